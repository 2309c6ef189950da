#pragma once
// Welford's running (count, mean, M2) and Chan's parallel merge: mean and variance in one
// pass without the cancellation of E[x^2] - E[x]^2 (rows with a large mean stay exact).
// Used by the CUDA LayerNorm kernel (the CPU and Triton kernels take two passes over a
// row instead). T is the accumulate type: float, or double for double inputs.
#include <type_traits>

#include "fastreg/macros.h"

namespace fastreg {

// The type statistics are accumulated in: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A plain aggregate (no default member initializers) so CUDA can hold it in shared
// memory; `WelfordState<T>{}` is the empty state.
template <typename T>
struct WelfordState {
  T count;
  T mean;
  T m2;  // sum of squared deviations from the mean
};

template <typename T>
FASTREG_HOST_DEVICE WelfordState<T> welford_add(WelfordState<T> s, T x) {
  s.count += T(1);
  const T delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
  return s;
}

template <typename T>
FASTREG_HOST_DEVICE WelfordState<T> welford_merge(WelfordState<T> a, WelfordState<T> b) {
  const T count = a.count + b.count;
  if (count == T(0)) return a;
  const T delta = b.mean - a.mean;
  const T b_share = b.count / count;
  WelfordState<T> merged;
  merged.count = count;
  merged.mean = a.mean + delta * b_share;
  merged.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  return merged;
}

}  // namespace fastreg
