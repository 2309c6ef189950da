// GroupNorm (+ SiLU) on CPU tensors: gn_fwd and gn_bwd of csrc/ops.cpp, formulas in
// csrc/include/fastreg/gn_steps.h. Two loop orders, chosen by the layout:
//   contiguous (S contiguous): one task per (sample, group), whose D rows of S values stay
//     in L1/L2 between its passes; row sums in explicit vector lanes (vectorize.h).
//   channels-last (C contiguous): one task per sample, walking its S positions with one
//     accumulator per channel (a group's D channels are too few to fill a vector, all C
//     are not); statistics in one pass of sums of d = x - shift, shift a value of the
//     group (a large mean costs no precision): var = mean(d^2) - mean(d)^2 (a second pass
//     would read the whole sample again from memory).
// Arithmetic in float (double for double). Deterministic: every sum has a fixed order, and
// dweight / dbias come from per-sample partials summed over the samples in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fastreg/gn_steps.h"
#include "fastreg/welford.h"
#include "column_sums.h"
#include "convert.h"
#include "parallel.h"
#include "vectorize.h"

namespace fastreg {
namespace {

template <typename acc_t>
__attribute__((always_inline)) inline acc_t exp_minus(acc_t z) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_approx(-z);
  } else {
    return std::exp(-z);
  }
}

// Rows of S values as acc_t: the input itself when it is stored as acc_t, else converted.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__attribute__((always_inline)) inline const acc_t* rows_as_acc(const scalar_t* __restrict first_row,
                                                               int64_t row_stride, int64_t rows, int64_t S,
                                                               acc_t* __restrict buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (row_stride == S || rows == 1) return first_row;
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < rows; ++j) std::memcpy(buf + j * S, first_row + j * row_stride, S * sizeof(acc_t));
  } else {
    widen_rows(first_row, row_stride, rows, S, buf);
  }
  return buf;
}

// ------------------------------------------------------------------ contiguous layout

// Group ng = n * G + g: statistics in one pass of sums of d = x - shift (shift: the
// group's first value, so a large mean costs no precision; var = mean(d^2) - mean(d)^2),
// then y from cache. buf: D * S scratch values.
template <typename scalar_t>
FASTREG_CPU_CLONES_AVX512 void fwd_group(const GnParams<scalar_t>& a, int64_t ng, acc_type<scalar_t>* __restrict buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = ng / a.G, g = ng % a.G, S = a.S, D = a.D, M = D * S;
  const int64_t offset = n * a.stride_n + g * D * a.stride_c;
  const acc_t* __restrict v = rows_as_acc(a.x + offset, a.stride_c, D, S, buf);
  const acc_t shift = v[0];
  acc_t sum_d = 0, sum_dd = 0;
  for (int64_t j = 0; j < D; ++j) {
    const auto [row_d, row_dd] = shifted_sums(v + j * S, shift, S);
    sum_d += row_d;
    sum_dd += row_dd;
  }
  const acc_t mean_d = sum_d / M;
  const acc_t mean = shift + mean_d;
  const acc_t var = std::max(sum_dd / M - mean_d * mean_d, acc_t(0));
  const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(var) + a.eps));
  a.mean_out[ng] = mean;
  a.rstd_out[ng] = rstd;
  for (int64_t j = 0; j < D; ++j) {
    const int64_t c = g * D + j;
    const acc_t scale = a.weight ? rstd * a.weight[c] : rstd, shift_out = a.bias ? a.bias[c] : acc_t(0);
    scalar_t* __restrict y = a.out + offset + j * a.stride_c;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      const acc_t* __restrict vr = v + j * S;
      if (a.silu) {
        for (int64_t s = 0; s < S; ++s) {
          const acc_t z = (vr[s] - mean) * scale + shift_out;
          y[s] = silu_from_exp(z, exp_minus(z));
        }
      } else {
        for (int64_t s = 0; s < S; ++s) y[s] = (vr[s] - mean) * scale + shift_out;
      }
    } else {  // 16-bit y: computed over the row's converted values in buf, then narrowed
      acc_t* row = const_cast<acc_t*>(v) + j * S;
      if (a.silu) {
        for (int64_t s = 0; s < S; ++s) {
          const acc_t z = (row[s] - mean) * scale + shift_out;
          row[s] = silu_from_exp(z, exp_minus(z));
        }
      } else {
        for (int64_t s = 0; s < S; ++s) row[s] = (row[s] - mean) * scale + shift_out;
      }
      narrow_from_float(row, y, S);
    }
  }
}

// Group ng: per-channel sums (the partials of dweight / dbias), then dx from cache.
// bufs: 3 * D * S scratch values (x, dy as acc_t; g = dy * silu'(z)).
template <typename scalar_t>
FASTREG_CPU_CLONES_AVX512 void bwd_group(const GnParams<scalar_t>& a, int64_t ng, acc_type<scalar_t>* __restrict bufs) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = ng / a.G, g = ng % a.G, S = a.S, D = a.D, M = D * S;
  const int64_t offset = n * a.stride_n + g * D * a.stride_c;
  acc_t* __restrict g_buf = bufs + 2 * M;
  const acc_t* __restrict x = rows_as_acc(a.x + offset, a.stride_c, D, S, bufs);
  const acc_t* __restrict dy = rows_as_acc(a.dy + offset, a.stride_c, D, S, bufs + M);
  const acc_t mean = a.mean[ng], rstd = a.rstd[ng];
  const acc_t* __restrict grad = dy;  // the gradient reaching the norm's output z
  if (a.silu) {
    for (int64_t j = 0; j < D; ++j) {
      const int64_t c = g * D + j;
      const acc_t scale = a.weight ? rstd * a.weight[c] : rstd, shift_out = a.bias ? a.bias[c] : acc_t(0);
      const acc_t* __restrict xr = x + j * S;
      const acc_t* __restrict dyr = dy + j * S;
      acc_t* __restrict gr = g_buf + j * S;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t z = (xr[s] - mean) * scale + shift_out;
        gr[s] = dyr[s] * silu_grad_from_exp(z, exp_minus(z));
      }
    }
    grad = g_buf;
  }
  acc_t sum_wg = 0, sum_wgxhat = 0;
  for (int64_t j = 0; j < D; ++j) {
    const int64_t c = g * D + j;
    const auto [sum_g, sum_gx] = dual_sum(grad + j * S, x + j * S, mean, S);
    const acc_t sum_gxhat = sum_gx * rstd, w = a.weight ? a.weight[c] : acc_t(1);
    a.sum_g[n * a.C + c] = sum_g;
    a.sum_gxhat[n * a.C + c] = sum_gxhat;
    sum_wg += w * sum_g;
    sum_wgxhat += w * sum_gxhat;
  }
  const GroupDxCoefs<acc_t> k = group_dx_coefs(sum_wg, sum_wgxhat, rstd, static_cast<acc_t>(M));
  for (int64_t j = 0; j < D; ++j) {
    const int64_t c = g * D + j;
    const acc_t k_g = a.weight ? rstd * a.weight[c] : rstd, k_x = k.k_x, k_one = k.k_one;
    const acc_t* __restrict xr = x + j * S;
    scalar_t* __restrict dx = a.out + offset + j * a.stride_c;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      const acc_t* __restrict gr = grad + j * S;
      for (int64_t s = 0; s < S; ++s) dx[s] = gr[s] * k_g + (xr[s] - mean) * k_x + k_one;
    } else {  // 16-bit dx: computed over the row's converted gradient in bufs, then narrowed
      acc_t* row = const_cast<acc_t*>(grad) + j * S;
      for (int64_t s = 0; s < S; ++s) row[s] = row[s] * k_g + (xr[s] - mean) * k_x + k_one;
      narrow_from_float(row, dx, S);
    }
  }
}

// --------------------------------------------------------------- channels-last layout

// Per-channel scratch of a sample task: named arrays of C values each.
template <typename acc_t>
struct ChannelArrays {
  std::vector<acc_t> storage;
  int64_t C;
  ChannelArrays(int64_t arrays, int64_t channels) : storage(arrays * channels), C(channels) {}
  acc_t* operator[](int64_t i) { return storage.data() + i * C; }
};

// 16-bit rows are converted into float scratch a piece of up to this many values at a time.
constexpr int64_t kPieceValues = 1024;

// Channel arrays of fwd_sample: six named ones, then the scratch rows of 16-bit inputs.
template <typename scalar_t>
ChannelArrays<acc_type<scalar_t>> fwd_sample_arrays(int64_t C) {
  const bool widened = !std::is_same_v<scalar_t, acc_type<scalar_t>>;
  return ChannelArrays<acc_type<scalar_t>>(6 + (widened ? std::max<int64_t>(1, kPieceValues / C) : 0), C);
}

// Sample n: one pass of per-channel sums of d = x - shift (shift: the group's value at
// the first position), the group statistics from them, then y.
template <int64_t Bytes, typename scalar_t>
FASTREG_INLINE inline void fwd_sample(const GnParams<scalar_t>& a, int64_t n,
                                      ChannelArrays<acc_type<scalar_t>>& arrays) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = a.C, S = a.S, D = a.D, G = a.G;
  acc_t* __restrict shift = arrays[0];
  acc_t* __restrict sum_d = arrays[1];
  acc_t* __restrict sum_dd = arrays[2];
  acc_t* __restrict mean_c = arrays[3];
  acc_t* __restrict scale_c = arrays[4];
  acc_t* __restrict shift_out = arrays[5];
  acc_t* scratch = arrays[6];  // 16-bit inputs: max(1, kPieceValues / C) rows of C values
  const scalar_t* __restrict xn = a.x + n * a.stride_n;
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<acc_t>(xn[(c / D) * D]);
    sum_d[c] = 0;
    sum_dd[c] = 0;
  }
  // rows of acc_t values: x itself, or 16-bit rows widened a group at a time into scratch
  using V = Vec<acc_t, Bytes>;
  const int64_t group = std::is_same_v<scalar_t, acc_t> ? S : std::max<int64_t>(1, kPieceValues / C);
  for (int64_t s0 = 0; s0 < S; s0 += group) {
    const int64_t rows = std::min(group, S - s0);
    const acc_t* __restrict v;
    int64_t v_stride;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v = xn + s0 * a.stride_s;
      v_stride = a.stride_s;
    } else {
      widen_rows(xn + s0 * a.stride_s, a.stride_s, rows, C, scratch);
      v = scratch;
      v_stride = C;
    }
    channel_block_sums<Bytes>(
        rows, C,
        channel_block_rows<Bytes, acc_t>(C, C * static_cast<int64_t>(sizeof(acc_t)), !std::is_same_v<scalar_t, acc_t>),
        [&](int64_t r, int64_t c) FASTREG_INLINE {
          const V d = load<acc_t, Bytes>(v + r * v_stride + c) - load<acc_t, Bytes>(shift + c);
          return std::pair<V, V>(d, d * d);
        },
        [&](int64_t r, int64_t c) FASTREG_INLINE {
          const acc_t d = v[r * v_stride + c] - shift[c];
          return std::pair<acc_t, acc_t>(d, d * d);
        },
        sum_d, sum_dd);
  }
  const acc_t M = static_cast<acc_t>(D * S);
  for (int64_t g = 0; g < G; ++g) {
    acc_t group_d = 0, group_dd = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      group_d += sum_d[c];
      group_dd += sum_dd[c];
    }
    const acc_t mean_d = group_d / M;
    const acc_t var = std::max(group_dd / M - mean_d * mean_d, acc_t(0));
    const acc_t mean = shift[g * D] + mean_d;
    const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(var) + a.eps));
    a.mean_out[n * G + g] = mean;
    a.rstd_out[n * G + g] = rstd;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      mean_c[c] = mean;
      scale_c[c] = a.weight ? rstd * a.weight[c] : rstd;
      shift_out[c] = a.bias ? a.bias[c] : acc_t(0);
    }
  }
  scalar_t* __restrict yn = a.out + n * a.stride_n;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {  // 16-bit: converted in registers
    const acc_t *m = mean_c, *k = scale_c, *b = shift_out;
    const auto norm = [m, k, b](auto v, int64_t c) __attribute__((always_inline)) {
      using T = decltype(v);
      return (v - values_at<T>(m, c)) * values_at<T>(k, c) + values_at<T>(b, c);
    };
    if (a.silu) {
      const auto norm_silu = [norm](auto v, int64_t c) __attribute__((always_inline)) {
        const auto z = norm(v, c);
        return z / (1.0f + exp_approx(-z));  // silu_from_exp, in a form that takes vectors
      };
      map_half_rows<Bytes>(xn, nullptr, yn, a.stride_s, S, C, norm_silu);
    } else {
      map_half_rows<Bytes>(xn, nullptr, yn, a.stride_s, S, C, norm);
    }
    return;
  }
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* __restrict xr = xn + s * a.stride_s;
    scalar_t* __restrict yr = yn + s * a.stride_s;
    if (a.silu) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t z = (static_cast<acc_t>(xr[c]) - mean_c[c]) * scale_c[c] + shift_out[c];
        yr[c] = static_cast<scalar_t>(silu_from_exp(z, exp_minus(z)));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        yr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mean_c[c]) * scale_c[c] + shift_out[c]);
      }
    }
  }
}

// Sample n: per-channel sums of g and g * (x - mean) over the positions, the group
// coefficients, then dx. With SiLU, g = dy * silu'(z) is kept in g_scratch (S * C values)
// between the passes: cheaper than a second exp.
template <typename scalar_t>
FASTREG_CPU_CLONES_AVX512 void bwd_sample(const GnParams<scalar_t>& a, int64_t n,
                                          ChannelArrays<acc_type<scalar_t>>& arrays,
                                          acc_type<scalar_t>* __restrict g_scratch) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = a.C, S = a.S, D = a.D, G = a.G;
  acc_t* __restrict mean_c = arrays[0];
  acc_t* __restrict scale_c = arrays[1];  // rstd * w: z's scale, and dx's factor of g
  acc_t* __restrict shift_out = arrays[2];
  acc_t* __restrict sum_g = arrays[3];
  acc_t* __restrict sum_gx = arrays[4];
  acc_t* __restrict k_x = arrays[5];
  acc_t* __restrict k_one = arrays[6];
  for (int64_t c = 0; c < C; ++c) {
    const int64_t ng = n * G + c / D;
    mean_c[c] = a.mean[ng];
    scale_c[c] = a.weight ? a.rstd[ng] * a.weight[c] : a.rstd[ng];
    shift_out[c] = a.bias ? a.bias[c] : acc_t(0);
    sum_g[c] = 0;
    sum_gx[c] = 0;
  }
  const scalar_t* __restrict xn = a.x + n * a.stride_n;
  const scalar_t* __restrict dyn = a.dy + n * a.stride_n;
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* __restrict xr = xn + s * a.stride_s;
    const scalar_t* __restrict dyr = dyn + s * a.stride_s;
    if (a.silu) {
      acc_t* __restrict gr = g_scratch + s * C;
      // two loops: GCC vectorizes each, not the two fused
      for (int64_t c = 0; c < C; ++c) {
        const acc_t z = (static_cast<acc_t>(xr[c]) - mean_c[c]) * scale_c[c] + shift_out[c];
        gr[c] = static_cast<acc_t>(dyr[c]) * silu_grad_from_exp(z, exp_minus(z));
      }
      for (int64_t c = 0; c < C; ++c) {
        sum_g[c] += gr[c];
        sum_gx[c] += gr[c] * (static_cast<acc_t>(xr[c]) - mean_c[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gv = static_cast<acc_t>(dyr[c]);
        sum_g[c] += gv;
        sum_gx[c] += gv * (static_cast<acc_t>(xr[c]) - mean_c[c]);
      }
    }
  }
  const acc_t M = static_cast<acc_t>(D * S);
  for (int64_t g = 0; g < G; ++g) {
    const acc_t rstd = a.rstd[n * G + g];
    acc_t sum_wg = 0, sum_wgxhat = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      const acc_t w = a.weight ? a.weight[c] : acc_t(1), sum_gxhat = sum_gx[c] * rstd;
      a.sum_g[n * C + c] = sum_g[c];
      a.sum_gxhat[n * C + c] = sum_gxhat;
      sum_wg += w * sum_g[c];
      sum_wgxhat += w * sum_gxhat;
    }
    const GroupDxCoefs<acc_t> k = group_dx_coefs(sum_wg, sum_wgxhat, rstd, M);
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      k_x[c] = k.k_x;
      k_one[c] = k.k_one;
    }
  }
  scalar_t* __restrict dxn = a.out + n * a.stride_n;
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* __restrict xr = xn + s * a.stride_s;
    const scalar_t* __restrict dyr = dyn + s * a.stride_s;
    scalar_t* __restrict dxr = dxn + s * a.stride_s;
    if (a.silu) {
      const acc_t* __restrict gr = g_scratch + s * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xc = static_cast<acc_t>(xr[c]) - mean_c[c];
        dxr[c] = static_cast<scalar_t>(gr[c] * scale_c[c] + xc * k_x[c] + k_one[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xc = static_cast<acc_t>(xr[c]) - mean_c[c];
        dxr[c] = static_cast<scalar_t>(static_cast<acc_t>(dyr[c]) * scale_c[c] + xc * k_x[c] + k_one[c]);
      }
    }
  }
}

// ------------------------------------------------------------------------ the ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_fwd_cpu(const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, int64_t groups,
                                                          double eps, bool silu) {
  check_gn_args(x_in, weight, bias, groups, "gn_fwd");
  const GnInput in = gn_input(x_in, groups);
  const at::Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  // Every entry is written below. The small outputs come first: a small block allocated
  // after the large one pins the heap's top, so freeing both makes glibc trim it, and the
  // next call faults the large output's pages in again.
  at::Tensor y = at::empty_like(in.x);
  const auto stats = in.x.options().dtype(acc_dtype(in.x));
  at::Tensor mean = at::empty({in.N, groups}, stats), rstd = at::empty({in.N, groups}, stats);
  if (in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fastreg_gn_fwd_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      const auto a = gn_fwd_params<scalar_t>(in, w, b, silu, eps, y, mean, rstd);
      if (in.channels_last) {
        at::parallel_for(0, in.N, grain_for(in.C * in.S), [&](int64_t begin, int64_t end) {
          auto arrays = fwd_sample_arrays<scalar_t>(in.C);
          with_widest_vectors([&](auto bytes) FASTREG_INLINE {
            for (int64_t n = begin; n < end; ++n) fwd_sample<bytes>(a, n, arrays);
          });
        });
      } else {
        const int64_t M = in.D * in.S;
        const bool rows_in_place = std::is_same_v<scalar_t, acc_t> && (in.D == 1 || a.stride_c == in.S);
        at::parallel_for(0, in.N * groups, std::max<int64_t>(1, 32768 / M), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> buf(rows_in_place ? 0 : M);
          for (int64_t ng = begin; ng < end; ++ng) fwd_group(a, ng, buf.data());
        });
      }
    });
  }
  return {in_layout_of(y, x_in), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                          int64_t groups, bool silu) {
  check_gn_args(x_in, weight, bias, groups, "gn_bwd");
  check_gn_stats(x_in, mean_in, rstd_in, groups);
  const GnInput in = gn_input(x_in, groups);
  const at::Tensor dy = dy_like(dy_in, in.x);
  const at::Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  // every entry is written below; the small ones first (see gn_fwd_cpu)
  const auto acc = in.x.options().dtype(acc_dtype(in.x));
  at::Tensor sum_g = at::empty({in.N, in.C}, acc), sum_gxhat = at::empty({in.N, in.C}, acc);
  at::Tensor dx = at::empty_like(in.x);
  if (in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fastreg_gn_bwd_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      const auto a = gn_bwd_params<scalar_t>(in, w, b, silu, dy, dx, mean, rstd, sum_g, sum_gxhat);
      if (in.channels_last) {
        at::parallel_for(0, in.N, grain_for(in.C * in.S), [&](int64_t begin, int64_t end) {
          ChannelArrays<acc_t> arrays(7, in.C);
          std::vector<acc_t> g_scratch(silu ? in.S * in.C : 0);
          for (int64_t n = begin; n < end; ++n) bwd_sample(a, n, arrays, g_scratch.data());
        });
      } else {
        const int64_t M = in.D * in.S;
        const bool rows_in_place = std::is_same_v<scalar_t, acc_t> && (in.D == 1 || a.stride_c == in.S);
        at::parallel_for(0, in.N * groups, std::max<int64_t>(1, 16384 / M), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> bufs(rows_in_place ? (silu ? 3 * M : 0) : 3 * M);
          for (int64_t ng = begin; ng < end; ++ng) bwd_group(a, ng, bufs.data());
        });
      }
    });
  }
  // the per-sample partials (N, C) summed over N in order (none written: zeros), in the
  // parameters' dtypes
  const int64_t rows = in.x.numel() > 0 ? in.N : 0;
  const auto grad_of = [&](const std::optional<at::Tensor>& param, const at::Tensor& partials) {
    const auto dtype = param.has_value() ? param->scalar_type() : in.x.scalar_type();
    if (!param.has_value()) return at::empty({0}, in.x.options().dtype(dtype));
    return in.x.scalar_type() == at::kDouble ? column_sums_cpu<double>(partials, rows, dtype)
                                             : column_sums_cpu<float>(partials, rows, dtype);
  };
  return {in_layout_of(dx, x_in), grad_of(weight, sum_gxhat), grad_of(bias, sum_g)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("gn_fwd", &gn_fwd_cpu);
  m.impl("gn_bwd", &gn_bwd_cpu);
}

}  // namespace fastreg
