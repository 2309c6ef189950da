// LayerNorm / RMSNorm on CPU tensors, forward (optionally of h = residual + dropout(x))
// and backward. Rows run in parallel. Arithmetic in the accumulate type (float, double
// for double inputs); statistics in two passes over a row (L1-resident after the first)
// with sums in vectorizable lanes (csrc/cpu/vectorize.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fastreg/norm_args.h"
#include "fastreg/philox.h"
#include "fastreg/welford.h"
#include "column_sums.h"
#include "convert.h"
#include "parallel.h"
#include "vectorize.h"

namespace fastreg {
namespace {

// A fixed split of the rows (not the thread count) for the dweight / dbias partials: a few
// chunks per core, and few enough that the partials stay small.
constexpr int64_t kMaxWeightChunks = 64;

// Statistics of the row v, then y. Two passes for the statistics, the second from L1:
// the mean of v - v[0] (shifted, so a large mean costs no precision), then the squared
// deviations from the mean. A 16-bit y is computed from `stored`, the row v as stored in
// 16 bits where there is one (x of a plain norm), converted in registers; else from v
// through the float row y_buf.
template <int64_t Bytes, typename scalar_t, typename h_t, typename acc_t>
FASTREG_INLINE inline void normalize_row(const NormFwdParams<scalar_t, h_t>& a, int64_t row,
                                         const acc_t* __restrict v, const scalar_t* __restrict stored,
                                         acc_t* __restrict y_buf) {
  const int64_t n = a.n;
  acc_t mean = 0;
  if (a.mean) {
    const acc_t shift = v[0];
    mean = shift + vector_sum<Bytes>(v, n, [&](auto value) FASTREG_INLINE { return value - shift; }) / n;
  }
  const acc_t m2 = vector_sum<Bytes>(v, n, [&](auto value) FASTREG_INLINE { return (value - mean) * (value - mean); });
  const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(m2) / n + a.eps));
  scalar_t* __restrict y = a.y + row * n;
  const acc_t* __restrict w = a.weight;
  const acc_t* __restrict b = a.bias;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    constexpr int64_t W = kWidth<acc_t, Bytes>;
    const auto at = [](const acc_t* p) FASTREG_INLINE { return load<acc_t, Bytes>(p); };
    if (w && b) {
      for (; j + W <= n; j += W) store(y + j, (at(v + j) - mean) * rstd * at(w + j) + at(b + j));
    } else if (w) {
      for (; j + W <= n; j += W) store(y + j, (at(v + j) - mean) * rstd * at(w + j));
    }
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; j < n; ++j) {
      acc_t out = (v[j] - mean) * rstd;
      if (w) out = out * w[j];
      if (b) out = out + b[j];
      y[j] = out;
    }
  } else if (stored != nullptr) {
    const acc_t *wp = w, *bp = b, m = mean, r = rstd;  // by value: registers (map_half_rows)
    map_half_rows<Bytes>(stored, nullptr, y, n, 1, n, [=](auto value, int64_t i) FASTREG_INLINE {
      using T = decltype(value);
      auto out = (value - m) * r;
      if (wp) out = out * values_at<T>(wp, i);
      if (bp) out = out + values_at<T>(bp, i);
      return out;
    });
  } else {
    for (; j < n; ++j) {
      acc_t out = (v[j] - mean) * rstd;
      if (w) out = out * w[j];
      if (b) out = out + b[j];
      y_buf[j] = out;
    }
    narrow_from_float(y_buf, y, n);
  }
  if (a.mean) a.mean[row] = mean;
  a.rstd[row] = rstd;
}

// One row. Plain norm: straight from x. Fused: h = residual + dropout(x) is formed in v
// (and stored), then normalized. v, multiplier and y_buf (16-bit y) are scratch rows.
template <int64_t Bytes, typename scalar_t, typename h_t>
FASTREG_INLINE inline void norm_fwd_row(const NormFwdParams<scalar_t, h_t>& a, int64_t row,
                                            acc_type<scalar_t>* __restrict v,
                                            acc_type<scalar_t>* __restrict multiplier,
                                            acc_type<scalar_t>* __restrict y_buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = a.n, base = row * n;
  const scalar_t* __restrict x = a.x + base;
  if (!a.fused) {
    const scalar_t* stored = std::is_same_v<scalar_t, acc_t> ? nullptr : x;
    normalize_row<Bytes>(a, row, as_acc(x, v, n), stored, y_buf);
    return;
  }
  if (a.seed) {
    keep_multipliers(static_cast<uint64_t>(base), n, static_cast<uint64_t>(*a.seed), a.threshold, a.scale, multiplier);
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(x[j]) * multiplier[j];
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(x[j]);
  }
  if (a.residual) {
    const scalar_t* __restrict residual = a.residual + base;
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(residual[j]) + v[j];
  }
  // normalize h rounded to its dtype, what backward reads
  if (a.h) {
    h_t* __restrict h = a.h + base;
    for (int64_t j = 0; j < n; ++j) {
      h[j] = static_cast<h_t>(v[j]);
      v[j] = static_cast<acc_t>(h[j]);
    }
  } else if constexpr (!std::is_same_v<h_t, acc_t>) {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(static_cast<h_t>(v[j]));
  }
  normalize_row<Bytes>(a, row, static_cast<const acc_t*>(v), static_cast<const scalar_t*>(nullptr), y_buf);
}

template <typename scalar_t, typename h_t>
void norm_fwd_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& seed, double p,
                   double eps, bool is_rms, bool fused, NormOutputs& out) {
  using acc_t = acc_type<scalar_t>;
  const auto a = norm_fwd_params<scalar_t, h_t>(x, weight, bias, residual.has_value() ? *residual : at::Tensor(),
                                                seed, p, eps, is_rms, fused, out);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.n, 1));
  at::parallel_for(0, x.size(0), grain, [&](int64_t begin, int64_t end) {
    const bool convert = a.fused || !std::is_same_v<scalar_t, acc_t>;
    // a 16-bit y goes through y_buf only when fused (a plain norm converts it in registers)
    const bool narrow_from_buf = a.fused && !std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> v(convert ? a.n : 0), multiplier(a.seed ? a.n : 0), y_buf(narrow_from_buf ? a.n : 0);
    with_widest_vectors([&](auto bytes) FASTREG_INLINE {
      for (int64_t row = begin; row < end; ++row) {
        norm_fwd_row<bytes>(a, row, v.data(), multiplier.data(), y_buf.data());
      }
    });
  });
}

// Rows [first, last): dx, and their dweight / dbias sums added into dw, db (one chunk's
// partials). Two passes per row: the sums (with dw, db), then dx. With xhat = (x - mean)
// * rstd and g = dy * w: dx = rstd * (g - mean(g * xhat) * xhat - mean(g)) (no mean(g)
// term for RMSNorm), plus dh. x_buf, dy_buf and dx_buf (16-bit dx) are scratch rows.
template <typename scalar_t>
FASTREG_CPU_CLONES void norm_bwd_rows(const NormBwdParams<scalar_t>& a, int64_t first, int64_t last,
                                      acc_type<scalar_t>* __restrict dw, acc_type<scalar_t>* __restrict db,
                                      acc_type<scalar_t>* __restrict x_buf, acc_type<scalar_t>* __restrict dy_buf,
                                      acc_type<scalar_t>* __restrict dx_buf,
                                      acc_type<scalar_t>* __restrict multiplier) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = kWidth<acc_t>;
  const int64_t n = a.n;
  const acc_t* __restrict w = a.weight;
  for (int64_t row = first; row < last; ++row) {
    const acc_t* __restrict x = as_acc(a.x + row * n, x_buf, n);
    const acc_t* __restrict dy = as_acc(a.dy + row * n, dy_buf, n);
    const acc_t mean = a.mean ? a.mean[row] : acc_t(0), rstd = a.rstd[row];
    V sum_gx = {}, sum_g = {};
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V dy_j = load(dy + j), xhat = (load(x + j) - mean) * rstd;
      const V g = w ? dy_j * load(w + j) : dy_j;
      sum_gx += g * xhat;
      sum_g += g;
      store(dw + j, load(dw + j) + dy_j * xhat);
      store(db + j, load(db + j) + dy_j);
    }
    acc_t gx_total = sum_lanes(sum_gx), g_total = sum_lanes(sum_g);
    for (; j < n; ++j) {
      const acc_t xhat = (x[j] - mean) * rstd, g = w ? dy[j] * w[j] : dy[j];
      gx_total += g * xhat;
      g_total += g;
      dw[j] += dy[j] * xhat;
      db[j] += dy[j];
    }
    const acc_t c1 = gx_total / n, c2 = a.mean ? g_total / n : acc_t(0);
    scalar_t* __restrict dx = a.dx + row * n;
    const scalar_t* __restrict dh = a.dh ? a.dh + row * n : nullptr;
    j = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (; j + W <= n; j += W) {
        const V dy_j = load(dy + j), xhat = (load(x + j) - mean) * rstd;
        const V g = w ? dy_j * load(w + j) : dy_j;
        V value = (g - xhat * c1 - c2) * rstd;
        if (dh) value += load(dh + j);
        store(dx + j, value);
      }
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (; j < n; ++j) {
        const acc_t xhat = (x[j] - mean) * rstd, g = w ? dy[j] * w[j] : dy[j];
        acc_t value = (g - xhat * c1 - c2) * rstd;
        if (dh) value += dh[j];
        dx[j] = value;
      }
    } else {  // 16-bit dx: computed into dx_buf, then narrowed
      for (; j < n; ++j) {
        const acc_t xhat = (x[j] - mean) * rstd, g = w ? dy[j] * w[j] : dy[j];
        acc_t value = (g - xhat * c1 - c2) * rstd;
        if (dh) value += static_cast<acc_t>(dh[j]);
        dx_buf[j] = value;
      }
      narrow_from_float(dx_buf, dx, n);
    }
    if (a.dx_dropout) {  // the fused block's dx: forward's mask, regenerated, on the rounded dx
      keep_multipliers(static_cast<uint64_t>(row * n), n, static_cast<uint64_t>(*a.seed), a.threshold, a.scale,
                       multiplier);
      scalar_t* __restrict dx_dropout = a.dx_dropout + row * n;
      for (int64_t k = 0; k < n; ++k) dx_dropout[k] = static_cast<scalar_t>(static_cast<acc_t>(dx[k]) * multiplier[k]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, bool is_rms, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& seed,
    double p, bool residual_in_fp32, bool store_h) {
  check_norm_fwd_args(x_in, weight, bias, residual_in, seed, p);
  const at::Tensor x = x_in.contiguous();
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = residual_in->contiguous();
  const bool fused = residual.has_value() || seed.has_value();
  NormOutputs out = allocate_norm_outputs(x, is_rms, fused && store_h, residual_in_fp32);
  if (x.numel() == 0) return {out.y, out.h, out.mean, out.rstd};
  const at::Tensor w = param_as_acc(weight, x), b = param_as_acc(bias, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_norm_fwd_cpu", [&] {
    if (residual_in_fp32) {
      norm_fwd_rows<scalar_t, acc_type<scalar_t>>(x, w, b, residual, seed, p, eps, is_rms, fused, out);
    } else {
      norm_fwd_rows<scalar_t, scalar_t>(x, w, b, residual, seed, p, eps, is_rms, fused, out);
    }
  });
  return {out.y, out.h, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool is_rms, bool has_bias, const std::optional<at::Tensor>& dh_in,
    const std::optional<at::Tensor>& seed, double p) {
  check_norm_bwd_args(dy_in, x_in, rstd, dh_in, seed, p);
  NormBwdBuffers buffers = prepare_norm_bwd(dy_in, x_in, weight, mean, rstd, dh_in, seed, kMaxWeightChunks);
  const int64_t m = buffers.m, n = buffers.n, chunk_rows = buffers.chunk_rows;
  const int64_t chunks = m > 0 ? buffers.dw_partial.size(0) : 0;  // no rows: no partials written
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : buffers.x.scalar_type();
  const auto empty = [&] { return at::empty({0}, buffers.x.options().dtype(w_dtype)); };
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffers.x.scalar_type(), "fastreg_norm_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto a = norm_bwd_params<scalar_t>(buffers, is_rms, seed, p);
    at::parallel_for(0, chunks, grain_for(chunk_rows * n), [&](int64_t chunk_begin, int64_t chunk_end) {
      const bool convert = !std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> x_buf(convert ? n : 0), dy_buf(convert ? n : 0), dx_buf(convert ? n : 0),
          multiplier(a.dx_dropout ? n : 0);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        acc_t* dw = a.dw_partial + chunk * n;
        acc_t* db = a.db_partial + chunk * n;
        std::fill(dw, dw + n, acc_t(0));
        std::fill(db, db + n, acc_t(0));
        norm_bwd_rows(a, chunk * chunk_rows, std::min(m, (chunk + 1) * chunk_rows), dw, db, x_buf.data(),
                      dy_buf.data(), dx_buf.data(), multiplier.data());
      }
    });
    dweight = weight.has_value() ? column_sums_cpu<acc_t>(buffers.dw_partial, chunks, w_dtype) : empty();
    dbias = has_bias ? column_sums_cpu<acc_t>(buffers.db_partial, chunks, w_dtype) : empty();
  });
  return {buffers.dx, dweight, dbias, buffers.dx_dropout};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("norm_fwd", &norm_fwd_cpu);
  m.impl("norm_bwd", &norm_bwd_cpu);
}

}  // namespace fastreg
