#pragma once
// Counter-based Philox 4x32-10 (Salmon et al., SC'11), the random stream of
// every fastreg dropout. Shared by the CPU and CUDA kernels, and mirrored
// bit for bit by triton_kernels/dropout.py and fastreg/_reference.py.
//
// Stream layout: the 64-bit seed is the key (low word k0, high word k1). The
// element with stream position i = offset + linear index draws word i % 4 of
// philox(counter = i / 4), where the 64-bit counter fills words c0 (low) and
// c1 (high) and c2 = c3 = 0. One Philox call thus serves four consecutive
// elements, and any element can be regenerated on its own in backward.
#include <cstdint>

#include "fastreg/macros.h"

namespace fastreg {

struct Philox4 {
  uint32_t w[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

FASTREG_HOST_DEVICE uint32_t mul_hi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FASTREG_HOST_DEVICE Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mul_hi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mul_hi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// An element is dropped when its 32-bit word is below `threshold`, which the
// caller computes once as round(p * 2^32) (see drop_threshold): the drop
// probability is then p to within 2^-33, with p = 1 giving threshold 2^32
// (every word is below it) and p = 0 giving 0 (none is).
FASTREG_HOST_DEVICE bool keep_element(uint32_t word, uint64_t threshold) {
  return static_cast<uint64_t>(word) >= threshold;
}

// The multiplier of a kept element, 0 for a dropped one; the kernels compute
// x * multiplier, so NaN and -0.0 propagate exactly as in torch's dropout.
FASTREG_HOST_DEVICE double keep_scale(double p) {
  return p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
}

inline uint64_t drop_threshold(double p) {
  // p in [0, 1] was checked by the caller; 2^32 * p is exact in double.
  const double t = p * 4294967296.0;
  return static_cast<uint64_t>(t + 0.5);  // round half up, as Python's math.floor(t + 0.5)
}

}  // namespace fastreg
