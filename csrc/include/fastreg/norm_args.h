#pragma once
// Argument checks, output allocation and kernel parameters of the norm ops, shared by the
// CPU and CUDA registrations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/promote_types.h>

#include "fastreg/philox.h"
#include "fastreg/welford.h"

namespace fastreg {

struct NormOutputs {
  at::Tensor y, h, mean, rstd;
};

inline void check_norm_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& seed, double p) {
  TORCH_CHECK(x.dim() == 2, "fastreg::norm_fwd: 'x' must be 2-D (rows, normalized size), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::norm_fwd: expected a floating-point 'x'");
  const int64_t n = x.size(1);
  for (const auto* param : {&weight, &bias}) {
    if (param->has_value()) {
      TORCH_CHECK((*param)->numel() == n && (*param)->device() == x.device() &&
                      at::isFloatingType((*param)->scalar_type()),
                  "fastreg::norm_fwd: 'weight' and 'bias' must have x.size(1) = ", n,
                  " floating-point elements on x's device");
    }
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "fastreg::norm_fwd: 'residual' must have x's shape, dtype and device");
  }
  if (seed.has_value()) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device() == x.device(),
                "fastreg::norm_fwd: 'seed' must be an int64 tensor with one element on x's device");
  }
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
}

// t in `dtype`: t itself when it has it (no dispatcher call: tiny rows are host-bound).
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The dtype statistics (mean, rstd), parameters and weight-gradient partials are kept
// in: float32, or float64 for float64 inputs (acc_type in fastreg/welford.h).
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// h has rows only when it is stored (fused, and store_h).
inline NormOutputs allocate_norm_outputs(const at::Tensor& x, bool is_rms, bool store_h, bool residual_in_fp32) {
  const int64_t m = x.size(0), n = x.size(1);
  const auto h_dtype = residual_in_fp32 ? at::promote_types(x.scalar_type(), at::kFloat) : x.scalar_type();
  const auto stats = x.options().dtype(acc_dtype(x));
  return NormOutputs{
      at::empty({m, n}, x.options()),
      store_h ? at::empty({m, n}, x.options().dtype(h_dtype)) : at::empty({0}, x.options().dtype(h_dtype)),
      at::empty({is_rms ? 0 : m}, stats),
      at::empty({m}, stats),
  };
}

// Parameters in the accumulate dtype (they are N elements: the copy is negligible), so
// the kernels take one parameter type whatever the input's.
inline at::Tensor param_as_acc(const std::optional<at::Tensor>& param, const at::Tensor& x) {
  return param.has_value() ? as_dtype(*param, acc_dtype(x)).contiguous() : at::Tensor();
}

inline void check_norm_bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& seed, double p) {
  if (seed.has_value()) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device() == x.device(),
                "fastreg::norm_bwd: 'seed' must be an int64 tensor with one element on x's device");
  }
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "fastreg::norm_bwd: 'dy' and 'x' must be 2-D of one shape");
  TORCH_CHECK(rstd.numel() == x.size(0) && rstd.scalar_type() == acc_dtype(x),
              "fastreg::norm_bwd: 'rstd' must have one value per row, float32 (float64 for float64 'x')");
  if (dh.has_value()) {
    TORCH_CHECK(dh->sizes() == x.sizes(), "fastreg::norm_bwd: 'dh' must have x's shape");
  }
}

// Rows per partial-sum chunk of dweight / dbias: a fixed split of the rows (not the
// thread count), so the sums are the same on every run.
inline int64_t rows_per_chunk(int64_t rows, int64_t max_chunks) {
  const int64_t chunks = std::max<int64_t>(1, std::min(rows, max_chunks));
  return (rows + chunks - 1) / chunks;
}

// What a norm_bwd kernel reads and writes, prepared the same way on every device: the
// contiguous inputs, whatever strides they came with (dy and dh in the dtype of the norm
// input: y's may differ from h's; mean and rstd), dx, the weight in the accumulate dtype,
// and dweight / dbias partials, one row per chunk of chunk_rows rows, uninitialized: each
// chunk's kernel writes its row whole. With a seed, dx_dropout (dropout(dx), in dx's dtype) too.
struct NormBwdBuffers {
  at::Tensor x, dy, dh, w, mean, rstd, dx, dw_partial, db_partial, dx_dropout;
  int64_t m, n, chunk_rows;
};

inline NormBwdBuffers prepare_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const std::optional<at::Tensor>& dh, const std::optional<at::Tensor>& seed,
                                       int64_t max_chunks) {
  NormBwdBuffers b;
  b.x = x.contiguous();
  b.mean = mean.contiguous();
  b.rstd = rstd.contiguous();
  b.dy = as_dtype(dy, x.scalar_type()).contiguous();
  b.dh = dh.has_value() ? as_dtype(*dh, x.scalar_type()).contiguous() : at::Tensor();
  b.w = param_as_acc(weight, b.x);
  b.dx = at::empty_like(b.x);
  b.dx_dropout = seed.has_value() ? at::empty_like(b.x) : at::empty({0}, b.x.options());
  b.m = b.x.size(0);
  b.n = b.x.size(1);
  b.chunk_rows = rows_per_chunk(b.m, max_chunks);
  const int64_t chunks = b.m == 0 ? 1 : (b.m + b.chunk_rows - 1) / b.chunk_rows;
  const auto partials = b.x.options().dtype(acc_dtype(b.x));
  b.dw_partial = at::empty({chunks, b.n}, partials);
  b.db_partial = at::empty({chunks, b.n}, partials);
  return b;
}

// What a norm_fwd kernel reads and writes: rows of n elements; h_t is h's dtype.
template <typename scalar_t, typename h_t>
struct NormFwdParams {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;  // nullptr: none
  const acc_t* weight;  // nullptr: none
  const acc_t* bias;  // nullptr: none
  const int64_t* seed;  // one element on x's device; nullptr: no dropout
  scalar_t* y;
  bool fused;  // the norm input is h = residual + dropout(x)
  h_t* h;  // where h is stored; nullptr: not stored
  acc_t* mean;  // nullptr: RMSNorm
  acc_t* rstd;
  int64_t n;
  double eps;
  uint64_t threshold;
  acc_t scale;
};

// x, residual: contiguous (residual undefined: none); weight, bias from param_as_acc.
template <typename scalar_t, typename h_t>
NormFwdParams<scalar_t, h_t> norm_fwd_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                             const at::Tensor& residual, const std::optional<at::Tensor>& seed,
                                             double p, double eps, bool is_rms, bool fused, NormOutputs& out) {
  using acc_t = acc_type<scalar_t>;
  NormFwdParams<scalar_t, h_t> params;
  params.x = x.const_data_ptr<scalar_t>();
  params.residual = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  params.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  params.bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  params.seed = seed.has_value() ? seed->const_data_ptr<int64_t>() : nullptr;
  params.y = out.y.mutable_data_ptr<scalar_t>();
  params.fused = fused;
  params.h = out.h.numel() > 0 ? out.h.mutable_data_ptr<h_t>() : nullptr;
  params.mean = is_rms ? nullptr : out.mean.mutable_data_ptr<acc_t>();
  params.rstd = out.rstd.mutable_data_ptr<acc_t>();
  params.n = x.size(1);
  params.eps = eps;
  params.threshold = drop_threshold(p);
  params.scale = static_cast<acc_t>(keep_scale(p));
  return params;
}

// What a norm_bwd kernel reads and writes (the buffers of prepare_norm_bwd).
template <typename scalar_t>
struct NormBwdParams {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* dh;  // nullptr: none
  const acc_t* weight;  // nullptr: none
  const acc_t* mean;  // nullptr: RMSNorm
  const acc_t* rstd;
  scalar_t* dx;
  scalar_t* dx_dropout;  // nullptr: no dropout
  const int64_t* seed;  // one element on x's device; nullptr: no dropout
  acc_t* dw_partial;  // (chunks, n): one row per chunk of chunk_rows rows
  acc_t* db_partial;
  int64_t m, n, chunk_rows;
  uint64_t threshold;
  acc_t scale;
};

template <typename scalar_t>
NormBwdParams<scalar_t> norm_bwd_params(NormBwdBuffers& b, bool is_rms, const std::optional<at::Tensor>& seed, double p) {
  using acc_t = acc_type<scalar_t>;
  NormBwdParams<scalar_t> params;
  params.dy = b.dy.const_data_ptr<scalar_t>();
  params.x = b.x.const_data_ptr<scalar_t>();
  params.dh = b.dh.defined() ? b.dh.const_data_ptr<scalar_t>() : nullptr;
  params.weight = b.w.defined() ? b.w.const_data_ptr<acc_t>() : nullptr;
  params.mean = is_rms ? nullptr : b.mean.const_data_ptr<acc_t>();
  params.rstd = b.rstd.const_data_ptr<acc_t>();
  params.dx = b.dx.mutable_data_ptr<scalar_t>();
  params.dx_dropout = seed.has_value() ? b.dx_dropout.mutable_data_ptr<scalar_t>() : nullptr;
  params.seed = seed.has_value() ? seed->const_data_ptr<int64_t>() : nullptr;
  params.dw_partial = b.dw_partial.mutable_data_ptr<acc_t>();
  params.db_partial = b.db_partial.mutable_data_ptr<acc_t>();
  params.m = b.m;
  params.n = b.n;
  params.chunk_rows = b.chunk_rows;
  params.threshold = drop_threshold(p);
  params.scale = static_cast<acc_t>(keep_scale(p));
  return params;
}

}  // namespace fastreg
