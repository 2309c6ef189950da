// The conversions of convert.h. Half uses the CPU's conversion instructions where it has
// them (AVX-512's 16 lanes, F16C's 8: one instruction per vector, as torch's own CPU kernels),
// picked once; BFloat16, and Half elsewhere, integer vector operations. Every path gives the
// same values; a NaN may keep its payload (the instructions) or become c10's quiet NaN.
#include "convert.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "vectorize.h"

namespace fastreg {
namespace {

// The portable conversions: kConvertLanes values at a time in integer vector operations
// (GCC vectorizes c10's one-value conversions poorly), the same bits as c10's: exact
// widening; narrowing rounds to nearest even, with c10's NaNs (0x7FC0 for BFloat16, 0x7E00
// for Half).
constexpr int64_t kConvertLanes = 16;
using FloatLanes = Vec<float, 4 * kConvertLanes>;
using BitLanes = Vec<uint32_t, 4 * kConvertLanes>;
using HalfBitLanes = Vec<uint16_t, 2 * kConvertLanes>;

__attribute__((always_inline)) inline FloatLanes float_lanes(BitLanes bits) {
  FloatLanes f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
__attribute__((always_inline)) inline BitLanes bit_lanes(FloatLanes f) {
  BitLanes bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

__attribute__((always_inline)) inline FloatLanes widen(HalfBitLanes h, c10::BFloat16) {
  return float_lanes(__builtin_convertvector(h, BitLanes) << 16);
}

__attribute__((always_inline)) inline HalfBitLanes narrow(FloatLanes f, c10::BFloat16) {
  const BitLanes u = bit_lanes(f);
  const BitLanes rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return __builtin_convertvector(f != f ? BitLanes{} + 0x7FC0u : rounded, HalfBitLanes);
}

// fp16: the exponent rebiased by a multiply (normal values) or the significand read off a
// float of exponent -1 (subnormal ones), as c10's fp16_ieee_to_fp32_value
__attribute__((always_inline)) inline FloatLanes widen(HalfBitLanes h, c10::Half) {
  const BitLanes w = __builtin_convertvector(h, BitLanes) << 16;
  const BitLanes two_w = w + w;
  const FloatLanes normal = float_lanes((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const FloatLanes subnormal = float_lanes((two_w >> 17) | (126u << 23)) - 0.5f;
  const BitLanes magnitude = two_w < (1u << 27) ? bit_lanes(subnormal) : bit_lanes(normal);
  return float_lanes((w & 0x80000000u) | magnitude);
}

// fp16 by float addition: adding a power of two that puts the fp16 rounding point at the
// float's last bit makes the float unit round (to nearest even), as c10's
// fp16_ieee_from_fp32_value; the products are exact (powers of two), so a fused multiply-add
// gives the same sum
__attribute__((always_inline)) inline HalfBitLanes narrow(FloatLanes f, c10::Half) {
  const BitLanes w = bit_lanes(f);
  const BitLanes shl1_w = w + w;
  const FloatLanes base = (float_lanes(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  BitLanes bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? BitLanes{} + 0x71000000u : bias;
  const BitLanes bits = bit_lanes(float_lanes((bias >> 1) + 0x07800000u) + base);
  const BitLanes nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const BitLanes result = ((w & 0x80000000u) >> 16) | (shl1_w > 0xFF000000u ? BitLanes{} + 0x7E00u : nonsign);
  return __builtin_convertvector(result, HalfBitLanes);
}

template <typename half_t>
FASTREG_CPU_CLONES_AVX512 void widen_lanes(const half_t* __restrict in, float* __restrict out, int64_t n) {
  int64_t i = 0;
  for (; i + kConvertLanes <= n; i += kConvertLanes) {
    HalfBitLanes h;
    std::memcpy(&h, in + i, sizeof(h));
    store(out + i, widen(h, half_t()));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

template <typename half_t>
FASTREG_CPU_CLONES_AVX512 void narrow_lanes(const float* __restrict in, half_t* __restrict out, int64_t n) {
  int64_t i = 0;
  for (; i + kConvertLanes <= n; i += kConvertLanes) store(out + i, narrow(load<float, sizeof(FloatLanes)>(in + i), half_t()));
  for (; i < n; ++i) out[i] = static_cast<half_t>(in[i]);
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

// 2: AVX-512, 1: F16C, 0: neither. Asked at the first call (after libgcc's constructors).
int half_instructions() {
  static const int level = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("f16c") ? 1 : 0;
  }();
  return level;
}
#else
int half_instructions() { return 0; }
#endif

}  // namespace

void widen_to_float(const c10::Half* in, float* out, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (half_instructions()) {
    case 2: return widen_half_avx512(in, out, n);
    case 1: return widen_half_f16c(in, out, n);
  }
#endif
  widen_lanes(in, out, n);
}

void narrow_from_float(const float* in, c10::Half* out, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (half_instructions()) {
    case 2: return narrow_half_avx512(in, out, n);
    case 1: return narrow_half_f16c(in, out, n);
  }
#endif
  narrow_lanes(in, out, n);
}

void widen_to_float(const c10::BFloat16* in, float* out, int64_t n) { widen_lanes(in, out, n); }

void narrow_from_float(const float* in, c10::BFloat16* out, int64_t n) { narrow_lanes(in, out, n); }

}  // namespace fastreg
