#pragma once
// CUDA only (included by csrc/cuda/*.cu): parameter gradients from per-chunk partials in
// one launch, summed in a fixed order (deterministic, no atomics) and written in the
// parameter's dtype, where `partial.sum(0).to(dtype)` would be one launch per sum and cast.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace fastreg {

constexpr int kColumnSumThreads = 256;

// Column j: out_a[j] = sum over rows r = 0, 1, ... of a[r * cols + j] (likewise b), one
// thread per column (adjacent threads read adjacent columns: coalesced). A null input
// has no output.
template <typename acc_t, typename out_t>
__global__ void column_sums_kernel(const acc_t* a, const acc_t* b, out_t* out_a, out_t* out_b, int64_t rows,
                                   int64_t cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  acc_t sum_a = 0, sum_b = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (a) sum_a += a[r * cols + j];
    if (b) sum_b += b[r * cols + j];
  }
  if (a) out_a[j] = static_cast<out_t>(sum_a);
  if (b) out_b[j] = static_cast<out_t>(sum_b);
}

// (the column sums of a, of b) over their first `rows` rows ((rows', cols) float32 or
// float64, contiguous; rows <= rows'), each (cols,) in out_dtype, in one launch; an
// undefined input gives an empty output. rows == 0 gives zeros.
inline std::tuple<at::Tensor, at::Tensor> column_sums_cuda(const at::Tensor& a, const at::Tensor& b, int64_t rows,
                                                           int64_t cols, at::ScalarType out_dtype) {
  const at::Tensor& any = a.defined() ? a : b;
  TORCH_INTERNAL_ASSERT(any.defined(), "column_sums_cuda: no input");
  const auto options = any.options().dtype(out_dtype);
  at::Tensor out_a = at::empty({a.defined() ? cols : 0}, options);
  at::Tensor out_b = at::empty({b.defined() ? cols : 0}, options);
  if (cols == 0) return {out_a, out_b};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (cols + kColumnSumThreads - 1) / kColumnSumThreads;
  AT_DISPATCH_FLOATING_TYPES(any.scalar_type(), "fastreg_column_sums_acc", [&] {
    using acc_t = scalar_t;
    const acc_t* a_ptr = a.defined() ? a.const_data_ptr<acc_t>() : nullptr;
    const acc_t* b_ptr = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "fastreg_column_sums_out", [&] {
      column_sums_kernel<acc_t, scalar_t><<<blocks, kColumnSumThreads, 0, stream>>>(
          a_ptr, b_ptr, a.defined() ? out_a.mutable_data_ptr<scalar_t>() : nullptr,
          b.defined() ? out_b.mutable_data_ptr<scalar_t>() : nullptr, rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out_a, out_b};
}

}  // namespace fastreg
