#pragma once
// GroupNorm (gn_fwd / gn_bwd of csrc/ops.cpp), shared by the CPU and CUDA kernels: argument
// checks, the layout the kernels walk, output allocation, and the per-group formulas.
//
// x is (N, C, *spatial), taken as (N, C, S) (as_ncs below): G groups of D = C / G channels,
// M = D * S values per (n, g):
//   forward   z = (x - mean) * rstd * w[c] + b[c];  y = z, or silu(z) = z / (1 + exp(-z))
//   backward  g = dy, or dy * silu'(z) with z recomputed from x; per (n, c)
//               sum_g[n, c] = sum_s g,   sum_gxhat[n, c] = rstd * sum_s g * (x - mean)
//             per (n, g) A = sum_c w[c] sum_g[n, c], B = sum_c w[c] sum_gxhat[n, c], and
//               dx = rstd * w[c] * g + k_x * (x - mean) + k_one,
//               k_x = -rstd^2 * B / M, k_one = -rstd * A / M
//             dweight = sum_n sum_gxhat[n, :], dbias = sum_n sum_g[n, :] (in order over n)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "fastreg/macros.h"
#include "fastreg/norm_args.h"
#include "fastreg/welford.h"

namespace fastreg {

// silu(z) and silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z), from e = exp(-z) (the
// caller's exp: a vectorizable one on CPU, expf on CUDA).
template <typename T>
FASTREG_HOST_DEVICE T silu_from_exp(T z, T exp_minus_z) {
  return z / (T(1) + exp_minus_z);
}

template <typename T>
FASTREG_HOST_DEVICE T silu_grad_from_exp(T z, T exp_minus_z) {
  const T s = T(1) / (T(1) + exp_minus_z);
  return s * (T(1) + z * (T(1) - s));
}

template <typename T>
struct GroupDxCoefs {
  T k_x, k_one;
};

// sum_wg = A, sum_wgxhat = B above, over `count` = M values.
template <typename T>
FASTREG_HOST_DEVICE GroupDxCoefs<T> group_dx_coefs(T sum_wg, T sum_wgxhat, T rstd, T count) {
  GroupDxCoefs<T> k;
  k.k_x = -rstd * rstd * sum_wgxhat / count;
  k.k_one = -rstd * sum_wg / count;
  return k;
}

inline void check_gn_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() >= 2, "fastreg::", op, ": 'x' must be (N, C, *), got a ", x.dim(), "-D tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::", op, ": expected a floating-point 'x'");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0,
              "Expected number of channels in input to be divisible by num_groups, but got input of shape ",
              x.sizes(), " and num_groups=", groups);
  for (const auto* param : {&weight, &bias}) {
    if (param->has_value()) {
      TORCH_CHECK((*param)->numel() == x.size(1) && (*param)->device() == x.device() &&
                      at::isFloatingType((*param)->scalar_type()),
                  "fastreg::", op, ": 'weight' and 'bias' must have C = ", x.size(1),
                  " floating-point elements on x's device");
    }
  }
}

// x in a layout the kernels walk: dense, with S contiguous (contiguous inputs: a group is D
// rows of S values) or C contiguous (channels-last: a sample is S rows of C values). Any
// other input is copied to contiguous first.
struct GnInput {
  at::Tensor x;
  bool channels_last;
  int64_t N, C, S, G, D;
};

// x (N, C, *spatial) as (N, C, S): a view in either memory format (a copy only where the
// spatial dims cannot be merged).
inline at::Tensor as_ncs(const at::Tensor& x) {
  if (x.dim() == 3) return x;
  return x.dim() == 2 ? x.unsqueeze(2) : x.flatten(2);
}

inline GnInput gn_input(const at::Tensor& x_nd, int64_t groups) {
  const at::Tensor x_in = as_ncs(x_nd);
  const int64_t C = x_in.size(1), S = x_in.size(2);
  const bool c_fast = x_in.stride(1) == 1 && C > 1 && (S == 1 || x_in.stride(2) != 1);
  const bool s_fast = x_in.stride(2) == 1 || S == 1;
  const bool walkable = x_in.is_non_overlapping_and_dense() && (c_fast || s_fast);
  GnInput in;
  in.x = walkable ? x_in : x_in.contiguous();
  in.channels_last = walkable && c_fast;
  in.N = x_in.size(0);
  in.C = C;
  in.S = S;
  in.G = groups;
  in.D = C / groups;
  return in;
}

// out (N, C, S), computed in the layout of gn_input's x, with x_nd's shape, in the layout
// empty_like(x_nd) has.
inline at::Tensor in_layout_of(const at::Tensor& out, const at::Tensor& x_nd) {
  const at::Tensor x_in = as_ncs(x_nd);
  if (x_in.is_non_overlapping_and_dense() && out.strides() != x_in.strides()) {
    return at::empty_like(x_nd).copy_(out.view(x_nd.sizes()));
  }
  return out.view(x_nd.sizes());
}

// dy (x_nd's shape) as (N, C, S) in x's dtype and strides (x from gn_input: dense), so one
// set of strides serves both.
inline at::Tensor dy_like(const at::Tensor& dy_nd, const at::Tensor& x) {
  TORCH_CHECK(dy_nd.dim() >= 2 && dy_nd.numel() == x.numel(), "fastreg::gn_bwd: 'dy' must have x's shape");
  const at::Tensor dy = as_ncs(dy_nd);
  TORCH_CHECK(dy.sizes() == x.sizes(), "fastreg::gn_bwd: 'dy' must have x's shape");
  if (dy.scalar_type() == x.scalar_type() && dy.strides() == x.strides()) return dy;
  return at::empty_like(x).copy_(dy);
}

inline void check_gn_stats(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->numel() == x.size(0) * groups && t->scalar_type() == acc_dtype(x) && t->device() == x.device(),
                "fastreg::gn_bwd: 'mean' and 'rstd' must be (N, groups), float32 (float64 for float64 'x')");
  }
}

// What a GroupNorm kernel reads and writes, over gn_input's x (N, C, S): x, y / dx and dy
// share x's strides; weight and bias from param_as_acc.
template <typename scalar_t>
struct GnParams {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* dy;  // backward
  scalar_t* out;  // y, or dx
  const acc_t* weight;  // nullptr: none
  const acc_t* bias;  // nullptr: none
  acc_t* mean_out;  // forward: (N, G)
  acc_t* rstd_out;
  const acc_t* mean;  // backward: (N, G)
  const acc_t* rstd;
  acc_t* sum_g;  // backward partials (N, C)
  acc_t* sum_gxhat;
  int64_t N, C, S, G, D, stride_n, stride_c, stride_s;
  double eps;
  bool silu, channels_last;
};

template <typename scalar_t>
GnParams<scalar_t> gn_params(const GnInput& in, const at::Tensor& weight, const at::Tensor& bias, bool silu) {
  using acc_t = acc_type<scalar_t>;
  GnParams<scalar_t> p{};
  p.x = in.x.const_data_ptr<scalar_t>();
  p.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  p.bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  p.N = in.N;
  p.C = in.C;
  p.S = in.S;
  p.G = in.G;
  p.D = in.D;
  p.stride_n = in.x.stride(0);
  p.stride_c = in.x.stride(1);
  p.stride_s = in.x.stride(2);
  p.silu = silu;
  p.channels_last = in.channels_last;
  return p;
}

template <typename scalar_t>
GnParams<scalar_t> gn_fwd_params(const GnInput& in, const at::Tensor& weight, const at::Tensor& bias, bool silu,
                                 double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = acc_type<scalar_t>;
  GnParams<scalar_t> p = gn_params<scalar_t>(in, weight, bias, silu);
  p.out = y.mutable_data_ptr<scalar_t>();
  p.mean_out = mean.mutable_data_ptr<acc_t>();
  p.rstd_out = rstd.mutable_data_ptr<acc_t>();
  p.eps = eps;
  return p;
}

template <typename scalar_t>
GnParams<scalar_t> gn_bwd_params(const GnInput& in, const at::Tensor& weight, const at::Tensor& bias, bool silu,
                                 const at::Tensor& dy, at::Tensor& dx, const at::Tensor& mean, const at::Tensor& rstd,
                                 at::Tensor& sum_g, at::Tensor& sum_gxhat) {
  using acc_t = acc_type<scalar_t>;
  GnParams<scalar_t> p = gn_params<scalar_t>(in, weight, bias, silu);
  p.dy = dy.const_data_ptr<scalar_t>();
  p.out = dx.mutable_data_ptr<scalar_t>();
  p.mean = mean.const_data_ptr<acc_t>();
  p.rstd = rstd.const_data_ptr<acc_t>();
  p.sum_g = sum_g.mutable_data_ptr<acc_t>();
  p.sum_gxhat = sum_gxhat.mutable_data_ptr<acc_t>();
  return p;
}

}  // namespace fastreg
