#pragma once
// Argument checks of the noise ops (gaussian_noise, alpha_dropout) and of drop_block,
// shared by the CPU and CUDA registrations so both reject bad input with the same messages.
#include <ATen/core/Tensor.h>

namespace fastreg {

inline void check_seeded_input(const at::Tensor& x, const at::Tensor& seed, const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::", op, ": expected a floating-point 'x', got ",
              x.scalar_type());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "fastreg::", op,
              ": 'seed' must be an int64 tensor with one element");
  TORCH_CHECK(seed.device() == x.device(), "fastreg::", op, ": 'seed' must be on x's device (", x.device(),
              "), got ", seed.device());
}

inline void check_offset(int64_t offset, const char* op) {
  TORCH_CHECK(offset >= 0 && offset % 4 == 0, "fastreg::", op,
              ": 'offset' must be a non-negative multiple of 4, got ", offset);
}

inline void check_gaussian_noise_args(const at::Tensor& x, const at::Tensor& seed, double std, int64_t offset) {
  check_seeded_input(x, seed, "gaussian_noise");
  TORCH_CHECK(std >= 0.0, "fastreg::gaussian_noise: 'std' must be >= 0, got ", std);
  check_offset(offset, "gaussian_noise");
}

inline void check_alpha_dropout_args(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset,
                                     int64_t inner) {
  check_seeded_input(x, seed, "alpha_dropout");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
  check_offset(offset, "alpha_dropout");
  TORCH_CHECK(inner >= 1, "fastreg::alpha_dropout: 'inner' must be >= 1, got ", inner);
}

}  // namespace fastreg
