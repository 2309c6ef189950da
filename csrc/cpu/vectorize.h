#pragma once
// Helpers of the CPU kernels: functions cloned for AVX2 and AVX-512 (picked at load time
// on CPUs that have them), Philox calls in batches the compiler vectorizes, and explicit
// vectors for sums (a plain floating-point reduction cannot be vectorized without
// reassociating it; separate vector lanes can).
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fastreg/philox.h"

namespace fastreg {

// FASTREG_CPU_CLONES_AVX512 adds an AVX-512 clone, for the compute-heavy loops: the
// optimizer steps (a sqrt and two divides per element), the exp polynomials of GroupNorm's
// SiLU and cross-entropy, and LayerNorm's passes over an L1-resident row run faster with
// 16-lane vectors where the CPU has them (torch's own CPU kernels use AVX-512 there).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTREG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTREG_CPU_CLONES_AVX512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTREG_CPU_CLONES_AVX512
#define FASTREG_CPU_CLONES
#endif

// The vector width of explicit vector loops in FASTREG_CPU_CLONES_AVX512 functions: one
// AVX-512 register in that clone, two AVX2 registers (four SSE ones) in the others.
constexpr int64_t kWideBytes = 64;

constexpr int64_t kPhiloxBatch = 16;

// words[j * kPhiloxBatch + k] = word j of Philox call first_counter + k. Runs the shared
// header's philox4x32_10 itself, over independent counters. A function of its own, cloned
// for AVX2 (static: one copy per file): inlined into a longer loop nest, it stays scalar.
static FASTREG_CPU_CLONES void philox_batch(uint64_t first_counter, uint64_t seed, uint32_t* __restrict words) {
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {
    const Philox4 r = philox4x32_10(first_counter + k, seed);
    for (int j = 0; j < 4; ++j) words[j * kPhiloxBatch + k] = r.w[j];
  }
}

// multiplier[i] = scale if stream position first + i is kept, else 0, for i < count.
template <typename T>
inline void keep_multipliers(uint64_t first, int64_t count, uint64_t seed, uint64_t threshold, T scale,
                             T* __restrict multiplier) {
  uint32_t words[4 * kPhiloxBatch];
  const uint64_t first_counter = first / 4, last = first + static_cast<uint64_t>(count);
  for (uint64_t counter = first_counter; counter * 4 < last; counter += kPhiloxBatch) {
    philox_batch(counter, seed, words);
    for (int64_t e = 0; e < 4 * kPhiloxBatch; ++e) {  // e: position 4 * counter + e
      const uint64_t position = 4 * counter + static_cast<uint64_t>(e);
      if (position < first || position >= last) continue;
      const bool keep = keep_element(words[(e % 4) * kPhiloxBatch + e / 4], threshold);
      multiplier[position - first] = scale * static_cast<T>(keep);  // branch-free
    }
  }
}

// Vectors of Bytes bytes (GCC/Clang vector extensions; 32 by default: one AVX2 register
// in the AVX2 clones, two SSE registers otherwise). Explicit, because GCC's vectorizer
// turns loops with several reductions into shuffles and spills.
template <typename T, int64_t Bytes = 32>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T, int64_t Bytes = 32>
using Vec = typename VecOf<T, Bytes>::type;
template <typename T, int64_t Bytes = 32>
constexpr int64_t kWidth = Bytes / sizeof(T);
// The element type of a vector V (v[0] is an lvalue reference to it). C++17: torch 2.11
// builds extensions with -std=c++17, which has no std::remove_cvref_t.
template <typename V>
using LaneOf = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

template <typename T, int64_t Bytes = 32>
__attribute__((always_inline)) inline Vec<T, Bytes> load(const T* p) {
  Vec<T, Bytes> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, typename V>
__attribute__((always_inline)) inline void store(T* p, V v) {
  static_assert(sizeof(V) % sizeof(T) == 0 && !std::is_arithmetic_v<V>, "store writes a vector of T");
  std::memcpy(p, &v, sizeof(v));
}

// exp(x) in float without a libm call, for a float or a vector of floats, in a form GCC
// vectorizes (with -fno-trapping-math, for the clamps): Cephes' expf, about 1 ulp, with
// x < -87 (results below the smallest normal float, and -inf) flushed to 0.
template <typename V>
__attribute__((always_inline)) inline V exp_approx(V x) {
  constexpr bool scalar = std::is_arithmetic_v<V>;
  const V lowest = V{} - 87.0f, highest = V{} + 88.0f;
  const auto underflow = x < lowest;
  V clamped = underflow ? lowest : x;
  clamped = clamped > highest ? highest : clamped;
  const V n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V e = p * r * r + r + 1.0f;
  V scale;  // 2^n
  if constexpr (scalar) {
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    std::memcpy(&scale, &bits, sizeof(scale));
  } else {
    using Bits = Vec<int32_t, sizeof(V)>;
    const Bits bits = (__builtin_convertvector(n, Bits) + 127) << 23;
    std::memcpy(&scale, &bits, sizeof(scale));
  }
  return underflow ? V{} : e * scale;
}

// The lanes of a vector (of any width) summed in a fixed order.
template <typename V, typename T = LaneOf<V>>
__attribute__((always_inline)) inline T sum_lanes(V v) {
  T total = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++k) total += v[k];
  return total;
}

// sum over i < n of f(v[i]) for a function f of a vector (or a scalar), in two vector
// accumulators of Bytes each (hiding the add latency), in a fixed order.
template <int64_t Bytes = 32, typename T, typename F>
__attribute__((always_inline)) inline T vector_sum(const T* __restrict v, int64_t n, F f) {
  constexpr int64_t W = kWidth<T, Bytes>;
  Vec<T, Bytes> a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a0 += f(load<T, Bytes>(v + i));
    a1 += f(load<T, Bytes>(v + i + W));
  }
  if (i + W <= n) {
    a0 += f(load<T, Bytes>(v + i));
    i += W;
  }
  T total = sum_lanes(a0 + a1);
  for (; i < n; ++i) total += f(v[i]);
  return total;
}

}  // namespace fastreg
