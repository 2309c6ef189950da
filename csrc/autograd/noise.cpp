// Autograd of the noise ops (gaussian_noise, alpha_dropout), for the C++ ops and their
// Triton twins alike. Saved for backward: the seed tensor (one int64) and the scalars; the
// noise is regenerated from the seed, never stored.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using GaussianNoiseSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, bool, int64_t);
using AlphaDropoutSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, double, double,
                                         int64_t, int64_t);

constexpr char kGaussianNoise[] = "fastreg::gaussian_noise";
constexpr char kGaussianNoiseTriton[] = "fastreg::gaussian_noise_triton";
constexpr char kAlphaDropout[] = "fastreg::alpha_dropout";
constexpr char kAlphaDropoutTriton[] = "fastreg::alpha_dropout_triton";

template <const char* op_name>
struct GaussianNoiseFunction : torch::autograd::Function<GaussianNoiseFunction<op_name>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double std,
                            bool multiplicative, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (multiplicative) ctx->save_for_backward({seed});
    ctx->saved_data["std"] = std;
    ctx->saved_data["multiplicative"] = multiplicative;
    ctx->saved_data["offset"] = offset;
    return op_handle<GaussianNoiseSignature, op_name>().call(x, seed, std, multiplicative, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_x = grads[0];
    if (ctx->saved_data["multiplicative"].toBool()) {
      // d(x * (1 + std * n))/dx = 1 + std * n: the forward op on the gradient, n regenerated
      grad_x = op_handle<GaussianNoiseSignature, op_name>().call(
          grad_x, ctx->get_saved_variables()[0], ctx->saved_data["std"].toDouble(), true,
          ctx->saved_data["offset"].toInt());
    }  // additive: d(x + std * n)/dx = 1
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <const char* op_name>
struct AlphaDropoutFunction : torch::autograd::Function<AlphaDropoutFunction<op_name>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double p,
                            double scale, double keep_shift, double drop_shift, int64_t offset, int64_t inner) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["inner"] = inner;
    return op_handle<AlphaDropoutSignature, op_name>().call(x, seed, p, scale, keep_shift, drop_shift, offset,
                                                             inner);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // d(out)/dx = keep ? scale : 0: the forward op on the gradient without the shifts
    at::Tensor grad_x = op_handle<AlphaDropoutSignature, op_name>().call(
        grads[0], ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble(),
        ctx->saved_data["scale"].toDouble(), 0.0, 0.0, ctx->saved_data["offset"].toInt(),
        ctx->saved_data["inner"].toInt());
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <const char* op_name>
at::Tensor gaussian_noise_autograd(const at::Tensor& x, const at::Tensor& seed, double std, bool multiplicative,
                                   int64_t offset) {
  return GaussianNoiseFunction<op_name>::apply(x, seed, std, multiplicative, offset);
}

template <const char* op_name>
at::Tensor alpha_dropout_autograd(const at::Tensor& x, const at::Tensor& seed, double p, double scale,
                                  double keep_shift, double drop_shift, int64_t offset, int64_t inner) {
  return AlphaDropoutFunction<op_name>::apply(x, seed, p, scale, keep_shift, drop_shift, offset, inner);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("gaussian_noise", &gaussian_noise_autograd<kGaussianNoise>);
  m.impl("gaussian_noise_triton", &gaussian_noise_autograd<kGaussianNoiseTriton>);
  m.impl("alpha_dropout", &alpha_dropout_autograd<kAlphaDropout>);
  m.impl("alpha_dropout_triton", &alpha_dropout_autograd<kAlphaDropoutTriton>);
}

}  // namespace fastreg
