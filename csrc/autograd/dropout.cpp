// Autograd of dropout (and its bias / residual fused forms), for the C++ op and its
// Triton twin alike: backward is the same op applied to the incoming gradient with the
// forward's seed, so the mask is regenerated, never stored.
#include <torch/library.h>

#include "graph_node.h"
#include "op_handle.h"

namespace fastreg {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using DropoutSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t,
                                    const OptionalTensor&, const OptionalTensor&);

constexpr char kDropout[] = "fastreg::dropout";
constexpr char kDropoutTriton[] = "fastreg::dropout_triton";

template <const char* op_name>
const c10::TypedOperatorHandle<DropoutSignature>& dropout_op() {
  return op_handle<DropoutSignature, op_name>();
}

// The backward node of dropout: gradients to x, bias and residual (in that order).
template <const char* op_name>
struct DropoutBackward final : Node {
  SavedVariable seed;
  double p = 0.0;
  int64_t offset = 0, inner = 1;
  bool has_bias = false, has_residual = false;

  std::string name() const override { return "DropoutBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    seed.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    // d(out)/dx = mask * scale: the forward op on the gradient, bias and residual left out
    // (through autograd: the double backward is this op again)
    at::Tensor grad_x = dropout_op<op_name>().call(grad_out, seed.unpack(), p, offset, inner, std::nullopt,
                                                   std::nullopt);
    at::Tensor grad_bias;
    if (has_bias && task_should_compute_output(1)) {
      // summed over rows in float32 (float64 for float64) by torch's deterministic sum
      const auto rows = grad_x.reshape({-1, grad_x.size(-1)});
      grad_bias = rows.sum(0, false, accumulate_type(grad_x.scalar_type())).to(grad_x.scalar_type());
    }
    return {grad_x, grad_bias, has_residual ? grad_out : at::Tensor()};
  }
};

template <const char* op_name>
at::Tensor dropout_autograd(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner,
                            const OptionalTensor& bias, const OptionalTensor& residual) {
  const OptionalTensor x_ = x;
  const bool record = records_graph(op_name, {&x_, &bias, &residual});
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = dropout_op<op_name>().call(x, seed, p, offset, inner, bias, residual);
  }
  if (!record) return out;
  auto node = make_node<DropoutBackward<op_name>>(x, or_undefined(bias), or_undefined(residual));
  record_output(out, node);
  node->seed = SavedVariable(seed, false);
  node->p = p;
  node->offset = offset;
  node->inner = inner;
  node->has_bias = bias.has_value();
  node->has_residual = residual.has_value();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("dropout", &dropout_autograd<kDropout>);
  m.impl("dropout_triton", &dropout_autograd<kDropoutTriton>);
}

}  // namespace fastreg
