// Dropout on CPU tensors: the Philox stream of csrc/include/fastreg/philox.h, one call
// per 4 consecutive elements, applied in the same pass over x.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "fastreg/dropout_args.h"
#include "fastreg/philox.h"
#include "vectorize.h"

namespace fastreg {
namespace {

// branch-free: a random keep/drop branch would be mispredicted half the time
template <typename acc_t>
inline acc_t multiplier(uint32_t word, uint64_t threshold, acc_t scale) {
  return scale * static_cast<acc_t>(keep_element(word, threshold));
}

// inner == 1: elements [4g, 4g + 4) take the four words of Philox call offset / 4 + g.
template <typename scalar_t>
void dropout_elementwise(const DropoutParams<scalar_t>& a) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const int64_t groups = (a.numel + 3) / 4;
  const uint64_t first_counter = static_cast<uint64_t>(a.offset) / 4;
  at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
    uint32_t words[4 * kPhiloxBatch];
    for (int64_t g0 = begin; g0 < end; g0 += kPhiloxBatch) {
      philox_batch(first_counter + g0, seed, words);  // past `end`: words left unused
      const int64_t first = 4 * g0, last = std::min(4 * std::min(g0 + kPhiloxBatch, end), a.numel);
      for (int64_t i = first; i < last; ++i) {
        const int64_t e = i - first;  // element e takes word e % 4 of call e / 4
        const uint32_t word = words[(e % 4) * kPhiloxBatch + e / 4];
        a.out[i] = dropout_combine(a, i, a.x[i], multiplier(word, a.threshold, a.scale));
      }
    }
  });
}

// inner > 1: group g of `inner` elements shares the word at stream position offset + g.
template <typename scalar_t>
void dropout_grouped(const DropoutParams<scalar_t>& a) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const int64_t groups = (a.numel + a.inner - 1) / a.inner;
  const int64_t grain = std::max<int64_t>(1, 32768 / a.inner);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint64_t position = static_cast<uint64_t>(a.offset) + g;
      const uint32_t word = philox4x32_10(position / 4, seed).w[position % 4];
      const auto keep = multiplier(word, a.threshold, a.scale);
      const int64_t last = std::min((g + 1) * a.inner, a.numel);
      for (int64_t i = g * a.inner; i < last; ++i) a.out[i] = dropout_combine(a, i, a.x[i], keep);
    }
  });
}

void launch(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
            at::Tensor& out) {
  if (x.numel() == 0) return;
  const at::Tensor residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_dropout_cpu", [&] {
    const auto a = dropout_params<scalar_t>(x, seed, p, offset, inner, bias_c, residual_c, out);
    if (inner == 1) {
      dropout_elementwise(a);
    } else {
      dropout_grouped(a);
    }
  });
}

at::Tensor dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_dropout_args(x, seed, p, offset, inner, bias, residual);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  launch(input, seed, p, offset, inner, bias, residual, out);
  return out;
}

void dropout_cpu_(at::Tensor& x, const at::Tensor& seed, double p, int64_t offset, int64_t inner) {
  check_dropout_args(x, seed, p, offset, inner, std::nullopt, std::nullopt);
  if (!x.is_contiguous()) {  // the kernel walks x in row-major order: through a contiguous copy
    x.copy_(dropout_cpu(x, seed, p, offset, inner, std::nullopt, std::nullopt));
    return;
  }
  launch(x, seed, p, offset, inner, std::nullopt, std::nullopt, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_", &dropout_cpu_);
}

}  // namespace fastreg
