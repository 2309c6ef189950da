#pragma once
// Cross-entropy of one row of logits, the math both C++ backends share (the Triton kernels
// and fastreg/_reference.py write the same formulas).
//
// For a row x (C logits) with target t (not ignored), class weights w (all 1 when absent),
// label smoothing eps and z-loss coefficient z, with lse = log(sum_c exp(x_c)):
//   ce   = (1 - eps) * w_t * (lse - x_t) + eps / C * sum_c w_c * (lse - x_c)   (torch's)
//   zrow = z * lse^2                                                             (PaLM's z-loss)
// and, with p_c = exp(x_c - lse), the gradient of ce_scale * ce + z_scale * zrow:
//   g_c = alpha * p_c - beta * w_c - [c == t] * target_term
//   alpha = ce_scale * ((1 - eps) * w_t + eps / C * sum_c w_c) + z_scale * 2 * z * lse
//   beta = ce_scale * eps / C,  target_term = ce_scale * (1 - eps) * w_t
// lse is kept as max + log_sum (log_sum = log sum_c exp(x_c - max)) and every difference
// with a logit is taken from the max first: lse - x_t = (max - x_t) + log_sum, and
// p_c = exp((x_c - max) - log_sum); the smoothing sum is taken of x_c - shift (shift: a
// logit of the row): sum_c w_c (lse - x_c) = ((max - shift) + log_sum) * sum_c w_c -
// sum_c w_c (x_c - shift). So a large common offset of the logits costs no precision.
#include <cmath>
#include <cstdint>

#include "fastreg/macros.h"

namespace fastreg {

// torch's at::Reduction values
constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;
constexpr int64_t kReductionSum = 2;

// Running max and sum of exp(x - max) of a row (online softmax): merged block by block.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T>
FASTREG_HOST_DEVICE SoftmaxStats<T> merge_stats(SoftmaxStats<T> a, SoftmaxStats<T> b) {
  const T m = a.max > b.max ? a.max : b.max;
  if (m == -INFINITY) return {m, T(0)};  // nothing but -inf so far: no exp(-inf - -inf)
  return {m, a.sum * std::exp(a.max - m) + b.sum * std::exp(b.max - m)};
}

template <typename T>
struct RowTerms {
  T ce, z;  // the row's loss terms (unscaled)
  T alpha, beta, target_term;  // its gradient: g_c = alpha * p_c - beta * w_c - [c == t] * target_term
};

// The loss terms and gradient coefficients of a non-ignored row from its statistics (max,
// log_sum = log sum_c exp(x_c - max)). target_weight = w_t; smooth_sum = sum_c w_c *
// (x_c - shift); weight_total = sum_c w_c (C without weights); ce_scale, z_scale: the
// multipliers of the two terms' gradients.
template <typename T>
FASTREG_HOST_DEVICE RowTerms<T> row_terms(T max, T log_sum, T target_logit, T target_weight, T shift, T smooth_sum,
                                          T weight_total, T smoothing, int64_t classes, T z_loss, T ce_scale,
                                          T z_scale) {
  const T uniform = smoothing / static_cast<T>(classes);
  const T lse = max + log_sum;
  RowTerms<T> r;
  r.ce = (T(1) - smoothing) * target_weight * ((max - target_logit) + log_sum);
  if (smoothing != T(0)) r.ce += uniform * (((max - shift) + log_sum) * weight_total - smooth_sum);
  r.z = z_loss * lse * lse;
  r.alpha = ce_scale * ((T(1) - smoothing) * target_weight + uniform * weight_total) + z_scale * T(2) * z_loss * lse;
  r.beta = ce_scale * uniform;
  r.target_term = ce_scale * (T(1) - smoothing) * target_weight;
  return r;
}

}  // namespace fastreg
