// Gaussian noise (multiplicative: Gaussian dropout; additive) and alpha dropout on CUDA
// tensors: one thread per 4 consecutive elements and one Philox call
// (csrc/include/fastreg/philox.h) for the four, 4-wide vector loads and stores when the
// pointers allow. The normals are those of csrc/include/fastreg/normal.h (its __f*_rn
// intrinsics keep nvcc from fusing a multiply and an add). The seed is read on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastreg/grid.cuh"
#include "fastreg/noise_args.h"
#include "fastreg/normal.h"
#include "fastreg/philox.h"

namespace fastreg {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t work) {
  return grid_stride_blocks(work, kThreads);
}

// out = x * (1 + std * n) (multiplicative) or x + std * n, in the accumulate type
template <typename acc_t, bool multiplicative>
__device__ __forceinline__ acc_t add_noise(acc_t x, acc_t std, float normal) {
  const acc_t noise = std * static_cast<acc_t>(normal);
  if constexpr (std::is_same_v<acc_t, float>) {
    return multiplicative ? __fmul_rn(x, __fadd_rn(1.0f, noise)) : __fadd_rn(x, noise);
  } else {
    return multiplicative ? __dmul_rn(x, __dadd_rn(1.0, noise)) : __dadd_rn(x, noise);
  }
}

template <typename scalar_t, bool multiplicative>
__global__ void gaussian_noise_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                      const int64_t* __restrict__ seed_ptr, int64_t numel, int64_t offset,
                                      at::opmath_type<scalar_t> std, bool vectorized) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(offset) / 4 + g, seed);
    float normals[4];
    normal_pair(r.w[0], r.w[1], &normals[0], &normals[1]);
    normal_pair(r.w[2], r.w[3], &normals[2], &normals[3]);
    const int64_t base = 4 * g;
    if (vectorized && base + 4 <= numel) {
      const Vec4<scalar_t> in = *reinterpret_cast<const Vec4<scalar_t>*>(x + base);
      Vec4<scalar_t> result;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        result.v[j] = static_cast<scalar_t>(add_noise<acc_t, multiplicative>(static_cast<acc_t>(in.v[j]), std, normals[j]));
      }
      *reinterpret_cast<Vec4<scalar_t>*>(out + base) = result;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (base + j < numel) {
          out[base + j] = static_cast<scalar_t>(
              add_noise<acc_t, multiplicative>(static_cast<acc_t>(x[base + j]), std, normals[j]));
        }
      }
    }
  }
}

at::Tensor gaussian_noise_cuda(const at::Tensor& x, const at::Tensor& seed, double std, bool multiplicative,
                               int64_t offset) {
  check_gaussian_noise_args(x, seed, std, offset);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (input.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_gaussian_noise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool vectorized = aligned_to(in, 4 * sizeof(scalar_t)) && aligned_to(o, 4 * sizeof(scalar_t));
    const int blocks = blocks_for((input.numel() + 3) / 4);
    if (multiplicative) {
      gaussian_noise_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          in, o, seed.const_data_ptr<int64_t>(), input.numel(), offset, static_cast<acc_t>(std), vectorized);
    } else {
      gaussian_noise_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          in, o, seed.const_data_ptr<int64_t>(), input.numel(), offset, static_cast<acc_t>(std), vectorized);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t>
struct AlphaDropoutParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  const int64_t* seed;
  int64_t numel, offset, inner;
  uint64_t threshold;
  acc_t scale, keep_shift, drop_shift;
};

// x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift), two roundings as torch's mul and add_
template <typename scalar_t>
__device__ __forceinline__ scalar_t alpha_apply(const AlphaDropoutParams<scalar_t>& p, scalar_t x, bool keep) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scaled = static_cast<acc_t>(x) * (keep ? p.scale : acc_t(0));
  const acc_t shift = keep ? p.keep_shift : p.drop_shift;
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<scalar_t>(__fadd_rn(scaled, shift));
  } else {
    return static_cast<scalar_t>(__dadd_rn(scaled, shift));
  }
}

template <typename scalar_t>
__global__ void alpha_dropout_elementwise_kernel(AlphaDropoutParams<scalar_t> p, bool vectorized) {
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t groups = (p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(p.offset) / 4 + g, seed);
    const int64_t base = 4 * g;
    if (vectorized && base + 4 <= p.numel) {
      const Vec4<scalar_t> in = *reinterpret_cast<const Vec4<scalar_t>*>(p.x + base);
      Vec4<scalar_t> result;
#pragma unroll
      for (int j = 0; j < 4; ++j) result.v[j] = alpha_apply(p, in.v[j], keep_element(r.w[j], p.threshold));
      *reinterpret_cast<Vec4<scalar_t>*>(p.out + base) = result;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (base + j < p.numel) p.out[base + j] = alpha_apply(p, p.x[base + j], keep_element(r.w[j], p.threshold));
      }
    }
  }
}

// inner > 1: element i draws the word at stream position offset + i / inner.
template <typename scalar_t>
__global__ void alpha_dropout_grouped_kernel(AlphaDropoutParams<scalar_t> p) {
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    const uint64_t position = static_cast<uint64_t>(p.offset) + i / p.inner;
    const uint32_t word = philox4x32_10(position / 4, seed).w[position % 4];
    p.out[i] = alpha_apply(p, p.x[i], keep_element(word, p.threshold));
  }
}

void alpha_dropout_launch(const at::Tensor& x, const at::Tensor& seed, double p, double scale, double keep_shift,
                          double drop_shift, int64_t offset, int64_t inner, at::Tensor& out) {
  if (x.numel() == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_alpha_dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AlphaDropoutParams<scalar_t> params;
    params.x = x.const_data_ptr<scalar_t>();
    params.out = out.mutable_data_ptr<scalar_t>();
    params.seed = seed.const_data_ptr<int64_t>();
    params.numel = x.numel();
    params.offset = offset;
    params.inner = inner;
    params.threshold = drop_threshold(p);
    params.scale = static_cast<acc_t>(scale);
    params.keep_shift = static_cast<acc_t>(keep_shift);
    params.drop_shift = static_cast<acc_t>(drop_shift);
    if (inner == 1) {
      const bool vectorized = aligned_to(params.x, 4 * sizeof(scalar_t)) && aligned_to(params.out, 4 * sizeof(scalar_t));
      alpha_dropout_elementwise_kernel<scalar_t><<<blocks_for((params.numel + 3) / 4), kThreads, 0, stream>>>(
          params, vectorized);
    } else {
      alpha_dropout_grouped_kernel<scalar_t><<<blocks_for(params.numel), kThreads, 0, stream>>>(params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor alpha_dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p, double scale, double keep_shift,
                              double drop_shift, int64_t offset, int64_t inner) {
  check_alpha_dropout_args(x, seed, p, offset, inner);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  alpha_dropout_launch(input, seed, p, scale, keep_shift, drop_shift, offset, inner, out);
  return out;
}

void alpha_dropout_cuda_(at::Tensor& x, const at::Tensor& seed, double p, double scale, double keep_shift,
                         double drop_shift, int64_t offset, int64_t inner) {
  check_alpha_dropout_args(x, seed, p, offset, inner);
  TORCH_CHECK(x.is_contiguous(), "fastreg::alpha_dropout_: 'x' must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  alpha_dropout_launch(x, seed, p, scale, keep_shift, drop_shift, offset, inner, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("gaussian_noise", &gaussian_noise_cuda);
  m.impl("alpha_dropout", &alpha_dropout_cuda);
  m.impl("alpha_dropout_", &alpha_dropout_cuda_);
}

}  // namespace fastreg
