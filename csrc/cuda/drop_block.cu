// DropBlock on CUDA tensors (geometry, stream and mask layout: csrc/include/fastreg/drop_block.h).
//
// Launches: the seeds (one byte per grid point, one Philox call per 4 points); sliding ORs
// along W, H (and D) that widen seeds into blocks, one thread per output byte; the pack of
// the keep bits in x's memory order, one thread per mask byte, with kept counts per thread
// block; the scale numel / (eps + kept) from the counts by ATen ops on the device; the
// multiply. Everything stays on the device (no host sync); the counts are integers, so
// their sum is exact in any order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastreg/drop_block.h"
#include "fastreg/grid.cuh"
#include "fastreg/philox.h"

namespace fastreg {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t work) {
  return grid_stride_blocks(work, kThreads);
}

__global__ void seeds_kernel(uint8_t* __restrict__ seeds, const int64_t* __restrict__ seed_ptr, int64_t points,
                             uint64_t threshold) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; 4 * g < points; g += stride) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), seed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * g + j < points) seeds[4 * g + j] = !keep_element(r.w[j], threshold);
    }
  }
}

// out[r, a, i] = OR of in[r, a - k, i] over k < block with 0 <= a - k < in_length
__global__ void sliding_or_kernel(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t rows,
                                  int64_t in_length, int64_t out_length, int64_t inner, int64_t block) {
  const int64_t total = rows * out_length * inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t i = t % inner, a = (t / inner) % out_length, r = t / (inner * out_length);
    const int64_t first = a - block + 1 > 0 ? a - block + 1 : 0, last = a < in_length - 1 ? a : in_length - 1;
    uint8_t value = 0;
    for (int64_t source = first; source <= last; ++source) value |= in[(r * in_length + source) * inner + i];
    out[t] = value;
  }
}

__global__ void pack_kernel(const uint8_t* __restrict__ drop, uint8_t* __restrict__ mask,
                            int64_t* __restrict__ kept_per_block, DropBlockGeometry g) {
  __shared__ int64_t block_kept[kThreads];
  const int64_t bytes = g.rows() * g.row_bytes(), L = g.row_length(), S = g.spatial();
  int64_t kept = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < bytes; b += stride) {
    const int64_t row = b / g.row_bytes(), k = b % g.row_bytes();
    uint8_t byte = 0;
    for (int j = 0; j < 8 && 8 * k + j < L; ++j) {
      const int64_t e = 8 * k + j;
      int64_t n, c, s;
      if (g.channels_last) {  // row = sample, element e = s * C + c
        n = row, s = e / g.C, c = e % g.C;
      } else {  // row = (n, c), element e = s
        n = row / g.C, c = row % g.C, s = e;
      }
      const int64_t plane = g.shared ? n : n * g.C + c;
      const uint8_t keep = drop[plane * S + s] ^ 1u;
      byte |= static_cast<uint8_t>(keep << j);
      kept += keep;
    }
    mask[b] = byte;
  }
  block_kept[threadIdx.x] = kept;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) block_kept[threadIdx.x] += block_kept[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) kept_per_block[blockIdx.x] = block_kept[0];
}

template <typename scalar_t>
__global__ void apply_kernel(const scalar_t* x, scalar_t* out, const uint8_t* __restrict__ mask,
                             const double* __restrict__ scale_ptr, int64_t numel, int64_t row_length,
                             int64_t row_bytes) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(*scale_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t row = i / row_length, e = i % row_length;
    const bool keep = (mask[row * row_bytes + e / 8] >> (e % 8)) & 1;
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * (keep ? scale : acc_t(0)));
  }
}

void apply_mask(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale, int64_t row_length,
                at::Tensor& out) {
  if (x.numel() == 0 || mask.size(0) == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_drop_block_apply_cuda", [&] {
    apply_kernel<scalar_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
        scale.const_data_ptr<double>(), x.numel(), row_length, mask.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// (out of `sliding_or` along one axis, for rows x in_length x inner bytes of `in`)
at::Tensor sliding_or(const at::Tensor& in, int64_t rows, int64_t in_length, int64_t out_length, int64_t inner,
                      int64_t block) {
  at::Tensor out = at::empty({rows * out_length * inner}, in.options());
  if (out.numel() == 0) return out;
  sliding_or_kernel<<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(), rows, in_length, out_length, inner, block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_and_scale(const at::Tensor& input, const at::Tensor& seed, double gamma,
                                                  int64_t block_size, double eps, bool shared, bool channels_last) {
  const DropBlockGeometry g = drop_block_geometry(input, block_size, shared, channels_last);
  const auto bytes = input.options().dtype(at::kByte);
  at::Tensor mask = at::empty({g.rows(), g.row_bytes()}, bytes);
  at::Tensor kept = at::zeros({}, input.options().dtype(at::kLong));
  if (input.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t points = g.planes() * g.grid();
    at::Tensor seeds = at::empty({points}, bytes);
    seeds_kernel<<<blocks_for((points + 3) / 4), kThreads, 0, stream>>>(
        seeds.mutable_data_ptr<uint8_t>(), seed.const_data_ptr<int64_t>(), points, drop_threshold(gamma));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor drop = sliding_or(seeds, g.planes() * g.Ds * g.Hs, g.Ws, g.W, 1, g.block_size);
    drop = sliding_or(drop, g.planes() * g.Ds, g.Hs, g.H, g.W, g.block_size);
    if (g.block_depth > 1) drop = sliding_or(drop, g.planes(), g.Ds, g.D, g.H * g.W, g.block_depth);
    const int blocks = blocks_for(mask.numel());
    at::Tensor kept_per_block = at::empty({blocks}, input.options().dtype(at::kLong));
    pack_kernel<<<blocks, kThreads, 0, stream>>>(drop.const_data_ptr<uint8_t>(), mask.mutable_data_ptr<uint8_t>(),
                                                 kept_per_block.mutable_data_ptr<int64_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kept = kept_per_block.sum();
  }
  // numel / (eps + kept) in float64: two IEEE operations, as the other backends
  const at::Tensor numel = at::full({}, static_cast<double>(input.numel()), input.options().dtype(at::kDouble));
  return {mask, numel / (kept.to(at::kDouble) + eps)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drop_block_cuda(const at::Tensor& x, const at::Tensor& seed,
                                                               double gamma, int64_t block_size, double eps,
                                                               bool shared) {
  check_drop_block_args(x, seed, gamma, block_size, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool channels_last = drop_block_channels_last(x);
  const at::Tensor input = channels_last ? x : x.contiguous();
  auto [mask, scale] = mask_and_scale(input, seed, gamma, block_size, eps, shared, channels_last);
  at::Tensor out = at::empty_like(input);
  apply_mask(input, mask, scale, input.numel() / std::max<int64_t>(mask.size(0), 1), out);
  return {out, mask, scale};
}

void drop_block_cuda_(at::Tensor& x, const at::Tensor& seed, double gamma, int64_t block_size, double eps,
                      bool shared) {
  check_drop_block_args(x, seed, gamma, block_size, eps);
  const bool channels_last = drop_block_channels_last(x);
  TORCH_CHECK(channels_last || x.is_contiguous(), "fastreg::drop_block_: 'x' must be contiguous or channels-last");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [mask, scale] = mask_and_scale(x, seed, gamma, block_size, eps, shared, channels_last);
  apply_mask(x, mask, scale, x.numel() / std::max<int64_t>(mask.size(0), 1), x);
}

at::Tensor drop_block_apply_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale) {
  const int64_t row_length = check_drop_block_apply_args(x, mask, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);  // x is dense: out gets its strides
  apply_mask(x, mask, scale, row_length, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("drop_block", &drop_block_cuda);
  m.impl("drop_block_", &drop_block_cuda_);
  m.impl("drop_block_apply", &drop_block_apply_cuda);
}

}  // namespace fastreg
