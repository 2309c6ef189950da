#pragma once
// Argument checks, layouts and output allocation of the cross-entropy ops, shared by the
// CPU and CUDA registrations (the Triton launchers and fake kernels in Python follow the
// same rules: fastreg/ops/cross_entropy.py).
//
// The logits are a 3-D view (N, C, S): class dim 1, S positions per sample ((N, C) inputs
// have S = 1). A kernel reads one of two layouts in place:
//   rows     classes contiguous (stride(1) == 1): (N, C) rows, channels-last (N, C, d...)
//   columns  positions contiguous (stride(2) == 1, S > 1): contiguous (N, C, d...), read a
//            block of positions at a time, each position a lane
// Anything else is copied to contiguous first (one extra pass over the logits).
// The gradient is dense in the layout read: rows -> (N, S, C) memory order, columns ->
// contiguous (N, C, S).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "fastreg/cross_entropy.h"

namespace fastreg {

inline at::ScalarType cross_entropy_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool reads_rows(const at::Tensor& x) {
  const int64_t C = x.size(1), S = x.size(2);
  return (S == 1 && (C <= 1 || x.stride(1) == 1)) || (S > 1 && C > 1 && x.stride(1) == 1);
}

inline bool reads_columns(const at::Tensor& x) {
  return !reads_rows(x) && x.size(2) > 1 && x.stride(2) == 1;
}

// x itself where a kernel reads it in place, else a contiguous copy.
inline at::Tensor readable_logits(const at::Tensor& x) {
  return reads_rows(x) || reads_columns(x) ? x : x.contiguous();
}

// The gradient of x (a readable layout), dense in that layout.
inline at::Tensor gradient_like(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  if (reads_rows(x) && S > 1) return at::empty({N, S, C}, x.options()).permute({0, 2, 1});
  return at::empty({N, C, S}, x.options());
}

inline void check_cross_entropy_args(const char* op, const at::Tensor& x, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, int64_t reduction) {
  TORCH_CHECK(x.dim() == 3, "fastreg::", op, ": 'input' must be 3-D (N, C, S), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::", op, ": expected floating-point logits, got ",
              x.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 2 && target.size(0) == x.size(0) &&
                  target.size(1) == x.size(2) && target.device() == x.device(),
              "fastreg::", op, ": 'target' must be int64 of shape (N, S) = (", x.size(0), ", ", x.size(2),
              ") on the logits' device, got ", target.scalar_type(), " ", target.sizes());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(1) && weight->device() == x.device() &&
                    weight->scalar_type() == x.scalar_type(),
                "fastreg::", op, ": 'weight' must be 1-D with C = ", x.size(1),
                " elements of the logits' dtype and device");
  }
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
              "fastreg::", op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// (loss, z_term) outputs of a reduction over N x S rows: 0-dim, or (N, S) for none.
inline std::tuple<at::Tensor, at::Tensor> loss_outputs(const at::Tensor& x, int64_t reduction) {
  if (reduction == kReductionNone) {
    return {at::empty({x.size(0), x.size(2)}, x.options()), at::empty({x.size(0), x.size(2)}, x.options())};
  }
  return {at::empty({}, x.options()), at::empty({}, x.options())};
}

}  // namespace fastreg
