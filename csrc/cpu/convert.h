// float from the 16-bit floating types and back, for the CPU kernels' 16-bit inputs and
// outputs: converted a piece at a time into float scratch (csrc/cpu/convert.cpp), or in
// registers inside a loop (map_half_rows).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "vectorize.h"

namespace fastreg {

// out[i] = float(in[i]), i < n: exact.
void widen_to_float(const c10::Half* in, float* out, int64_t n);
void widen_to_float(const c10::BFloat16* in, float* out, int64_t n);
// out[i] = in[i] rounded to the nearest even 16-bit value, i < n.
void narrow_from_float(const float* in, c10::Half* out, int64_t n);
void narrow_from_float(const float* in, c10::BFloat16* out, int64_t n);

// The portable conversions, in integer vector operations (GCC vectorizes c10's one-value
// conversions poorly), the same bits as c10's: exact widening; narrowing rounds to nearest
// even, with c10's NaNs (0x7FC0 for BFloat16, 0x7E00 for Half). They take vectors of any
// lane count: H, 16-bit patterns; F, as many floats; B, as many 32-bit patterns.
template <typename V>
using BitsOf = Vec<uint32_t, sizeof(V)>;  // a float vector's bits
template <typename H>
using FloatsOf = Vec<float, 2 * sizeof(H)>;  // the floats of a vector of 16-bit patterns
template <typename F>
using HalvesOf = Vec<uint16_t, sizeof(F) / 2>;  // the 16-bit patterns of a float vector

template <typename B>
__attribute__((always_inline)) inline Vec<float, sizeof(B)> float_lanes(B bits) {
  Vec<float, sizeof(B)> f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename F>
__attribute__((always_inline)) inline BitsOf<F> bit_lanes(F f) {
  BitsOf<F> bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

template <typename H>
__attribute__((always_inline)) inline FloatsOf<H> float_lanes_of(H h, c10::BFloat16) {
  return float_lanes(__builtin_convertvector(h, BitsOf<FloatsOf<H>>) << 16);
}

template <typename F>
__attribute__((always_inline)) inline HalvesOf<F> half_lanes_of(F f, c10::BFloat16) {
  const BitsOf<F> u = bit_lanes(f);
  const BitsOf<F> rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return __builtin_convertvector(f != f ? BitsOf<F>{} + 0x7FC0u : rounded, HalvesOf<F>);
}

// fp16: the exponent rebiased by a multiply (normal values) or the significand read off a
// float of exponent -1 (subnormal ones), as c10's fp16_ieee_to_fp32_value
template <typename H>
__attribute__((always_inline)) inline FloatsOf<H> float_lanes_of(H h, c10::Half) {
  using B = BitsOf<FloatsOf<H>>;
  const B w = __builtin_convertvector(h, B) << 16;
  const B two_w = w + w;
  const FloatsOf<H> normal = float_lanes((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const FloatsOf<H> subnormal = float_lanes((two_w >> 17) | (126u << 23)) - 0.5f;
  const B magnitude = two_w < (1u << 27) ? bit_lanes(subnormal) : bit_lanes(normal);
  return float_lanes((w & 0x80000000u) | magnitude);
}

// fp16 by float addition: adding a power of two that puts the fp16 rounding point at the
// float's last bit makes the float unit round (to nearest even), as c10's
// fp16_ieee_from_fp32_value; the products are exact (powers of two), so a fused multiply-add
// gives the same sum
template <typename F>
__attribute__((always_inline)) inline HalvesOf<F> half_lanes_of(F f, c10::Half) {
  using B = BitsOf<F>;
  const B w = bit_lanes(f);
  const B shl1_w = w + w;
  const F base = (float_lanes(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  B bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? B{} + 0x71000000u : bias;
  const B bits = bit_lanes(float_lanes((bias >> 1) + 0x07800000u) + base);
  const B nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const B result = ((w & 0x80000000u) >> 16) | (shl1_w > 0xFF000000u ? B{} + 0x7E00u : nonsign);
  return __builtin_convertvector(result, HalvesOf<F>);
}

// The Half conversions in use: 2: AVX-512's 16-lane instructions, 1: F16C's 8-lane ones, 0:
// integer vector operations. The best of cpu_capability() (convert.cpp).
int half_instructions();

// map_half_rows' loops, by the conversions they use: a vector of a row's values at a time
// (16 with AVX-512's instructions, 8 with F16C's, Bytes / 4 in integer lanes), its last
// values one at a time. In2 is std::nullptr_t without a second input.
template <typename In2>
constexpr bool kSecondInput = !std::is_same_v<In2, std::nullptr_t>;

// The second input's next row (none: nullptr).
template <typename In2>
__attribute__((always_inline)) inline In2 next_row(In2 in2, int64_t stride) {
  if constexpr (kSecondInput<In2>) {
    return in2 + stride;
  } else {
    return in2;
  }
}

// Values [i, n) of a row one at a time, by c10's conversions (in2: the second input's row).
template <typename half_t, typename In2, typename F>
__attribute__((always_inline)) inline void map_half_tail(const half_t* in, In2 in2, half_t* out, int64_t i, int64_t n,
                                                         F f) {
  for (; i < n; ++i) {
    if constexpr (kSecondInput<In2>) {
      out[i] = static_cast<half_t>(f(static_cast<float>(in[i]), static_cast<float>(in2[i]), i));
    } else {
      out[i] = static_cast<half_t>(f(static_cast<float>(in[i]), i));
    }
  }
}

template <int64_t Bytes, typename half_t, typename In2, typename F>
__attribute__((always_inline)) inline void map_half_portable(const half_t* __restrict in, In2 in2,
                                                             half_t* __restrict out, int64_t stride, int64_t rows,
                                                             int64_t n, F f) {
  constexpr int64_t W = Bytes / sizeof(float);
  const auto widen = [](const half_t* p) __attribute__((always_inline)) {
    return float_lanes_of(load<uint16_t, 2 * W>(reinterpret_cast<const uint16_t*>(p)), half_t());
  };
  for (int64_t r = 0; r < rows; ++r, in += stride, in2 = next_row(in2, stride), out += stride) {
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      Vec<float, Bytes> y;
      if constexpr (kSecondInput<In2>) {
        y = f(widen(in + i), widen(in2 + i), i);
      } else {
        y = f(widen(in + i), i);
      }
      store(reinterpret_cast<uint16_t*>(out + i), half_lanes_of(y, half_t()));
    }
    map_half_tail(in, in2, out, i, n, f);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
using FloatLanes = Vec<float, 64>;  // 16 floats: one AVX-512 register

template <typename In2, typename F>
__attribute__((target("avx512f"))) void map_half_avx512(const c10::Half* __restrict in, In2 in2,
                                                        c10::Half* __restrict out, int64_t stride, int64_t rows,
                                                        int64_t n, F f) {
  for (int64_t r = 0; r < rows; ++r, in += stride, in2 = next_row(in2, stride), out += stride) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const FloatLanes v = (FloatLanes)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
      FloatLanes y;
      if constexpr (kSecondInput<In2>) {
        const c10::Half* p2 = in2 + i;
        y = f(v, (FloatLanes)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p2))), i);
      } else {
        y = f(v, i);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                          _mm512_cvtps_ph((__m512)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    map_half_tail(in, in2, out, i, n, f);
  }
}

// 8 Half values from p as floats, by F16C's instruction: one AVX2 register.
using F16cLanes = Vec<float, 32>;
__attribute__((target("avx2,f16c"), always_inline)) inline F16cLanes widen_f16c(const c10::Half* p) {
  return (F16cLanes)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename In2, typename F>
__attribute__((target("avx2,f16c"))) void map_half_f16c(const c10::Half* __restrict in, In2 in2,
                                                        c10::Half* __restrict out, int64_t stride, int64_t rows,
                                                        int64_t n, F f) {
  constexpr int64_t W = 8;
  for (int64_t r = 0; r < rows; ++r, in += stride, in2 = next_row(in2, stride), out += stride) {
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      F16cLanes y;
      if constexpr (kSecondInput<In2>) {
        y = f(widen_f16c(in + i), widen_f16c(in2 + i), i);
      } else {
        y = f(widen_f16c(in + i), i);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm256_cvtps_ph((__m256)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    map_half_tail(in, in2, out, i, n, f);
  }
}
#endif

// out[r * stride + i] = f(float(in[r * stride + i]), i) narrowed to half_t, for rows r <
// rows of n values i < n; with a second input in2 (a half_t pointer, not nullptr),
// f(float(in[...]), float(in2[...]), i). f takes float vectors (the values from i) or floats,
// converted in registers on the way in and out: for the 16-bit outputs of a pass over
// inputs in memory, no float scratch row to write and read back. f's vector code takes
// the target of the calling loop (inlined; Bytes: its vector width, with_widest_vectors),
// or that of the Half instructions; a closure that captures pointers by value keeps them
// in registers (by reference, the 16-bit stores may alias what it points to, and it is
// read again at every vector).
template <int64_t Bytes, typename half_t, typename In2, typename F>
__attribute__((always_inline)) inline void map_half_rows(const half_t* __restrict in, In2 in2, half_t* __restrict out,
                                                         int64_t stride, int64_t rows, int64_t n, F f) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<half_t, c10::Half>) {
    switch (half_instructions()) {
      case 2: return map_half_avx512(in, in2, out, stride, rows, n, f);
      case 1: return map_half_f16c(in, in2, out, stride, rows, n, f);
    }
  }
#endif
  map_half_portable<Bytes>(in, in2, out, stride, rows, n, f);
}

// p[i...] as a T: the float vector from p + i, or the float p[i] (for the functions of map_half_rows).
template <typename T>
__attribute__((always_inline)) inline T values_at(const float* p, int64_t i) {
  if constexpr (std::is_arithmetic_v<T>) {
    return p[i];
  } else {
    return load<float, sizeof(T)>(p + i);
  }
}

// rows of C values `stride` apart, widened into out (rows * C floats): one call where the
// rows are packed.
template <typename half_t>
inline void widen_rows(const half_t* in, int64_t stride, int64_t rows, int64_t C, float* out) {
  if (stride == C) return widen_to_float(in, out, rows * C);
  for (int64_t r = 0; r < rows; ++r) widen_to_float(in + r * stride, out + r * C, C);
}

// in[0, n) as acc_t: in itself when it is stored as acc_t, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* in, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return in;
  } else {
    widen_to_float(in, buf, n);
    return buf;
  }
}

}  // namespace fastreg
