// LayerNorm / RMSNorm on CUDA tensors. Forward: one block per row; each thread keeps a
// Welford state (csrc/include/fastreg/welford.h) over its columns, merged across the
// block, then a second sweep writes y (from L1/L2 for rows that fit). Backward: one block
// per row for dx; dweight/dbias from per-chunk column partial sums reduced afterwards
// (no atomics: deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastreg/norm_args.h"
#include "fastreg/philox.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int kMaxWeightChunks = 512;
constexpr int kColumnThreads = 256;

int threads_for(int64_t n) {
  // enough threads that each handles a few elements, within one block
  int threads = 32;
  while (threads < 1024 && threads * 4 < n) threads *= 2;
  return threads;
}

__device__ __forceinline__ Welford shuffle_down(const Welford& s, int delta) {
  Welford other;
  other.count = __shfl_down_sync(0xffffffff, s.count, delta);
  other.mean = __shfl_down_sync(0xffffffff, s.mean, delta);
  other.m2 = __shfl_down_sync(0xffffffff, s.m2, delta);
  return other;
}

// Merge every thread's Welford state; the result is returned to all threads.
__device__ Welford block_welford(Welford s) {
  __shared__ Welford per_warp[32];
  __shared__ Welford result;
  for (int delta = 16; delta > 0; delta /= 2) s = welford_merge(s, shuffle_down(s, delta));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (blockDim.x + 31) / 32 ? per_warp[lane] : Welford{};
    for (int delta = 16; delta > 0; delta /= 2) s = welford_merge(s, shuffle_down(s, delta));
    if (lane == 0) result = s;
  }
  __syncthreads();
  return result;
}

// Sum of two floats over the block, returned to all threads.
__device__ float2 block_sum2(float2 v) {
  __shared__ float2 per_warp[32];
  __shared__ float2 result;
  for (int delta = 16; delta > 0; delta /= 2) {
    v.x += __shfl_down_sync(0xffffffff, v.x, delta);
    v.y += __shfl_down_sync(0xffffffff, v.y, delta);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x + 31) / 32 ? per_warp[lane] : make_float2(0.f, 0.f);
    for (int delta = 16; delta > 0; delta /= 2) {
      v.x += __shfl_down_sync(0xffffffff, v.x, delta);
      v.y += __shfl_down_sync(0xffffffff, v.y, delta);
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

template <typename scalar_t, typename h_t>
struct NormFwdParams {
  const scalar_t* x;
  const scalar_t* residual;  // nullptr: none
  const float* weight;  // nullptr: none
  const float* bias;  // nullptr: none
  const int64_t* seed;  // nullptr: no dropout
  scalar_t* y;
  h_t* h;  // nullptr: not fused
  float* mean;  // nullptr: RMSNorm
  float* rstd;
  int64_t n;
  float eps, scale;
  uint64_t threshold;
};

template <typename scalar_t, typename h_t>
__global__ void norm_fwd_kernel(NormFwdParams<scalar_t, h_t> p) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.n;
  const uint64_t seed = p.seed ? static_cast<uint64_t>(*p.seed) : 0;
  Welford state{};
  float sum_squares = 0.f;
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    float v = static_cast<float>(p.x[base + j]);
    if (p.h) {
      if (p.seed) {
        const uint64_t position = static_cast<uint64_t>(base + j);
        const uint32_t word = philox4x32_10(position / 4, seed).w[position % 4];
        v = v * (keep_element(word, p.threshold) ? p.scale : 0.f);
      }
      if (p.residual) v = static_cast<float>(p.residual[base + j]) + v;
      const h_t rounded = static_cast<h_t>(v);  // normalize what backward will read
      p.h[base + j] = rounded;
      v = static_cast<float>(rounded);
    }
    if (p.mean) {
      state = welford_add(state, v);
    } else {
      sum_squares += v * v;
    }
  }
  float mean = 0.f, variance;
  if (p.mean) {
    const Welford total = block_welford(state);
    mean = total.mean;
    variance = total.m2 / p.n;
  } else {
    variance = block_sum2(make_float2(sum_squares, 0.f)).x / p.n;
  }
  const float rstd = rsqrtf(variance + p.eps);
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const float v = p.h ? static_cast<float>(p.h[base + j]) : static_cast<float>(p.x[base + j]);
    float out = (v - mean) * rstd;
    if (p.weight) out = out * p.weight[j];
    if (p.bias) out = out + p.bias[j];
    p.y[base + j] = static_cast<scalar_t>(out);
  }
  if (threadIdx.x == 0) {
    if (p.mean) p.mean[blockIdx.x] = mean;
    p.rstd[blockIdx.x] = rstd;
  }
}

template <typename scalar_t>
struct NormBwdParams {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* dh;  // nullptr: none
  const float* weight;  // nullptr: none
  const float* mean;  // nullptr: RMSNorm
  const float* rstd;
  scalar_t* dx;
  float* dw_partial;
  float* db_partial;
  int64_t m, n, chunk_rows;
};

template <typename scalar_t>
__global__ void norm_bwd_dx_kernel(NormBwdParams<scalar_t> p) {
  const int64_t row = blockIdx.x, base = row * p.n;
  const float mean = p.mean ? p.mean[row] : 0.f, rstd = p.rstd[row];
  float2 sums = make_float2(0.f, 0.f);  // (sum g * xhat, sum g)
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const float g = static_cast<float>(p.dy[base + j]) * (p.weight ? p.weight[j] : 1.f);
    sums.x += g * (static_cast<float>(p.x[base + j]) - mean) * rstd;
    sums.y += g;
  }
  sums = block_sum2(sums);
  const float c1 = sums.x / p.n, c2 = p.mean ? sums.y / p.n : 0.f;
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const float g = static_cast<float>(p.dy[base + j]) * (p.weight ? p.weight[j] : 1.f);
    const float xhat = (static_cast<float>(p.x[base + j]) - mean) * rstd;
    float value = (g - xhat * c1 - c2) * rstd;
    if (p.dh) value += static_cast<float>(p.dh[base + j]);
    p.dx[base + j] = static_cast<scalar_t>(value);
  }
}

// Column j of chunk c: sums of dy * xhat and dy over the chunk's rows.
template <typename scalar_t>
__global__ void norm_bwd_weight_kernel(NormBwdParams<scalar_t> p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.n) return;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * p.chunk_rows;
  const int64_t last = min(first + p.chunk_rows, p.m);
  float dw = 0.f, db = 0.f;
  for (int64_t row = first; row < last; ++row) {
    const float dy = static_cast<float>(p.dy[row * p.n + j]);
    const float mean = p.mean ? p.mean[row] : 0.f;
    dw += dy * (static_cast<float>(p.x[row * p.n + j]) - mean) * p.rstd[row];
    db += dy;
  }
  p.dw_partial[blockIdx.y * p.n + j] = dw;
  p.db_partial[blockIdx.y * p.n + j] = db;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, bool is_rms, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& seed,
    double p, bool residual_in_fp32) {
  check_norm_fwd_args(x_in, weight, bias, residual_in, seed, p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  const bool fused = residual.defined() || seed.has_value();
  NormOutputs out = allocate_norm_outputs(x, is_rms, fused, residual_in_fp32);
  if (x.numel() == 0) return {out.y, out.h, out.mean, out.rstd};
  const at::Tensor w = param_as_float(weight), b = param_as_float(bias);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_norm_fwd_cuda", [&] {
    auto launch = [&](auto h_type_tag) {
      using h_t = decltype(h_type_tag);
      NormFwdParams<scalar_t, h_t> params;
      params.x = x.const_data_ptr<scalar_t>();
      params.residual = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
      params.weight = w.defined() ? w.const_data_ptr<float>() : nullptr;
      params.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
      params.seed = seed.has_value() ? seed->const_data_ptr<int64_t>() : nullptr;
      params.y = out.y.mutable_data_ptr<scalar_t>();
      params.h = fused ? out.h.mutable_data_ptr<h_t>() : nullptr;
      params.mean = is_rms ? nullptr : out.mean.mutable_data_ptr<float>();
      params.rstd = out.rstd.mutable_data_ptr<float>();
      params.n = x.size(1);
      params.eps = static_cast<float>(eps);
      params.scale = static_cast<float>(keep_scale(p));
      params.threshold = drop_threshold(p);
      norm_fwd_kernel<scalar_t, h_t><<<x.size(0), threads_for(params.n), 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (residual_in_fp32) {
      launch(float{});
    } else {
      launch(scalar_t{});
    }
  });
  return {out.y, out.h, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool is_rms, bool has_bias, const std::optional<at::Tensor>& dh_in) {
  check_norm_bwd_args(dy_in, x_in, rstd, dh_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();  // y's dtype may differ from h's
  const at::Tensor dh = dh_in.has_value() ? dh_in->to(x.scalar_type()).contiguous() : at::Tensor();
  const int64_t m = x.size(0), n = x.size(1);
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  at::Tensor dx = at::empty_like(x);
  const int64_t chunk_rows = rows_per_chunk(m, kMaxWeightChunks);
  const int64_t chunks = m == 0 ? 1 : (m + chunk_rows - 1) / chunk_rows;
  at::Tensor dw_partial = at::zeros({chunks, n}, x.options().dtype(at::kFloat));
  at::Tensor db_partial = at::zeros({chunks, n}, x.options().dtype(at::kFloat));
  const at::Tensor w = param_as_float(weight);
  if (m > 0 && n > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_norm_bwd_cuda", [&] {
      NormBwdParams<scalar_t> params;
      params.dy = dy.const_data_ptr<scalar_t>();
      params.x = x.const_data_ptr<scalar_t>();
      params.dh = dh.defined() ? dh.const_data_ptr<scalar_t>() : nullptr;
      params.weight = w.defined() ? w.const_data_ptr<float>() : nullptr;
      params.mean = is_rms ? nullptr : mean.const_data_ptr<float>();
      params.rstd = rstd.const_data_ptr<float>();
      params.dx = dx.mutable_data_ptr<scalar_t>();
      params.dw_partial = dw_partial.mutable_data_ptr<float>();
      params.db_partial = db_partial.mutable_data_ptr<float>();
      params.m = m;
      params.n = n;
      params.chunk_rows = chunk_rows;
      norm_bwd_dx_kernel<scalar_t><<<m, threads_for(n), 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (weight.has_value() || has_bias) {
        const dim3 grid((n + kColumnThreads - 1) / kColumnThreads, chunks);
        norm_bwd_weight_kernel<scalar_t><<<grid, kColumnThreads, 0, stream>>>(params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  // second reduction over the chunks: deterministic
  at::Tensor dw = weight.has_value() ? dw_partial.sum(0).to(w_dtype) : at::empty({0}, x.options().dtype(w_dtype));
  at::Tensor db = has_bias ? db_partial.sum(0).to(w_dtype) : at::empty({0}, x.options().dtype(w_dtype));
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd_cuda);
  m.impl("norm_bwd", &norm_bwd_cuda);
}

}  // namespace fastreg
