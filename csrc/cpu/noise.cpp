// Gaussian noise (multiplicative: Gaussian dropout; additive) and alpha dropout on CPU
// tensors, on the Philox stream of csrc/include/fastreg/philox.h: one Philox call per 4
// consecutive elements, the noise drawn in the same pass over x.
//
// No FMA contraction in this file: the normals must be the float32 values every backend
// computes (csrc/include/fastreg/normal.h), and alpha dropout's x * scale + shift rounds
// twice, as torch's multiply and add_ do.
#pragma GCC optimize("fp-contract=off")

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "fastreg/noise_args.h"
#include "fastreg/normal.h"
#include "fastreg/philox.h"
#include "vectorize.h"

namespace fastreg {
namespace {

// normals[e] = the normal of stream position 4 * first_counter + e, for e < 4 * kPhiloxBatch:
// kPhiloxBatch Philox calls and 2 * kPhiloxBatch Box-Muller pairs, vectorized across calls.
static FASTREG_CPU_CLONES_AVX512 void normal_batch(uint64_t first_counter, uint64_t seed,
                                                   float* __restrict normals) {
  uint32_t words[4][kPhiloxBatch];
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {
    const Philox4 r = philox4x32_10(first_counter + k, seed);
    for (int j = 0; j < 4; ++j) words[j][k] = r.w[j];
  }
  float cosines[2][kPhiloxBatch], sines[2][kPhiloxBatch];
  for (int half = 0; half < 2; ++half) {
    for (int64_t k = 0; k < kPhiloxBatch; ++k) {
      normal_pair(words[2 * half][k], words[2 * half + 1][k], &cosines[half][k], &sines[half][k]);
    }
  }
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {  // element 4k + j: the stream's order
    normals[4 * k] = cosines[0][k];
    normals[4 * k + 1] = sines[0][k];
    normals[4 * k + 2] = cosines[1][k];
    normals[4 * k + 3] = sines[1][k];
  }
}

// out = x * (1 + std * n) (multiplicative) or x + std * n, in the accumulate type.
template <typename scalar_t, bool multiplicative>
void gaussian_noise_kernel(const scalar_t* __restrict x, scalar_t* __restrict out, int64_t numel, uint64_t seed,
                           int64_t offset, double std) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t std_acc = static_cast<acc_t>(std);
  const int64_t groups = (numel + 3) / 4;
  const uint64_t first_counter = static_cast<uint64_t>(offset) / 4;
  at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
    float normals[4 * kPhiloxBatch];
    for (int64_t g0 = begin; g0 < end; g0 += kPhiloxBatch) {
      normal_batch(first_counter + g0, seed, normals);  // past `end`: normals left unused
      const int64_t first = 4 * g0, last = std::min(4 * std::min(g0 + kPhiloxBatch, end), numel);
      for (int64_t i = first; i < last; ++i) {
        const acc_t v = static_cast<acc_t>(x[i]);
        const acc_t noise = std_acc * static_cast<acc_t>(normals[i - first]);
        out[i] = static_cast<scalar_t>(multiplicative ? v * (acc_t(1) + noise) : v + noise);
      }
    }
  });
}

at::Tensor gaussian_noise_cpu(const at::Tensor& x, const at::Tensor& seed, double std, bool multiplicative,
                              int64_t offset) {
  check_gaussian_noise_args(x, seed, std, offset);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (input.numel() == 0) return out;
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_gaussian_noise_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (multiplicative) {
      gaussian_noise_kernel<scalar_t, true>(in, o, input.numel(), seed_value, offset, std);
    } else {
      gaussian_noise_kernel<scalar_t, false>(in, o, input.numel(), seed_value, offset, std);
    }
  });
  return out;
}

// Alpha dropout: out = x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift), one keep
// draw per `inner` consecutive elements (keep: word >= round(p * 2^32), as dropout).
template <typename scalar_t>
struct AlphaDropoutArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  int64_t numel, offset, inner;
  uint64_t seed, threshold;
  acc_t scale, keep_shift, drop_shift;

  inline void apply(int64_t i, bool keep) const {
    const acc_t v = static_cast<acc_t>(x[i]) * (keep ? scale : acc_t(0));
    out[i] = static_cast<scalar_t>(v + (keep ? keep_shift : drop_shift));
  }
};

// keep[e] = 1 if stream position 4 * first_counter + e is kept, for e < 4 * kPhiloxBatch; cloned
// for AVX-512 (the Philox rounds are most of the CPU time; 16-lane vectors run them faster).
static FASTREG_CPU_CLONES_AVX512 void keep_batch(uint64_t first_counter, uint64_t seed, uint64_t threshold,
                                                 uint8_t* __restrict keep) {
  uint32_t words[4][kPhiloxBatch];
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {
    const Philox4 r = philox4x32_10(first_counter + k, seed);
    for (int j = 0; j < 4; ++j) words[j][k] = r.w[j];
  }
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {
    for (int j = 0; j < 4; ++j) keep[4 * k + j] = keep_element(words[j][k], threshold);
  }
}

template <typename scalar_t>
void alpha_dropout_elementwise(const AlphaDropoutArgs<scalar_t>& a) {
  const int64_t groups = (a.numel + 3) / 4;
  const uint64_t first_counter = static_cast<uint64_t>(a.offset) / 4;
  at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
    uint8_t keep[4 * kPhiloxBatch];
    for (int64_t g0 = begin; g0 < end; g0 += kPhiloxBatch) {
      keep_batch(first_counter + g0, a.seed, a.threshold, keep);  // past `end`: left unused
      const int64_t first = 4 * g0, last = std::min(4 * std::min(g0 + kPhiloxBatch, end), a.numel);
      for (int64_t i = first; i < last; ++i) a.apply(i, keep[i - first]);
    }
  });
}

template <typename scalar_t>
void alpha_dropout_grouped(const AlphaDropoutArgs<scalar_t>& a) {
  const int64_t groups = (a.numel + a.inner - 1) / a.inner;
  const int64_t grain = std::max<int64_t>(1, 32768 / a.inner);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint64_t position = static_cast<uint64_t>(a.offset) + g;
      const bool keep = keep_element(philox4x32_10(position / 4, a.seed).w[position % 4], a.threshold);
      const int64_t last = std::min((g + 1) * a.inner, a.numel);
      for (int64_t i = g * a.inner; i < last; ++i) a.apply(i, keep);
    }
  });
}

void alpha_dropout_launch(const at::Tensor& x, const at::Tensor& seed, double p, double scale, double keep_shift,
                          double drop_shift, int64_t offset, int64_t inner, at::Tensor& out) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_alpha_dropout_cpu", [&] {
    using acc_t = typename AlphaDropoutArgs<scalar_t>::acc_t;
    AlphaDropoutArgs<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.numel = x.numel();
    a.offset = offset;
    a.inner = inner;
    a.seed = static_cast<uint64_t>(seed.item<int64_t>());
    a.threshold = drop_threshold(p);
    a.scale = static_cast<acc_t>(scale);
    a.keep_shift = static_cast<acc_t>(keep_shift);
    a.drop_shift = static_cast<acc_t>(drop_shift);
    if (inner == 1) {
      alpha_dropout_elementwise(a);
    } else {
      alpha_dropout_grouped(a);
    }
  });
}

at::Tensor alpha_dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p, double scale, double keep_shift,
                             double drop_shift, int64_t offset, int64_t inner) {
  check_alpha_dropout_args(x, seed, p, offset, inner);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  alpha_dropout_launch(input, seed, p, scale, keep_shift, drop_shift, offset, inner, out);
  return out;
}

void alpha_dropout_cpu_(at::Tensor& x, const at::Tensor& seed, double p, double scale, double keep_shift,
                        double drop_shift, int64_t offset, int64_t inner) {
  check_alpha_dropout_args(x, seed, p, offset, inner);
  TORCH_CHECK(x.is_contiguous(), "fastreg::alpha_dropout_: 'x' must be contiguous");
  alpha_dropout_launch(x, seed, p, scale, keep_shift, drop_shift, offset, inner, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("gaussian_noise", &gaussian_noise_cpu);
  m.impl("alpha_dropout", &alpha_dropout_cpu);
  m.impl("alpha_dropout_", &alpha_dropout_cpu_);
}

}  // namespace fastreg
