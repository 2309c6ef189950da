// GroupNorm (+ SiLU) on CUDA tensors: gn_fwd and gn_bwd of csrc/ops.cpp; argument
// checks, layout choice and formulas shared with the CPU kernels in
// csrc/include/fastreg/gn_steps.h. One block per (sample, group):
//   forward   two passes for the statistics (mean of values shifted by the group's first,
//             then squared deviations), a third
//             writes y; the group's values are walked in memory order (c fastest for
//             channels-last, s fastest otherwise), so loads are coalesced in either layout.
//   backward  per channel of the group, the sums of g and g * (x - mean) over S (the
//             dweight / dbias partials, and the group's A, B), then dx in memory order.
//             dweight / dbias: the per-sample partials summed over N in order by
//             column_sums_kernel, in the parameters' dtypes (two launches in all).
// Block reductions are fixed trees in shared memory: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastreg/column_sums.cuh"
#include "fastreg/gn_steps.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

// Element i of group (n, g) in memory order: its channel and offset.
template <typename scalar_t>
__device__ __forceinline__ int64_t group_element(const GnParams<scalar_t>& p, int64_t n, int64_t g, int64_t i,
                                                 int64_t& c) {
  int64_t s;
  if (p.channels_last) {
    c = g * p.D + i % p.D;
    s = i / p.D;
  } else {
    c = g * p.D + i / p.S;
    s = i % p.S;
  }
  return n * p.stride_n + c * p.stride_c + s * p.stride_s;
}

// The sums of a and b over the block, in a fixed tree; every thread gets them.
template <typename acc_t>
__device__ __forceinline__ void block_sums(acc_t& a, acc_t& b, acc_t* shared_a, acc_t* shared_b) {
  shared_a[threadIdx.x] = a;
  shared_b[threadIdx.x] = b;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      shared_a[threadIdx.x] += shared_a[threadIdx.x + half];
      shared_b[threadIdx.x] += shared_b[threadIdx.x + half];
    }
    __syncthreads();
  }
  a = shared_a[0];
  b = shared_b[0];
  __syncthreads();  // before the arrays are reused
}

template <typename scalar_t>
__global__ void gn_fwd_kernel(GnParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shared_a[kThreads], shared_b[kThreads];
  const int64_t ng = blockIdx.x, n = ng / p.G, g = ng % p.G, M = p.D * p.S;
  int64_t c;
  // the mean of values shifted by the group's first: a large mean costs no precision
  const acc_t first = static_cast<acc_t>(p.x[group_element(p, n, g, 0, c)]);
  acc_t sum = 0, unused = 0;
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    sum += static_cast<acc_t>(p.x[group_element(p, n, g, i, c)]) - first;
  }
  block_sums(sum, unused, shared_a, shared_b);
  const acc_t mean = first + sum / static_cast<acc_t>(M);
  acc_t squares = 0;
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    const acc_t d = static_cast<acc_t>(p.x[group_element(p, n, g, i, c)]) - mean;
    squares += d * d;
  }
  block_sums(squares, unused, shared_a, shared_b);
  const acc_t rstd = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(squares) / M + p.eps));
  if (threadIdx.x == 0) {
    p.mean_out[ng] = mean;
    p.rstd_out[ng] = rstd;
  }
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    const int64_t offset = group_element(p, n, g, i, c);
    const acc_t scale = p.weight ? rstd * p.weight[c] : rstd, shift = p.bias ? p.bias[c] : acc_t(0);
    acc_t z = (static_cast<acc_t>(p.x[offset]) - mean) * scale + shift;
    if (p.silu) z = silu_from_exp(z, exp_of(-z));
    p.out[offset] = static_cast<scalar_t>(z);
  }
}

// The gradient reaching the pre-activation z = centered * scale + shift.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_pre_activation(acc_t dy, acc_t centered, acc_t scale, acc_t shift, bool silu) {
  if (!silu) return dy;
  const acc_t z = centered * scale + shift;
  return dy * silu_grad_from_exp(z, exp_of(-z));
}

template <typename scalar_t>
__global__ void gn_bwd_kernel(GnParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shared_a[kThreads], shared_b[kThreads];
  const int64_t ng = blockIdx.x, n = ng / p.G, g = ng % p.G, M = p.D * p.S;
  const acc_t mean = p.mean[ng], rstd = p.rstd[ng];
  acc_t sum_wg = 0, sum_wgxhat = 0;  // the same in every thread: they add broadcast sums
  for (int64_t j = 0; j < p.D; ++j) {
    const int64_t c = g * p.D + j;
    const acc_t w = p.weight ? p.weight[c] : acc_t(1), shift = p.bias ? p.bias[c] : acc_t(0);
    acc_t sum_g = 0, sum_gx = 0;
    for (int64_t s = threadIdx.x; s < p.S; s += kThreads) {
      const int64_t offset = n * p.stride_n + c * p.stride_c + s * p.stride_s;
      const acc_t centered = static_cast<acc_t>(p.x[offset]) - mean;
      const acc_t grad = grad_pre_activation(static_cast<acc_t>(p.dy[offset]), centered, rstd * w, shift, p.silu);
      sum_g += grad;
      sum_gx += grad * centered;
    }
    block_sums(sum_g, sum_gx, shared_a, shared_b);
    const acc_t sum_gxhat = sum_gx * rstd;
    if (threadIdx.x == 0) {
      p.sum_g[n * p.C + c] = sum_g;
      p.sum_gxhat[n * p.C + c] = sum_gxhat;
    }
    sum_wg += w * sum_g;
    sum_wgxhat += w * sum_gxhat;
  }
  const GroupDxCoefs<acc_t> k = group_dx_coefs(sum_wg, sum_wgxhat, rstd, static_cast<acc_t>(M));
  for (int64_t i = threadIdx.x; i < M; i += kThreads) {
    int64_t c;
    const int64_t offset = group_element(p, n, g, i, c);
    const acc_t w = p.weight ? p.weight[c] : acc_t(1), shift = p.bias ? p.bias[c] : acc_t(0);
    const acc_t centered = static_cast<acc_t>(p.x[offset]) - mean;
    const acc_t grad = grad_pre_activation(static_cast<acc_t>(p.dy[offset]), centered, rstd * w, shift, p.silu);
    p.out[offset] = static_cast<scalar_t>(grad * rstd * w + centered * k.k_x + k.k_one);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_fwd_cuda(const at::Tensor& x_in,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias, int64_t groups,
                                                           double eps, bool silu) {
  check_gn_args(x_in, weight, bias, groups, "gn_fwd");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GnInput in = gn_input(x_in, groups);
  const at::Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  at::Tensor y = at::empty_like(in.x);
  const auto stats = in.x.options().dtype(acc_dtype(in.x));
  // written by the kernel; zeros only where there is nothing to normalize
  const bool empty_input = in.x.numel() == 0;
  at::Tensor mean = empty_input ? at::zeros({in.N, groups}, stats) : at::empty({in.N, groups}, stats);
  at::Tensor rstd = empty_input ? at::zeros({in.N, groups}, stats) : at::empty({in.N, groups}, stats);
  if (in.x.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fastreg_gn_fwd_cuda", [&] {
      const auto p = gn_fwd_params<scalar_t>(in, w, b, silu, eps, y, mean, rstd);
      gn_fwd_kernel<<<in.N * groups, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {in_layout_of(y, x_in), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                           int64_t groups, bool silu) {
  check_gn_args(x_in, weight, bias, groups, "gn_bwd");
  check_gn_stats(x_in, mean_in, rstd_in, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GnInput in = gn_input(x_in, groups);
  const at::Tensor dy = dy_like(dy_in, in.x);
  const at::Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(in.x);
  const auto acc = in.x.options().dtype(acc_dtype(in.x));
  // every (n, c) written by the kernel; an empty input's are never read (zero rows summed)
  at::Tensor sum_g = at::empty({in.N, in.C}, acc), sum_gxhat = at::empty({in.N, in.C}, acc);
  if (in.x.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fastreg_gn_bwd_cuda", [&] {
      const auto p = gn_bwd_params<scalar_t>(in, w, b, silu, dy, dx, mean, rstd, sum_g, sum_gxhat);
      gn_bwd_kernel<<<in.N * groups, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const int64_t rows = in.x.numel() > 0 ? in.N : 0;
  const auto dtype_of = [&](const std::optional<at::Tensor>& param) {
    return param.has_value() ? param->scalar_type() : in.x.scalar_type();
  };
  at::Tensor dweight = at::empty({0}, in.x.options().dtype(dtype_of(weight)));
  at::Tensor dbias = at::empty({0}, in.x.options().dtype(dtype_of(bias)));
  if (weight.has_value() && bias.has_value() && dtype_of(weight) == dtype_of(bias)) {
    std::tie(dweight, dbias) = column_sums_cuda(sum_gxhat, sum_g, rows, in.C, dtype_of(weight));
  } else {  // one launch per parameter where their dtypes differ
    if (weight.has_value()) dweight = std::get<0>(column_sums_cuda(sum_gxhat, {}, rows, in.C, dtype_of(weight)));
    if (bias.has_value()) dbias = std::get<1>(column_sums_cuda({}, sum_g, rows, in.C, dtype_of(bias)));
  }
  return {in_layout_of(dx, x_in), dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("gn_fwd", &gn_fwd_cuda);
  m.impl("gn_bwd", &gn_bwd_cuda);
}

}  // namespace fastreg
