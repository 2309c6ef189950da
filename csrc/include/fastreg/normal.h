#pragma once
// Standard normal draws from the Philox words of csrc/include/fastreg/philox.h, the
// noise of gaussian_dropout / gaussian_noise. Shared by the CPU and CUDA kernels and
// mirrored operation for operation by triton_kernels/noise.py and fastreg/_reference.py,
// so every backend draws the same float32 values bit for bit.
//
// Stream layout: element i (stream position q = offset + i) takes Philox call q / 4, like
// dropout. A call's four words give four normals by the Box-Muller transform, two per
// pair of words: (w0, w1) -> (r cos t, r sin t) for positions 4k, 4k + 1 and (w2, w3) for
// 4k + 2, 4k + 3, with r = sqrt(-2 ln u), u from the radius word and the angle t from the
// angle word.
//
// Why bit for bit: the transform uses only IEEE-exact operations (integer ops, exact
// int -> float conversions, +, -, *, / and sqrt, each rounded once to float32) in one
// fixed order, with polynomials of its own instead of each platform's logf / sinf / cosf
// (which differ by an ulp between libm, CUDA's libdevice and SLEEF). No operation may be
// contracted into an FMA: CUDA code uses the __f*_rn intrinsics, which nvcc never
// contracts; the CPU files that include this header switch contraction off.
//
// Accuracy against the exact transform of the same words: the polynomials are truncated
// series with remainders below 3e-9 (relative); with the roundings the float32 normal
// is within 1e-6 (relative) of the float64 transform. u = (2 * (w >> 9) + 1) / 2^24 lies
// in [2^-24, 1 - 2^-24], so |n| <= sqrt(2 ln 2^24) ~ 5.77 (P(|N| > 5.77) ~ 8e-9).
#include <cstdint>
#include <cstring>

#include "fastreg/macros.h"

namespace fastreg {
namespace normal_detail {

// One rounding each, never fused: see above.
FASTREG_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTREG_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTREG_HOST_DEVICE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTREG_HOST_DEVICE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTREG_HOST_DEVICE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
FASTREG_HOST_DEVICE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}
FASTREG_HOST_DEVICE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// Float32 constants, each written as the exact decimal of its float32 value, so that every
// language parses it to the same float.
constexpr float kLn2 = 0.6931471824645996f;
constexpr float kSqrt2 = 1.4142135381698608f;
// ln(m) = 2 atanh(s) = s * (2 + z * (2/3 + z * (2/5 + z * (2/7 + z * 2/9)))), s = (m - 1) / (m + 1),
// z = s^2 <= 0.0295 for m in [sqrt(1/2), sqrt(2)]: the next term is below 2e-9 relative.
constexpr float kLog3 = 0.6666666865348816f;
constexpr float kLog5 = 0.4000000059604645f;
constexpr float kLog7 = 0.2857142984867096f;
constexpr float kLog9 = 0.2222222238779068f;
// sin(pi/2 t) and cos(pi/2 t) for |t| <= 1/2 (|angle| <= pi/4): Taylor series to t^9 and
// t^10, remainders below 3e-9 and 2e-10.
constexpr float kSin1 = 1.5707963705062866f;
constexpr float kSin3 = -0.6459640860557556f;
constexpr float kSin5 = 0.07969262450933456f;
constexpr float kSin7 = -0.004681753925979137f;
constexpr float kSin9 = 0.00016044118092395365f;
constexpr float kCos2 = -1.2337005138397217f;
constexpr float kCos4 = 0.25366950035095215f;
constexpr float kCos6 = -0.020863480865955353f;
constexpr float kCos8 = 0.0009192602592520416f;
constexpr float kCos10 = -2.520204179745633e-05f;

}  // namespace normal_detail

// The Box-Muller pair of one radius word and one angle word: *cos_out = r cos(t),
// *sin_out = r sin(t). Branch-free, so that a loop over pairs vectorizes.
FASTREG_HOST_DEVICE void normal_pair(uint32_t radius_word, uint32_t angle_word, float* cos_out, float* sin_out) {
  using namespace normal_detail;
  // u = (2k + 1) / 2^24 with k the top 23 bits: exact in float32, never 0 or 1
  const float u = mul(static_cast<float>(static_cast<int32_t>((radius_word >> 9) * 2u + 1u)), 5.9604644775390625e-08f);
  // u = 2^e * m, m in [sqrt(1/2), sqrt(2)): exact bit manipulation of the float
  const uint32_t bits = float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127;
  float m = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const bool halve = m > kSqrt2;
  m = halve ? mul(m, 0.5f) : m;
  e = halve ? e + 1 : e;
  const float s = div(sub(m, 1.0f), add(m, 1.0f));
  const float z = mul(s, s);
  float series = add(kLog7, mul(z, kLog9));
  series = add(kLog5, mul(z, series));
  series = add(kLog3, mul(z, series));
  series = add(2.0f, mul(z, series));
  const float log_u = add(mul(static_cast<float>(e), kLn2), mul(s, series));  // < 0
  const float r = sqrt_rn(mul(-2.0f, log_u));

  // angle = pi/2 * (quadrant + t): the quadrant from the top 2 bits, t in (-1/2, 1/2) from
  // the next 23 as an odd multiple of 2^-24 (exact); a uniform angle on the circle
  const uint32_t quadrant = angle_word >> 30;
  const float t = mul(static_cast<float>(static_cast<int32_t>(((angle_word >> 7) & 0x7FFFFFu) * 2u + 1u) - 8388608),
                      5.9604644775390625e-08f);
  const float t2 = mul(t, t);
  float sin_series = add(kSin7, mul(t2, kSin9));
  sin_series = add(kSin5, mul(t2, sin_series));
  sin_series = add(kSin3, mul(t2, sin_series));
  sin_series = add(kSin1, mul(t2, sin_series));
  const float sin_t = mul(t, sin_series);
  float cos_series = add(kCos8, mul(t2, kCos10));
  cos_series = add(kCos6, mul(t2, cos_series));
  cos_series = add(kCos4, mul(t2, cos_series));
  cos_series = add(kCos2, mul(t2, cos_series));
  const float cos_t = add(1.0f, mul(t2, cos_series));
  // rotation by quadrant quarter turns: exact swaps and sign flips
  const bool swap = (quadrant & 1u) != 0;
  const float c = swap ? sin_t : cos_t;
  const float sn = swap ? cos_t : sin_t;
  const float cos_angle = (quadrant == 1u || quadrant == 2u) ? -c : c;
  const float sin_angle = quadrant >= 2u ? -sn : sn;
  *cos_out = mul(r, cos_angle);
  *sin_out = mul(r, sin_angle);
}

// The normal drawn by stream position `position` from that position's Philox call `words`.
FASTREG_HOST_DEVICE float normal_of_position(const uint32_t* words, uint64_t position) {
  const int pair = static_cast<int>(position & 2u);  // words 0, 1 or words 2, 3
  float c, s;
  normal_pair(words[pair], words[pair + 1], &c, &s);
  return (position & 1u) ? s : c;
}

}  // namespace fastreg
