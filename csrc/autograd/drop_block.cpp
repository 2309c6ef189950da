// Autograd of DropBlock, for the C++ ops and their Triton twins alike. Saved for backward:
// the bit-packed keep mask (1 bit per element) and the float64 scale that drop_block
// returned; backward is drop_block_apply on the gradient, laid out as forward's output
// (the mask's bits follow that memory order).
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using DropBlockSignature = Tensors3(const at::Tensor&, const at::Tensor&, double, int64_t, double, bool);
using ApplySignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

constexpr char kDropBlock[] = "fastreg::drop_block";
constexpr char kDropBlockTriton[] = "fastreg::drop_block_triton";
constexpr char kApply[] = "fastreg::drop_block_apply";
constexpr char kApplyTriton[] = "fastreg::drop_block_apply_triton";

// The gradient in the memory layout (strides) of the tensor the mask describes.
at::Tensor in_layout(const at::Tensor& grad, AutogradContext* ctx) {
  const std::vector<int64_t> strides = ctx->saved_data["strides"].toIntVector();
  if (grad.strides().vec() == strides) return grad;
  return at::empty_strided(grad.sizes(), strides, grad.options()).copy_(grad);
}

void save_mask(AutogradContext* ctx, const at::Tensor& mask, const at::Tensor& scale, const at::Tensor& laid_out) {
  ctx->save_for_backward({mask, scale});
  ctx->saved_data["strides"] = laid_out.strides().vec();
}

// d(x * keep * scale)/dx = keep * scale: drop_block_apply on the gradient
template <const char* apply_name>
at::Tensor apply_to_gradient(AutogradContext* ctx, const at::Tensor& grad) {
  const auto saved = ctx->get_saved_variables();
  return op_handle<ApplySignature, apply_name>().call(in_layout(grad, ctx), saved[0], saved[1]);
}

template <const char* fwd_name, const char* apply_name>
struct DropBlockFunction : torch::autograd::Function<DropBlockFunction<fwd_name, apply_name>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double gamma,
                               int64_t block_size, double eps, bool shared_mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mask, scale] =
        op_handle<DropBlockSignature, fwd_name>().call(x, seed, gamma, block_size, eps, shared_mask);
    save_mask(ctx, mask, scale, y);
    ctx->mark_non_differentiable({mask, scale});
    return {y, mask, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {apply_to_gradient<apply_name>(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// drop_block_apply is linear in x: its backward is itself (double backward of drop_block)
template <const char* apply_name>
struct DropBlockApplyFunction : torch::autograd::Function<DropBlockApplyFunction<apply_name>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask,
                            const at::Tensor& scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor y = op_handle<ApplySignature, apply_name>().call(x, mask, scale);
    save_mask(ctx, mask, scale, y);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {apply_to_gradient<apply_name>(ctx, grads[0]), at::Tensor(), at::Tensor()};
  }
};

template <const char* fwd_name, const char* apply_name>
Tensors3 drop_block_autograd(const at::Tensor& x, const at::Tensor& seed, double gamma, int64_t block_size,
                             double eps, bool shared_mask) {
  auto out = DropBlockFunction<fwd_name, apply_name>::apply(x, seed, gamma, block_size, eps, shared_mask);
  return {out[0], out[1], out[2]};
}

template <const char* apply_name>
at::Tensor drop_block_apply_autograd(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale) {
  return DropBlockApplyFunction<apply_name>::apply(x, mask, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("drop_block", &drop_block_autograd<kDropBlock, kApply>);
  m.impl("drop_block_triton", &drop_block_autograd<kDropBlockTriton, kApplyTriton>);
  m.impl("drop_block_apply", &drop_block_apply_autograd<kApply>);
  m.impl("drop_block_apply_triton", &drop_block_apply_autograd<kApplyTriton>);
}

}  // namespace fastreg
