// LayerNorm / RMSNorm on CUDA tensors. Forward: one block per row; each thread keeps a
// Welford state (csrc/include/fastreg/welford.h) over its columns, merged across the
// block, then a second sweep writes y (from L1/L2 for rows that fit). Backward, two
// launches: one block per row for dx, and in the same launch blocks that write the
// per-chunk column partial sums for dweight/dbias; then column_sums_kernel sums them in a
// fixed order into the weight's dtype (no atomics: deterministic).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastreg/column_sums.cuh"
#include "fastreg/norm_args.h"
#include "fastreg/philox.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int kMaxWeightChunks = 512;

int threads_for(int64_t n) {
  // enough threads that each handles a few elements, within one block
  int threads = 32;
  while (threads < 1024 && threads * 4 < n) threads *= 2;
  return threads;
}

template <typename T>
__device__ __forceinline__ WelfordState<T> shuffle_down(const WelfordState<T>& s, int delta) {
  WelfordState<T> other;
  other.count = __shfl_down_sync(0xffffffff, s.count, delta);
  other.mean = __shfl_down_sync(0xffffffff, s.mean, delta);
  other.m2 = __shfl_down_sync(0xffffffff, s.m2, delta);
  return other;
}

// Merge every thread's Welford state; the result is returned to all threads.
// (Shared arrays are declared as raw bytes: a templated __shared__ variable would need
// one name per instantiation.)
template <typename T>
__device__ WelfordState<T> block_welford(WelfordState<T> s) {
  __shared__ __align__(16) unsigned char per_warp_bytes[32 * sizeof(WelfordState<T>)];
  __shared__ __align__(16) unsigned char result_bytes[sizeof(WelfordState<T>)];
  auto* per_warp = reinterpret_cast<WelfordState<T>*>(per_warp_bytes);
  auto& result = *reinterpret_cast<WelfordState<T>*>(result_bytes);
  for (int delta = 16; delta > 0; delta /= 2) s = welford_merge(s, shuffle_down(s, delta));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (blockDim.x + 31) / 32 ? per_warp[lane] : WelfordState<T>{};
    for (int delta = 16; delta > 0; delta /= 2) s = welford_merge(s, shuffle_down(s, delta));
    if (lane == 0) result = s;
  }
  __syncthreads();
  return result;
}

template <typename T>
struct Pair {
  T x, y;
};

// Sum of two values over the block, returned to all threads.
template <typename T>
__device__ Pair<T> block_sum2(Pair<T> v) {
  __shared__ __align__(16) unsigned char per_warp_bytes[32 * sizeof(Pair<T>)];
  __shared__ __align__(16) unsigned char result_bytes[sizeof(Pair<T>)];
  auto* per_warp = reinterpret_cast<Pair<T>*>(per_warp_bytes);
  auto& result = *reinterpret_cast<Pair<T>*>(result_bytes);
  for (int delta = 16; delta > 0; delta /= 2) {
    v.x += __shfl_down_sync(0xffffffff, v.x, delta);
    v.y += __shfl_down_sync(0xffffffff, v.y, delta);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x + 31) / 32 ? per_warp[lane] : Pair<T>{T(0), T(0)};
    for (int delta = 16; delta > 0; delta /= 2) {
      v.x += __shfl_down_sync(0xffffffff, v.x, delta);
      v.y += __shfl_down_sync(0xffffffff, v.y, delta);
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// The value the norm sees at element i: x, or h = residual + dropout(x) rounded to h's
// dtype (what backward reads).
template <typename scalar_t, typename h_t, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ acc_t fused_norm_input(const NormFwdParams<scalar_t, h_t>& p, int64_t i, uint64_t seed) {
  acc_t v = static_cast<acc_t>(p.x[i]);
  if (!p.fused) return v;
  if (p.seed) {
    const uint32_t word = philox4x32_10(static_cast<uint64_t>(i) / 4, seed).w[i % 4];
    v = v * (keep_element(word, p.threshold) ? p.scale : acc_t(0));
  }
  if (p.residual) v = static_cast<acc_t>(p.residual[i]) + v;
  return static_cast<acc_t>(static_cast<h_t>(v));
}

template <typename scalar_t, typename h_t>
__global__ void norm_fwd_kernel(NormFwdParams<scalar_t, h_t> p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.n;
  const uint64_t seed = p.seed ? static_cast<uint64_t>(*p.seed) : 0;
  WelfordState<acc_t> state{};
  acc_t sum_squares = 0;
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const acc_t v = fused_norm_input(p, base + j, seed);
    if (p.h) p.h[base + j] = static_cast<h_t>(v);
    if (p.mean) {
      state = welford_add(state, v);
    } else {
      sum_squares += v * v;
    }
  }
  acc_t mean = 0, variance;
  if (p.mean) {
    const WelfordState<acc_t> total = block_welford(state);
    mean = total.mean;
    variance = total.m2 / p.n;
  } else {
    variance = block_sum2(Pair<acc_t>{sum_squares, acc_t(0)}).x / p.n;
  }
  const acc_t rstd = acc_t(1) / sqrt(variance + static_cast<acc_t>(p.eps));
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    // the stored h, or the input again (recomputed when h is not stored)
    const acc_t v = p.h ? static_cast<acc_t>(p.h[base + j]) : fused_norm_input(p, base + j, seed);
    acc_t out = (v - mean) * rstd;
    if (p.weight) out = out * p.weight[j];
    if (p.bias) out = out + p.bias[j];
    p.y[base + j] = static_cast<scalar_t>(out);
  }
  if (threadIdx.x == 0) {
    if (p.mean) p.mean[blockIdx.x] = mean;
    p.rstd[blockIdx.x] = rstd;
  }
}

// Block `block` past the rows: columns [k * blockDim.x, (k + 1) * blockDim.x) of chunk c
// (block = c * column blocks + k), the sums of dy * xhat and dy over the chunk's rows.
template <typename scalar_t>
__device__ void norm_bwd_weight_partials(const NormBwdParams<scalar_t>& p, int64_t block) {
  using acc_t = acc_type<scalar_t>;
  const int64_t column_blocks = (p.n + blockDim.x - 1) / blockDim.x;
  const int64_t chunk = block / column_blocks;
  const int64_t j = (block % column_blocks) * blockDim.x + threadIdx.x;
  if (j >= p.n) return;
  const int64_t first = chunk * p.chunk_rows;
  const int64_t last = min(first + p.chunk_rows, p.m);
  acc_t dw = 0, db = 0;
  for (int64_t row = first; row < last; ++row) {
    const acc_t dy = static_cast<acc_t>(p.dy[row * p.n + j]);
    const acc_t mean = p.mean ? p.mean[row] : acc_t(0);
    dw += dy * (static_cast<acc_t>(p.x[row * p.n + j]) - mean) * p.rstd[row];
    db += dy;
  }
  p.dw_partial[chunk * p.n + j] = dw;
  p.db_partial[chunk * p.n + j] = db;
}

// Blocks [0, m): dx of row blockIdx.x. Blocks past m: norm_bwd_weight_partials.
template <typename scalar_t>
__global__ void norm_bwd_dx_kernel(NormBwdParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  if (static_cast<int64_t>(blockIdx.x) >= p.m) {  // whole blocks: the row's block sums below stay uniform
    norm_bwd_weight_partials(p, static_cast<int64_t>(blockIdx.x) - p.m);
    return;
  }
  const int64_t row = blockIdx.x, base = row * p.n;
  const acc_t mean = p.mean ? p.mean[row] : acc_t(0), rstd = p.rstd[row];
  Pair<acc_t> sums{acc_t(0), acc_t(0)};  // (sum g * xhat, sum g)
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const acc_t g = static_cast<acc_t>(p.dy[base + j]) * (p.weight ? p.weight[j] : acc_t(1));
    sums.x += g * (static_cast<acc_t>(p.x[base + j]) - mean) * rstd;
    sums.y += g;
  }
  sums = block_sum2(sums);
  const acc_t c1 = sums.x / p.n, c2 = p.mean ? sums.y / p.n : acc_t(0);
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const acc_t g = static_cast<acc_t>(p.dy[base + j]) * (p.weight ? p.weight[j] : acc_t(1));
    const acc_t xhat = (static_cast<acc_t>(p.x[base + j]) - mean) * rstd;
    acc_t value = (g - xhat * c1 - c2) * rstd;
    if (p.dh) value += static_cast<acc_t>(p.dh[base + j]);
    const scalar_t rounded = static_cast<scalar_t>(value);
    p.dx[base + j] = rounded;
    if (p.dx_dropout) {  // the fused block's dx: forward's mask, regenerated
      const uint64_t position = static_cast<uint64_t>(base + j);
      const uint32_t word = philox4x32_10(position / 4, static_cast<uint64_t>(*p.seed)).w[position % 4];
      p.dx_dropout[base + j] =
          static_cast<scalar_t>(static_cast<acc_t>(rounded) * (keep_element(word, p.threshold) ? p.scale : acc_t(0)));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, bool is_rms, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& seed,
    double p, bool residual_in_fp32, bool store_h) {
  check_norm_fwd_args(x_in, weight, bias, residual_in, seed, p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  const bool fused = residual.defined() || seed.has_value();
  NormOutputs out = allocate_norm_outputs(x, is_rms, fused && store_h, residual_in_fp32);
  if (x.numel() == 0) return {out.y, out.h, out.mean, out.rstd};
  const at::Tensor w = param_as_acc(weight, x), b = param_as_acc(bias, x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_norm_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    auto launch = [&](auto h_type_tag) {
      using h_t = decltype(h_type_tag);
      const auto params = norm_fwd_params<scalar_t, h_t>(x, w, b, residual, seed, p, eps, is_rms, fused, out);
      norm_fwd_kernel<scalar_t, h_t><<<x.size(0), threads_for(params.n), 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (residual_in_fp32) {
      launch(acc_t{});
    } else {
      launch(scalar_t{});
    }
  });
  return {out.y, out.h, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool is_rms, bool has_bias, const std::optional<at::Tensor>& dh_in,
    const std::optional<at::Tensor>& seed, double p) {
  check_norm_bwd_args(dy_in, x_in, rstd, dh_in, seed, p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // the partials are written whole by the kernel (no zero fill); no rows: none are read
  NormBwdBuffers buffers =
      prepare_norm_bwd(dy_in, x_in, weight, mean, rstd, dh_in, seed, kMaxWeightChunks);
  const int64_t m = buffers.m, n = buffers.n, chunks = buffers.dw_partial.size(0);
  const bool param_grads = weight.has_value() || has_bias;
  if (m > 0 && n > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int threads = threads_for(n);
    const int64_t weight_blocks = param_grads ? chunks * ((n + threads - 1) / threads) : 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffers.x.scalar_type(), "fastreg_norm_bwd_cuda", [&] {
      const auto params = norm_bwd_params<scalar_t>(buffers, is_rms, seed, p);
      norm_bwd_dx_kernel<scalar_t><<<m + weight_blocks, threads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : buffers.x.scalar_type();
  if (!param_grads) {  // distinct empty tensors: an op's outputs may not alias
    const auto empty = [&] { return at::empty({0}, buffers.x.options().dtype(w_dtype)); };
    return {buffers.dx, empty(), empty(), buffers.dx_dropout};
  }
  auto [dweight, dbias] =
      column_sums_cuda(weight.has_value() ? buffers.dw_partial : at::Tensor(),
                       has_bias ? buffers.db_partial : at::Tensor(), m > 0 ? chunks : 0, n, w_dtype);
  return {buffers.dx, dweight, dbias, buffers.dx_dropout};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd_cuda);
  m.impl("norm_bwd", &norm_bwd_cuda);
}

}  // namespace fastreg
