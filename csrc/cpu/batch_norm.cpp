// BatchNorm on CPU tensors: the fused bn_fwd / bn_bwd and the four steps of csrc/ops.cpp,
// over x (N, C, *) of any strides, addressed as (N, C, S) (fastreg::Ncs). Two loops do the
// per-element work, both on raw per-channel arrays (no ATen op between them, so a small
// call costs little host time):
//   channel_sums: per channel, with d = x - shift[c], A = sum d and B = sum d * d, or with
//     dy, A = sum dy and B = sum dy * d; partial sums over a fixed split (of the positions,
//     or of N) added in order: deterministic whatever the thread count.
//   affine: out = (x - mean[c]) * coef_x[c] + coef_one[c] (+ dy * coef_dy[c]).
// Each has two loop orders, chosen by the layout: channels-last (C contiguous) walks the
// positions (n, s) and, inside, the channels; otherwise each (n, c) walks its S values.
// Unit strides take vector lanes (vectorize.h), and 16-bit values are converted a piece at
// a time into float scratch (convert.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fastreg/bn_steps.h"
#include "fastreg/welford.h"
#include "convert.h"
#include "parallel.h"
#include "vectorize.h"

namespace fastreg {
namespace {

constexpr int64_t kMaxChunks = 64;

bool channels_last(const Ncs& v) { return v.sc == 1 && v.C > 1; }

Ncs ncs_strides(const at::Tensor& t) {
  const auto v = ncs_of(t);
  TORCH_INTERNAL_ASSERT(v.has_value(), "fastreg::bn: spatial dims that do not collapse");
  return *v;
}

// The distance between positions p and p + 1 (p = n * S + s) where all are equally spaced,
// else 0. Without spatial dims (S = 1: BatchNorm1d's (N, C)) it is the sample stride.
int64_t position_step(const Ncs& v) { return v.S == 1 ? v.sn : v.sn == v.S * v.ss ? v.ss : 0; }

// The sums of channel_sums over units [first, last) of a chunk (positions when
// channels-last, else samples), added into a and b. Unit strides take vector lanes: the
// channels in registers (channel_block_sums) or each (n, c) row's values (shifted_sums,
// dual_sum); 16-bit rows are converted into float pieces of kRowPiece values first.
constexpr int64_t kRowPiece = 1024;

template <int64_t Bytes, typename scalar_t, typename acc_t>
FASTREG_INLINE inline void chunk_sums(const scalar_t* x, const Ncs& sx, const scalar_t* dy, const Ncs& sdy,
                                      const acc_t* shift, bool by_positions, int64_t first, int64_t last,
                                      acc_t* __restrict a, acc_t* __restrict b) {
  using V = Vec<acc_t, Bytes>;
  const int64_t C = sx.C, S = sx.S;
  if (by_positions) {
    // positions p = n * S + s one step apart (x, and dy, channels-last): rows of C values,
    // taken a group of rows at a time (as acc_t: 16-bit rows widened)
    const int64_t x_step = position_step(sx), g_step = dy ? position_step(sdy) : 0;
    if (x_step != 0 && (!dy || (sdy.sc == 1 && g_step != 0))) {
      const int64_t group = std::is_same_v<scalar_t, acc_t> ? last - first : std::max<int64_t>(1, kRowPiece / C);
      std::vector<acc_t> x_rows, g_rows;
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        x_rows.resize(group * C);
        if (dy) g_rows.resize(group * C);
      }
      for (int64_t p0 = first; p0 < last; p0 += group) {
        const int64_t rows = std::min(group, last - p0);
        const acc_t *xg, *gg = nullptr;
        int64_t x_stride = x_step, g_stride = g_step;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          xg = x + p0 * x_step;
          if (dy) gg = dy + p0 * g_step;
        } else {
          widen_rows(x + p0 * x_step, x_step, rows, C, x_rows.data());
          xg = x_rows.data();
          x_stride = C;
          if (dy) {
            widen_rows(dy + p0 * g_step, g_step, rows, C, g_rows.data());
            gg = g_rows.data();
            g_stride = C;
          }
        }
        const int64_t block_rows = channel_block_rows<Bytes, acc_t>(
            C, (dy ? 2 : 1) * C * static_cast<int64_t>(sizeof(acc_t)), !std::is_same_v<scalar_t, acc_t>);
        const auto load_acc = [](const acc_t* p) FASTREG_INLINE { return load<acc_t, Bytes>(p); };  // a V from p
        if (dy) {
          channel_block_sums<Bytes>(
              rows, C, block_rows,
              [&](int64_t r, int64_t c) FASTREG_INLINE {
                const V g = load_acc(gg + r * g_stride + c);
                return std::pair<V, V>(g, g * (load_acc(xg + r * x_stride + c) - load_acc(shift + c)));
              },
              [&](int64_t r, int64_t c) FASTREG_INLINE {
                const acc_t g = gg[r * g_stride + c];
                return std::pair<acc_t, acc_t>(g, g * (xg[r * x_stride + c] - shift[c]));
              },
              a, b);
        } else {
          channel_block_sums<Bytes>(
              rows, C, block_rows,
              [&](int64_t r, int64_t c) FASTREG_INLINE {
                const V d = load_acc(xg + r * x_stride + c) - load_acc(shift + c);
                return std::pair<V, V>(d, d * d);
              },
              [&](int64_t r, int64_t c) FASTREG_INLINE {
                const acc_t d = xg[r * x_stride + c] - shift[c];
                return std::pair<acc_t, acc_t>(d, d * d);
              },
              a, b);
        }
      }
      return;
    }
    for (int64_t p = first; p < last; ++p) {
      const int64_t n = p / S, s = p % S;
      const scalar_t* xr = x + n * sx.sn + s * sx.ss;
      if (dy) {
        const scalar_t* dyr = dy + n * sdy.sn + s * sdy.ss;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t g = static_cast<acc_t>(dyr[c * sdy.sc]);
          a[c] += g;
          b[c] += g * (static_cast<acc_t>(xr[c]) - shift[c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(xr[c]) - shift[c];
          a[c] += d;
          b[c] += d * d;
        }
      }
    }
    return;
  }
  const bool unit_strides = sx.ss == 1 && (!dy || sdy.ss == 1);
  acc_t x_piece[kRowPiece], g_piece[kRowPiece];
  for (int64_t n = first; n < last; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = x + n * sx.sn + c * sx.sc;
      const scalar_t* dyr = dy ? dy + n * sdy.sn + c * sdy.sc : nullptr;
      const acc_t shift_c = shift[c];
      acc_t sa = 0, sb = 0;
      if (unit_strides) {
        for (int64_t s0 = 0; s0 < S; s0 += kRowPiece) {
          const int64_t len = std::min(kRowPiece, S - s0);
          const acc_t* xs = as_acc(xr + s0, x_piece, len);
          const std::pair<acc_t, acc_t> piece =
              dyr ? dual_sum(as_acc(dyr + s0, g_piece, len), xs, shift_c, len) : shifted_sums(xs, shift_c, len);
          sa += piece.first;
          sb += piece.second;
        }
      } else if (dyr) {
        for (int64_t s = 0; s < S; ++s) {
          const acc_t g = static_cast<acc_t>(dyr[s * sdy.ss]);
          sa += g;
          sb += g * (static_cast<acc_t>(xr[s * sx.ss]) - shift_c);
        }
      } else {
        for (int64_t s = 0; s < S; ++s) {
          const acc_t d = static_cast<acc_t>(xr[s * sx.ss]) - shift_c;
          sa += d;
          sb += d * d;
        }
      }
      a[c] += sa;
      b[c] += sb;
    }
  }
}

template <typename scalar_t, typename acc_t>
void channel_sums(const scalar_t* x, const Ncs& sx, const scalar_t* dy, const Ncs& sdy, const acc_t* shift,
                  acc_t* sum_a, acc_t* sum_b) {
  const int64_t N = sx.N, C = sx.C, S = sx.S, P = N * S;
  const bool by_positions = channels_last(sx);
  const int64_t units = by_positions ? P : N;  // what the chunks split
  const int64_t per_chunk = rows_per_chunk(units, kMaxChunks);
  const int64_t chunks = units == 0 ? 1 : (units + per_chunk - 1) / per_chunk;
  std::vector<acc_t> partial(chunks * 2 * C, acc_t(0));
  at::parallel_for(0, chunks, grain_for(per_chunk * (by_positions ? C : C * S)), [&](int64_t begin, int64_t end) {
    with_widest_vectors([&](auto bytes) FASTREG_INLINE {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        acc_t* a = partial.data() + chunk * 2 * C;
        const int64_t first = chunk * per_chunk, last = std::min(units, first + per_chunk);
        chunk_sums<bytes>(x, sx, dy, sdy, shift, by_positions, first, last, a, a + C);
      }
    });
  });
  for (int64_t c = 0; c < C; ++c) {  // over the chunks, in order
    acc_t a = 0, b = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      a += partial[chunk * 2 * C + c];
      b += partial[chunk * 2 * C + C + c];
    }
    sum_a[c] = a;
    sum_b[c] = b;
  }
}

// The per-channel coefficients of affine; coef_dy is nullptr without dy.
template <typename acc_t>
struct Coefs {
  const acc_t *mean, *coef_x, *coef_one, *coef_dy;
};

// out[i] = (x[i] - mean) * coef_x + coef_one (+ dy[i] * coef_dy), i < n, with coefficients
// per value (per_channel: a channels-last row) or one for all (an (n, c) row).
template <typename acc_t>
__attribute__((always_inline)) inline void affine_values(const acc_t* __restrict x, const acc_t* __restrict dy,
                                                         acc_t* __restrict out, Coefs<acc_t> k, bool per_channel,
                                                         int64_t n) {
  if (!per_channel) {
    const acc_t m = *k.mean, kx = *k.coef_x, k1 = *k.coef_one;
    if (dy) {
      const acc_t kdy = *k.coef_dy;
      for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - m) * kx + k1 + dy[i] * kdy;
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - m) * kx + k1;
    }
  } else if (dy) {
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - k.mean[i]) * k.coef_x[i] + k.coef_one[i] + dy[i] * k.coef_dy[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - k.mean[i]) * k.coef_x[i] + k.coef_one[i];
  }
}

// affine_values on rows of 16-bit values, converted in registers (map_half_rows), in the
// widest vectors: the loop is bound by its arithmetic, where wide vectors pay
// (affine_range itself is not, see there).
template <int64_t Bytes, typename half_t, typename acc_t>
FASTREG_INLINE inline void affine_half_rows(const half_t* x, const half_t* dy, half_t* out, Coefs<acc_t> k,
                                            bool per_channel, int64_t rows, int64_t width) {
  const acc_t *mean = k.mean, *coef_x = k.coef_x, *coef_one = k.coef_one, *coef_dy = k.coef_dy;
  if (per_channel) {
    const auto norm = [mean, coef_x, coef_one](auto v, int64_t i) __attribute__((always_inline)) {
      using T = decltype(v);
      return (v - values_at<T>(mean, i)) * values_at<T>(coef_x, i) + values_at<T>(coef_one, i);
    };
    if (dy) {
      const auto with_dy = [norm, coef_dy](auto v, auto g, int64_t i) __attribute__((always_inline)) {
        return norm(v, i) + g * values_at<decltype(g)>(coef_dy, i);
      };
      map_half_rows<Bytes>(x, dy, out, width, rows, width, with_dy);
    } else {
      map_half_rows<Bytes>(x, nullptr, out, width, rows, width, norm);
    }
    return;
  }
  const acc_t m = *mean, kx = *coef_x, k1 = *coef_one, kdy = dy ? *coef_dy : acc_t(0);
  const auto norm = [m, kx, k1](auto v, int64_t) __attribute__((always_inline)) { return (v - m) * kx + k1; };
  if (dy) {
    const auto with_dy = [norm, kdy](auto v, auto g, int64_t i) __attribute__((always_inline)) {
      return norm(v, i) + g * kdy;
    };
    map_half_rows<Bytes>(x, dy, out, width, rows, width, with_dy);
  } else {
    map_half_rows<Bytes>(x, nullptr, out, width, rows, width, norm);
  }
}

// affine over `rows` rows of `width` values, stored one after another (x, dy and out):
// channels-last positions (per_channel: the coefficients of the row's C channels) or one
// (n, c) row of S values.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void affine_rows(const scalar_t* x, const scalar_t* dy, scalar_t* out,
                                                       Coefs<acc_t> k, bool per_channel, int64_t rows,
                                                       int64_t width) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t offset = r * width;
      affine_values(x + offset, dy ? dy + offset : nullptr, out + offset, k, per_channel, width);
    }
  } else {
    with_widest_vectors([&](auto bytes) FASTREG_INLINE {
      affine_half_rows<bytes>(x, dy, out, k, per_channel, rows, width);
    });
  }
}

// affine over units [begin, end): channels-last positions (C values each) or (n, c) rows
// (S values each). Not cloned: on float values it streams from memory, and ran slower in
// an AVX-512 clone on an AMD EPYC; 16-bit values take affine_half_rows.
template <typename scalar_t, typename acc_t>
void affine_range(const scalar_t* x, const Ncs& sx, const scalar_t* dy, const Ncs& sdy, scalar_t* out, const Ncs& so,
                  Coefs<acc_t> k, bool by_positions, int64_t begin, int64_t end) {
  const int64_t C = so.C, S = so.S;
  // positions one after another in x, out (and dy): the range in one run of rows
  const auto positions_packed = [&](const Ncs& v) { return v.sc == 1 && position_step(v) == C; };
  if (by_positions && positions_packed(sx) && positions_packed(so) && (!dy || positions_packed(sdy))) {
    affine_rows(x + begin * C, dy ? dy + begin * C : nullptr, out + begin * C, k, true, end - begin, C);
    return;
  }
  for (int64_t u = begin; u < end; ++u) {
    if (by_positions) {
      const int64_t n = u / S, s = u % S;
      const scalar_t* xr = x + n * sx.sn + s * sx.ss;
      const scalar_t* dyr = dy ? dy + n * sdy.sn + s * sdy.ss : nullptr;
      scalar_t* outr = out + n * so.sn + s * so.ss;
      if (sx.sc == 1 && (!dy || sdy.sc == 1)) {  // the common case: unit strides
        affine_rows(xr, dyr, outr, k, true, 1, C);
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = (static_cast<acc_t>(xr[c * sx.sc]) - k.mean[c]) * k.coef_x[c] + k.coef_one[c];
        if (dyr) v += static_cast<acc_t>(dyr[c * sdy.sc]) * k.coef_dy[c];
        outr[c] = static_cast<scalar_t>(v);
      }
    } else {
      const int64_t n = u / C, c = u % C;
      const scalar_t* xr = x + n * sx.sn + c * sx.sc;
      const scalar_t* dyr = dy ? dy + n * sdy.sn + c * sdy.sc : nullptr;
      scalar_t* outr = out + n * so.sn + c * so.sc;
      const Coefs<acc_t> kc{k.mean + c, k.coef_x + c, k.coef_one + c, dy ? k.coef_dy + c : nullptr};
      if (sx.ss == 1 && so.ss == 1 && (!dy || sdy.ss == 1)) {  // unit strides
        affine_rows(xr, dyr, outr, kc, false, 1, S);
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        acc_t v = (static_cast<acc_t>(xr[s * sx.ss]) - *kc.mean) * *kc.coef_x + *kc.coef_one;
        if (dyr) v += static_cast<acc_t>(dyr[s * sdy.ss]) * *kc.coef_dy;
        outr[s * so.ss] = static_cast<scalar_t>(v);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void affine(const scalar_t* x, const Ncs& sx, const scalar_t* dy, const Ncs& sdy, scalar_t* out, const Ncs& so,
            Coefs<acc_t> k) {
  const int64_t N = so.N, C = so.C, S = so.S;
  if (N * C * S == 0) return;
  const bool by_positions = channels_last(so);
  const int64_t units = by_positions ? N * S : N * C, per_unit = by_positions ? C : S;
  at::parallel_for(0, units, std::max<int64_t>(1, 32768 / std::max<int64_t>(per_unit, 1)),
                   [&](int64_t begin, int64_t end) { affine_range(x, sx, dy, sdy, out, so, k, by_positions, begin, end); });
}

// A per-channel tensor's values in the accumulate dtype: its own data when it already is
// contiguous acc_t, else a converted copy kept in `holder`.
template <typename acc_t>
const acc_t* acc_values(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value()) return nullptr;
  holder = t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value && t->is_contiguous()
               ? *t
               : t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return holder.const_data_ptr<acc_t>();
}

// running = (1 - momentum) * running + momentum * value, in running's dtype.
template <typename acc_t>
void update_running(at::Tensor& running, const std::vector<acc_t>& value, double momentum) {
  if (running.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && running.is_contiguous()) {
    acc_t* r = running.mutable_data_ptr<acc_t>();
    const acc_t m = static_cast<acc_t>(momentum), keep = static_cast<acc_t>(1.0 - momentum);
    for (size_t c = 0; c < value.size(); ++c) r[c] = r[c] * keep + value[c] * m;
    return;
  }
  const at::Tensor v = at::from_blob(const_cast<acc_t*>(value.data()), {static_cast<int64_t>(value.size())},
                                     at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  running.mul_(1.0 - momentum).add_(v.to(running.scalar_type()) * momentum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_fwd_cpu(const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& running_mean,
                                                          const std::optional<at::Tensor>& running_var,
                                                          bool training, double momentum, double eps,
                                                          const std::optional<at::Tensor>& batches_tracked) {
  check_bn_fwd_args(x_in, weight, bias, running_mean, running_var, training, batches_tracked);
  const at::Tensor x = collapsible(x_in);
  const Ncs sx = ncs_strides(x);
  const int64_t C = sx.C, count = sx.N * sx.S;
  at::Tensor y = at::empty_like(x);
  const Ncs sy = ncs_strides(y);
  const auto stats_options = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({C}, stats_options), invstd = at::empty({C}, stats_options);
  if (batches_tracked.has_value()) momentum = 1.0 / batches_tracked->item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    acc_t* mean_c = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_c = invstd.mutable_data_ptr<acc_t>();
    at::Tensor weight_holder, bias_holder;
    const acc_t* w = acc_values<acc_t>(weight, weight_holder);
    const acc_t* b = acc_values<acc_t>(bias, bias_holder);
    std::vector<acc_t> scale(C), shift(C);
    if (training) {
      // sums of x - x[0, c, 0]: shifted by one value of the channel, so a large mean costs no precision
      for (int64_t c = 0; c < C; ++c) shift[c] = count > 0 ? static_cast<acc_t>(x_data[c * sx.sc]) : acc_t(0);
      std::vector<acc_t> sum_d(C), sum_dd(C);
      channel_sums<scalar_t, acc_t>(x_data, sx, nullptr, sx, shift.data(), sum_d.data(), sum_dd.data());
      const acc_t denominator = static_cast<acc_t>(std::max<int64_t>(count, 1));
      const acc_t unbias = static_cast<acc_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
      std::vector<acc_t> unbiased(C);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t mean_d = sum_d[c] / denominator;
        acc_t var = sum_dd[c] / denominator - mean_d * mean_d;
        if (var < acc_t(0)) var = 0;  // rounding below 0 clamped; a NaN (non-finite x) kept
        mean_c[c] = shift[c] + mean_d;
        invstd_c[c] = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        unbiased[c] = var * unbias;
      }
      if (running_mean.has_value()) {
        at::Tensor running = *running_mean;
        update_running(running, std::vector<acc_t>(mean_c, mean_c + C), momentum);
      }
      if (running_var.has_value()) {
        at::Tensor running = *running_var;
        update_running(running, unbiased, momentum);
      }
    } else {
      at::Tensor mean_holder, var_holder;
      const acc_t* rm = acc_values<acc_t>(running_mean, mean_holder);
      const acc_t* rv = acc_values<acc_t>(running_var, var_holder);
      for (int64_t c = 0; c < C; ++c) {
        mean_c[c] = rm[c];
        invstd_c[c] = acc_t(1) / std::sqrt(rv[c] + static_cast<acc_t>(eps));
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w ? invstd_c[c] * w[c] : invstd_c[c];
      shift[c] = b ? b[c] : acc_t(0);
    }
    affine<scalar_t, acc_t>(x_data, sx, nullptr, sx, y.mutable_data_ptr<scalar_t>(), sy,
                            {mean_c, scale.data(), shift.data(), nullptr});
  });
  return {x.is_same(x_in) ? y : y.view(x_in.sizes()), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                                          bool training, std::array<bool, 3> output_mask) {
  check_bn_bwd_args(dy_in, x_in, weight, mean_in, invstd_in);
  const at::Tensor x = collapsible(x_in);
  const at::Tensor dy = collapsible(dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type()));
  const Ncs sx = ncs_strides(x), sdy = ncs_strides(dy);
  const int64_t C = sx.C, count = sx.N * sx.S;
  const bool sums = training ? output_mask[0] || output_mask[1] || output_mask[2] : output_mask[1] || output_mask[2];
  at::Tensor dx = output_mask[0] ? at::empty_like(x) : at::Tensor();
  const auto param_options = x.options().dtype(bn_param_dtype(x, weight));
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor weight_holder, mean_holder, invstd_holder;
    const acc_t* w = acc_values<acc_t>(weight, weight_holder);
    const acc_t* mean = acc_values<acc_t>(mean_in, mean_holder);
    const acc_t* invstd = acc_values<acc_t>(invstd_in, invstd_holder);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    std::vector<acc_t> sum_dy(C, acc_t(0)), sum_dy_xhat(C, acc_t(0));
    if (sums) {
      channel_sums<scalar_t, acc_t>(x_data, sx, dy_data, sdy, mean, sum_dy.data(), sum_dy_xhat.data());
      for (int64_t c = 0; c < C; ++c) sum_dy_xhat[c] *= invstd[c];
    }
    auto param_grad = [&](const std::vector<acc_t>& values) {
      const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor out = at::empty({C}, param_options);
      if (out.scalar_type() == acc.dtype()) {
        std::copy(values.begin(), values.end(), out.mutable_data_ptr<acc_t>());
      } else {
        out.copy_(at::from_blob(const_cast<acc_t*>(values.data()), {C}, acc));
      }
      return out;
    };
    if (output_mask[1]) dweight = param_grad(sum_dy_xhat);
    if (output_mask[2]) dbias = param_grad(sum_dy);
    if (!output_mask[0]) return;
    std::vector<acc_t> scale(C), coef_x(C, acc_t(0)), coef_one(C, acc_t(0)), zeros(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) scale[c] = w ? invstd[c] * w[c] : invstd[c];
    const Ncs sdx = ncs_strides(dx);
    if (!training) {  // dx = dy * scale reads no x (a NaN in x stays out of dx, as in torch)
      affine<scalar_t, acc_t>(dy_data, sdy, nullptr, sdy, dx.mutable_data_ptr<scalar_t>(), sdx,
                              {zeros.data(), scale.data(), zeros.data(), nullptr});
      return;
    }
    // dx = (dy - sum_dy / n - xhat * sum_dy_xhat / n) * scale
    const acc_t n = static_cast<acc_t>(std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < C; ++c) {
      coef_x[c] = -scale[c] * invstd[c] * sum_dy_xhat[c] / n;
      coef_one[c] = -scale[c] * sum_dy[c] / n;
    }
    affine<scalar_t, acc_t>(x_data, sx, dy_data, sdy, dx.mutable_data_ptr<scalar_t>(), sdx,
                            {mean, coef_x.data(), coef_one.data(), scale.data()});
  });
  if (dx.defined() && !x.is_same(x_in)) dx = dx.view(x_in.sizes());
  return {dx.defined() ? dx : at::empty({0}, x.options()), dweight.defined() ? dweight : at::empty({0}, param_options),
          dbias.defined() ? dbias : at::empty({0}, param_options)};
}

// ------------------------------------------------------------------ the four steps

std::pair<at::Tensor, at::Tensor> partial_sums_cpu(const at::Tensor& x, const at::Tensor& shift_in,
                                                   const at::Tensor* dy) {
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor sum_a = at::empty({x.size(1)}, acc), sum_b = at::empty({x.size(1)}, acc);
  const at::Tensor shift = shift_in.to(acc_dtype(x)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_partial_sums_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Ncs sx = ncs_strides(x);
    channel_sums<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), sx, dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                                  dy ? ncs_strides(*dy) : sx, shift.const_data_ptr<acc_t>(),
                                  sum_a.mutable_data_ptr<acc_t>(), sum_b.mutable_data_ptr<acc_t>());
  });
  return {sum_a, sum_b};
}

at::Tensor affine_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef_x, const at::Tensor& coef_one,
                      const at::Tensor* dy, const at::Tensor* coef_dy) {
  at::Tensor out = at::empty_like(x);  // x's strides
  const auto acc = acc_dtype(x);
  const at::Tensor m = mean.to(acc).contiguous(), kx = coef_x.to(acc).contiguous(), k1 = coef_one.to(acc).contiguous(),
                   kdy = coef_dy ? coef_dy->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_affine_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Ncs sx = ncs_strides(x);
    affine<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), sx, dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                            dy ? ncs_strides(*dy) : sx, out.mutable_data_ptr<scalar_t>(), ncs_strides(out),
                            {m.const_data_ptr<acc_t>(), kx.const_data_ptr<acc_t>(), k1.const_data_ptr<acc_t>(),
                             coef_dy ? kdy.const_data_ptr<acc_t>() : nullptr});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x) { return bn_stats_steps(x, partial_sums_cpu); }

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  return bn_apply_steps(x, mean, var, weight, bias, eps, affine_cpu);
}

std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                                     const at::Tensor& var, double eps) {
  return bn_bwd_reduce_steps(dy, x, mean, var, eps, partial_sums_cpu);
}

at::Tensor bn_bwd_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight, double eps, const std::optional<at::Tensor>& sum_dy,
                            const std::optional<at::Tensor>& sum_dy_xhat, int64_t count) {
  return bn_bwd_apply_steps(dy, x, mean, var, weight, eps, sum_dy, sum_dy_xhat, count, affine_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("bn_fwd", &bn_fwd_cpu);
  m.impl("bn_bwd", &bn_bwd_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cpu);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cpu);
}

}  // namespace fastreg
