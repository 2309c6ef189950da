#pragma once
// Welford's running (count, mean, M2) and Chan's parallel merge: mean and variance in one
// pass without the cancellation of E[x^2] - E[x]^2 (rows with a large mean stay exact).
// Shared by the CPU and CUDA kernels.
#include "fastreg/macros.h"

namespace fastreg {

// A plain aggregate (no default member initializers) so CUDA can hold it in shared
// memory; `Welford{}` is the empty state.
struct Welford {
  float count;
  float mean;
  float m2;  // sum of squared deviations from the mean
};

FASTREG_HOST_DEVICE Welford welford_add(Welford s, float x) {
  s.count += 1.f;
  const float delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
  return s;
}

FASTREG_HOST_DEVICE Welford welford_merge(Welford a, Welford b) {
  const float count = a.count + b.count;
  if (count == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float b_share = b.count / count;
  Welford merged;
  merged.count = count;
  merged.mean = a.mean + delta * b_share;
  merged.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  return merged;
}

}  // namespace fastreg
