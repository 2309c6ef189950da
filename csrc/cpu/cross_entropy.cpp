// Cross-entropy on CPU tensors: cross_entropy_fwd (the loss and, in the same pass, the
// gradient of the logits), cross_entropy_bwd_ (that gradient scaled by the incoming one, in
// place) and linear_cross_entropy_fwd (chunks of tokens through at::mm and the same row
// pass), formulas in csrc/include/fastreg/cross_entropy.h.
//
// Row pass: rows (classes contiguous) run in parallel, each in blocks of kBlock classes
// that stay in L1: the block's max, then the running (max, sum of exp) of the row updated
// once per block (online softmax, one exp per logit); the gradient is a second pass over
// the row, from L2 for rows up to its size. Columns (positions contiguous) run in tiles of
// 16 positions, one per vector lane, walking the classes three times (max, sum of exp,
// gradient) while the tile's C x 16 values stay in cache.
// Arithmetic in float (double for double). Deterministic: every row has a fixed order of
// operations, and the reductions over rows are sequential sums in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastreg/cross_entropy.h"
#include "fastreg/cross_entropy_args.h"
#include "fastreg/linear_cross_entropy.h"
#include "fastreg/welford.h"
#include "vectorize.h"

namespace fastreg {
namespace {

// Classes per block of a row: 4 KiB of floats, in L1 with its converted copy.
constexpr int64_t kBlock = 1024;

// The loops take vectors of Bytes (with_widest_vectors); Vt is such a vector.
template <int64_t Bytes, typename acc_t>
__attribute__((always_inline)) inline Vec<acc_t, Bytes> splat(acc_t value) {
  return Vec<acc_t, Bytes>{} + value;
}

template <typename Vt>
constexpr int64_t kLanesOf = sizeof(Vt) / sizeof(LaneOf<Vt>);

// exp of every lane: the polynomial for float, libm for double (the fp64 path checks
// gradients, it is not a fast path).
template <typename Vt>
__attribute__((always_inline)) inline Vt exp_lanes(Vt x) {
  if constexpr (std::is_same_v<LaneOf<Vt>, float>) {
    return exp_approx(x);
  } else {
    for (int64_t k = 0; k < kLanesOf<Vt>; ++k) x[k] = std::exp(x[k]);
    return x;
  }
}

template <typename acc_t>
__attribute__((always_inline)) inline acc_t exp_scalar(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_approx(x);
  } else {
    return std::exp(x);
  }
}

template <typename Vt>
__attribute__((always_inline)) inline Vt max_lanes(Vt a, Vt b) {
  return a > b ? a : b;
}

template <typename Vt>
__attribute__((always_inline)) inline LaneOf<Vt> max_of_lanes(Vt v) {
  LaneOf<Vt> m = v[0];
  for (int64_t k = 1; k < kLanesOf<Vt>; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

template <typename scalar_t>
struct RowPassArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;  // logits (N, C, S), strides x_n, x_c, x_s
  scalar_t* grad;  // nullptr: no gradient; else (N, C, S) with strides g_n, g_c, g_s (may be x)
  const int64_t* target;  // (N, S) contiguous
  const acc_t* weight;  // (C,) contiguous, or nullptr
  const acc_t* scale;  // (ce_scale, z_scale) of row r at scale + r * scale_stride (0: one pair)
  acc_t* ce;  // (N * S,): the rows' cross-entropy terms
  acc_t* z;  // (N * S,): the rows' z-loss terms
  int64_t N, C, S, x_n, x_c, x_s, g_n, g_c, g_s, scale_stride;
  int64_t ignore_index;
  acc_t smoothing, z_loss;
};

inline void check_target(int64_t t, int64_t C) {
  TORCH_CHECK_INDEX(t >= 0 && t < C, "Target ", t, " is out of bounds.");
}

// The row's values as acc_t: the row itself when stored as acc_t, else converted into buf.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__attribute__((always_inline)) inline const acc_t* as_acc(const scalar_t* __restrict x, int64_t n,
                                                          acc_t* __restrict buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(x[j]);
    return buf;
  }
}

// ------------------------------------------------------------------- rows (classes contiguous)

template <int64_t Bytes, typename acc_t>
__attribute__((always_inline)) inline acc_t block_max(const acc_t* __restrict v, int64_t n) {
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  Vec<acc_t, Bytes> m0 = splat<Bytes, acc_t>(-INFINITY), m1 = m0;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    m0 = max_lanes(m0, load<acc_t, Bytes>(v + j));
    m1 = max_lanes(m1, load<acc_t, Bytes>(v + j + W));
  }
  acc_t m = max_of_lanes(max_lanes(m0, m1));
  for (; j < n; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

template <int64_t Bytes, typename acc_t>
__attribute__((always_inline)) inline acc_t block_sum_exp(const acc_t* __restrict v, int64_t n, acc_t m) {
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  const Vec<acc_t, Bytes> shift = splat<Bytes>(m);
  Vec<acc_t, Bytes> s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    s0 += exp_lanes(load<acc_t, Bytes>(v + j) - shift);
    s1 += exp_lanes(load<acc_t, Bytes>(v + j + W) - shift);
  }
  acc_t s = sum_lanes(s0 + s1);
  for (; j < n; ++j) s += exp_scalar(v[j] - m);
  return s;
}

// sum_j w_j * (v_j - shift) (w == nullptr: weights 1) and sum_j w_j.
template <int64_t Bytes, typename acc_t>
__attribute__((always_inline)) inline void block_smooth_sums(const acc_t* __restrict v, const acc_t* __restrict w,
                                                             int64_t n, acc_t shift, acc_t& smooth_sum,
                                                             acc_t& weight_sum) {
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  const Vec<acc_t, Bytes> shifts = splat<Bytes>(shift);
  Vec<acc_t, Bytes> s0 = {}, s1 = {}, w0 = {}, w1 = {};
  int64_t j = 0;
  if (w) {
    for (; j + 2 * W <= n; j += 2 * W) {
      const Vec<acc_t, Bytes> wa = load<acc_t, Bytes>(w + j), wb = load<acc_t, Bytes>(w + j + W);
      s0 += wa * (load<acc_t, Bytes>(v + j) - shifts);
      s1 += wb * (load<acc_t, Bytes>(v + j + W) - shifts);
      w0 += wa;
      w1 += wb;
    }
  } else {
    for (; j + 2 * W <= n; j += 2 * W) {
      s0 += load<acc_t, Bytes>(v + j) - shifts;
      s1 += load<acc_t, Bytes>(v + j + W) - shifts;
    }
  }
  acc_t s = sum_lanes(s0 + s1), ws = sum_lanes(w0 + w1);
  for (; j < n; ++j) {
    const acc_t wj = w ? w[j] : acc_t(1);
    s += wj * (v[j] - shift);
    ws += wj;
  }
  smooth_sum += s;
  weight_sum += w ? ws : static_cast<acc_t>(n);
}

// out_j = alpha * exp((v_j - max) - log_sum) - beta * w_j for j < n. out may be v (the
// linear form overwrites its logits with their gradient): element j is read before it is
// written.
template <int64_t Bytes, typename acc_t>
__attribute__((always_inline)) inline void block_grad(const acc_t* v, const acc_t* __restrict w, int64_t n, acc_t max,
                                                      acc_t log_sum, acc_t alpha, acc_t beta, acc_t* out) {
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  const Vec<acc_t, Bytes> maxes = splat<Bytes>(max), log_sums = splat<Bytes>(log_sum), alphas = splat<Bytes>(alpha),
                          betas = splat<Bytes>(beta);
  int64_t j = 0;
  if (w) {
    for (; j + W <= n; j += W) {
      const Vec<acc_t, Bytes> p = exp_lanes((load<acc_t, Bytes>(v + j) - maxes) - log_sums);
      store(out + j, alphas * p - betas * load<acc_t, Bytes>(w + j));
    }
  } else {
    for (; j + W <= n; j += W) {
      store(out + j, alphas * exp_lanes((load<acc_t, Bytes>(v + j) - maxes) - log_sums) - betas);
    }
  }
  for (; j < n; ++j) out[j] = alpha * exp_scalar((v[j] - max) - log_sum) - beta * (w ? w[j] : acc_t(1));
}

// One row r = (n, s). buf, gbuf: kBlock scratch values. g may be x (not restrict).
template <int64_t Bytes, typename scalar_t>
FASTREG_INLINE inline void cross_entropy_row(const RowPassArgs<scalar_t>& a, int64_t r,
                                             acc_type<scalar_t>* __restrict buf, acc_type<scalar_t>* __restrict gbuf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = r / a.S, s = r % a.S, C = a.C;
  const scalar_t* x = a.x + n * a.x_n + s * a.x_s;
  scalar_t* g = a.grad ? a.grad + n * a.g_n + s * a.g_s : nullptr;
  const int64_t t = a.target[r];
  if (t == a.ignore_index) {
    a.ce[r] = 0;
    a.z[r] = 0;
    if (g) std::fill(g, g + C, scalar_t(0));
    return;
  }
  check_target(t, C);
  const acc_t shift = static_cast<acc_t>(x[0]);
  SoftmaxStats<acc_t> stats{-INFINITY, 0};
  acc_t smooth_sum = 0, weight_sum = 0;
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t len = std::min(kBlock, C - j0);
    const acc_t* v = as_acc(x + j0, len, buf);
    const acc_t m = block_max<Bytes>(v, len);
    if (m > stats.max) {
      stats.sum *= exp_scalar(stats.max - m);
      stats.max = m;
    }
    if (stats.max != -INFINITY) stats.sum += block_sum_exp<Bytes>(v, len, stats.max);
    if (a.smoothing != 0) {
      block_smooth_sums<Bytes>(v, a.weight ? a.weight + j0 : nullptr, len, shift, smooth_sum, weight_sum);
    }
  }
  const acc_t log_sum = std::log(stats.sum);
  const acc_t* scale = a.scale + r * a.scale_stride;
  const acc_t target_weight = a.weight ? a.weight[t] : acc_t(1);
  const RowTerms<acc_t> terms = row_terms<acc_t>(stats.max, log_sum, static_cast<acc_t>(x[t]), target_weight, shift,
                                                 smooth_sum, weight_sum, a.smoothing, C, a.z_loss, scale[0], scale[1]);
  a.ce[r] = terms.ce;
  a.z[r] = terms.z;
  if (!g) return;
  const acc_t x_t = static_cast<acc_t>(x[t]);  // read before the row is overwritten (g may be x)
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t len = std::min(kBlock, C - j0);
    const acc_t* w = a.weight ? a.weight + j0 : nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      block_grad<Bytes>(x + j0, w, len, stats.max, log_sum, terms.alpha, terms.beta, g + j0);
    } else {
      block_grad<Bytes>(as_acc(x + j0, len, buf), w, len, stats.max, log_sum, terms.alpha, terms.beta, gbuf);
      for (int64_t j = 0; j < len; ++j) g[j0 + j] = static_cast<scalar_t>(gbuf[j]);
    }
  }
  g[t] = static_cast<scalar_t>(terms.alpha * exp_scalar((x_t - stats.max) - log_sum) - terms.beta * target_weight -
                               terms.target_term);
}

// --------------------------------------------------------------- columns (positions contiguous)

// Lanes [0, count) of a vector from count <= its lanes values (the others: fill).
template <int64_t Bytes, typename scalar_t, typename acc_t = acc_type<scalar_t>>
__attribute__((always_inline)) inline Vec<acc_t, Bytes> load_lanes(const scalar_t* __restrict p, int64_t count,
                                                                   acc_t fill) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count == kWidth<acc_t, Bytes>) return load<acc_t, Bytes>(p);
  }
  Vec<acc_t, Bytes> v = splat<Bytes>(fill);
  for (int64_t k = 0; k < count; ++k) v[k] = static_cast<acc_t>(p[k]);
  return v;
}

template <typename scalar_t, typename Vt>
__attribute__((always_inline)) inline void store_lanes(scalar_t* __restrict p, Vt v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, LaneOf<Vt>>) {
    if (count == kLanesOf<Vt>) return store(p, v);
  }
  for (int64_t k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(v[k]);
}

// Positions [s0, s0 + count) of sample n, one per lane: count <= the lanes of a Bytes vector.
template <int64_t Bytes, typename scalar_t>
FASTREG_INLINE inline void cross_entropy_columns(const RowPassArgs<scalar_t>& a, int64_t n, int64_t s0,
                                                 int64_t count) {
  using acc_t = acc_type<scalar_t>;
  using Vt = Vec<acc_t, Bytes>;
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  const int64_t C = a.C;
  const scalar_t* x = a.x + n * a.x_n + s0 * a.x_s;
  const int64_t first_row = n * a.S + s0;
  // per lane: target, whether counted, its target logit and weight
  int64_t t[W];
  bool active[W];
  acc_t target_logit[W], target_weight[W];
  for (int64_t k = 0; k < W; ++k) {
    t[k] = k < count ? a.target[first_row + k] : a.ignore_index;
    active[k] = k < count && t[k] != a.ignore_index;
    if (active[k]) check_target(t[k], C);
    target_logit[k] = active[k] ? static_cast<acc_t>(x[t[k] * a.x_c + k]) : acc_t(0);
    target_weight[k] = active[k] ? (a.weight ? a.weight[t[k]] : acc_t(1)) : acc_t(0);
  }
  const Vt shift = C > 0 ? load_lanes<Bytes>(x, count, acc_t(0)) : Vt{};
  Vt m = splat<Bytes, acc_t>(-INFINITY), smooth_sum = {};
  acc_t weight_sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    const Vt v = load_lanes<Bytes>(x + c * a.x_c, count, acc_t(0));
    m = max_lanes(m, v);
    if (a.smoothing != 0) {
      const acc_t wc = a.weight ? a.weight[c] : acc_t(1);
      smooth_sum += wc * (v - shift);
      weight_sum += wc;
    }
  }
  // lanes whose logits are all -inf keep sum 0 and lse -inf, as a row does
  const Vt m_finite = m == splat<Bytes, acc_t>(-INFINITY) ? Vt{} : m;
  Vt sum = {};
  for (int64_t c = 0; c < C; ++c) sum += exp_lanes(load_lanes<Bytes>(x + c * a.x_c, count, acc_t(0)) - m_finite);
  Vt alpha = {}, beta = {}, target_term = {}, log_sum = {};
  for (int64_t k = 0; k < W; ++k) {
    const int64_t r = first_row + k;
    if (!active[k]) {
      if (k < count) a.ce[r] = a.z[r] = 0;
      continue;
    }
    log_sum[k] = std::log(sum[k]);
    const acc_t* scale = a.scale + r * a.scale_stride;
    const RowTerms<acc_t> terms = row_terms<acc_t>(m[k], log_sum[k], target_logit[k], target_weight[k], shift[k],
                                                   smooth_sum[k], weight_sum, a.smoothing, C, a.z_loss, scale[0],
                                                   scale[1]);
    a.ce[r] = terms.ce;
    a.z[r] = terms.z;
    alpha[k] = terms.alpha;
    beta[k] = terms.beta;
    target_term[k] = terms.target_term;
  }
  if (!a.grad) return;
  scalar_t* g = a.grad + n * a.g_n + s0 * a.g_s;
  using Mask = decltype(alpha < alpha);  // integer lanes of acc_t's width
  using Index = LaneOf<Mask>;
  Mask targets = {}, live = {};
  for (int64_t k = 0; k < W; ++k) {
    targets[k] = active[k] ? static_cast<Index>(t[k]) : Index(-1);
    live[k] = active[k] ? Index(-1) : Index(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const Vt v = load_lanes<Bytes>(x + c * a.x_c, count, acc_t(0));
    const acc_t wc = a.weight ? a.weight[c] : acc_t(1);
    Vt grad = alpha * exp_lanes((v - m_finite) - log_sum) - beta * wc;
    grad = targets == (Mask{} + static_cast<Index>(c)) ? grad - target_term : grad;
    grad = live != Mask{} ? grad : Vt{};  // ignored positions: exactly 0 whatever their logits
    store_lanes(g + c * a.g_c, grad, count);
  }
}

// ----------------------------------------------------------------------------- the row pass

// ce_rows, z_rows (acc dtype, N * S) and, when grad is defined, the gradient of the rows of
// the readable logits x (N, C, S) into grad (may be x itself). weight: (C,) acc dtype,
// contiguous, or undefined; scale: (1, 2) or (N * S, 2) acc dtype (ce_scale, z_scale).
void cross_entropy_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                        double smoothing, double z_loss, const at::Tensor& scale, const at::Tensor& ce_rows,
                        const at::Tensor& z_rows, const at::Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_rows", [&] {
    using acc_t = acc_type<scalar_t>;
    RowPassArgs<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.grad = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    a.target = target.const_data_ptr<int64_t>();
    a.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    a.scale = scale.const_data_ptr<acc_t>();
    a.ce = ce_rows.mutable_data_ptr<acc_t>();
    a.z = z_rows.mutable_data_ptr<acc_t>();
    a.N = x.size(0);
    a.C = x.size(1);
    a.S = x.size(2);
    a.x_n = x.stride(0);
    a.x_c = x.stride(1);
    a.x_s = x.stride(2);
    a.g_n = grad.defined() ? grad.stride(0) : 0;
    a.g_c = grad.defined() ? grad.stride(1) : 0;
    a.g_s = grad.defined() ? grad.stride(2) : 0;
    a.scale_stride = scale.size(0) > 1 ? scale.stride(0) : 0;
    a.ignore_index = ignore_index;
    a.smoothing = static_cast<acc_t>(smoothing);
    a.z_loss = static_cast<acc_t>(z_loss);
    const int64_t rows = a.N * a.S;
    if (rows == 0) return;
    if (reads_rows(x)) {
      TORCH_INTERNAL_ASSERT(!grad.defined() || grad.stride(1) == 1 || a.C <= 1);
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.C, 1));
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kBlock), gbuf(a.grad ? kBlock : 0);
        with_widest_vectors([&](auto bytes) FASTREG_INLINE {
          for (int64_t r = begin; r < end; ++r) cross_entropy_row<bytes>(a, r, buf.data(), gbuf.data());
        });
      });
    } else {
      TORCH_INTERNAL_ASSERT(reads_columns(x) && (!grad.defined() || grad.stride(2) == 1));
      const int64_t W = widest_vector_bytes() / static_cast<int64_t>(sizeof(acc_t));  // positions per tile
      const int64_t tiles_per_sample = (a.S + W - 1) / W;
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.C * W, 1));
      at::parallel_for(0, a.N * tiles_per_sample, grain, [&](int64_t begin, int64_t end) {
        with_widest_vectors([&](auto bytes) FASTREG_INLINE {
          for (int64_t tile = begin; tile < end; ++tile) {
            const int64_t n = tile / tiles_per_sample, s0 = (tile % tiles_per_sample) * W;
            cross_entropy_columns<bytes>(a, n, s0, std::min(W, a.S - s0));
          }
        });
      });
    }
  });
}

// (sum of w_t, count) over the non-ignored targets; checks them against [0, C).
std::pair<double, int64_t> target_totals(const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                                         int64_t C) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  double total = 0;
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(weight.defined() ? weight.scalar_type() : at::kFloat, "target_totals", [&] {
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0, rows = target.numel(); i < rows; ++i) {
      if (t[i] == ignore_index) continue;
      check_target(t[i], C);
      total += w ? static_cast<double>(w[t[i]]) : 1.0;
      ++count;
    }
  });
  return {total, count};
}

// The (ce_scale, z_scale) pair of a reduction: the gradient of a mean divides by the total
// weight (ce) and the count (z) of the non-ignored rows.
at::Tensor reduction_scale(int64_t reduction, double total, int64_t count, const at::TensorOptions& acc) {
  at::Tensor scale = at::empty({1, 2}, acc);
  const double ce_scale = reduction == kReductionMean ? 1.0 / total : 1.0;
  const double z_scale = reduction == kReductionMean ? 1.0 / static_cast<double>(count) : 1.0;
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "reduction_scale", [&] {
    scale.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(ce_scale);
    scale.mutable_data_ptr<scalar_t>()[1] = static_cast<scalar_t>(z_scale);
  });
  return scale;
}

// loss (ce + z per row, or its reduction) and z_term, in the logits' dtype, from the rows.
void reduce_rows(const at::Tensor& ce_rows, const at::Tensor& z_rows, int64_t reduction, double total, int64_t count,
                 at::Tensor& loss, at::Tensor& z_term) {
  AT_DISPATCH_FLOATING_TYPES(ce_rows.scalar_type(), "reduce_rows", [&] {
    const scalar_t* ce = ce_rows.const_data_ptr<scalar_t>();
    const scalar_t* z = z_rows.const_data_ptr<scalar_t>();
    const int64_t rows = ce_rows.numel();
    if (reduction == kReductionNone) {
      loss.copy_(ce_rows.add(z_rows).view(loss.sizes()));
      z_term.copy_(z_rows.view(z_term.sizes()));
      return;
    }
    double ce_sum = 0, z_sum = 0;
    for (int64_t i = 0; i < rows; ++i) {
      ce_sum += static_cast<double>(ce[i]);
      z_sum += static_cast<double>(z[i]);
    }
    if (reduction == kReductionMean) {  // 0 / 0 = nan when nothing counts, as torch
      ce_sum /= total;
      z_sum /= static_cast<double>(count);
    }
    loss.fill_(ce_sum + z_sum);
    z_term.fill_(z_sum);
  });
}

at::Tensor acc_weight(const std::optional<at::Tensor>& weight, at::ScalarType acc) {
  return weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, int64_t reduction, bool compute_grad) {
  check_cross_entropy_args("cross_entropy_fwd", input, target, weight, reduction);
  const at::Tensor x = readable_logits(input);
  const at::Tensor targets = target.contiguous();
  const auto acc = input.options().dtype(cross_entropy_acc_dtype(input));
  const at::Tensor w = acc_weight(weight, acc.dtype().toScalarType());
  const auto [total, count] = target_totals(targets, w, ignore_index, x.size(1));
  const at::Tensor scale = reduction_scale(reduction, total, count, acc);
  const int64_t rows = x.size(0) * x.size(2);
  at::Tensor ce_rows = at::empty({rows}, acc), z_rows = at::empty({rows}, acc);
  at::Tensor grad = compute_grad ? gradient_like(x) : at::empty({0}, input.options());
  cross_entropy_rows(x, targets, w, ignore_index, label_smoothing, z_loss, scale, ce_rows, z_rows,
                     compute_grad ? grad : at::Tensor());
  auto [loss, z_term] = loss_outputs(x, reduction);
  reduce_rows(ce_rows, z_rows, reduction, total, count, loss, z_term);
  return {loss, z_term, grad};
}

// grad *= grad_loss: one value (skipped when it is 1, the gradient of a loss used alone),
// or one per row (N, S) broadcast over the class dim of grad (N, C, S).
void cross_entropy_bwd_cpu_(at::Tensor& grad, const at::Tensor& grad_loss) {
  if (grad.numel() == 0) return;
  if (grad_loss.numel() == 1) {
    const double factor = grad_loss.item<double>();
    if (factor != 1.0) grad.mul_(factor);
    return;
  }
  TORCH_CHECK(grad.dim() == 3 && grad_loss.dim() == 2 && grad_loss.size(0) == grad.size(0) &&
                  grad_loss.size(1) == grad.size(2),
              "fastreg::cross_entropy_bwd_: per-row 'grad_loss' must be (N, S) for a gradient (N, C, S), got ",
              grad_loss.sizes(), " for ", grad.sizes());
  grad.mul_(grad_loss.unsqueeze(1));
}

// ---------------------------------------------------------------------- linear cross-entropy

// The CPU side of linear_cross_entropy_chunks (csrc/include/fastreg/linear_cross_entropy.h).
struct CpuRowPass {
  using Totals = std::pair<double, int64_t>;
  // One matmul of a chunk's few rows against the whole (V, H) weight runs well below the
  // CPU's matmul speed (the BLAS splits and packs the wide weight for so few rows); the
  // weight's kVocabBlock-row slices, spread over the threads as single-threaded matmuls that
  // each write their columns of `out` in place, run near it. Each block's values do not
  // depend on the thread count. The worker threads run the matmuls with this thread's
  // dispatch state (below autograd: the inputs may require grad).
  static constexpr int64_t kVocabBlock = 512;
  void logits(at::Tensor& out, const at::Tensor& x, const at::Tensor& linear_weight,
              const std::optional<at::Tensor>& linear_bias) const {
    const int64_t V = linear_weight.size(0);
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, (V + kVocabBlock - 1) / kVocabBlock, 1, [&](int64_t first, int64_t last) {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      for (int64_t block = first; block < last; ++block) {
        const int64_t v0 = block * kVocabBlock, n = std::min(kVocabBlock, V - v0);
        at::Tensor columns = out.narrow(1, v0, n);
        const at::Tensor weight_t = linear_weight.narrow(0, v0, n).t();
        if (linear_bias.has_value()) {
          at::addmm_out(columns, linear_bias->narrow(0, v0, n), x, weight_t);
        } else {
          at::mm_out(columns, x, weight_t);
        }
      }
    });
  }
  Totals totals(const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index, int64_t C) const {
    return target_totals(target, weight, ignore_index, C);
  }
  at::Tensor scale(int64_t reduction, const Totals& totals, const at::TensorOptions& acc) const {
    return reduction_scale(reduction, totals.first, totals.second, acc);
  }
  // the chunk's logits (rows, V) become its gradient in place when with_grad
  void operator()(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                  double smoothing, double z_loss, const at::Tensor& scale, const at::Tensor& ce_rows,
                  const at::Tensor& z_rows, bool with_grad) const {
    const at::Tensor x = logits.unsqueeze(2);
    cross_entropy_rows(x, target.unsqueeze(1), weight, ignore_index, smoothing, z_loss, scale, ce_rows, z_rows,
                       with_grad ? x : at::Tensor());
  }
  // float16/bfloat16: the operands in float32 (CPU matmuls in those dtypes are emulated,
  // slower than float32's), kSlice tokens at a time so the float32 copies stay small
  void add_weight_grad(at::Tensor& grad_weight, const at::Tensor& grad_logits, const at::Tensor& x) const {
    constexpr int64_t kSlice = 128;
    const auto acc = grad_weight.scalar_type();
    for (int64_t start = 0; start < x.size(0); start += kSlice) {
      const int64_t rows = std::min(kSlice, x.size(0) - start);
      grad_weight.addmm_(grad_logits.narrow(0, start, rows).t().to(acc), x.narrow(0, start, rows).to(acc));
    }
  }
  void reduce(const at::Tensor& ce_rows, const at::Tensor& z_rows, int64_t reduction, const Totals& totals,
              at::Tensor& loss, at::Tensor& z_term) const {
    reduce_rows(ce_rows, z_rows, reduction, totals.first, totals.second, loss, z_term);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    double z_loss, int64_t reduction, const std::optional<at::Tensor>& grad_loss, bool grad_input, bool grad_weight,
    bool grad_bias, int64_t chunk_tokens) {
  return linear_cross_entropy_chunks(CpuRowPass{}, input, linear_weight, linear_bias, target, weight, ignore_index,
                                     label_smoothing, z_loss, reduction, grad_loss, grad_input, grad_weight,
                                     grad_bias, chunk_tokens);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_cpu_);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
}

}  // namespace fastreg
