// Dropout on CUDA tensors: one thread per 4 consecutive elements and one Philox call
// (csrc/include/fastreg/philox.h) for the four, with 4-wide vector loads and stores
// when the pointers allow. The seed is read on the device: no host synchronization.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastreg/dropout_args.h"
#include "fastreg/grid.cuh"
#include "fastreg/philox.h"

namespace fastreg {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void dropout_elementwise_kernel(DropoutParams<scalar_t> p, bool vectorized) {
  using acc_t = typename DropoutParams<scalar_t>::acc_t;
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t groups = (p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(p.offset) / 4 + g, seed);
    const int64_t base = 4 * g;
    if (vectorized && base + 4 <= p.numel) {
      Vec4<scalar_t> x = *reinterpret_cast<const Vec4<scalar_t>*>(p.x + base);
      Vec4<scalar_t> out;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const acc_t multiplier = keep_element(r.w[j], p.threshold) ? p.scale : acc_t(0);
        out.v[j] = dropout_combine(p, base + j, x.v[j], multiplier);
      }
      *reinterpret_cast<Vec4<scalar_t>*>(p.out + base) = out;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (base + j < p.numel) {
          const acc_t multiplier = keep_element(r.w[j], p.threshold) ? p.scale : acc_t(0);
          p.out[base + j] = dropout_combine(p, base + j, p.x[base + j], multiplier);
        }
      }
    }
  }
}

// inner > 1: element i draws the word at stream position offset + i / inner.
template <typename scalar_t>
__global__ void dropout_grouped_kernel(DropoutParams<scalar_t> p) {
  using acc_t = typename DropoutParams<scalar_t>::acc_t;
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    const uint64_t position = static_cast<uint64_t>(p.offset) + i / p.inner;
    const uint32_t word = philox4x32_10(position / 4, seed).w[position % 4];
    const acc_t multiplier = keep_element(word, p.threshold) ? p.scale : acc_t(0);
    p.out[i] = dropout_combine(p, i, p.x[i], multiplier);
  }
}

void launch(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
            at::Tensor& out) {
  if (x.numel() == 0) return;
  const at::Tensor residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_dropout_cuda", [&] {
    const auto params = dropout_params<scalar_t>(x, seed, p, offset, inner, bias_c, residual_c, out);
    const size_t vector_bytes = 4 * sizeof(scalar_t);  // x, residual and out aligned to 4 elements
    const bool vectorized = aligned_to(params.x, vector_bytes) && aligned_to(params.out, vector_bytes) &&
                            (!params.residual || aligned_to(params.residual, vector_bytes));
    const int64_t work = inner == 1 ? (params.numel + 3) / 4 : params.numel;
    const int blocks = grid_stride_blocks(work, kThreads);
    if (inner == 1) {
      dropout_elementwise_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(params, vectorized);
    } else {
      dropout_grouped_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_dropout_args(x, seed, p, offset, inner, bias, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  launch(input, seed, p, offset, inner, bias, residual, out);
  return out;
}

void dropout_cuda_(at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner) {
  check_dropout_args(x, seed, p, offset, inner, std::nullopt, std::nullopt);
  if (!x.is_contiguous()) {  // the kernel walks x in row-major order: through a contiguous copy
    x.copy_(dropout_cuda(x, seed, p, offset, inner, std::nullopt, std::nullopt));
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  launch(x, seed, p, offset, inner, std::nullopt, std::nullopt, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_", &dropout_cuda_);
}

}  // namespace fastreg
