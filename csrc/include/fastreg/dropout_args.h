#pragma once
// Argument checks of the dropout ops, shared by the CPU and CUDA registrations so both
// reject bad input with the same messages.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

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

}  // namespace fastreg
