// float from the 16-bit floating types and back, for the CPU kernels' 16-bit inputs and
// outputs: converted a piece at a time into float scratch (csrc/cpu/convert.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastreg {

// out[i] = float(in[i]), i < n: exact.
void widen_to_float(const c10::Half* in, float* out, int64_t n);
void widen_to_float(const c10::BFloat16* in, float* out, int64_t n);
// out[i] = in[i] rounded to the nearest even 16-bit value, i < n.
void narrow_from_float(const float* in, c10::Half* out, int64_t n);
void narrow_from_float(const float* in, c10::BFloat16* out, int64_t n);

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

// out[0, n) = in[0, n) in scalar_t: a copy when scalar_t is acc_t, else narrowed.
template <typename acc_t, typename scalar_t>
inline void store_as(const acc_t* in, scalar_t* out, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (in != out) std::memcpy(out, in, n * sizeof(acc_t));
  } else {
    narrow_from_float(in, out, n);
  }
}

}  // namespace fastreg
