// Autograd of the noise ops (gaussian_noise, alpha_dropout), for the C++ ops and their
// Triton twins alike. Saved for backward: the seed tensor (one int64) and the scalars; the
// noise is regenerated from the seed, never stored.
#include <torch/library.h>

#include "graph_node.h"
#include "op_handle.h"

namespace fastreg {
namespace {

using GaussianNoiseSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, bool, int64_t);
using AlphaDropoutSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, double, double,
                                         int64_t, int64_t);

constexpr char kGaussianNoise[] = "fastreg::gaussian_noise";
constexpr char kGaussianNoiseTriton[] = "fastreg::gaussian_noise_triton";
constexpr char kAlphaDropout[] = "fastreg::alpha_dropout";
constexpr char kAlphaDropoutTriton[] = "fastreg::alpha_dropout_triton";

// The backward node of gaussian_noise: the gradient to x.
template <const char* op_name>
struct GaussianNoiseBackward final : Node {
  SavedVariable seed;  // multiplicative noise only
  double std = 0.0;
  bool multiplicative = false;
  int64_t offset = 0;

  std::string name() const override { return "GaussianNoiseBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    seed.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    at::Tensor grad_x = grads[0];
    if (multiplicative && grad_x.defined()) {
      // d(x * (1 + std * n))/dx = 1 + std * n: the forward op on the gradient, n regenerated
      // (through autograd: the double backward is this op again)
      grad_x = op_handle<GaussianNoiseSignature, op_name>().call(grad_x, seed.unpack(), std, true, offset);
    }  // additive: d(x + std * n)/dx = 1
    return {grad_x};
  }
};

// The backward node of alpha_dropout: the gradient to x.
template <const char* op_name>
struct AlphaDropoutBackward final : Node {
  SavedVariable seed;
  double p = 0.0, scale = 1.0;
  int64_t offset = 0, inner = 1;

  std::string name() const override { return "AlphaDropoutBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    seed.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {at::Tensor()};
    // d(out)/dx = keep ? scale : 0: the forward op on the gradient without the shifts
    return {op_handle<AlphaDropoutSignature, op_name>().call(grads[0], seed.unpack(), p, scale, 0.0, 0.0, offset,
                                                             inner)};
  }
};

template <const char* op_name>
at::Tensor gaussian_noise_autograd(const at::Tensor& x, const at::Tensor& seed, double std, bool multiplicative,
                                   int64_t offset) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op_handle<GaussianNoiseSignature, op_name>().call(x, seed, std, multiplicative, offset);
  }
  const std::optional<at::Tensor> x_ = x;
  if (!records_graph(op_name, {&x_})) return out;
  auto node = make_node<GaussianNoiseBackward<op_name>>(x);
  record_output(out, node);
  if (multiplicative) node->seed = SavedVariable(seed, false);
  node->std = std;
  node->multiplicative = multiplicative;
  node->offset = offset;
  return out;
}

template <const char* op_name>
at::Tensor alpha_dropout_autograd(const at::Tensor& x, const at::Tensor& seed, double p, double scale,
                                  double keep_shift, double drop_shift, int64_t offset, int64_t inner) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op_handle<AlphaDropoutSignature, op_name>().call(x, seed, p, scale, keep_shift, drop_shift, offset, inner);
  }
  const std::optional<at::Tensor> x_ = x;
  if (!records_graph(op_name, {&x_})) return out;
  auto node = make_node<AlphaDropoutBackward<op_name>>(x);
  record_output(out, node);
  node->seed = SavedVariable(seed, false);
  node->p = p;
  node->scale = scale;
  node->offset = offset;
  node->inner = inner;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("gaussian_noise", &gaussian_noise_autograd<kGaussianNoise>);
  m.impl("gaussian_noise_triton", &gaussian_noise_autograd<kGaussianNoiseTriton>);
  m.impl("alpha_dropout", &alpha_dropout_autograd<kAlphaDropout>);
  m.impl("alpha_dropout_triton", &alpha_dropout_autograd<kAlphaDropoutTriton>);
}

}  // namespace fastreg
