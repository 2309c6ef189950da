// BatchNorm on CUDA tensors: the device kernels of the four steps (the rest is in
// csrc/include/fastreg/bn_steps.h) over x (N, C, S) of any strides.
// Channels-last (C contiguous): a block covers 32 channels x 8 position lanes, threads
// along C read coalesced. Otherwise a block covers one channel of a chunk of N, threads
// along S. Partial sums per chunk are reduced in shared memory in a fixed order, then over
// the chunks in order: deterministic, no atomics. Channels (or channel blocks) are the
// grid's x axis (up to 2^31 - 1 blocks; y and z stop at 65535), chunks its y axis (at
// most kMaxChunks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "fastreg/bn_steps.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int64_t kMaxChunks = 128;
constexpr int kChannelLanes = 32, kPositionLanes = 8, kThreads = 256;

struct Strides {
  int64_t n, c, s;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

bool channels_last(const at::Tensor& x) { return x.stride(1) == 1 && x.size(1) > 1; }

// A grid's x extent: at most 2^31 - 1 blocks.
unsigned int launch_blocks(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastreg::bn: ", blocks, " blocks exceed a CUDA grid");
  return static_cast<unsigned int>(blocks);
}

template <typename scalar_t, typename acc_t>
struct SumsParams {
  const scalar_t* x;
  const scalar_t* dy;  // nullptr: statistics
  const acc_t* shift;
  acc_t* partial_a;
  acc_t* partial_b;
  Strides sx, sdy;
  int64_t C, S, units, per_chunk;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate(const SumsParams<scalar_t, acc_t>& p, int64_t n, int64_t c, int64_t s,
                                           acc_t& a, acc_t& b) {
  const acc_t d = static_cast<acc_t>(p.x[n * p.sx.n + c * p.sx.c + s * p.sx.s]) - p.shift[c];
  if (p.dy) {
    const acc_t g = static_cast<acc_t>(p.dy[n * p.sdy.n + c * p.sdy.c + s * p.sdy.s]);
    a += g;
    b += g * d;
  } else {
    a += d;
    b += d * d;
  }
}

// Channels-last: grid (channel blocks, chunks of positions), block (32, 8).
template <typename scalar_t, typename acc_t>
__global__ void sums_by_positions_kernel(SumsParams<scalar_t, acc_t> p) {
  __shared__ acc_t shared_a[kPositionLanes][kChannelLanes], shared_b[kPositionLanes][kChannelLanes];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelLanes + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t first = chunk * p.per_chunk;
  const int64_t last = min(first + p.per_chunk, p.units);
  acc_t a = 0, b = 0;
  if (c < p.C) {
    for (int64_t pos = first + threadIdx.y; pos < last; pos += kPositionLanes) {
      accumulate(p, pos / p.S, c, pos % p.S, a, b);
    }
  }
  shared_a[threadIdx.y][threadIdx.x] = a;
  shared_b[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < p.C) {
    for (int lane = 1; lane < kPositionLanes; ++lane) {
      a += shared_a[lane][threadIdx.x];
      b += shared_b[lane][threadIdx.x];
    }
    p.partial_a[chunk * p.C + c] = a;
    p.partial_b[chunk * p.C + c] = b;
  }
}

// Otherwise: grid (C, chunks of N), kThreads along the chunk's (n, s) positions.
template <typename scalar_t, typename acc_t>
__global__ void sums_by_channel_kernel(SumsParams<scalar_t, acc_t> p) {
  __shared__ acc_t shared_a[kThreads], shared_b[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t first = chunk * p.per_chunk;
  const int64_t last = min(first + p.per_chunk, p.units);
  acc_t a = 0, b = 0;
  for (int64_t i = threadIdx.x; i < (last - first) * p.S; i += kThreads) {
    accumulate(p, first + i / p.S, c, i % p.S, a, b);
  }
  shared_a[threadIdx.x] = a;
  shared_b[threadIdx.x] = b;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {  // a fixed tree: deterministic
    if (threadIdx.x < half) {
      shared_a[threadIdx.x] += shared_a[threadIdx.x + half];
      shared_b[threadIdx.x] += shared_b[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    p.partial_a[chunk * p.C + c] = shared_a[0];
    p.partial_b[chunk * p.C + c] = shared_b[0];
  }
}

std::pair<at::Tensor, at::Tensor> partial_sums_cuda(const at::Tensor& x, const at::Tensor& shift_in,
                                                    const at::Tensor* dy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  const bool by_positions = channels_last(x);
  const int64_t units = by_positions ? N * S : N;
  const int64_t per_chunk = rows_per_chunk(units, kMaxChunks);
  const int64_t chunks = units == 0 ? 1 : (units + per_chunk - 1) / per_chunk;
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor partial_a = at::zeros({chunks, C}, acc), partial_b = at::zeros({chunks, C}, acc);
  const at::Tensor shift = shift_in.to(acc_dtype(x)).contiguous();
  if (x.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_sums_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      SumsParams<scalar_t, acc_t> p{x.const_data_ptr<scalar_t>(), dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                                    shift.const_data_ptr<acc_t>(), partial_a.mutable_data_ptr<acc_t>(),
                                    partial_b.mutable_data_ptr<acc_t>(), strides_of(x),
                                    dy ? strides_of(*dy) : strides_of(x), C, S, units, per_chunk};
      if (by_positions) {
        const dim3 grid(launch_blocks((C + kChannelLanes - 1) / kChannelLanes), chunks);
        sums_by_positions_kernel<<<grid, dim3(kChannelLanes, kPositionLanes), 0, stream>>>(p);
      } else {
        sums_by_channel_kernel<<<dim3(launch_blocks(C), chunks), kThreads, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {partial_a.sum(0), partial_b.sum(0)};  // over the chunks, in order
}

template <typename scalar_t, typename acc_t>
struct AffineParams {
  const scalar_t* x;
  const scalar_t* dy;  // nullptr: no dy term
  scalar_t* out;
  const acc_t *mean, *coef_x, *coef_one, *coef_dy;
  Strides sx, sdy, so;
  int64_t C, S, numel;
  bool channels_last;
};

// One thread per element, in x's memory order (coalesced in either layout).
template <typename scalar_t, typename acc_t>
__global__ void affine_kernel(AffineParams<scalar_t, acc_t> p) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, s;
    if (p.channels_last) {  // (n, s, c), c fastest
      c = i % p.C;
      s = (i / p.C) % p.S;
      n = i / (p.C * p.S);
    } else {  // (n, c, s), s fastest
      s = i % p.S;
      c = (i / p.S) % p.C;
      n = i / (p.S * p.C);
    }
    acc_t v = (static_cast<acc_t>(p.x[n * p.sx.n + c * p.sx.c + s * p.sx.s]) - p.mean[c]) * p.coef_x[c] + p.coef_one[c];
    if (p.dy) v += static_cast<acc_t>(p.dy[n * p.sdy.n + c * p.sdy.c + s * p.sdy.s]) * p.coef_dy[c];
    p.out[n * p.so.n + c * p.so.c + s * p.so.s] = static_cast<scalar_t>(v);
  }
}

at::Tensor affine_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef_x,
                       const at::Tensor& coef_one, const at::Tensor* dy, const at::Tensor* coef_dy) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);  // x's strides
  if (out.numel() == 0) return out;
  const auto acc = acc_dtype(x);
  const at::Tensor m = mean.to(acc).contiguous(), kx = coef_x.to(acc).contiguous(), k1 = coef_one.to(acc).contiguous(),
                   kdy = coef_dy ? coef_dy->to(acc).contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_affine_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    AffineParams<scalar_t, acc_t> p{x.const_data_ptr<scalar_t>(), dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
                                    kx.const_data_ptr<acc_t>(), k1.const_data_ptr<acc_t>(),
                                    coef_dy ? kdy.const_data_ptr<acc_t>() : nullptr, strides_of(x),
                                    dy ? strides_of(*dy) : strides_of(x), strides_of(out), x.size(1), x.size(2),
                                    x.numel(), channels_last(x)};
    const int64_t blocks = std::min<int64_t>((p.numel + kThreads - 1) / kThreads, 65535);
    affine_kernel<<<blocks, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x) { return bn_stats_steps(x, partial_sums_cuda); }

at::Tensor bn_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  return bn_apply_steps(x, mean, var, weight, bias, eps, affine_cuda);
}

std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& mean, const at::Tensor& var, double eps) {
  return bn_bwd_reduce_steps(dy, x, mean, var, eps, partial_sums_cuda);
}

at::Tensor bn_bwd_apply_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight, double eps,
                             const std::optional<at::Tensor>& sum_dy, const std::optional<at::Tensor>& sum_dy_xhat,
                             int64_t count) {
  return bn_bwd_apply_steps(dy, x, mean, var, weight, eps, sum_dy, sum_dy_xhat, count, affine_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cuda);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cuda);
}

}  // namespace fastreg
