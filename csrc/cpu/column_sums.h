// The CPU twin of csrc/include/fastreg/column_sums.cuh: a parameter gradient from its
// per-chunk partials.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "parallel.h"

namespace fastreg {

// The (rows, n) float partials summed over the first `rows` rows in row order, so the same
// sums on every run and thread count, in out_dtype (no rows: zeros). A loop, not at::sum:
// on small layers the host time of a reduction op is most of the backward.
template <typename acc_t>
at::Tensor column_sums_cpu(const at::Tensor& partials, int64_t rows, at::ScalarType out_dtype) {
  const int64_t n = partials.size(1);
  at::Tensor total = at::empty({n}, partials.options());
  const acc_t* p = partials.const_data_ptr<acc_t>();
  acc_t* out = total.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, grain_for(rows), [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, acc_t(0));
    for (int64_t row = 0; row < rows; ++row) {
      const acc_t* __restrict partial = p + row * n;
      for (int64_t j = begin; j < end; ++j) out[j] += partial[j];
    }
  });
  return out_dtype == total.scalar_type() ? total : total.to(out_dtype);
}

}  // namespace fastreg
