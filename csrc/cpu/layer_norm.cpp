// LayerNorm / RMSNorm on CPU tensors, forward (optionally of h = residual + dropout(x))
// and backward. Rows run in parallel; each row's values are gathered once into a buffer
// of the accumulate type (float, double for double inputs) and its statistics taken in
// two passes over it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastreg/norm_args.h"
#include "fastreg/philox.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int64_t kMaxWeightChunks = 256;

// Row statistics of v[0..n): (mean, rstd); mean is 0 for RMSNorm. The row is in a
// buffer already, so two passes (the mean, then squared deviations from it) cost little
// and are exact for large means; the sums are double.
template <typename acc_t>
std::pair<acc_t, acc_t> row_statistics(const acc_t* v, int64_t n, bool is_rms, double eps) {
  double mean = 0.0;
  if (!is_rms) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += v[j];
    mean = sum / n;
  }
  double sum_squares = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double centered = v[j] - mean;
    sum_squares += centered * centered;
  }
  return {static_cast<acc_t>(mean), static_cast<acc_t>(1.0 / std::sqrt(sum_squares / n + eps))};
}

template <typename scalar_t, typename h_t>
void norm_fwd_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& seed, double p,
                   double eps, bool is_rms, NormOutputs& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m = x.size(0), n = x.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* res_data = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const bool fused = out.h.numel() > 0;
  h_t* h_data = fused ? out.h.mutable_data_ptr<h_t>() : nullptr;
  scalar_t* y = out.y.mutable_data_ptr<scalar_t>();
  acc_t* mean_out = is_rms ? nullptr : out.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_out = out.rstd.mutable_data_ptr<acc_t>();
  const bool dropout = seed.has_value();
  const uint64_t seed_value = dropout ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  const uint64_t threshold = drop_threshold(p);
  const acc_t scale = static_cast<acc_t>(keep_scale(p));

  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(n), multiplier(dropout ? n : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * n;
      if (dropout) {  // one Philox call per 4 stream positions, positions base .. base + n
        for (uint64_t group = base / 4; group * 4 < static_cast<uint64_t>(base + n); ++group) {
          const Philox4 r = philox4x32_10(group, seed_value);
          for (int lane = 0; lane < 4; ++lane) {
            const int64_t j = static_cast<int64_t>(group * 4 + lane) - base;
            if (j >= 0 && j < n) multiplier[j] = scale * static_cast<acc_t>(keep_element(r.w[lane], threshold));
          }
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        acc_t value = static_cast<acc_t>(x_data[base + j]);
        if (fused) {
          if (dropout) value = value * multiplier[j];
          if (res_data) value = static_cast<acc_t>(res_data[base + j]) + value;
          const h_t rounded = static_cast<h_t>(value);  // normalize what backward will read
          h_data[base + j] = rounded;
          value = static_cast<acc_t>(rounded);
        }
        v[j] = value;
      }
      const auto [mean, rstd] = row_statistics(v.data(), n, is_rms, eps);
      for (int64_t j = 0; j < n; ++j) {
        acc_t out_value = (v[j] - mean) * rstd;
        if (w) out_value = out_value * w[j];
        if (b) out_value = out_value + b[j];
        y[base + j] = static_cast<scalar_t>(out_value);
      }
      if (mean_out) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, bool is_rms, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& seed,
    double p, bool residual_in_fp32) {
  check_norm_fwd_args(x_in, weight, bias, residual_in, seed, p);
  const at::Tensor x = x_in.contiguous();
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = residual_in->contiguous();
  const bool fused = residual.has_value() || seed.has_value();
  NormOutputs out = allocate_norm_outputs(x, is_rms, fused, residual_in_fp32);
  if (x.numel() == 0) return {out.y, out.h, out.mean, out.rstd};
  const at::Tensor w = param_as_acc(weight, x), b = param_as_acc(bias, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_norm_fwd_cpu", [&] {
    if (residual_in_fp32) {
      norm_fwd_rows<scalar_t, acc_type<scalar_t>>(x, w, b, residual, seed, p, eps, is_rms, out);
    } else {
      norm_fwd_rows<scalar_t, scalar_t>(x, w, b, residual, seed, p, eps, is_rms, out);
    }
  });
  return {out.y, out.h, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool is_rms, bool has_bias, const std::optional<at::Tensor>& dh_in) {
  check_norm_bwd_args(dy_in, x_in, rstd, dh_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();  // y's dtype may differ from h's
  const at::Tensor dh = dh_in.has_value() ? dh_in->to(x.scalar_type()).contiguous() : at::Tensor();
  const int64_t m = x.size(0), n = x.size(1);
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  at::Tensor dx = at::empty_like(x);
  const int64_t chunk_rows = rows_per_chunk(m, kMaxWeightChunks);
  const int64_t chunks = m == 0 ? 1 : (m + chunk_rows - 1) / chunk_rows;
  at::Tensor dw_partial = at::zeros({chunks, n}, x.options().dtype(acc_dtype(x)));
  at::Tensor db_partial = at::zeros({chunks, n}, x.options().dtype(acc_dtype(x)));
  const at::Tensor w = param_as_acc(weight, x);
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_norm_bwd_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
      const scalar_t* dh_data = dh.defined() ? dh.const_data_ptr<scalar_t>() : nullptr;
      const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
      const acc_t* mean_data = is_rms ? nullptr : mean.const_data_ptr<acc_t>();
      const acc_t* rstd_data = rstd.const_data_ptr<acc_t>();
      scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        std::vector<acc_t> xhat(n), g(n);
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
          acc_t* dw = dw_partial.mutable_data_ptr<acc_t>() + chunk * n;
          acc_t* db = db_partial.mutable_data_ptr<acc_t>() + chunk * n;
          for (int64_t row = chunk * chunk_rows; row < std::min(m, (chunk + 1) * chunk_rows); ++row) {
            const int64_t base = row * n;
            const acc_t mean_row = mean_data ? mean_data[row] : acc_t(0), rstd_row = rstd_data[row];
            double sum_gx = 0.0, sum_g = 0.0;
            for (int64_t j = 0; j < n; ++j) {
              const acc_t dy_j = static_cast<acc_t>(dy_data[base + j]);
              xhat[j] = (static_cast<acc_t>(x_data[base + j]) - mean_row) * rstd_row;
              g[j] = w_data ? dy_j * w_data[j] : dy_j;
              sum_gx += static_cast<double>(g[j]) * xhat[j];
              sum_g += g[j];
              dw[j] += dy_j * xhat[j];
              db[j] += dy_j;
            }
            const acc_t c1 = static_cast<acc_t>(sum_gx / n);
            const acc_t c2 = is_rms ? acc_t(0) : static_cast<acc_t>(sum_g / n);
            for (int64_t j = 0; j < n; ++j) {
              acc_t value = (g[j] - xhat[j] * c1 - c2) * rstd_row;
              if (dh_data) value += static_cast<acc_t>(dh_data[base + j]);
              dx_data[base + j] = static_cast<scalar_t>(value);
            }
          }
        }
      });
    });
  }
  // second reduction over the chunks, in order: deterministic
  at::Tensor dw = weight.has_value() ? dw_partial.sum(0).to(w_dtype) : at::empty({0}, x.options().dtype(w_dtype));
  at::Tensor db = has_bias ? db_partial.sum(0).to(w_dtype) : at::empty({0}, x.options().dtype(w_dtype));
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("norm_fwd", &norm_fwd_cpu);
  m.impl("norm_bwd", &norm_bwd_cpu);
}

}  // namespace fastreg
