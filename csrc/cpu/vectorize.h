#pragma once
// Helpers of the CPU kernels: functions cloned for AVX2 and AVX-512 (picked at load time
// on CPUs that have them), Philox calls in batches the compiler vectorizes, and explicit
// vectors for sums (a plain floating-point reduction cannot be vectorized without
// reassociating it; separate vector lanes can).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fastreg/philox.h"

namespace fastreg {

// FASTREG_CPU_CLONES_AVX512 adds an AVX-512 clone, for compute-heavy loops the compiler
// vectorizes itself (GroupNorm's contiguous passes and SiLU, the Philox batches): they run
// faster with 16-lane vectors where the CPU has them (torch's own CPU kernels use AVX-512
// there).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTREG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTREG_CPU_CLONES_AVX512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTREG_CPU_CLONES_AVX512
#define FASTREG_CPU_CLONES
#endif

#define FASTREG_INLINE __attribute__((always_inline))

// The vector extensions the kernels pick from, widest last. The CPU's widest, unless the
// environment variable FASTREG_CPU_CAPABILITY (avx2, default) caps it, as torch's
// ATEN_CPU_CAPABILITY does for torch's kernels: the tests reach other CPUs' paths that way.
// The cap covers what fastreg picks itself (with_widest_vectors, the Half conversions of
// convert.h), not the compiler's target_clones.
enum class CpuCapability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuCapability cpu_capability() {
  static const CpuCapability capability = [] {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    const CpuCapability cpu = __builtin_cpu_supports("avx512f") ? CpuCapability::kAvx512
                              : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                                  ? CpuCapability::kAvx2
                                  : CpuCapability::kDefault;
    const char* cap = std::getenv("FASTREG_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return CpuCapability::kDefault;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(cpu, CpuCapability::kAvx2);
    return cpu;
#else
    return CpuCapability::kDefault;
#endif
  }();
  return capability;
}

// Explicit vector loops (GCC vector extensions) take their width as a template parameter
// Bytes and run through with_widest_vectors, which compiles them for each extension with
// that extension's register width: 64 bytes with AVX-512, 32 with AVX2, 16 otherwise. The
// width follows the extension because GCC moves a vector wider than the target's registers
// through the stack: a 64-byte vector in AVX2 code spills at every load and store.
template <int64_t Bytes>
using VectorBytes = std::integral_constant<int64_t, Bytes>;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <typename Body>
__attribute__((target("avx512f"))) void run_avx512(const Body& body) {
  body(VectorBytes<64>{});
}
template <typename Body>
__attribute__((target("avx2,fma"))) void run_avx2(const Body& body) {
  body(VectorBytes<32>{});
}
#endif

// The Bytes that with_widest_vectors passes, for a caller that splits work by vector lanes.
inline int64_t widest_vector_bytes() {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512: return 64;
    case CpuCapability::kAvx2: return 32;
    default: return 16;
  }
}

// body(VectorBytes<Bytes>{}) compiled for the widest extension of cpu_capability(). body
// must be a FASTREG_INLINE closure whose loops call only FASTREG_INLINE functions (or
// functions cloned on their own): a function that is not inlined is compiled for the
// default target.
template <typename Body>
inline void with_widest_vectors(const Body& body) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  switch (cpu_capability()) {
    case CpuCapability::kAvx512: return run_avx512(body);
    case CpuCapability::kAvx2: return run_avx2(body);
    case CpuCapability::kDefault: break;
  }
#endif
  body(VectorBytes<16>{});
}

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

// (sum g, sum g * (x - mean)) over n values, in vector lanes, in a fixed order.
template <typename acc_t>
__attribute__((always_inline)) inline std::pair<acc_t, acc_t> dual_sum(const acc_t* __restrict g,
                                                                       const acc_t* __restrict x, acc_t mean,
                                                                       int64_t n) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kWidth<acc_t>;
  V sum_g = {}, sum_gx = {}, sum_g1 = {}, sum_gx1 = {};  // two accumulators each: hides the add latency
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V g0 = load(g + i), g1 = load(g + i + W);
    sum_g += g0;
    sum_gx += g0 * (load(x + i) - mean);
    sum_g1 += g1;
    sum_gx1 += g1 * (load(x + i + W) - mean);
  }
  for (; i + W <= n; i += W) {
    const V gi = load(g + i);
    sum_g += gi;
    sum_gx += gi * (load(x + i) - mean);
  }
  acc_t total_g = sum_lanes(sum_g + sum_g1), total_gx = sum_lanes(sum_gx + sum_gx1);
  for (; i < n; ++i) {
    total_g += g[i];
    total_gx += g[i] * (x[i] - mean);
  }
  return {total_g, total_gx};
}

// (sum d, sum d^2) of d = x - shift over n values, in vector lanes, in a fixed order.
template <typename acc_t>
__attribute__((always_inline)) inline std::pair<acc_t, acc_t> shifted_sums(const acc_t* __restrict x, acc_t shift,
                                                                           int64_t n) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kWidth<acc_t>;
  V sum_d = {}, sum_dd = {}, sum_d1 = {}, sum_dd1 = {};  // two accumulators each: hides the add latency
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V d0 = load(x + i) - shift, d1 = load(x + i + W) - shift;
    sum_d += d0;
    sum_dd += d0 * d0;
    sum_d1 += d1;
    sum_dd1 += d1 * d1;
  }
  acc_t total_d = sum_lanes(sum_d + sum_d1), total_dd = sum_lanes(sum_dd + sum_dd1);
  for (; i < n; ++i) {
    const acc_t d = x[i] - shift;
    total_d += d;
    total_dd += d * d;
  }
  return {total_d, total_dd};
}

// Per-channel sums over the rows of a channels-last loop (a row: the C channels of one
// position): sum_a[c] += the sum over rows r < rows of a, sum_b[c] += that of b, with
// (a, b) = vector_terms(r, c) for the Bytes vector of channels from c, or
// scalar_terms(r, c) for channel c alone. Blocks of kChannelBlockVectors vectors of
// channels keep their sums in registers while walking a block of block_rows rows (summing
// into sum_a and sum_b at every row would load and store two sums per value read); the
// blocks' sums are added in row order, so the order of every sum is fixed.
constexpr int64_t kL1BlockBytes = 16384, kChannelBlockVectors = 4;

// block_rows for channel_block_sums over rows of C acc_t values, row_bytes read per row.
// Rows in L1 (16-bit rows widened into scratch), or rows of one block of channels (walked
// in memory order): as many as fit in kL1BlockBytes. Rows read from memory that span
// several blocks: one, since walking down a block of rows one block of channels at a time
// reads memory out of order, which the prefetchers follow poorly.
template <int64_t Bytes, typename acc_t>
inline int64_t channel_block_rows(int64_t C, int64_t row_bytes, bool rows_in_l1) {
  if (!rows_in_l1 && C > kChannelBlockVectors * kWidth<acc_t, Bytes>) return 1;
  return std::max<int64_t>(1, kL1BlockBytes / std::max<int64_t>(row_bytes, 1));
}

template <int64_t Bytes, typename acc_t, typename VectorTerms, typename ScalarTerms>
__attribute__((always_inline)) inline void channel_block_sums(int64_t rows, int64_t C, int64_t block_rows,
                                                              VectorTerms vector_terms, ScalarTerms scalar_terms,
                                                              acc_t* __restrict sum_a, acc_t* __restrict sum_b) {
  using V = Vec<acc_t, Bytes>;
  constexpr int64_t W = kWidth<acc_t, Bytes>, kVectors = kChannelBlockVectors, block_c = kVectors * W;
  const int64_t blocks_end = C - C % block_c;  // channels [blocks_end, C): one at a time
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t r1 = std::min(rows, r0 + block_rows);
    for (int64_t c0 = 0; c0 < blocks_end; c0 += block_c) {
      V a[kVectors] = {}, b[kVectors] = {};
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t k = 0; k < kVectors; ++k) {
          const std::pair<V, V> terms = vector_terms(r, c0 + k * W);
          a[k] += terms.first;
          b[k] += terms.second;
        }
      }
      for (int64_t k = 0; k < kVectors; ++k) {
        store(sum_a + c0 + k * W, load<acc_t, Bytes>(sum_a + c0 + k * W) + a[k]);
        store(sum_b + c0 + k * W, load<acc_t, Bytes>(sum_b + c0 + k * W) + b[k]);
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = blocks_end; c < C; ++c) {
        const std::pair<acc_t, acc_t> terms = scalar_terms(r, c);
        sum_a[c] += terms.first;
        sum_b[c] += terms.second;
      }
    }
  }
}

}  // namespace fastreg
