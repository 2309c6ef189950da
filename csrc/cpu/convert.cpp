// The conversions of convert.h. Half uses the CPU's conversion instructions where it has
// them (AVX-512's 16 lanes, F16C's 8: one instruction per vector, as torch's own CPU kernels),
// picked once; BFloat16, and Half elsewhere, integer vector operations. Every path gives the
// same values; a NaN may keep its payload (the instructions) or become c10's quiet NaN.
#include "convert.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "vectorize.h"

namespace fastreg {
namespace {

// The portable conversions, a vector of Bytes / 4 values at a time (with_widest_vectors).
template <int64_t Bytes, typename half_t>
FASTREG_INLINE inline void widen_lanes(const half_t* __restrict in, float* __restrict out, int64_t n) {
  constexpr int64_t W = Bytes / sizeof(float);
  int64_t i = 0;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  for (; i + W <= n; i += W) store(out + i, float_lanes_of(load<uint16_t, 2 * W>(bits + i), half_t()));
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

template <int64_t Bytes, typename half_t>
FASTREG_INLINE inline void narrow_lanes(const float* __restrict in, half_t* __restrict out, int64_t n) {
  constexpr int64_t W = Bytes / sizeof(float);
  int64_t i = 0;
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (; i + W <= n; i += W) store(bits + i, half_lanes_of(load<float, Bytes>(in + i), half_t()));
  for (; i < n; ++i) out[i] = static_cast<half_t>(in[i]);
}

template <typename half_t>
void widen_portable(const half_t* in, float* out, int64_t n) {
  with_widest_vectors([&](auto bytes) FASTREG_INLINE { widen_lanes<bytes>(in, out, n); });
}

template <typename half_t>
void narrow_portable(const float* in, half_t* out, int64_t n) {
  with_widest_vectors([&](auto bytes) FASTREG_INLINE { narrow_lanes<bytes>(in, out, n); });
}

#if defined(__x86_64__) && defined(__GNUC__)
// The last n % lanes values through a zero-padded vector too, so that every value takes
// the same instruction.
__attribute__((target("avx512f"))) void widen_half_avx512(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i))));
  }
  if (i < n) {
    alignas(64) c10::Half h[16] = {};
    alignas(64) float f[16];
    std::memcpy(h, in + i, (n - i) * sizeof(c10::Half));
    _mm512_store_ps(f, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h))));
    std::memcpy(out + i, f, (n - i) * sizeof(float));
  }
}

__attribute__((target("avx512f"))) void narrow_half_avx512(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (i < n) {
    alignas(64) float f[16] = {};
    alignas(64) c10::Half h[16];
    std::memcpy(f, in + i, (n - i) * sizeof(float));
    _mm256_store_si256(reinterpret_cast<__m256i*>(h),
                       _mm512_cvtps_ph(_mm512_load_ps(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    std::memcpy(out + i, h, (n - i) * sizeof(c10::Half));
  }
}

__attribute__((target("avx,f16c"))) void widen_half_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  if (i < n) {
    alignas(32) c10::Half h[8] = {};
    alignas(32) float f[8];
    std::memcpy(h, in + i, (n - i) * sizeof(c10::Half));
    _mm256_store_ps(f, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h))));
    std::memcpy(out + i, f, (n - i) * sizeof(float));
  }
}

__attribute__((target("avx,f16c"))) void narrow_half_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (i < n) {
    alignas(32) float f[8] = {};
    alignas(32) c10::Half h[8];
    std::memcpy(f, in + i, (n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(h),
                    _mm256_cvtps_ph(_mm256_load_ps(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    std::memcpy(out + i, h, (n - i) * sizeof(c10::Half));
  }
}
#endif

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
// Follows cpu_capability() (vectorize.h), which FASTREG_CPU_CAPABILITY caps: AVX-512 has
// the 16-lane instructions; the AVX2 CPUs have F16C.
int half_instructions() {
  static const int level = [] {
    switch (cpu_capability()) {
      case CpuCapability::kAvx512: return 2;
      case CpuCapability::kAvx2: return __builtin_cpu_supports("f16c") ? 1 : 0;
      default: return 0;
    }
  }();
  return level;
}
#else
int half_instructions() { return 0; }
#endif

void widen_to_float(const c10::Half* in, float* out, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (half_instructions()) {
    case 2: return widen_half_avx512(in, out, n);
    case 1: return widen_half_f16c(in, out, n);
  }
#endif
  widen_portable(in, out, n);
}

void narrow_from_float(const float* in, c10::Half* out, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (half_instructions()) {
    case 2: return narrow_half_avx512(in, out, n);
    case 1: return narrow_half_f16c(in, out, n);
  }
#endif
  narrow_portable(in, out, n);
}

void widen_to_float(const c10::BFloat16* in, float* out, int64_t n) { widen_portable(in, out, n); }

void narrow_from_float(const float* in, c10::BFloat16* out, int64_t n) { narrow_portable(in, out, n); }

}  // namespace fastreg
