"""GroupNorm (and InstanceNorm: one group per channel) in Triton, optionally fused with SiLU,
forward and backward, over inputs (N, C, S) in either memory format (contiguous or
channels-last: any strides).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

    forward   z = (x - mean) * rstd * w[c] + b[c];  y = z, or silu(z) = z * sigmoid(z)
    backward  g = dy (or dy * silu'(z), z recomputed from x)
              per channel: sum_g = sum g, sum_gxhat = rstd * sum g * (x - mean)
              per group:   A = sum_c w sum_g, B = sum_c w sum_gxhat over M = D * S values
              dx = rstd * w * g - rstd * A / M - (x - mean) * rstd^2 * B / M
              dweight = sum over n of sum_gxhat, dbias = sum over n of sum_g

Two families of kernels, one per way of walking x (`_plan` picks one):
- "group": a program's unit is one group (n, g) of D = C / G channels, walked in tiles
  of BLOCK_D channels x BLOCK_S positions through the strides (no transposing copy); the
  tile's fast axis is S. For contiguous inputs (and channels-last ones whose groups are
  too wide for a chunk).
- "chunk" (channels-last, stride_c == 1): a program's unit is a chunk of GROUPS whole
  groups (GROUPS * D channels, adjacent in memory), walked in tiles of BLOCK_S positions x
  BLOCK_C channels (BLOCK_C: the power of two at or above GROUPS * D, lanes past the chunk
  masked). A chunk is sized to rows of at least 128 bytes that are a multiple of 16 bytes
  where G allows, so that a GPU reads and writes whole rows 16 bytes per access whatever
  D is (10, 20, 40 in diffusion UNets). Per-channel sums are folded to per-group values
  with a (GROUPS, channels) membership mask.

A launch with too few units for a GPU splits S into SPLITS ranges of TILES_PER_SPLIT
whole tiles (`_plan`: about SPLIT_PROGRAMS_PER_SM programs per SM); each direction is then
two kernels over the grid (unit, split):
- forward: the stats kernel writes each group's (mean, M2) over its split; the apply
  kernel merges a group's SPLITS partials (`_merged_moments`: count-weighted, shifted by
  split 0's mean), stores MEAN / RSTD from split 0, and writes y over its split.
- backward: the grad-sums kernel writes per-channel sums of g and g * (x - mean) over its
  split to (N, SPLITS, C); the dx kernel sums a channel's SPLITS partials and writes dx
  over its split, and its programs past the units sum all the partials into dweight and
  dbias (`_param_grads`).
Partials are merged SPLIT_BLOCK at a time (loads in parallel), summed in a fixed order.
Unsplit, one kernel does the forward; the backward kernel writes per-sample channel sums
(N, 1, C) and `_gn_param_grads_kernel` sums them into dweight and dbias. So each direction
is at most two launches; statistics are written by the kernels (no zero-filled buffers) and
the parameters are read, and their gradients written, in their own dtypes (no casts).
Every sum runs in a fixed order: deterministic, no atomics. Statistics are float32 (float64
for float64 inputs), in two passes (the mean of values shifted by the group's first value,
then squared deviations from the mean): a large mean costs no precision. Counts (D * S
values per group) are 64-bit.

All kernels of a direction share argument names, so the launchers pass every kernel of
the table `_KERNELS` its arguments by name from one dict.
"""

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

GPU_TILE = 2048  # values per tile on a GPU
# ... and per "group" tile of float64 (two registers a value): its backward sums keep two
# accumulator tiles and the SiLU derivative live, 168 registers at GPU_TILE (spilling
# under triton 3.9); the "chunk" kernels, with less live, keep GPU_TILE
GPU_GROUP_TILE_FLOAT64 = GPU_TILE // 2
INTERPRETER_TILE = 1024  # ... and in the interpreter
CHUNK_ROW_BYTES = 128  # a chunk grows (doubling its groups) until its rows are this long
NUM_WARPS = 4
SPLIT_PROGRAMS_PER_SM = 4  # a launch is split until it has about this many programs per SM
# ... into tiles of no fewer than 16 bytes per thread (16-byte accesses), and only inputs
# of MIN_SPLIT_INPUT_BYTES or more (a smaller one takes a few microseconds unsplit: a second
# launch would cost as much)
MIN_SPLIT_TILE_BYTES = 16 * 32 * NUM_WARPS
MIN_SPLIT_INPUT_BYTES = 256 * 1024
MAX_SPLIT_BLOCK = 32  # partials merged per step


# ------------------------------------------------------------------ shared steps


@triton.jit
def _grad_pre_activation(dy, centered, scale, shift, SILU: tl.constexpr):
    """The gradient reaching z = centered * scale + shift (scale, shift broadcast to the
    tile by the caller): dy, or dy * silu'(z)."""
    if SILU:
        z = centered * scale + shift
        sig = 1.0 / (1.0 + tl.exp(-z))
        return dy * sig * (1.0 + z * (1.0 - sig))
    else:
        return dy


@triton.jit
def _affine_params(W, B, c, cmask, ACC: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(weight, bias), (BLOCK,) each, of channels c (those in cmask): 1 and 0 where the
    module has none."""
    w = tl.full((BLOCK,), 1.0, ACC)
    b = tl.zeros((BLOCK,), ACC)
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=cmask, other=0.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    return w, b


@triton.jit
def _positions_in(tile_first, tiles, S, BLOCK_S: tl.constexpr):
    """How many positions of S the tiles [tile_first, tile_first + tiles) cover."""
    s_begin = tile_first * BLOCK_S
    return tl.minimum(S, s_begin + tiles * BLOCK_S) - s_begin


@triton.jit
def _count(D, positions):
    """D * positions as int64: a group's values pass 2^31 (D and S are int32 arguments)."""
    return tl.cast(D, tl.int64) * positions


@triton.jit
def _merged_moments(PART_MEAN, PART_M2, groups, D, S, SPLITS, TILES_PER_SPLIT,
                    ACC: tl.constexpr, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """(mean, M2), (GROUPS,) each, over all of S of the groups `groups` (GROUPS,), from
    the per-split (mean, M2) at PART_*[group * SPLITS + k]: SPLIT_BLOCK splits per
    step, their loads in parallel. mean = m0 + sum_k count_k * (mean_k - m0) / count, m0
    split 0's mean (shifted: a large mean costs no precision); M2 = sum_k M2_k + count_k *
    (mean_k - mean)^2."""
    m0 = tl.load(PART_MEAN + groups.to(tl.int64) * SPLITS)
    rows = groups.to(tl.int64)[:, None] * SPLITS
    shifted = tl.zeros((GROUPS, SPLIT_BLOCK), ACC)
    for k0 in range(0, SPLITS, SPLIT_BLOCK):
        k = k0 + tl.arange(0, SPLIT_BLOCK)
        mask = (k < SPLITS)[None, :]
        count_k = _count(D, _positions_in(k * TILES_PER_SPLIT, TILES_PER_SPLIT, S, BLOCK_S)).to(ACC)
        mean_k = tl.load(PART_MEAN + rows + k[None, :], mask=mask, other=0.0)
        shifted += tl.where(mask, (mean_k - m0[:, None]) * count_k[None, :], 0.0)
    mean = m0 + tl.sum(shifted, axis=1) / _count(D, S).to(ACC)
    m2 = tl.zeros((GROUPS, SPLIT_BLOCK), ACC)
    for k0 in range(0, SPLITS, SPLIT_BLOCK):
        k = k0 + tl.arange(0, SPLIT_BLOCK)
        mask = (k < SPLITS)[None, :]
        count_k = _count(D, _positions_in(k * TILES_PER_SPLIT, TILES_PER_SPLIT, S, BLOCK_S)).to(ACC)
        mean_k = tl.load(PART_MEAN + rows + k[None, :], mask=mask, other=0.0)
        m2_k = tl.load(PART_M2 + rows + k[None, :], mask=mask, other=0.0)
        delta = mean_k - mean[:, None]
        m2 += tl.where(mask, m2_k + delta * delta * count_k[None, :], 0.0)
    return mean, tl.sum(m2, axis=1)


@triton.jit
def _merged_channel_sums(PART_G, PART_GX, n, c, cmask, C, SPLITS, ACC: tl.constexpr, BLOCK: tl.constexpr,
                         SPLIT_BLOCK: tl.constexpr):
    """(sum_g, sum_gx), (BLOCK,) each, of channels c (those in cmask) of sample n over all
    splits, from PART_*[(n * SPLITS + k) * C + c]: SPLIT_BLOCK splits per step."""
    sum_g = tl.zeros((SPLIT_BLOCK, BLOCK), ACC)
    sum_gx = tl.zeros((SPLIT_BLOCK, BLOCK), ACC)
    for k0 in range(0, SPLITS, SPLIT_BLOCK):
        k = k0 + tl.arange(0, SPLIT_BLOCK)
        offsets = ((n.to(tl.int64) * SPLITS + k) * C)[:, None] + c[None, :]
        mask = (k < SPLITS)[:, None] & cmask[None, :]
        sum_g += tl.load(PART_G + offsets, mask=mask, other=0.0)
        sum_gx += tl.load(PART_GX + offsets, mask=mask, other=0.0)
    return tl.sum(sum_g, axis=0), tl.sum(sum_gx, axis=0)


# ------------------------------------------------------------------ "group": the steps
# A program's unit is the group (n, g): channels [c_begin, c_end) = [g * D, g * D + D),
# over the S tiles [tile_first, tile_first + tiles): all of S unsplit, its split's tiles
# split. A tile's first position is a multiple of the constexpr BLOCK_S: the compiler
# sees its alignment.


@triton.jit
def _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s,
                BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of channels [c_first, c_first + BLOCK_D) (those below c_end) by
    positions [s_start, s_start + BLOCK_S) of sample n."""
    c = c_first + tl.arange(0, BLOCK_D)
    s = s_start + tl.arange(0, BLOCK_S)
    offsets = n.to(tl.int64) * stride_n + (c.to(tl.int64) * stride_c)[:, None] + (s.to(tl.int64) * stride_s)[None, :]
    mask = (c < c_end)[:, None] & (s < S)[None, :]
    return offsets, mask


@triton.jit
def _group_moments(X, n, c_begin, c_end, S, tile_first, tiles, stride_n, stride_c, stride_s,
                   ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """(mean, M2) of the group's values in the tiles, in two passes over values shifted by
    the group's first (which every split can read): a large mean costs no precision."""
    count = _count(c_end - c_begin, _positions_in(tile_first, tiles, S, BLOCK_S)).to(ACC)
    first = tl.load(X + n.to(tl.int64) * stride_n + c_begin.to(tl.int64) * stride_c).to(ACC)
    total = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        for t in range(tile_first, tile_first + tiles):
            offsets, mask = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                        BLOCK_D, BLOCK_S)
            total += tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - first, 0.0)
    mean = first + tl.sum(tl.sum(total, axis=1), axis=0) / count
    squares = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        for t in range(tile_first, tile_first + tiles):
            offsets, mask = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                        BLOCK_D, BLOCK_S)
            d = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            squares += d * d
    return mean, tl.sum(tl.sum(squares, axis=1), axis=0)


@triton.jit
def _group_write_y(X, Y, W, B, n, c_begin, c_end, mean, rstd, S, tile_first, tiles, stride_n, stride_c, stride_s,
                   ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """y of the group over the tiles (Y has X's strides)."""
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        w, shift = _affine_params(W, B, c, c < c_end, ACC, BLOCK_D, HAS_WEIGHT, HAS_BIAS)
        scale = w * rstd
        for t in range(tile_first, tile_first + tiles):
            offsets, mask = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                        BLOCK_D, BLOCK_S)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
            z = (x - mean) * scale[:, None] + shift[:, None]
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(Y + offsets, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_grad_sums(X, DY, W, B, n, c_first, c_end, mean, rstd, S, tile_first, tiles, stride_n, stride_c, stride_s,
                     ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel of [c_first, c_first + BLOCK_D) (below c_end): (w, sum g, sum g * (x - mean))
    over the tiles."""
    c = c_first + tl.arange(0, BLOCK_D)
    w, shift = _affine_params(W, B, c, c < c_end, ACC, BLOCK_D, HAS_WEIGHT, HAS_BIAS)
    acc_g = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    acc_gx = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                    BLOCK_D, BLOCK_S)
        centered = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean, 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        grad = _grad_pre_activation(dy, centered, (w * rstd)[:, None], shift[:, None], SILU)
        acc_g += grad
        acc_gx += grad * centered
    return w, tl.sum(acc_g, axis=1), tl.sum(acc_gx, axis=1)


@triton.jit
def _group_write_dx(X, DY, DX, W, B, n, c_begin, c_end, mean, rstd, k_x, k_one, S, tile_first, tiles,
                    stride_n, stride_c, stride_s,
                    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx of the group over the tiles from its coefficients k_x = -rstd^2 B / M and
    k_one = -rstd A / M (DY and DX have X's strides)."""
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        w, shift = _affine_params(W, B, c, c < c_end, ACC, BLOCK_D, HAS_WEIGHT, HAS_BIAS)
        for t in range(tile_first, tile_first + tiles):
            offsets, mask = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                        BLOCK_D, BLOCK_S)
            centered = tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            grad = _grad_pre_activation(dy, centered, (w * rstd)[:, None], shift[:, None], SILU)
            dx = grad * (w * rstd)[:, None] + centered * k_x + k_one
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_dx_coefs(W, c, cmask, rstd, sum_g, sum_gx, sum_wg, sum_wgxhat,
                    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr):
    """A channel block's share of the group's A, B, added to sum_wg, sum_wgxhat."""
    w, _ = _affine_params(W, W, c, cmask, ACC, BLOCK_D, HAS_WEIGHT, False)
    return sum_wg + w * sum_g, sum_wgxhat + w * (sum_gx * rstd)


# ------------------------------------------------------------------ "group": the kernels


@triton.jit
def _gn_fwd_kernel(
    X,  # (N, C, S) strides (stride_n, stride_c, stride_s), x.dtype
    Y,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) out, ACC
    RSTD,  # (N, G) out, ACC
    S,  # int: positions per sample
    D,  # int: channels per group
    G,  # int: groups
    eps,  # float
    stride_n, stride_c, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,  # y = silu(z)
    BLOCK_D: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * G + g, 0): the group's mean and rstd, then y."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    tiles = tl.cdiv(S, BLOCK_S)
    mean, m2 = _group_moments(X, n, g * D, g * D + D, S, 0, tiles, stride_n, stride_c, stride_s, ACC, BLOCK_D, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / _count(D, S).to(ACC) + eps)
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, rstd)
    _group_write_y(X, Y, W, B, n, g * D, g * D + D, mean, rstd, S, 0, tiles, stride_n, stride_c, stride_s,
                   ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


@triton.jit
def _gn_stats_kernel(
    X,  # (N, C, S) strides (stride_n, stride_c, stride_s), x.dtype
    PART_MEAN,  # (N * G * SPLITS,) out: mean of group n * G + g over split k at [(n * G + g) * SPLITS + k], ACC
    PART_M2,  # (N * G * SPLITS,) out: its sum of squared deviations, ACC
    S,  # int: positions per sample
    D,  # int: channels per group
    G,  # int: groups
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    stride_n, stride_c, stride_s,  # int: X's strides, in elements
    BLOCK_D: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * G + g, split k): the group's mean and M2 over the split's positions."""
    ACC: tl.constexpr = PART_MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    mean, m2 = _group_moments(X, n, g * D, g * D + D, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT,
                              stride_n, stride_c, stride_s, ACC, BLOCK_D, BLOCK_S)
    tl.store(PART_MEAN + ng.to(tl.int64) * SPLITS + split, mean)
    tl.store(PART_M2 + ng.to(tl.int64) * SPLITS + split, m2)


@triton.jit
def _gn_apply_kernel(
    X,  # (N, C, S) strides (stride_n, stride_c, stride_s), x.dtype
    Y,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) out (written by split 0), ACC
    RSTD,  # (N, G) out (written by split 0), ACC
    PART_MEAN,  # (N * G * SPLITS,) per-split means from _gn_stats_kernel, ACC
    PART_M2,  # (N * G * SPLITS,) per-split M2, ACC
    S,  # int: positions per sample
    D,  # int: channels per group
    G,  # int: groups
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    eps,  # float
    stride_n, stride_c, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # positions per tile
    SPLIT_BLOCK: tl.constexpr,  # partials merged per step
):
    """Program (n * G + g, split k): the group's mean and rstd merged from the SPLITS
    partials, then y over the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    mean, m2 = _merged_moments(PART_MEAN, PART_M2, ng + tl.arange(0, 1), D, S, SPLITS, TILES_PER_SPLIT, ACC, BLOCK_S,
                               1, SPLIT_BLOCK)
    mean, m2 = tl.sum(mean, axis=0), tl.sum(m2, axis=0)  # the one group's
    rstd = 1.0 / tl.sqrt(m2 / _count(D, S).to(ACC) + eps)
    if split == 0:  # every split merges the same: one stores
        tl.store(MEAN + ng, mean)
        tl.store(RSTD + ng, rstd)
    _group_write_y(X, Y, W, B, n, g * D, g * D + D, mean, rstd, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT,
                   stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


@triton.jit
def _gn_bwd_kernel(
    X,  # (N, C, S) strides (stride_n, stride_c, stride_s), x.dtype
    DY,  # (N, C, S) X's strides, x.dtype
    DX,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) ACC
    RSTD,  # (N, G) ACC
    PART_G,  # (N, 1, C) out: per-channel sums of g (dbias partials), ACC
    PART_GX,  # (N, 1, C) out: per-channel sums of g * (x - mean) (dweight partials, times rstd), ACC
    C,  # int: channels
    S,  # int: positions per sample
    D,  # int: channels per group
    G,  # int: groups
    stride_n, stride_c, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * G + g, 0): the group's per-channel sums and A, B, then dx."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    c_begin, c_end = g * D, g * D + D
    count = _count(D, S).to(ACC)
    tiles = tl.cdiv(S, BLOCK_S)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    sum_wg = tl.zeros((BLOCK_D,), ACC)
    sum_wgxhat = tl.zeros((BLOCK_D,), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        _, sum_g, sum_gx = _group_grad_sums(X, DY, W, B, n, c_first, c_end, mean, rstd, S, 0, tiles,
                                            stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU,
                                            BLOCK_D, BLOCK_S)
        tl.store(PART_G + n.to(tl.int64) * C + c, sum_g, mask=c < c_end)
        tl.store(PART_GX + n.to(tl.int64) * C + c, sum_gx, mask=c < c_end)
        sum_wg, sum_wgxhat = _group_dx_coefs(W, c, c < c_end, rstd, sum_g, sum_gx, sum_wg, sum_wgxhat, ACC,
                                             HAS_WEIGHT, BLOCK_D)
    k_x = -rstd * rstd * tl.sum(sum_wgxhat, axis=0) / count
    k_one = -rstd * tl.sum(sum_wg, axis=0) / count
    _group_write_dx(X, DY, DX, W, B, n, c_begin, c_end, mean, rstd, k_x, k_one, S, 0, tiles,
                    stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


@triton.jit
def _gn_grad_sums_kernel(
    X,  # (N, C, S) strides (stride_n, stride_c, stride_s), x.dtype
    DY,  # (N, C, S) X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) ACC
    RSTD,  # (N, G) ACC
    PART_G,  # (N, SPLITS, C) out: per-channel sums of g over split k, ACC
    PART_GX,  # (N, SPLITS, C) out: per-channel sums of g * (x - mean) over split k, ACC
    C,  # int: channels
    S,  # int: positions per sample
    D,  # int: channels per group
    G,  # int: groups
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    stride_n, stride_c, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * G + g, split k): the group's per-channel sums over the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    c_begin, c_end = g * D, g * D + D
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    part = (n.to(tl.int64) * SPLITS + split) * C
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        _, sum_g, sum_gx = _group_grad_sums(X, DY, W, B, n, c_first, c_end, mean, rstd, S,
                                            split * TILES_PER_SPLIT, TILES_PER_SPLIT, stride_n, stride_c, stride_s,
                                            ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)
        tl.store(PART_G + part + c, sum_g, mask=c < c_end)
        tl.store(PART_GX + part + c, sum_gx, mask=c < c_end)


@triton.jit
def _gn_dx_kernel(
    X,  # (N, C, S) strides (stride_n, stride_c, stride_s), x.dtype
    DY,  # (N, C, S) X's strides, x.dtype
    DX,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) ACC
    RSTD,  # (N, G) ACC
    PART_G,  # (N, SPLITS, C) per-split sums of g from _gn_grad_sums_kernel, ACC
    PART_GX,  # (N, SPLITS, C) per-split sums of g * (x - mean), ACC
    DW,  # (C,) out: dweight, weight.dtype; any pointer unless HAS_WEIGHT
    DB,  # (C,) out: dbias, bias.dtype; any pointer unless HAS_BIAS
    N,  # int: samples
    C,  # int: channels
    S,  # int: positions per sample
    D,  # int: channels per group
    G,  # int: groups
    UNITS,  # int: programs (ng, k) with ng < UNITS write dx; the rest (k == 0) dweight, dbias
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    stride_n, stride_c, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # positions per tile
    SPLIT_BLOCK: tl.constexpr,  # partials merged per step
    GRAD_ROWS: tl.constexpr,  # partial rows per step of the dweight, dbias sums
    GRAD_BLOCK_C: tl.constexpr,  # channels per dweight, dbias program
):
    """Program (n * G + g, split k): the group's per-channel sums merged from the SPLITS
    partials, its A, B, then dx over the split's positions. Program (UNITS + b, 0):
    dweight, dbias of channel block b from all the partials (`_param_grads`)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    if ng >= UNITS:
        if split == 0:
            _param_grads(PART_G, PART_GX, RSTD, DW, DB, ng - UNITS, N, C, G, D, SPLITS, ACC, HAS_WEIGHT, HAS_BIAS,
                         GRAD_ROWS, GRAD_BLOCK_C)
    else:
        n, g = ng // G, ng % G
        c_begin, c_end = g * D, g * D + D
        count = _count(D, S).to(ACC)
        mean = tl.load(MEAN + ng)
        rstd = tl.load(RSTD + ng)
        sum_wg = tl.zeros((BLOCK_D,), ACC)
        sum_wgxhat = tl.zeros((BLOCK_D,), ACC)
        for c_first in range(c_begin, c_end, BLOCK_D):
            c = c_first + tl.arange(0, BLOCK_D)
            sum_g, sum_gx = _merged_channel_sums(PART_G, PART_GX, n, c, c < c_end, C, SPLITS, ACC, BLOCK_D,
                                                 SPLIT_BLOCK)
            sum_wg, sum_wgxhat = _group_dx_coefs(W, c, c < c_end, rstd, sum_g, sum_gx, sum_wg, sum_wgxhat, ACC,
                                                 HAS_WEIGHT, BLOCK_D)
        k_x = -rstd * rstd * tl.sum(sum_wgxhat, axis=0) / count
        k_one = -rstd * tl.sum(sum_wg, axis=0) / count
        _group_write_dx(X, DY, DX, W, B, n, c_begin, c_end, mean, rstd, k_x, k_one, S, split * TILES_PER_SPLIT,
                        TILES_PER_SPLIT, stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D,
                        BLOCK_S)


# ------------------------------------------------------------------ "chunk": the steps
# A program's unit is chunk k of sample n: channels [c_first, c_first + GROUPS * D),
# c_first = k * GROUPS * D, adjacent in memory (stride_c == 1), the GROUPS groups
# [k * GROUPS, (k + 1) * GROUPS) of the sample. Tiles are BLOCK_S positions x BLOCK_C
# channel lanes, lanes past GROUPS * D masked.


@triton.jit
def _chunk_unit(pid, G, D: tl.constexpr, GROUPS: tl.constexpr):
    """(n, c_first, groups) of unit pid = n * chunks + k: the chunk's sample, first
    channel, and its groups' indices n * G + g into (N, G)."""
    chunks = G // GROUPS
    n = pid // chunks
    c_first = (pid % chunks) * (GROUPS * D)
    return n, c_first, pid * GROUPS + tl.arange(0, GROUPS)  # n * G + k * GROUPS + j = pid * GROUPS + j


@triton.jit
def _membership(D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(GROUPS, BLOCK_C): lane c of the chunk belongs to its group j (c // D == j); lanes
    past the chunk belong to none."""
    lane = tl.arange(0, BLOCK_C)
    return (lane // D)[None, :] == tl.arange(0, GROUPS)[:, None]


@triton.jit
def _per_group(v, member):
    """(GROUPS,): per-channel values v (BLOCK_C,) summed over each group's channels."""
    return tl.sum(tl.where(member, v[None, :], 0.0), axis=1)


@triton.jit
def _per_channel(v, member):
    """(BLOCK_C,): each channel's group's value of v (GROUPS,): a sum of one term, exact."""
    return tl.sum(tl.where(member, v[:, None], 0.0), axis=0)


@triton.jit
def _chunk_lanes(c_first, D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(channels, lane mask) of the chunk's BLOCK_C lanes."""
    lane = tl.arange(0, BLOCK_C)
    return c_first + lane, lane < GROUPS * D


@triton.jit
def _chunk_tile(n, c_first, s_start, S, stride_n, stride_s, D: tl.constexpr, GROUPS: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of positions [s_start, s_start + BLOCK_S) by the chunk's channel
    lanes. Rows of GROUPS * D channels are contiguous in memory: where that is a multiple
    of 16 bytes, a GPU accesses them 16 bytes at a time."""
    s = s_start + tl.arange(0, BLOCK_S)
    lane = tl.arange(0, BLOCK_C)
    offsets = n.to(tl.int64) * stride_n + (s.to(tl.int64) * stride_s)[:, None] + (c_first + lane)[None, :]
    return offsets, (s < S)[:, None] & (lane < GROUPS * D)[None, :]


@triton.jit
def _chunk_moments(X, n, c_first, S, tile_first, tiles, stride_n, stride_s,
                   ACC: tl.constexpr, D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    """(mean, M2), (GROUPS,) each, of the chunk's groups over the tiles, in two passes over
    values shifted by each group's first (position 0, which every split can read)."""
    member = _membership(D, GROUPS, BLOCK_C)
    count = _count(D, _positions_in(tile_first, tiles, S, BLOCK_S)).to(ACC)
    first = tl.load(X + n.to(tl.int64) * stride_n + c_first + tl.arange(0, GROUPS) * D).to(ACC)
    first_c = _per_channel(first, member)
    total = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, D, GROUPS, BLOCK_S, BLOCK_C)
        total += tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - first_c[None, :], 0.0)
    mean = first + _per_group(tl.sum(total, axis=0), member) / count
    mean_c = _per_channel(mean, member)
    # second pass over the chunk (re-read from L2): squared deviations from the mean
    squares = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, D, GROUPS, BLOCK_S, BLOCK_C)
        d = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean_c[None, :], 0.0)
        squares += d * d
    return mean, _per_group(tl.sum(squares, axis=0), member)


@triton.jit
def _chunk_write_y(X, Y, W, B, n, c_first, mean, rstd, S, tile_first, tiles, stride_n, stride_s,
                   ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                   D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    """y of the chunk over the tiles, from its groups' mean and rstd (GROUPS,)."""
    member = _membership(D, GROUPS, BLOCK_C)
    c, cmask = _chunk_lanes(c_first, D, GROUPS, BLOCK_C)
    w, shift = _affine_params(W, B, c, cmask, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    mean_c = _per_channel(mean, member)
    scale = _per_channel(rstd, member) * w
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, D, GROUPS, BLOCK_S, BLOCK_C)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        z = (x - mean_c[None, :]) * scale[None, :] + shift[None, :]
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(Y + offsets, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_grad_sums(X, DY, W, B, n, c_first, mean, rstd, S, tile_first, tiles, stride_n, stride_s,
                     ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """Per channel lane of the chunk: (sum g, sum g * (x - mean)) over the tiles."""
    member = _membership(D, GROUPS, BLOCK_C)
    c, cmask = _chunk_lanes(c_first, D, GROUPS, BLOCK_C)
    w, shift = _affine_params(W, B, c, cmask, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    mean_c = _per_channel(mean, member)
    scale = w * _per_channel(rstd, member)
    acc_g = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    acc_gx = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, D, GROUPS, BLOCK_S, BLOCK_C)
        centered = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean_c[None, :], 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        grad = _grad_pre_activation(dy, centered, scale[None, :], shift[None, :], SILU)
        acc_g += grad
        acc_gx += grad * centered
    return tl.sum(acc_g, axis=0), tl.sum(acc_gx, axis=0)


@triton.jit
def _chunk_write_dx(X, DY, DX, W, B, n, c_first, mean, rstd, sum_g, sum_gx, S, tile_first, tiles, stride_n, stride_s,
                    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """dx of the chunk over the tiles from its per-channel sums over all of S, the groups'
    A, B formed here."""
    member = _membership(D, GROUPS, BLOCK_C)
    c, cmask = _chunk_lanes(c_first, D, GROUPS, BLOCK_C)
    w, shift = _affine_params(W, B, c, cmask, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    rstd_c = _per_channel(rstd, member)
    sum_gxhat = sum_gx * rstd_c
    count = _count(D, S).to(ACC)
    k_x = _per_channel(-rstd * rstd * _per_group(w * sum_gxhat, member) / count, member)
    k_one = _per_channel(-rstd * _per_group(w * sum_g, member) / count, member)
    mean_c = _per_channel(mean, member)
    scale = w * rstd_c
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, D, GROUPS, BLOCK_S, BLOCK_C)
        centered = tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean_c[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        grad = _grad_pre_activation(dy, centered, scale[None, :], shift[None, :], SILU)
        dx = grad * scale[None, :] + centered * k_x[None, :] + k_one[None, :]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ "chunk": the kernels


@triton.jit
def _gn_chunk_fwd_kernel(
    X,  # (N, C, S) strides (stride_n, 1, stride_s), x.dtype
    Y,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) out, ACC
    RSTD,  # (N, G) out, ACC
    S,  # int: positions per sample
    G,  # int: groups
    eps,  # float
    stride_n, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,  # y = silu(z)
    D: tl.constexpr,  # channels per group
    GROUPS: tl.constexpr,  # groups per chunk, a power of two
    BLOCK_C: tl.constexpr,  # channel lanes per tile: power of two >= GROUPS * D
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * chunks + k, 0): the chunk's groups' mean and rstd, then y."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    n, c_first, groups = _chunk_unit(tl.program_id(0), G, D, GROUPS)
    tiles = tl.cdiv(S, BLOCK_S)
    mean, m2 = _chunk_moments(X, n, c_first, S, 0, tiles, stride_n, stride_s, ACC, D, GROUPS, BLOCK_C, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / _count(D, S).to(ACC) + eps)
    tl.store(MEAN + groups, mean)
    tl.store(RSTD + groups, rstd)
    _chunk_write_y(X, Y, W, B, n, c_first, mean, rstd, S, 0, tiles, stride_n, stride_s,
                   ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, GROUPS, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_chunk_stats_kernel(
    X,  # (N, C, S) strides (stride_n, 1, stride_s), x.dtype
    PART_MEAN,  # (N * G * SPLITS,) out: mean of group n * G + g over split k at [(n * G + g) * SPLITS + k], ACC
    PART_M2,  # (N * G * SPLITS,) out: its sum of squared deviations, ACC
    S,  # int: positions per sample
    G,  # int: groups
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    stride_n, stride_s,  # int: X's strides, in elements
    D: tl.constexpr,  # channels per group
    GROUPS: tl.constexpr,  # groups per chunk, a power of two
    BLOCK_C: tl.constexpr,  # channel lanes per tile: power of two >= GROUPS * D
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * chunks + k, split): the chunk's groups' mean and M2 over the split's positions."""
    ACC: tl.constexpr = PART_MEAN.dtype.element_ty
    split = tl.program_id(1)
    n, c_first, groups = _chunk_unit(tl.program_id(0), G, D, GROUPS)
    mean, m2 = _chunk_moments(X, n, c_first, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT, stride_n, stride_s,
                              ACC, D, GROUPS, BLOCK_C, BLOCK_S)
    tl.store(PART_MEAN + groups.to(tl.int64) * SPLITS + split, mean)
    tl.store(PART_M2 + groups.to(tl.int64) * SPLITS + split, m2)


@triton.jit
def _gn_chunk_apply_kernel(
    X,  # (N, C, S) strides (stride_n, 1, stride_s), x.dtype
    Y,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) out (written by split 0), ACC
    RSTD,  # (N, G) out (written by split 0), ACC
    PART_MEAN,  # (N * G * SPLITS,) per-split means from _gn_chunk_stats_kernel, ACC
    PART_M2,  # (N * G * SPLITS,) per-split M2, ACC
    S,  # int: positions per sample
    G,  # int: groups
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    eps,  # float
    stride_n, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    D: tl.constexpr,  # channels per group
    GROUPS: tl.constexpr,  # groups per chunk, a power of two
    BLOCK_C: tl.constexpr,  # channel lanes per tile: power of two >= GROUPS * D
    BLOCK_S: tl.constexpr,  # positions per tile
    SPLIT_BLOCK: tl.constexpr,  # partials merged per step
):
    """Program (n * chunks + k, split): the chunk's groups' mean and rstd merged from the
    SPLITS partials, then y over the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    split = tl.program_id(1)
    n, c_first, groups = _chunk_unit(tl.program_id(0), G, D, GROUPS)
    mean, m2 = _merged_moments(PART_MEAN, PART_M2, groups, D, S, SPLITS, TILES_PER_SPLIT, ACC, BLOCK_S, GROUPS,
                               SPLIT_BLOCK)
    rstd = 1.0 / tl.sqrt(m2 / _count(D, S).to(ACC) + eps)
    if split == 0:  # every split merges the same: one stores
        tl.store(MEAN + groups, mean)
        tl.store(RSTD + groups, rstd)
    _chunk_write_y(X, Y, W, B, n, c_first, mean, rstd, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT,
                   stride_n, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, GROUPS, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_chunk_bwd_kernel(
    X,  # (N, C, S) strides (stride_n, 1, stride_s), x.dtype
    DY,  # (N, C, S) X's strides, x.dtype
    DX,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) ACC
    RSTD,  # (N, G) ACC
    PART_G,  # (N, 1, C) out: per-channel sums of g (dbias partials), ACC
    PART_GX,  # (N, 1, C) out: per-channel sums of g * (x - mean) (dweight partials, times rstd), ACC
    C,  # int: channels
    S,  # int: positions per sample
    G,  # int: groups
    stride_n, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    D: tl.constexpr,  # channels per group
    GROUPS: tl.constexpr,  # groups per chunk, a power of two
    BLOCK_C: tl.constexpr,  # channel lanes per tile: power of two >= GROUPS * D
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * chunks + k, 0): the chunk's per-channel sums and its groups' A, B, then dx."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    n, c_first, groups = _chunk_unit(tl.program_id(0), G, D, GROUPS)
    tiles = tl.cdiv(S, BLOCK_S)
    mean = tl.load(MEAN + groups)
    rstd = tl.load(RSTD + groups)
    sum_g, sum_gx = _chunk_grad_sums(X, DY, W, B, n, c_first, mean, rstd, S, 0, tiles, stride_n, stride_s,
                                     ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, GROUPS, BLOCK_C, BLOCK_S)
    c, cmask = _chunk_lanes(c_first, D, GROUPS, BLOCK_C)
    tl.store(PART_G + n.to(tl.int64) * C + c, sum_g, mask=cmask)
    tl.store(PART_GX + n.to(tl.int64) * C + c, sum_gx, mask=cmask)
    _chunk_write_dx(X, DY, DX, W, B, n, c_first, mean, rstd, sum_g, sum_gx, S, 0, tiles, stride_n, stride_s,
                    ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, GROUPS, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_chunk_grad_sums_kernel(
    X,  # (N, C, S) strides (stride_n, 1, stride_s), x.dtype
    DY,  # (N, C, S) X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) ACC
    RSTD,  # (N, G) ACC
    PART_G,  # (N, SPLITS, C) out: per-channel sums of g over split k, ACC
    PART_GX,  # (N, SPLITS, C) out: per-channel sums of g * (x - mean) over split k, ACC
    C,  # int: channels
    S,  # int: positions per sample
    G,  # int: groups
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    stride_n, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    D: tl.constexpr,  # channels per group
    GROUPS: tl.constexpr,  # groups per chunk, a power of two
    BLOCK_C: tl.constexpr,  # channel lanes per tile: power of two >= GROUPS * D
    BLOCK_S: tl.constexpr,  # positions per tile
):
    """Program (n * chunks + k, split): the chunk's per-channel sums over the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    split = tl.program_id(1)
    n, c_first, groups = _chunk_unit(tl.program_id(0), G, D, GROUPS)
    mean = tl.load(MEAN + groups)
    rstd = tl.load(RSTD + groups)
    sum_g, sum_gx = _chunk_grad_sums(X, DY, W, B, n, c_first, mean, rstd, S, split * TILES_PER_SPLIT,
                                     TILES_PER_SPLIT, stride_n, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU,
                                     D, GROUPS, BLOCK_C, BLOCK_S)
    c, cmask = _chunk_lanes(c_first, D, GROUPS, BLOCK_C)
    part = (n.to(tl.int64) * SPLITS + split) * C
    tl.store(PART_G + part + c, sum_g, mask=cmask)
    tl.store(PART_GX + part + c, sum_gx, mask=cmask)


@triton.jit
def _gn_chunk_dx_kernel(
    X,  # (N, C, S) strides (stride_n, 1, stride_s), x.dtype
    DY,  # (N, C, S) X's strides, x.dtype
    DX,  # (N, C, S) out, X's strides, x.dtype
    W,  # (C,) weight.dtype; any pointer unless HAS_WEIGHT
    B,  # (C,) bias.dtype; any pointer unless HAS_BIAS
    MEAN,  # (N, G) ACC
    RSTD,  # (N, G) ACC
    PART_G,  # (N, SPLITS, C) per-split sums of g from _gn_chunk_grad_sums_kernel, ACC
    PART_GX,  # (N, SPLITS, C) per-split sums of g * (x - mean), ACC
    DW,  # (C,) out: dweight, weight.dtype; any pointer unless HAS_WEIGHT
    DB,  # (C,) out: dbias, bias.dtype; any pointer unless HAS_BIAS
    N,  # int: samples
    C,  # int: channels
    S,  # int: positions per sample
    G,  # int: groups
    UNITS,  # int: programs (u, k) with u < UNITS write dx; the rest (k == 0) dweight, dbias
    SPLITS,  # int: splits of S (the grid's axis 1)
    TILES_PER_SPLIT,  # int: tiles of BLOCK_S positions per split
    stride_n, stride_s,  # int: X's strides, in elements
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    D: tl.constexpr,  # channels per group
    GROUPS: tl.constexpr,  # groups per chunk, a power of two
    BLOCK_C: tl.constexpr,  # channel lanes per tile: power of two >= GROUPS * D
    BLOCK_S: tl.constexpr,  # positions per tile
    SPLIT_BLOCK: tl.constexpr,  # partials merged per step
    GRAD_ROWS: tl.constexpr,  # partial rows per step of the dweight, dbias sums
    GRAD_BLOCK_C: tl.constexpr,  # channels per dweight, dbias program
):
    """Program (n * chunks + k, split): the chunk's per-channel sums merged from the SPLITS
    partials, its groups' A, B, then dx over the split's positions. Program (UNITS + b,
    0): dweight, dbias of channel block b from all the partials (`_param_grads`)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    unit, split = tl.program_id(0), tl.program_id(1)
    if unit >= UNITS:
        if split == 0:
            _param_grads(PART_G, PART_GX, RSTD, DW, DB, unit - UNITS, N, C, G, D, SPLITS, ACC, HAS_WEIGHT, HAS_BIAS,
                         GRAD_ROWS, GRAD_BLOCK_C)
    else:
        n, c_first, groups = _chunk_unit(unit, G, D, GROUPS)
        mean = tl.load(MEAN + groups)
        rstd = tl.load(RSTD + groups)
        c, cmask = _chunk_lanes(c_first, D, GROUPS, BLOCK_C)
        sum_g, sum_gx = _merged_channel_sums(PART_G, PART_GX, n, c, cmask, C, SPLITS, ACC, BLOCK_C, SPLIT_BLOCK)
        _chunk_write_dx(X, DY, DX, W, B, n, c_first, mean, rstd, sum_g, sum_gx, S, split * TILES_PER_SPLIT,
                        TILES_PER_SPLIT, stride_n, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, GROUPS, BLOCK_C,
                        BLOCK_S)


# ------------------------------------------------------------------ dweight, dbias


@triton.jit
def _param_grads(PART_G, PART_GX, RSTD, DW, DB, block, N, C, G, D, SPLITS, ACC: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_ROWS: tl.constexpr,
                 GRAD_BLOCK_C: tl.constexpr):
    """dweight, dbias of channels [block * GRAD_BLOCK_C, ...) in the parameters' dtypes,
    from the per-(sample, split) channel sums PART_*[(n * SPLITS + k) * C + c], summed over
    the N * SPLITS rows in a fixed order (deterministic): dbias = sum of the sums of g,
    dweight = sum of rstd[n, c // D] * the sums of g * (x - mean)."""
    c = block * GRAD_BLOCK_C + tl.arange(0, GRAD_BLOCK_C)
    cmask = c < C
    group = c // D  # once per program
    acc_g = tl.zeros((GRAD_ROWS, GRAD_BLOCK_C), ACC)
    acc_gx = tl.zeros((GRAD_ROWS, GRAD_BLOCK_C), ACC)
    rows = N * SPLITS
    for first in range(0, rows, GRAD_ROWS):
        r = first + tl.arange(0, GRAD_ROWS)
        mask = (r < rows)[:, None] & cmask[None, :]
        offsets = r.to(tl.int64)[:, None] * C + c[None, :]
        if HAS_BIAS:
            acc_g += tl.load(PART_G + offsets, mask=mask, other=0.0)
        if HAS_WEIGHT:
            rstd = tl.load(RSTD + (r // SPLITS).to(tl.int64)[:, None] * G + group[None, :], mask=mask, other=0.0)
            acc_gx += tl.load(PART_GX + offsets, mask=mask, other=0.0) * rstd
    if HAS_WEIGHT:
        tl.store(DW + c, tl.sum(acc_gx, axis=0).to(DW.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        tl.store(DB + c, tl.sum(acc_g, axis=0).to(DB.dtype.element_ty), mask=cmask)


@triton.jit
def _gn_param_grads_kernel(
    RSTD,  # (N, G) ACC (float32; float64 for float64 x)
    PART_G,  # (N, SPLITS, C) per-(sample, split) sums of g, ACC
    PART_GX,  # (N, SPLITS, C) per-(sample, split) sums of g * (x - mean), ACC
    DW,  # (C,) out: dweight, weight.dtype; any pointer unless HAS_WEIGHT
    DB,  # (C,) out: dbias, bias.dtype; any pointer unless HAS_BIAS
    N,  # int: samples
    C,  # int: channels
    G,  # int: groups
    D,  # int: channels per group
    SPLITS,  # int: splits of S
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GRAD_ROWS: tl.constexpr,  # partial rows per step
    GRAD_BLOCK_C: tl.constexpr,  # channels per program
):
    """Program (b, 0): dweight, dbias of channel block b (after the unsplit backward)."""
    _param_grads(PART_G, PART_GX, RSTD, DW, DB, tl.program_id(0), N, C, G, D, SPLITS, RSTD.dtype.element_ty,
                 HAS_WEIGHT, HAS_BIAS, GRAD_ROWS, GRAD_BLOCK_C)


# ------------------------------------------------------------------ launch

# (family, direction, split) -> the kernels launched, in order, each with its grid: "units"
# (units, SPLITS); "units+grads" (units + the dweight/dbias programs, SPLITS): the
# dweight/dbias programs, split 0 only, past the units; "grads" (the dweight/dbias
# programs, 1), not launched without weight and bias
_KERNELS = {
    ("group", "fwd", False): ((_gn_fwd_kernel, "units"),),
    ("group", "fwd", True): ((_gn_stats_kernel, "units"), (_gn_apply_kernel, "units")),
    ("group", "bwd", False): ((_gn_bwd_kernel, "units"), (_gn_param_grads_kernel, "grads")),
    ("group", "bwd", True): ((_gn_grad_sums_kernel, "units"), (_gn_dx_kernel, "units+grads")),
    ("chunk", "fwd", False): ((_gn_chunk_fwd_kernel, "units"),),
    ("chunk", "fwd", True): ((_gn_chunk_stats_kernel, "units"), (_gn_chunk_apply_kernel, "units")),
    ("chunk", "bwd", False): ((_gn_chunk_bwd_kernel, "units"), (_gn_param_grads_kernel, "grads")),
    ("chunk", "bwd", True): ((_gn_chunk_grad_sums_kernel, "units"), (_gn_chunk_dx_kernel, "units+grads")),
}
# dweight/dbias programs: GRAD_BLOCK_C channels each, partial rows summed GRAD_ROWS per step
# (float32 partials: rows of 256 bytes, 16 bytes per thread and access)
GRAD_BLOCK_C = 64
GRAD_ROWS = 32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a launch walks x (N, C, S): the kernel family, its unit count (the grid's axis
    0), the tile constexprs, and the splits of S (the grid's axis 1)."""

    family: str  # "group" or "chunk"
    units: int  # groups (N * G) or chunks (N * G / GROUPS)
    tile: dict  # BLOCK_S, and BLOCK_D ("group") or GROUPS, BLOCK_C ("chunk")
    splits: int  # SPLITS: 1 is unsplit (one kernel per direction)
    tiles_per_split: int  # TILES_PER_SPLIT

    @property
    def block_s(self):
        return self.tile["BLOCK_S"]


def _chunk_groups(G, D, itemsize, tile):
    """Groups per chunk: doubled (while G holds whole chunks and the lanes fit a tile) until
    a chunk's row is at least CHUNK_ROW_BYTES and a multiple of 16 bytes."""
    groups = 1
    while G % (2 * groups) == 0 and triton.next_power_of_2(2 * groups * D) <= tile:
        row_bytes = groups * D * itemsize
        if row_bytes >= CHUNK_ROW_BYTES and row_bytes % 16 == 0:
            break
        groups *= 2
    return groups


def _tiles(C, G, S, stride_c, itemsize, device):
    """(family, tile constexprs) for x (N, C, S) in G groups: "chunk" where channels are
    adjacent in memory (stride_c == 1, C > 1: channels-last) and a group's lanes fit a
    tile, else "group". A tile holds about GPU_TILE values (INTERPRETER_TILE in the
    interpreter)."""
    tile = GPU_TILE if device.type == "cuda" else INTERPRETER_TILE
    D = C // G
    if stride_c == 1 and C > 1 and triton.next_power_of_2(D) <= tile:
        groups = _chunk_groups(G, D, itemsize, tile)
        block_c = triton.next_power_of_2(groups * D)
        block_s = min(triton.next_power_of_2(max(S, 1)), max(1, tile // block_c))
        return "chunk", dict(GROUPS=groups, BLOCK_C=block_c, BLOCK_S=block_s)
    if device.type == "cuda" and itemsize == 8:
        tile = GPU_GROUP_TILE_FLOAT64
    block_s = min(triton.next_power_of_2(max(S, 1)), tile)
    block_d = min(triton.next_power_of_2(D), max(1, tile // block_s), 64)
    return "group", dict(BLOCK_D=block_d, BLOCK_S=max(1, min(block_s, tile // block_d)))


def _split_targets(device, itemsize, programs=None):
    """(programs, tile values, input bytes): a launch is split until it has about
    `programs` programs (given, or SPLIT_PROGRAMS_PER_SM per SM of the device), but not
    into tiles of fewer values than given (MIN_SPLIT_TILE_BYTES), and only for inputs of
    the bytes given or more. In the interpreter small numbers, so that the tests' small
    shapes split too."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return programs or SPLIT_PROGRAMS_PER_SM * sms, MIN_SPLIT_TILE_BYTES // itemsize, MIN_SPLIT_INPUT_BYTES
    return programs or 16, 16, 256 * itemsize


def _plan(N, C, G, S, stride_c, itemsize, device, target_programs=None, splits=None):
    """The _Plan of a launch over x (N, C, S) in G groups: `_tiles`'s family and tile, and
    the splits of S. A launch of fewer than `target_programs` programs (default:
    `_split_targets`'s, by device; `splits` forces a number instead, for tests) splits S
    into splits of TILES_PER_SPLIT whole tiles, enough of them to reach the target where S
    has the tiles; for more splits the tile takes fewer positions (and, per group, more
    channels) while it holds enough values. A small input is not split."""
    family, tile = _tiles(C, G, S, stride_c, itemsize, device)
    units = N * G // tile["GROUPS"] if family == "chunk" else N * G
    unsplit = _Plan(family, units, tile, 1, triton.cdiv(S, tile["BLOCK_S"]))
    target, min_values, min_bytes = _split_targets(device, itemsize, target_programs)
    small = N * C * S * itemsize < min_bytes
    wanted = splits if splits is not None else 1 if small else triton.cdiv(target, max(units, 1))
    if wanted <= 1:
        return unsplit
    # positions per tile halved (channels per group tile doubled) while S has fewer tiles
    # than splits wanted and the tile keeps min_values values
    lanes_name = "BLOCK_C" if family == "chunk" else "BLOCK_D"
    lanes, block_s = tile[lanes_name], tile["BLOCK_S"]
    max_lanes = lanes if family == "chunk" else min(triton.next_power_of_2(C // G), 64)
    while triton.cdiv(S, block_s) < wanted and block_s > 1:
        grown = 2 * lanes if lanes < max_lanes else lanes
        if grown * (block_s // 2) < min_values:
            break
        lanes, block_s = grown, block_s // 2
    tiles = triton.cdiv(S, block_s)
    # the target: at least `wanted` splits where S has them; a forced number: at most it
    per_split = triton.cdiv(tiles, wanted) if splits is not None else max(1, tiles // wanted)
    count = triton.cdiv(tiles, per_split)  # never an empty split
    if count == 1:
        return unsplit
    return _Plan(family, units, dict(tile, **{lanes_name: lanes, "BLOCK_S": block_s}), count, per_split)


_NO_DEVICE_CHANGE = contextlib.nullcontext()  # reusable: it holds no state


def _launch_device(tensor):
    """The context a launch on `tensor` runs in: Triton launches on the current CUDA device,
    so a tensor on another device makes its device current for the launch. Where it
    already is (or for a CPU tensor, run by the interpreter) no context is entered: a
    shared no-op one is returned."""
    index = tensor.get_device()  # -1 for a CPU tensor
    if index >= 0 and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return _NO_DEVICE_CHANGE


def _launch(plan, direction, args, param_grads=False):
    """Launch the kernels of `plan` for `direction` over their grids (`_KERNELS`), each
    taking its arguments by name from `args`; param_grads: dweight or dbias wanted."""
    grad_programs = triton.cdiv(args["C"], GRAD_BLOCK_C) if param_grads else 0
    args = dict(args, SPLITS=plan.splits, TILES_PER_SPLIT=plan.tiles_per_split, UNITS=plan.units,
                SPLIT_BLOCK=min(triton.next_power_of_2(plan.splits), MAX_SPLIT_BLOCK), GRAD_ROWS=GRAD_ROWS,
                GRAD_BLOCK_C=GRAD_BLOCK_C, **plan.tile)
    grids = {"units": (plan.units, plan.splits), "units+grads": (plan.units + grad_programs, plan.splits),
             "grads": (grad_programs, 1)}
    with _launch_device(args["X"]):
        for kernel, grid in _KERNELS[plan.family, direction, plan.splits > 1]:
            if grids[grid][0] > 0:
                kernel[grids[grid]](**{name: args[name] for name in kernel.arg_names}, num_warps=NUM_WARPS)


def _walkable(x):
    """x itself if dense (empty_like keeps its strides: y and dx then share them), else a
    contiguous copy."""
    return x if torch.empty_like(x).stride() == x.stride() else x.contiguous()


def _as_ncs(t):
    """(N, C, *spatial) -> (N, C, S): a view in either memory format where one exists."""
    if t.dim() == 3:
        return t
    return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)


def gn_fwd(x, weight, bias, groups, eps, silu, splits=None):
    """GroupNorm of x (N, C, *spatial) (taken as (N, C, S)), any strides, optionally + SiLU.

    weight, bias: (C,) or None. Returns (y, mean, rstd): y in x's dtype and layout
    (empty_like), mean and rstd (N, groups) in float32 (float64 for float64 x), what
    backward needs besides x. splits: force the number of splits of S (tests; None:
    `_plan`'s choice)."""
    shape = x.shape
    x = _walkable(_as_ncs(x))
    N, C, S = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty_like(x)
    # written by the kernels; no values to normalize (S == 0): zeros
    stats = torch.empty if x.numel() > 0 else torch.zeros
    mean = stats((N, groups), dtype=acc, device=x.device)
    rstd = stats((N, groups), dtype=acc, device=x.device)
    if x.numel() > 0:
        plan = _plan(N, C, groups, S, x.stride(1), x.element_size(), x.device, splits=splits)
        w, b = (param.contiguous() if param is not None else None for param in (weight, bias))
        # per-split (mean, M2) of each group, merged by the apply kernel
        part_mean, part_m2 = (torch.empty((N * groups * plan.splits if plan.splits > 1 else 0,), dtype=acc,
                                          device=x.device) for _ in range(2))
        _launch(plan, "fwd", dict(
            X=x, Y=y, W=w if w is not None else mean, B=b if b is not None else mean,  # any pointer when absent
            MEAN=mean, RSTD=rstd, PART_MEAN=part_mean, PART_M2=part_m2, C=C, S=S, G=groups, D=C // groups, eps=eps,
            stride_n=x.stride(0), stride_c=x.stride(1), stride_s=x.stride(2),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu))
    return y.view(shape), mean, rstd


def gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu, splits=None):
    """Gradients of gn_fwd: (dx in x's layout, dweight, dbias), the parameter gradients
    in the parameters' dtypes (empty where absent), summed in a fixed order over the
    per-(sample, split) float32 partials (N, SPLITS, C): deterministic. Two launches:
    unsplit, the backward kernel and `_gn_param_grads_kernel`; split, the grad-sums
    kernel and the dx kernel, whose last programs sum dweight, dbias. splits: as in gn_fwd."""
    shape = x.shape
    x, dy = _walkable(_as_ncs(x)), _as_ncs(dy)
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    N, C, S = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    dx = torch.empty_like(x)
    if x.numel() == 0:  # no values: zero parameter gradients
        return (dx.view(shape), *(torch.zeros(C, dtype=param.dtype, device=x.device) if param is not None
                                  else x.new_empty(0) for param in (weight, bias)))
    dweight = torch.empty(C, dtype=weight.dtype, device=x.device) if weight is not None else x.new_empty(0)
    dbias = torch.empty(C, dtype=bias.dtype, device=x.device) if bias is not None else x.new_empty(0)
    plan = _plan(N, C, groups, S, x.stride(1), x.element_size(), x.device, splits=splits)
    w, b = (param.contiguous() if param is not None else None for param in (weight, bias))
    mean, rstd = mean.contiguous(), rstd.contiguous()
    # per-(sample, split) per-channel sums, merged per sample by the dx kernel (split) and
    # over samples and splits into dweight, dbias
    part_g, part_gx = (torch.empty((N, plan.splits, C), dtype=acc, device=x.device) for _ in range(2))
    _launch(plan, "bwd", dict(
        X=x, DY=dy, DX=dx, W=w if w is not None else mean, B=b if b is not None else mean,
        MEAN=mean, RSTD=rstd, PART_G=part_g, PART_GX=part_gx, DW=dweight if weight is not None else part_g,
        DB=dbias if bias is not None else part_g, N=N, C=C, S=S, G=groups, D=C // groups,
        stride_n=x.stride(0), stride_c=x.stride(1), stride_s=x.stride(2),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu),
        param_grads=weight is not None or bias is not None)
    return dx.view(shape), dweight, dbias
