#pragma once
// The fused BatchNorm ops' layout and argument checks, and the four BatchNorm steps of csrc/ops.cpp, shared by the CPU and CUDA registrations:
// argument checks and the per-channel coefficients (C values, computed with ATen ops)
// here; the two device kernels, passed in, do the per-element work:
//   partial_sums(x, shift, dy or nullptr) -> (A, B) per channel: with d = x - shift[c],
//       A = sum d, B = sum d * d; or with dy, A = sum dy, B = sum dy * d (deterministic)
//   affine(x, mean, coef_x, coef_one, dy or nullptr, coef_dy or nullptr) -> out, in x's
//       dtype and strides: (x - mean[c]) * coef_x[c] + coef_one[c] (+ dy * coef_dy[c])
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <optional>

#include "fastreg/norm_args.h"

namespace fastreg {

// x (N, C, *spatial) addressed as (N, C, S) through three strides, without a view
// tensor: the spatial dims must collapse into one stride (any dense layout does; size-1
// dims are skipped).
struct Ncs {
  int64_t N, C, S;
  int64_t sn, sc, ss;
};

inline std::optional<Ncs> ncs_of(const at::Tensor& x) {
  Ncs v{x.size(0), x.size(1), 1, x.stride(0), x.stride(1), 1};
  int64_t inner_stride = -1, inner_size = 1;  // the last spatial dim of size > 1 seen so far
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    const int64_t size = x.size(d);
    v.S *= size;
    if (size == 1) continue;
    if (inner_stride < 0) {
      v.ss = x.stride(d);
    } else if (x.stride(d) != inner_stride * inner_size) {
      return std::nullopt;
    }
    inner_stride = x.stride(d);
    inner_size = size;
  }
  return v;
}

// x itself where its spatial dims collapse, else a contiguous copy (which does).
inline at::Tensor collapsible(const at::Tensor& x) { return ncs_of(x).has_value() ? x : x.contiguous(); }

// bn_fwd's checks (the Python API has made torch's; these guard direct calls).
inline void check_bn_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var, bool training,
                              const std::optional<at::Tensor>& batches_tracked) {
  TORCH_CHECK(x.dim() >= 2, "fastreg::bn_fwd: 'x' must be (N, C, *), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::bn_fwd: expected a floating-point 'x'");
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->numel() == x.size(1) && (*t)->device() == x.device() &&
                      at::isFloatingType((*t)->scalar_type()),
                  "fastreg::bn_fwd: 'weight', 'bias' and the running statistics must have x.size(1) = ", x.size(1),
                  " floating-point elements on x's device");
    }
  }
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()),
              "fastreg::bn_fwd: eval needs the running statistics");
  if (batches_tracked.has_value()) {
    TORCH_CHECK(batches_tracked->numel() == 1 && batches_tracked->device() == x.device(),
                "fastreg::bn_fwd: 'batches_tracked' must be a scalar on x's device");
  }
}

inline void check_bn_bwd_args(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const at::Tensor& mean, const at::Tensor& invstd) {
  TORCH_CHECK(x.dim() >= 2 && at::isFloatingType(x.scalar_type()),
              "fastreg::bn_bwd: 'x' must be a floating-point (N, C, *) tensor");
  TORCH_CHECK(dy.sizes() == x.sizes(), "fastreg::bn_bwd: 'dy' must have x's shape");
  TORCH_CHECK(mean.numel() == x.size(1) && invstd.numel() == x.size(1) &&
                  (!weight.has_value() || weight->numel() == x.size(1)),
              "fastreg::bn_bwd: 'weight', 'mean' and 'invstd' must have x.size(1) elements");
}

// The dtype of dweight and dbias: weight's (x's without weight).
inline at::ScalarType bn_param_dtype(const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  return weight.has_value() ? weight->scalar_type() : x.scalar_type();
}

inline void check_ncs(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, "fastreg::bn: '", name, "' must be 3-D (N, C, S), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::bn: expected a floating-point '", name, "'");
}

template <typename PartialSums>
std::tuple<at::Tensor, at::Tensor> bn_stats_steps(const at::Tensor& x, PartialSums partial_sums) {
  check_ncs(x, "x");
  const int64_t count = x.size(0) * x.size(2);
  const auto acc = x.options().dtype(acc_dtype(x));
  // shifted by one value of each channel, so a large mean costs no precision
  const at::Tensor shift = count > 0 ? x.select(0, 0).select(1, 0).to(acc_dtype(x)) : at::zeros({x.size(1)}, acc);
  const auto [sum_d, sum_dd] = partial_sums(x, shift, nullptr);
  const double denominator = static_cast<double>(std::max<int64_t>(count, 1));
  const at::Tensor mean_d = sum_d / denominator;
  return {shift + mean_d, (sum_dd / denominator - mean_d * mean_d).clamp_min(0.0)};
}

template <typename Affine>
at::Tensor bn_apply_steps(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                          Affine affine) {
  check_ncs(x, "x");
  at::Tensor scale = (var.to(acc_dtype(x)) + eps).rsqrt();
  if (weight.has_value()) scale = scale * weight->to(acc_dtype(x));
  const at::Tensor shift = bias.has_value() ? bias->to(acc_dtype(x)) : at::zeros_like(scale);
  return affine(x, mean, scale, shift, nullptr, nullptr);
}

template <typename PartialSums>
std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_steps(const at::Tensor& dy_in, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& var, double eps,
                                                       PartialSums partial_sums) {
  check_ncs(x, "x");
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "fastreg::bn_bwd_reduce: 'dy' must have x's shape");
  const at::Tensor dy = dy_in.to(x.scalar_type());
  const auto [sum_dy, sum_dy_centered] = partial_sums(x, mean, &dy);
  return {sum_dy, sum_dy_centered * (var.to(acc_dtype(x)) + eps).rsqrt()};
}

template <typename Affine>
at::Tensor bn_bwd_apply_steps(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& var, const std::optional<at::Tensor>& weight, double eps,
                              const std::optional<at::Tensor>& sum_dy, const std::optional<at::Tensor>& sum_dy_xhat,
                              int64_t count, Affine affine) {
  check_ncs(x, "x");
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "fastreg::bn_bwd_apply: 'dy' must have x's shape");
  TORCH_CHECK(sum_dy.has_value() == sum_dy_xhat.has_value(), "fastreg::bn_bwd_apply: give both sums or neither");
  const at::Tensor dy = dy_in.to(x.scalar_type());
  const at::Tensor invstd = (var.to(acc_dtype(x)) + eps).rsqrt();
  const at::Tensor scale = weight.has_value() ? invstd * weight->to(acc_dtype(x)) : invstd;
  if (!sum_dy.has_value()) {  // fixed statistics: dx = dy * scale reads no x (a NaN in x stays out of dx)
    const at::Tensor dy_like_x = dy.strides() == x.strides() ? dy : at::empty_like(x).copy_(dy);
    return affine(dy_like_x, at::zeros_like(scale), scale, at::zeros_like(scale), nullptr, nullptr);
  }
  // batch statistics: the gradient through mean and var
  TORCH_CHECK(count > 0, "fastreg::bn_bwd_apply: 'count' must be positive with the sums");
  const at::Tensor coef_x = -scale * invstd * sum_dy_xhat->to(acc_dtype(x)) / static_cast<double>(count);
  const at::Tensor coef_one = -scale * sum_dy->to(acc_dtype(x)) / static_cast<double>(count);
  return affine(x, mean, coef_x, coef_one, &dy, &scale);
}

}  // namespace fastreg
