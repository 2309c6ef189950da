// DropBlock on CPU tensors (geometry, stream and mask layout: csrc/include/fastreg/drop_block.h).
//
// Two passes. The mask pass (parallel over mask rows, or samples when a sample's planes
// share work) draws a plane's seeds from the Philox stream, widens them into blocks with
// sliding ORs along W, H and D (block_size byte ORs per element, vectorized along the row),
// and packs the keep bits in x's memory order, counting the kept elements per row. The
// apply pass multiplies x by keep * scale, 8 elements per mask byte through a table of the
// 256 byte values' multipliers. The mask is stored (1 bit per element) rather than
// regenerated: the seeds' Philox draws cost more than the apply pass itself, and both the
// forward's normalization (it needs the kept count before any output) and backward would
// draw them again.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "fastreg/drop_block.h"
#include "fastreg/philox.h"
#include "parallel.h"
#include "vectorize.h"

namespace fastreg {
namespace {

// bytes[e] = 1 if stream position 4 * first_counter + e is a seed (word below threshold), for
// e < 4 * kPhiloxBatch. A function of its own, cloned for AVX-512: the Philox rounds are most
// of DropBlock's CPU time, and 16-lane vectors run them faster.
static FASTREG_CPU_CLONES_AVX512 void seed_batch(uint64_t first_counter, uint64_t seed, uint64_t threshold,
                                                 uint8_t* __restrict bytes) {
  uint32_t words[4][kPhiloxBatch];
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {
    const Philox4 r = philox4x32_10(first_counter + k, seed);
    for (int j = 0; j < 4; ++j) words[j][k] = r.w[j];
  }
  for (int64_t k = 0; k < kPhiloxBatch; ++k) {
    for (int j = 0; j < 4; ++j) bytes[4 * k + j] = static_cast<uint64_t>(words[j][k]) < threshold;
  }
}

// seeds[e] = 1 if stream position first + e is a seed, for e < count; returns the number of seeds.
int64_t draw_seeds(uint64_t first, int64_t count, uint64_t seed, uint64_t threshold, uint8_t* __restrict seeds) {
  uint8_t batch[4 * kPhiloxBatch];
  const uint64_t last = first + static_cast<uint64_t>(count);
  int64_t total = 0;
  for (uint64_t counter = first / 4; counter * 4 < last; counter += kPhiloxBatch) {
    const uint64_t begin = std::max(first, 4 * counter), end = std::min(last, 4 * (counter + kPhiloxBatch));
    uint8_t* target = seeds + (begin - first);
    if (begin == 4 * counter && end == 4 * (counter + kPhiloxBatch)) {
      seed_batch(counter, seed, threshold, target);  // a whole batch: in place
    } else {
      seed_batch(counter, seed, threshold, batch);
      std::memcpy(target, batch + (begin - 4 * counter), static_cast<size_t>(end - begin));
    }
    for (uint64_t e = 0; e < end - begin; ++e) total += target[e];
  }
  return total;
}

// out[r][a] = OR of in[r][a - k] over k < block, 0 <= a - k < in_length, for `rows` rows of
// `inner` bytes at each of in_length (in) / out_length (out) positions along the axis: for
// each k, one flat OR of the row shifted by k positions (vectorized).
void sliding_or(const uint8_t* __restrict in, uint8_t* __restrict out, int64_t rows, int64_t in_length,
                int64_t out_length, int64_t inner, int64_t block) {
  std::memset(out, 0, static_cast<size_t>(rows * out_length * inner));
  const int64_t span = in_length * inner;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = in + r * span;
    for (int64_t k = 0; k < block; ++k) {
      uint8_t* dst = out + r * out_length * inner + k * inner;
      for (int64_t t = 0; t < span; ++t) dst[t] |= src[t];
    }
  }
}

// One plane's drop bytes (1 = dropped), D*H*W in (d, h, w) order; scratch reused per thread.
struct PlaneMasker {
  const DropBlockGeometry& g;
  uint64_t seed, threshold;
  std::vector<uint8_t> seeds, along_w, along_h, drop;

  PlaneMasker(const DropBlockGeometry& geometry, uint64_t seed_value, uint64_t threshold_value)
      : g(geometry), seed(seed_value), threshold(threshold_value) {
    seeds.resize(g.grid());
    along_w.resize(g.Ds * g.Hs * g.W);
    along_h.resize(g.Ds * g.H * g.W);
    drop.resize(g.spatial());
  }

  const uint8_t* operator()(int64_t plane) {
    const int64_t count = draw_seeds(static_cast<uint64_t>(plane * g.grid()), g.grid(), seed, threshold, seeds.data());
    if (count == 0) {
      std::memset(drop.data(), 0, drop.size());
      return drop.data();
    }
    // along W: rows (d, i) of Ws seeds -> W; then H: for each d, Hs rows -> H; then D
    sliding_or(seeds.data(), along_w.data(), g.Ds * g.Hs, g.Ws, g.W, 1, g.block_size);
    uint8_t* after_h = g.block_depth > 1 ? along_h.data() : drop.data();
    sliding_or(along_w.data(), after_h, g.Ds, g.Hs, g.H, g.W, g.block_size);
    if (g.block_depth > 1) sliding_or(along_h.data(), drop.data(), 1, g.Ds, g.D, g.H * g.W, g.block_depth);
    return drop.data();
  }
};

// Packs keep = !drop[e] of `length` elements into bits (LSB first); returns the kept count.
int64_t pack_keep_bits(const uint8_t* __restrict drop, int64_t length, uint8_t* __restrict bits) {
  int64_t dropped = 0;
  for (int64_t k = 0; k * 8 < length; ++k) {
    uint8_t byte = 0;
    const int64_t n = std::min<int64_t>(8, length - 8 * k);
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t d = drop[8 * k + j];
      dropped += d;
      byte |= static_cast<uint8_t>((d ^ 1u) << j);
    }
    bits[k] = byte;
  }
  return length - dropped;
}

// Fills mask (rows x row_bytes) and kept[row]; returns the total kept count.
int64_t build_mask(const DropBlockGeometry& g, uint64_t seed, uint64_t threshold, uint8_t* mask) {
  const int64_t rows = g.rows(), row_bytes = g.row_bytes(), L = g.row_length(), S = g.spatial();
  std::vector<int64_t> kept(rows, 0);
  if (!g.channels_last && !g.shared) {
    // a row is a plane: one task per plane
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(S, 1)), [&](int64_t begin, int64_t end) {
      PlaneMasker plane_drop(g, seed, threshold);
      for (int64_t r = begin; r < end; ++r) kept[r] = pack_keep_bits(plane_drop(r), L, mask + r * row_bytes);
    });
  } else if (!g.channels_last) {
    // shared mask, contiguous: the sample's plane once, its bits copied to the C rows
    at::parallel_for(0, g.N, grain_for(g.C * S), [&](int64_t begin, int64_t end) {
      PlaneMasker plane_drop(g, seed, threshold);
      for (int64_t n = begin; n < end; ++n) {
        uint8_t* first_row = mask + n * g.C * row_bytes;
        const int64_t count = pack_keep_bits(plane_drop(n), L, first_row);
        for (int64_t c = 0; c < g.C; ++c) {
          if (c > 0) std::memcpy(first_row + c * row_bytes, first_row, static_cast<size_t>(row_bytes));
          kept[n * g.C + c] = count;
        }
      }
    });
  } else {
    // channels-last: a row is a sample, element s * C + c; drop bytes gathered in that order,
    // kChannelBlock planes at a time (each position's bytes of a block written together)
    constexpr int64_t kChannelBlock = 16;
    at::parallel_for(0, g.N, grain_for(g.C * S), [&](int64_t begin, int64_t end) {
      PlaneMasker plane_drop(g, seed, threshold);
      std::vector<uint8_t> sample_drop(L), block_drop(kChannelBlock * S);
      for (int64_t n = begin; n < end; ++n) {
        if (g.shared) {
          const uint8_t* drop = plane_drop(n);
          for (int64_t s = 0; s < S; ++s) std::memset(sample_drop.data() + s * g.C, drop[s], static_cast<size_t>(g.C));
        } else {
          for (int64_t c0 = 0; c0 < g.C; c0 += kChannelBlock) {
            const int64_t channels = std::min(kChannelBlock, g.C - c0);
            for (int64_t j = 0; j < channels; ++j) {
              std::memcpy(block_drop.data() + j * S, plane_drop(n * g.C + c0 + j), static_cast<size_t>(S));
            }
            for (int64_t s = 0; s < S; ++s) {
              uint8_t* position = sample_drop.data() + s * g.C + c0;
              for (int64_t j = 0; j < channels; ++j) position[j] = block_drop[j * S + s];
            }
          }
        }
        kept[n] = pack_keep_bits(sample_drop.data(), L, mask + n * row_bytes);
      }
    });
  }
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) total += kept[r];  // in order: deterministic (and exact)
  return total;
}

// out = x * keep * scale for mask bytes [first_byte, last_byte) of rows of x's memory (row r:
// elements [r * L, (r + 1) * L), bits of mask row r). A table holds the 8 multipliers of each
// byte value, so a full byte is one 8-element vector multiply.
template <typename scalar_t>
void apply_mask_bytes(const scalar_t* x, scalar_t* out, const uint8_t* mask, int64_t first_byte, int64_t last_byte,
                      int64_t row_length, int64_t row_bytes, const at::opmath_type<scalar_t>* table) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t row = first_byte / row_bytes, k = first_byte % row_bytes;
  for (int64_t b = first_byte; b < last_byte; ++b) {
    const int64_t base = row * row_length + 8 * k;
    const acc_t* multipliers = table + 8 * mask[b];
    if (8 * k + 8 <= row_length) {
      for (int j = 0; j < 8; ++j) out[base + j] = static_cast<scalar_t>(static_cast<acc_t>(x[base + j]) * multipliers[j]);
    } else {  // the row's last, partial byte
      for (int64_t j = 0; j < row_length - 8 * k; ++j) {
        out[base + j] = static_cast<scalar_t>(static_cast<acc_t>(x[base + j]) * multipliers[j]);
      }
    }
    if (++k == row_bytes) {
      k = 0;
      ++row;
    }
  }
}

void apply_mask(const at::Tensor& x, const at::Tensor& mask, double scale, int64_t row_length, at::Tensor& out) {
  if (x.numel() == 0) return;
  const int64_t row_bytes = mask.size(1), bytes = mask.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_drop_block_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> table(256 * 8);
    const acc_t scale_acc = static_cast<acc_t>(scale);
    for (int v = 0; v < 256; ++v) {
      for (int j = 0; j < 8; ++j) table[8 * v + j] = ((v >> j) & 1) ? scale_acc : acc_t(0);
    }
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const uint8_t* bits = mask.const_data_ptr<uint8_t>();
    at::parallel_for(0, bytes, 2048, [&](int64_t begin, int64_t end) {
      apply_mask_bytes<scalar_t>(in, o, bits, begin, end, row_length, row_bytes, table.data());
    });
  });
}

// The mask pass and the scale: (mask, scale tensor, scale value).
std::tuple<at::Tensor, at::Tensor, double> mask_and_scale(const at::Tensor& input, const at::Tensor& seed,
                                                          double gamma, int64_t block_size, double eps,
                                                          bool shared, bool channels_last) {
  const DropBlockGeometry g = drop_block_geometry(input, block_size, shared, channels_last);
  at::Tensor mask = at::empty({g.rows(), g.row_bytes()}, input.options().dtype(at::kByte));
  int64_t kept = 0;
  if (input.numel() > 0) {
    kept = build_mask(g, static_cast<uint64_t>(seed.item<int64_t>()), drop_threshold(gamma),
                      mask.mutable_data_ptr<uint8_t>());
  }
  const double scale = static_cast<double>(input.numel()) / (eps + static_cast<double>(kept));
  return {mask, at::full({}, scale, input.options().dtype(at::kDouble)), scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drop_block_cpu(const at::Tensor& x, const at::Tensor& seed,
                                                              double gamma, int64_t block_size, double eps,
                                                              bool shared) {
  check_drop_block_args(x, seed, gamma, block_size, eps);
  const bool channels_last = drop_block_channels_last(x);
  const at::Tensor input = channels_last ? x : x.contiguous();
  auto [mask, scale_tensor, scale] = mask_and_scale(input, seed, gamma, block_size, eps, shared, channels_last);
  at::Tensor out = at::empty_like(input);
  apply_mask(input, mask, scale, input.numel() / std::max<int64_t>(mask.size(0), 1), out);
  return {out, mask, scale_tensor};
}

void drop_block_cpu_(at::Tensor& x, const at::Tensor& seed, double gamma, int64_t block_size, double eps,
                     bool shared) {
  check_drop_block_args(x, seed, gamma, block_size, eps);
  const bool channels_last = drop_block_channels_last(x);
  TORCH_CHECK(channels_last || x.is_contiguous(), "fastreg::drop_block_: 'x' must be contiguous or channels-last");
  auto [mask, scale_tensor, scale] = mask_and_scale(x, seed, gamma, block_size, eps, shared, channels_last);
  apply_mask(x, mask, scale, x.numel() / std::max<int64_t>(mask.size(0), 1), x);
}

at::Tensor drop_block_apply_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale) {
  const int64_t row_length = check_drop_block_apply_args(x, mask, scale);
  at::Tensor out = at::empty_like(x);  // x is dense: out gets its strides
  apply_mask(x, mask, scale.item<double>(), row_length, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("drop_block", &drop_block_cpu);
  m.impl("drop_block_", &drop_block_cpu_);
  m.impl("drop_block_apply", &drop_block_apply_cpu);
}

}  // namespace fastreg
