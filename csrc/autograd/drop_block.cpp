// Autograd of DropBlock, for the C++ ops and their Triton twins alike. Saved for backward:
// the bit-packed keep mask (1 bit per element) and the float64 scale that drop_block
// returned; backward is drop_block_apply on the gradient, laid out as forward's output
// (the mask's bits follow that memory order).
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "graph_node.h"
#include "op_handle.h"

namespace fastreg {
namespace {

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using DropBlockSignature = Tensors3(const at::Tensor&, const at::Tensor&, double, int64_t, double, bool);
using ApplySignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

constexpr char kDropBlock[] = "fastreg::drop_block";
constexpr char kDropBlockTriton[] = "fastreg::drop_block_triton";
constexpr char kApply[] = "fastreg::drop_block_apply";
constexpr char kApplyTriton[] = "fastreg::drop_block_apply_triton";

// The backward node of drop_block and of drop_block_apply, the gradient to x:
// d(x * keep * scale)/dx = keep * scale, drop_block_apply on the gradient (through
// autograd: drop_block_apply is linear in x, so the double backward is itself).
template <const char* apply_name>
struct DropBlockBackward final : Node {
  SavedVariable mask, scale;
  std::vector<int64_t> strides;  // of the tensor the mask describes

  std::string name() const override { return "DropBlockBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    mask.reset_data();
    scale.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor()};
    // the gradient in the memory layout (strides) the mask's bits follow
    const at::Tensor laid_out = grad.strides().vec() == strides
                                    ? grad
                                    : at::empty_strided(grad.sizes(), strides, grad.options()).copy_(grad);
    return {op_handle<ApplySignature, apply_name>().call(laid_out, mask.unpack(), scale.unpack())};
  }
};

// Records out = x * keep * scale (the op `op_name`) for backward when x requires grad.
template <const char* apply_name>
void record(const char* op_name, const at::Tensor& x, const at::Tensor& out, const at::Tensor& mask,
            const at::Tensor& scale) {
  const std::optional<at::Tensor> x_ = x;
  if (!records_graph(op_name, {&x_})) return;
  auto node = make_node<DropBlockBackward<apply_name>>(x);
  record_output(out, node);
  node->mask = SavedVariable(mask, false);
  node->scale = SavedVariable(scale, false);
  node->strides = out.strides().vec();
}

template <const char* fwd_name, const char* apply_name>
Tensors3 drop_block_autograd(const at::Tensor& x, const at::Tensor& seed, double gamma, int64_t block_size,
                             double eps, bool shared_mask) {
  Tensors3 out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op_handle<DropBlockSignature, fwd_name>().call(x, seed, gamma, block_size, eps, shared_mask);
  }
  const auto& [y, mask, scale] = out;  // mask and scale are not differentiable
  record<apply_name>(fwd_name, x, y, mask, scale);
  return out;
}

template <const char* apply_name>
at::Tensor drop_block_apply_autograd(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale) {
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    y = op_handle<ApplySignature, apply_name>().call(x, mask, scale);
  }
  record<apply_name>(apply_name, x, y, mask, scale);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("drop_block", &drop_block_autograd<kDropBlock, kApply>);
  m.impl("drop_block_triton", &drop_block_autograd<kDropBlockTriton, kApplyTriton>);
  m.impl("drop_block_apply", &drop_block_apply_autograd<kApply>);
  m.impl("drop_block_apply_triton", &drop_block_apply_autograd<kApplyTriton>);
}

}  // namespace fastreg
