#pragma once
// The dropout ops' argument checks (the CPU and CUDA registrations reject bad input with
// the same messages), and the kernel parameters both fill from the same tensors.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "fastreg/macros.h"
#include "fastreg/philox.h"

namespace fastreg {

inline void check_dropout_args(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset,
                               int64_t inner, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fastreg::dropout: expected a floating-point 'x', got ", x.scalar_type());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastreg::dropout: 'seed' must be an int64 tensor with one element");
  TORCH_CHECK(seed.device() == x.device(), "fastreg::dropout: 'seed' must be on x's device (",
              x.device(), "), got ", seed.device());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
  TORCH_CHECK(offset >= 0 && offset % 4 == 0,
              "fastreg::dropout: 'offset' must be a non-negative multiple of 4, got ", offset);
  TORCH_CHECK(inner >= 1, "fastreg::dropout: 'inner' must be >= 1, got ", inner);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && x.dim() >= 1 && bias->size(0) == x.size(-1),
                "fastreg::dropout: 'bias' must be 1-D of size x.size(-1)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "fastreg::dropout: 'bias' must have x's dtype and device");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "fastreg::dropout: 'residual' must have x's shape, dtype and device");
  }
}

// What a dropout kernel reads: out = residual + (x + bias[i % bias_numel]) * keep / (1 - p)
// over numel contiguous elements, element i keeping with the word at stream position
// offset + i / inner.
template <typename scalar_t>
struct DropoutParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* bias;  // (bias_numel,); nullptr: none
  const scalar_t* residual;  // like x; nullptr: none
  scalar_t* out;  // like x; may be x (in place)
  const int64_t* seed;  // one element on x's device: a CPU kernel reads it on the host, a CUDA one on the GPU
  int64_t numel, bias_numel, offset, inner;
  uint64_t threshold;
  acc_t scale;
};

// x, out: contiguous; bias, residual: contiguous or undefined.
template <typename scalar_t>
DropoutParams<scalar_t> dropout_params(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset,
                                       int64_t inner, const at::Tensor& bias, const at::Tensor& residual,
                                       at::Tensor& out) {
  DropoutParams<scalar_t> params;
  params.x = x.const_data_ptr<scalar_t>();
  params.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  params.residual = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  params.out = out.mutable_data_ptr<scalar_t>();
  params.seed = seed.const_data_ptr<int64_t>();
  params.numel = x.numel();
  params.bias_numel = bias.defined() ? bias.numel() : 1;
  params.offset = offset;
  params.inner = inner;
  params.threshold = drop_threshold(p);
  params.scale = static_cast<typename DropoutParams<scalar_t>::acc_t>(keep_scale(p));
  return params;
}

// out[i] = residual + (x + bias) * multiplier, in the order every backend uses.
template <typename scalar_t, typename acc_t>
FASTREG_HOST_DEVICE scalar_t dropout_combine(const DropoutParams<scalar_t>& p, int64_t i, scalar_t x,
                                             acc_t multiplier) {
  acc_t v = static_cast<acc_t>(x);
  if (p.bias) v = v + static_cast<acc_t>(p.bias[i % p.bias_numel]);
  v = v * multiplier;
  if (p.residual) v = static_cast<acc_t>(p.residual[i]) + v;
  return static_cast<scalar_t>(v);
}

}  // namespace fastreg
