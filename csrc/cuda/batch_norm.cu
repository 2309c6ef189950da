// BatchNorm on CUDA tensors: the device kernels of the four steps (the rest is in
// csrc/include/fastreg/bn_steps.h) over x (N, C, S) of any strides.
// Channels-last (C contiguous): a block covers 32 channels x 8 position lanes, threads
// along C read coalesced. Otherwise a block covers one channel of a chunk of N, threads
// along S. Partial sums per chunk are reduced in shared memory in a fixed order, then over
// the chunks in order: deterministic, no atomics. Channels (or channel blocks) are the
// grid's x axis (up to 2^31 - 1 blocks; y and z stop at 65535), chunks its y axis (at
// most kMaxChunks).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
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
bool channels_last(const Ncs& v) { return v.sc == 1 && v.C > 1; }

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

// The shift of channel c: shift[c], or x[0, c, 0] without a shift array (statistics).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t shift_of(const SumsParams<scalar_t, acc_t>& p, int64_t c) {
  if (p.shift) return p.shift[c];
  return p.units > 0 ? static_cast<acc_t>(p.x[c * p.sx.c]) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate(const SumsParams<scalar_t, acc_t>& p, int64_t n, int64_t c, int64_t s,
                                           acc_t shift, acc_t& a, acc_t& b) {
  const acc_t d = static_cast<acc_t>(p.x[n * p.sx.n + c * p.sx.c + s * p.sx.s]) - shift;
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
    const acc_t shift = shift_of(p, c);
    for (int64_t pos = first + threadIdx.y; pos < last; pos += kPositionLanes) {
      accumulate(p, pos / p.S, c, pos % p.S, shift, a, b);
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
  const acc_t shift = shift_of(p, c);
  for (int64_t i = threadIdx.x; i < (last - first) * p.S; i += kThreads) {
    accumulate(p, first + i / p.S, c, i % p.S, shift, a, b);
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

// The (chunks, C) partial sums of x (N, C, S strides in sx) into partial_a / partial_b
// (acc dtype, written whole); shift nullptr: shifted by x[0, c, 0].
struct Partials {
  at::Tensor a, b;
  int64_t chunks;
};

Partials launch_partial_sums(const at::Tensor& x, const Ncs& sx, const at::Tensor* dy, const Ncs& sdy,
                             const at::Tensor* shift) {
  const int64_t C = sx.C;
  const bool by_positions = channels_last(sx);
  const int64_t units = by_positions ? sx.N * sx.S : sx.N;
  const int64_t per_chunk = rows_per_chunk(units, kMaxChunks);
  const int64_t chunks = units == 0 ? 1 : (units + per_chunk - 1) / per_chunk;
  const auto acc = x.options().dtype(acc_dtype(x));
  Partials out{at::empty({chunks, C}, acc), at::empty({chunks, C}, acc), chunks};
  if (units == 0 || sx.S == 0 || C == 0) {
    out.a.zero_();
    out.b.zero_();
    return out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_sums_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    SumsParams<scalar_t, acc_t> p{x.const_data_ptr<scalar_t>(), dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                                  shift ? shift->const_data_ptr<acc_t>() : nullptr, out.a.mutable_data_ptr<acc_t>(),
                                  out.b.mutable_data_ptr<acc_t>(), {sx.sn, sx.sc, sx.ss},
                                  {sdy.sn, sdy.sc, sdy.ss}, C, sx.S, units, per_chunk};
    if (by_positions) {
      const dim3 grid(launch_blocks((C + kChannelLanes - 1) / kChannelLanes), chunks);
      sums_by_positions_kernel<<<grid, dim3(kChannelLanes, kPositionLanes), 0, stream>>>(p);
    } else {
      sums_by_channel_kernel<<<dim3(launch_blocks(C), chunks), kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Ncs ncs_strides(const at::Tensor& t) {
  const auto v = ncs_of(t);
  TORCH_INTERNAL_ASSERT(v.has_value(), "fastreg::bn: spatial dims that do not collapse");
  return *v;
}

std::pair<at::Tensor, at::Tensor> partial_sums_cuda(const at::Tensor& x, const at::Tensor& shift_in,
                                                    const at::Tensor* dy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor shift = shift_in.to(acc_dtype(x)).contiguous();
  const Ncs sx = ncs_strides(x);
  const Partials partials = launch_partial_sums(x, sx, dy, dy ? ncs_strides(*dy) : sx, &shift);
  return {partials.a.sum(0), partials.b.sum(0)};  // over the chunks, in order
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

// ------------------------------------------------------------------ fused bn_fwd / bn_bwd
// Three launches each way in training (partial sums, a per-channel finalize, the affine
// pass), two in eval (finalize, affine). The finalize kernel (one thread per channel) adds
// the chunks' partial sums in order and writes the statistics or gradients and the affine
// coefficients, rows of coefs (4, C): mean, coef_x, coef_one, coef_dy.

template <typename acc_t>
struct FwdFinalizeParams {
  const acc_t *partial_a, *partial_b;  // (chunks, C); nullptr in eval
  int64_t chunks, C, count;
  const acc_t *weight, *bias;         // (C,) or nullptr
  acc_t *running_mean, *running_var;  // (C,) or nullptr; read in eval, updated in training
  const int64_t* batches_tracked;     // momentum = 1 / *batches_tracked, or nullptr
  double momentum, eps;
  acc_t *mean, *invstd, *coefs;       // out: (C,), (C,), (4, C)
};

// x, x_stride_c: the shift x[0, c, 0] the partial sums were taken with
template <typename scalar_t, typename acc_t>
__global__ void fwd_finalize_kernel(FwdFinalizeParams<acc_t> p, const scalar_t* x, int64_t x_stride_c) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  acc_t mean, var;
  if (p.partial_a) {
    acc_t a = 0, b = 0;
    for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {  // in order: deterministic
      a += p.partial_a[chunk * p.C + c];
      b += p.partial_b[chunk * p.C + c];
    }
    const acc_t n = static_cast<acc_t>(p.count > 1 ? p.count : 1);
    const acc_t shift = p.count > 0 ? static_cast<acc_t>(x[c * x_stride_c]) : acc_t(0);
    const acc_t mean_d = a / n;
    mean = shift + mean_d;
    var = b / n - mean_d * mean_d;
    if (var < acc_t(0)) var = 0;  // rounding below 0 clamped; a NaN (non-finite x) kept
    if (p.running_mean) {
      const acc_t factor =
          p.batches_tracked ? acc_t(1) / static_cast<acc_t>(*p.batches_tracked) : static_cast<acc_t>(p.momentum);
      const acc_t unbias = static_cast<acc_t>(static_cast<double>(p.count) / (p.count > 1 ? p.count - 1 : 1));
      p.running_mean[c] = p.running_mean[c] * (acc_t(1) - factor) + mean * factor;
      p.running_var[c] = p.running_var[c] * (acc_t(1) - factor) + var * unbias * factor;
    }
  } else {
    mean = p.running_mean[c];
    var = p.running_var[c];
  }
  const acc_t invstd = acc_t(1) / sqrt(var + static_cast<acc_t>(p.eps));
  p.mean[c] = mean;
  p.invstd[c] = invstd;
  p.coefs[c] = mean;
  p.coefs[p.C + c] = p.weight ? invstd * p.weight[c] : invstd;
  p.coefs[2 * p.C + c] = p.bias ? p.bias[c] : acc_t(0);
}

template <typename acc_t>
struct BwdFinalizeParams {
  const acc_t *partial_a, *partial_b;  // (chunks, C): sums of dy, dy * (x - mean); nullptr: no sums
  int64_t chunks, C, count;
  bool training;
  const acc_t *weight, *mean, *invstd;
  acc_t *sum_dy, *sum_dy_xhat;  // out (C,) or nullptr
  acc_t* coefs;                 // out (4, C)
};

template <typename acc_t>
__global__ void bwd_finalize_kernel(BwdFinalizeParams<acc_t> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  const acc_t invstd = p.invstd[c];
  const acc_t scale = p.weight ? invstd * p.weight[c] : invstd;
  acc_t a = 0, b = 0;
  if (p.partial_a) {
    for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {  // in order: deterministic
      a += p.partial_a[chunk * p.C + c];
      b += p.partial_b[chunk * p.C + c];
    }
    b *= invstd;  // sum dy * xhat
    if (p.sum_dy) p.sum_dy[c] = a;
    if (p.sum_dy_xhat) p.sum_dy_xhat[c] = b;
  }
  if (p.training) {  // dx = (x - mean) * coef_x + coef_one + dy * scale
    const acc_t n = static_cast<acc_t>(p.count > 1 ? p.count : 1);
    p.coefs[c] = p.mean[c];
    p.coefs[p.C + c] = -scale * invstd * b / n;
    p.coefs[2 * p.C + c] = -scale * a / n;
    p.coefs[3 * p.C + c] = scale;
  } else {  // dx = dy * scale, x unread: the affine pass runs on dy
    p.coefs[c] = 0;
    p.coefs[p.C + c] = scale;
    p.coefs[2 * p.C + c] = 0;
    p.coefs[3 * p.C + c] = 0;
  }
}

template <typename scalar_t, typename acc_t>
void launch_affine(const at::Tensor& x, const Ncs& sx, const at::Tensor* dy, const Ncs& sdy, at::Tensor& out,
                   const Ncs& so, const acc_t* coefs) {
  const int64_t numel = so.N * so.C * so.S;
  if (numel == 0) return;
  const int64_t C = so.C;
  AffineParams<scalar_t, acc_t> p{x.const_data_ptr<scalar_t>(), dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                                  out.mutable_data_ptr<scalar_t>(), coefs, coefs + C, coefs + 2 * C,
                                  dy ? coefs + 3 * C : nullptr, {sx.sn, sx.sc, sx.ss}, {sdy.sn, sdy.sc, sdy.ss},
                                  {so.sn, so.sc, so.ss}, C, so.S, numel, channels_last(so)};
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535);
  affine_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A per-channel tensor in the accumulate dtype, contiguous (itself when it already is).
at::Tensor acc_contiguous(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_fwd_cuda(const at::Tensor& x_in,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const std::optional<at::Tensor>& running_mean,
                                                           const std::optional<at::Tensor>& running_var,
                                                           bool training, double momentum, double eps,
                                                           const std::optional<at::Tensor>& batches_tracked) {
  check_bn_fwd_args(x_in, weight, bias, running_mean, running_var, training, batches_tracked);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = collapsible(x_in);
  const Ncs sx = ncs_strides(x);
  const int64_t C = sx.C;
  const auto acc = acc_dtype(x);
  at::Tensor y = at::empty_like(x);
  const Ncs sy = ncs_strides(y);
  at::Tensor mean = at::empty({C}, x.options().dtype(acc)), invstd = at::empty({C}, x.options().dtype(acc));
  at::Tensor coefs = at::empty({3, C}, x.options().dtype(acc));
  const at::Tensor w = weight.has_value() ? acc_contiguous(*weight, acc) : at::Tensor();
  const at::Tensor b = bias.has_value() ? acc_contiguous(*bias, acc) : at::Tensor();
  // running statistics the kernel updates in place: their own memory when acc-typed and contiguous
  at::Tensor rm, rv;
  if (running_mean.has_value()) {
    rm = acc_contiguous(*running_mean, acc);
    rv = acc_contiguous(*running_var, acc);
  }
  const at::Tensor counter = batches_tracked.has_value() ? batches_tracked->to(at::kLong) : at::Tensor();
  Partials partials{};
  if (training) partials = launch_partial_sums(x, sx, nullptr, sx, nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    FwdFinalizeParams<acc_t> p{training ? partials.a.const_data_ptr<acc_t>() : nullptr,
                               training ? partials.b.const_data_ptr<acc_t>() : nullptr,
                               training ? partials.chunks : 0, C, sx.N * sx.S,
                               w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                               b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
                               rm.defined() ? rm.mutable_data_ptr<acc_t>() : nullptr,
                               rv.defined() ? rv.mutable_data_ptr<acc_t>() : nullptr,
                               counter.defined() ? counter.const_data_ptr<int64_t>() : nullptr, momentum, eps,
                               mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
                               coefs.mutable_data_ptr<acc_t>()};
    if (C > 0) {
      fwd_finalize_kernel<scalar_t, acc_t><<<launch_blocks((C + kThreads - 1) / kThreads), kThreads, 0,
                                             c10::cuda::getCurrentCUDAStream()>>>(p, x.const_data_ptr<scalar_t>(),
                                                                                  sx.sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_affine<scalar_t, acc_t>(x, sx, nullptr, sx, y, sy, coefs.const_data_ptr<acc_t>());
  });
  if (training && running_mean.has_value()) {  // copies (another dtype or layout): the update written back
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {x.is_same(x_in) ? y : y.view(x_in.sizes()), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                           const std::optional<at::Tensor>& weight,
                                                           const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                                           bool training, std::array<bool, 3> output_mask) {
  check_bn_bwd_args(dy_in, x_in, weight, mean_in, invstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = collapsible(x_in);
  const at::Tensor dy = collapsible(dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type()));
  const Ncs sx = ncs_strides(x), sdy = ncs_strides(dy);
  const int64_t C = sx.C;
  const auto acc = acc_dtype(x);
  const auto param_options = x.options().dtype(bn_param_dtype(x, weight));
  const bool sums = training ? output_mask[0] || output_mask[1] || output_mask[2] : output_mask[1] || output_mask[2];
  const at::Tensor w = weight.has_value() ? acc_contiguous(*weight, acc) : at::Tensor();
  const at::Tensor mean = acc_contiguous(mean_in, acc), invstd = acc_contiguous(invstd_in, acc);
  at::Tensor sum_dy = at::empty({output_mask[2] ? C : 0}, x.options().dtype(acc));
  at::Tensor sum_dy_xhat = at::empty({output_mask[1] ? C : 0}, x.options().dtype(acc));
  at::Tensor dx = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  Partials partials{};
  if (sums) partials = launch_partial_sums(x, sx, &dy, sdy, &mean);
  if ((sums || output_mask[0]) && C > 0) {
    at::Tensor coefs = at::empty({4, C}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_bwd_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      BwdFinalizeParams<acc_t> p{sums ? partials.a.const_data_ptr<acc_t>() : nullptr,
                                 sums ? partials.b.const_data_ptr<acc_t>() : nullptr,
                                 sums ? partials.chunks : 0, C, sx.N * sx.S, training,
                                 w.defined() ? w.const_data_ptr<acc_t>() : nullptr, mean.const_data_ptr<acc_t>(),
                                 invstd.const_data_ptr<acc_t>(),
                                 output_mask[2] ? sum_dy.mutable_data_ptr<acc_t>() : nullptr,
                                 output_mask[1] ? sum_dy_xhat.mutable_data_ptr<acc_t>() : nullptr,
                                 coefs.mutable_data_ptr<acc_t>()};
      bwd_finalize_kernel<acc_t><<<launch_blocks((C + kThreads - 1) / kThreads), kThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!output_mask[0]) return;
      const Ncs sdx = ncs_strides(dx);
      if (training) {
        launch_affine<scalar_t, acc_t>(x, sx, &dy, sdy, dx, sdx, coefs.const_data_ptr<acc_t>());
      } else {  // dx = dy * scale: x unread (a NaN in x stays out of dx, as in torch)
        launch_affine<scalar_t, acc_t>(dy, sdy, nullptr, sdy, dx, sdx, coefs.const_data_ptr<acc_t>());
      }
    });
  }
  if (output_mask[0] && !x.is_same(x_in)) dx = dx.view(x_in.sizes());
  return {dx, output_mask[1] ? sum_dy_xhat.to(param_options.dtype()) : at::empty({0}, param_options),
          output_mask[2] ? sum_dy.to(param_options.dtype()) : at::empty({0}, param_options)};
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
  m.impl("bn_fwd", &bn_fwd_cuda);
  m.impl("bn_bwd", &bn_bwd_cuda);
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cuda);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cuda);
}

}  // namespace fastreg
