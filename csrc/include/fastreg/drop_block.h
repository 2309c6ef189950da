#pragma once
// DropBlock's geometry and argument checks, shared by the CPU and CUDA kernels.
//
// x is (N, C, *spatial) with 2 or 3 spatial dims, seen as (N, C, D, H, W) with D = 1 for
// 2-D inputs. Seeds: one Bernoulli(gamma) draw per point of the grid (planes, Ds, Hs, Ws),
// Ds = D - block_depth + 1 (block_depth = block_size in 3-D, 1 in 2-D), Hs = H - block_size
// + 1, Ws = W - block_size + 1; a plane is (n, c), or n when the mask is shared by the
// channels. Grid point (plane, d, i, j) draws stream position ((plane * Ds + d) * Hs + i) *
// Ws + j of the Philox stream (csrc/include/fastreg/philox.h) and is a seed when its word is
// below round(gamma * 2^32). A seed drops the block [d, d + block_depth) x [i, i +
// block_size) x [j, j + block_size) of its plane: torchvision's placement (its max-pool of
// the padded seeds), blocks wholly inside the plane.
//
// The mask holds the keep bits in x's memory order, one row per plane (contiguous x: rows
// (n, c) of D*H*W elements) or per sample (channels-last x: rows n of D*H*W*C elements),
// each row padded to whole bytes, bit j of byte k of a row being element 8k + j of the row.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "fastreg/macros.h"

namespace fastreg {

struct DropBlockGeometry {
  int64_t N, C, D, H, W;
  int64_t block_depth, block_size;
  int64_t Ds, Hs, Ws;
  bool channels_last, shared;

  FASTREG_HOST_DEVICE int64_t spatial() const { return D * H * W; }
  FASTREG_HOST_DEVICE int64_t grid() const { return Ds * Hs * Ws; }  // seed points per plane
  FASTREG_HOST_DEVICE int64_t planes() const { return shared ? N : N * C; }
  FASTREG_HOST_DEVICE int64_t rows() const { return channels_last ? N : N * C; }
  FASTREG_HOST_DEVICE int64_t row_length() const { return channels_last ? C * spatial() : spatial(); }
  FASTREG_HOST_DEVICE int64_t row_bytes() const { return (row_length() + 7) / 8; }
};

// Channels-last: x is dense in the channels_last(_3d) order and not also contiguous (then
// the two orders differ). Every backend and the fake kernel use this rule.
inline bool drop_block_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

inline DropBlockGeometry drop_block_geometry(const at::Tensor& x, int64_t block_size, bool shared,
                                             bool channels_last) {
  DropBlockGeometry g;
  const bool three_d = x.dim() == 5;
  g.N = x.size(0);
  g.C = x.size(1);
  g.D = three_d ? x.size(2) : 1;
  g.H = x.size(-2);
  g.W = x.size(-1);
  g.block_size = block_size;
  g.block_depth = three_d ? block_size : 1;
  g.Ds = g.D - g.block_depth + 1;
  g.Hs = g.H - block_size + 1;
  g.Ws = g.W - block_size + 1;
  g.channels_last = channels_last;
  g.shared = shared;
  return g;
}

inline void check_drop_block_args(const at::Tensor& x, const at::Tensor& seed, double gamma, int64_t block_size,
                                  double eps) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::drop_block: expected a floating-point 'x', got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "fastreg::drop_block: 'x' must be 4-D (N, C, H, W) or 5-D (N, C, D, H, W), got ",
              x.dim(), "-D");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastreg::drop_block: 'seed' must be an int64 tensor with one element");
  TORCH_CHECK(seed.device() == x.device(), "fastreg::drop_block: 'seed' must be on x's device (", x.device(),
              "), got ", seed.device());
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "fastreg::drop_block: 'gamma' must be in [0, 1], got ", gamma);
  TORCH_CHECK(eps >= 0.0, "fastreg::drop_block: 'eps' must be >= 0, got ", eps);
  int64_t smallest = x.size(-1);
  for (int64_t d = 2; d < x.dim(); ++d) smallest = std::min(smallest, x.size(d));
  TORCH_CHECK(x.numel() == 0 || (block_size >= 1 && block_size <= smallest),
              "fastreg::drop_block: 'block_size' must be in [1, smallest spatial size ", smallest, "], got ",
              block_size);
}

// Checks the mask and scale drop_block returned against x; returns the row length.
inline int64_t check_drop_block_apply_args(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastreg::drop_block_apply: expected a floating-point 'x', got ",
              x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(),
              "fastreg::drop_block_apply: 'x' must be dense in the memory layout of the drop_block call");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.is_contiguous(),
              "fastreg::drop_block_apply: 'mask' must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(scale.scalar_type() == at::kDouble && scale.numel() == 1,
              "fastreg::drop_block_apply: 'scale' must be a float64 tensor with one element");
  TORCH_CHECK(mask.device() == x.device() && scale.device() == x.device(),
              "fastreg::drop_block_apply: 'mask' and 'scale' must be on x's device");
  const int64_t rows = mask.size(0);
  const int64_t row_length = rows > 0 ? x.numel() / rows : 0;
  TORCH_CHECK(rows * row_length == x.numel() && mask.size(1) == (row_length + 7) / 8,
              "fastreg::drop_block_apply: 'mask' of shape ", mask.sizes(), " does not fit x of ", x.numel(),
              " elements");
  return row_length;
}

}  // namespace fastreg
