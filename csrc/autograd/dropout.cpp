// Autograd of dropout (and its bias / residual fused forms), for the C++ op and its
// Triton twin alike: backward is the same op applied to the incoming gradient with the
// forward's seed, so the mask is regenerated, never stored.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using DropoutSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t,
                                    const OptionalTensor&, const OptionalTensor&);

constexpr char kDropout[] = "fastreg::dropout";
constexpr char kDropoutTriton[] = "fastreg::dropout_triton";

template <const char* op_name>
struct DropoutFunction : torch::autograd::Function<DropoutFunction<op_name>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double p,
                            int64_t offset, int64_t inner, const OptionalTensor& bias,
                            const OptionalTensor& residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["inner"] = inner;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    return op_handle<DropoutSignature, op_name>().call(x, seed, p, offset, inner, bias, residual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const at::Tensor seed = ctx->get_saved_variables()[0];
    // d(out)/dx = mask * scale: the forward op on the gradient, bias and residual left out
    // (through autograd: the double backward is this op again)
    at::Tensor grad_x = op_handle<DropoutSignature, op_name>().call(
        grad_out, seed, ctx->saved_data["p"].toDouble(), ctx->saved_data["offset"].toInt(),
        ctx->saved_data["inner"].toInt(), std::nullopt, std::nullopt);
    at::Tensor grad_bias;
    // needs_input_grad counts the tensor inputs given: x, seed, then bias
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      // summed over rows in float32 (float64 for float64) by torch's deterministic sum
      const auto rows = grad_x.reshape({-1, grad_x.size(-1)});
      grad_bias = rows.sum(0, false, accumulate_type(grad_x.scalar_type())).to(grad_x.scalar_type());
    }
    at::Tensor grad_residual = ctx->saved_data["has_residual"].toBool() ? grad_out : at::Tensor();
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_bias, grad_residual};
  }
};

template <const char* op_name>
at::Tensor dropout_autograd(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner,
                            const OptionalTensor& bias, const OptionalTensor& residual) {
  const OptionalTensor x_ = x;
  if (!records_graph({&x_, &bias, &residual})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op_handle<DropoutSignature, op_name>().call(x, seed, p, offset, inner, bias, residual);
  }
  return DropoutFunction<op_name>::apply(x, seed, p, offset, inner, bias, residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("dropout", &dropout_autograd<kDropout>);
  m.impl("dropout_triton", &dropout_autograd<kDropoutTriton>);
}

}  // namespace fastreg
