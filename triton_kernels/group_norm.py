"""GroupNorm (and InstanceNorm: one group per channel) in Triton, optionally fused with SiLU,
forward and backward, over inputs (N, C, S) in either memory format (contiguous or
channels-last: any strides).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

Two kernel families; `_blocks` picks a family and its tile, `_plan` (the one place the
launchers ask) that and how many pieces S is split into:
- per group ("group"): one program per (sample n, group g) of D = C / G channels walks
  the group's D x S values in tiles of BLOCK_D channels x BLOCK_S positions addressed
  through the strides (no transposing copy). Used for contiguous inputs, where the fast
  axis is S, and as the fallback for channels-last ones whose D is not a power of two.
- per channel chunk ("chunk", channels-last: stride_c == 1): one program per (sample n,
  chunk of BLOCK_C = GROUPS * D whole channels, a power of two dividing C) walks S in
  tiles of BLOCK_S positions x BLOCK_C channels whose fast axis is the channel axis. A
  group's row is only D * itemsize bytes (16 for bf16 at D = 8); a chunk's row is 128
  bytes or more where C allows, read whole: no mask along the channels, so that a GPU
  reads and writes 16 bytes per access. Per-channel sums accumulate in the tile and are
  reduced to per-group values through a (GROUPS, D) reshape.
One program per unit (group or chunk) is too few for a GPU where N * units is small (the
issue's shapes: 16 to 64 programs for an H100's 132 SMs), so `_plan` splits S into
SPLITS pieces of whole tiles until a launch has about 4 programs per SM (fewer where S
has too few tiles; none for a small input), and each direction becomes two launches over
(unit, piece):
- forward: `_gn_*stats_kernel` writes each group's (mean, M2) over its piece to a small
  buffer; `_gn_*apply_kernel` merges a group's SPLITS partials in piece order (Chan's
  count-weighted merge), stores MEAN / RSTD from piece 0, and writes y over its piece.
- backward: `_gn_*grad_sums_kernel` writes per-channel sums of g and g * (x - mean) over
  its piece to (N, SPLITS, C); `_gn_*dx_kernel` sums a channel's SPLITS partials in piece
  order, stores SUM_G / SUM_GXHAT from piece 0, and writes dx over its piece.
With SPLITS == 1 one kernel does each direction (`_gn_fwd_kernel`, `_gn_chunk_bwd_kernel`,
...). Every sum runs in a fixed order: deterministic, no atomics. Statistics are float32
(float64 for float64 inputs), in two passes (the mean of values shifted by the group's
first, then squared deviations from the mean of the program's values): a large mean costs
no precision.

    forward   z = (x - mean) * rstd * w[c] + b[c];  y = z, or silu(z) = z * sigmoid(z)
    backward  g = dy (or dy * silu'(z), z recomputed from x);
              per channel: sum_g = sum g, sum_gxhat = rstd * sum g * (x - mean)
              per group:   A = sum_c w sum_g, B = sum_c w sum_gxhat over M = D * S values
              dx = rstd * w * g - rstd * A / M - (x - mean) * rstd^2 * B / M
              dweight = sum over n of sum_gxhat, dbias = sum over n of sum_g
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s,
                BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of channels [c_first, c_first + BLOCK_D) (those below c_end) by
    positions [s_start, s_start + BLOCK_S) of sample n; and the channel indices."""
    c = c_first + tl.arange(0, BLOCK_D)
    s = s_start + tl.arange(0, BLOCK_S)
    offsets = n.to(tl.int64) * stride_n + (c.to(tl.int64) * stride_c)[:, None] + (s.to(tl.int64) * stride_s)[None, :]
    mask = (c < c_end)[:, None] & (s < S)[None, :]
    return offsets, mask, c


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
    """(weight, bias) of channels c (those in cmask; all for None): 1 and 0 where the
    module has none."""
    w = tl.full((BLOCK,), 1.0, ACC)
    b = tl.zeros((BLOCK,), ACC)
    if cmask is None:  # every channel exists (a chunk): unmasked loads
        if HAS_WEIGHT:
            w = tl.load(W + c)
        if HAS_BIAS:
            b = tl.load(B + c)
    else:
        if HAS_WEIGHT:
            w = tl.load(W + c, mask=cmask, other=0.0)
        if HAS_BIAS:
            b = tl.load(B + c, mask=cmask, other=0.0)
    return w, b


@triton.jit
def _positions_in(tile_first, tiles, S, BLOCK_S: tl.constexpr):
    """How many positions of S the tiles [tile_first, tile_first + tiles) cover."""
    s_begin = tile_first * BLOCK_S
    return tl.minimum(S, s_begin + tiles * BLOCK_S) - s_begin


# The steps of a program, over the S tiles [tile_first, tile_first + tiles) of its unit:
# all of S in the one-kernel launches, the split's own tiles in the split ones. A tile's
# first position is a multiple of the constexpr BLOCK_S: the compiler sees its alignment.

# ------------------------------------------------------- per group: the steps


@triton.jit
def _group_moments(X, n, c_begin, c_end, S, tile_first, tiles, stride_n, stride_c, stride_s,
                   ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """(mean, M2) of group [c_begin, c_end) of sample n over the tiles, in two passes over
    values shifted by the group's first (which every split can read): a large mean costs
    no precision."""
    count = (c_end - c_begin) * _positions_in(tile_first, tiles, S, BLOCK_S)  # an int: promoted where it divides
    first = tl.load(X + n.to(tl.int64) * stride_n + c_begin.to(tl.int64) * stride_c).to(ACC)
    total = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        for t in range(tile_first, tile_first + tiles):
            offsets, mask, _ = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                           BLOCK_D, BLOCK_S)
            total += tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - first, 0.0)
    mean = first + tl.sum(tl.sum(total, axis=1), axis=0) / count
    squares = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        for t in range(tile_first, tile_first + tiles):
            offsets, mask, _ = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                           BLOCK_D, BLOCK_S)
            d = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            squares += d * d
    return mean, tl.sum(tl.sum(squares, axis=1), axis=0)


@triton.jit
def _group_write_y(X, Y, W, B, n, c_begin, c_end, mean, rstd, S, tile_first, tiles, stride_n, stride_c, stride_s,
                   ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """y of group [c_begin, c_end) of sample n over the tiles (Y has X's strides)."""
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        w, shift = _affine_params(W, B, c, c < c_end, ACC, BLOCK_D, HAS_WEIGHT, HAS_BIAS)
        scale = w * rstd
        for t in range(tile_first, tile_first + tiles):
            offsets, mask, _ = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
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
        offsets, mask, _ = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
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
    """dx of group [c_begin, c_end) of sample n over the tiles, from the group's
    coefficients k_x, k_one (DY and DX have X's strides)."""
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        w, shift = _affine_params(W, B, c, c < c_end, ACC, BLOCK_D, HAS_WEIGHT, HAS_BIAS)
        for t in range(tile_first, tile_first + tiles):
            offsets, mask, _ = _group_tile(n, c_first, c_end, t * BLOCK_S, S, stride_n, stride_c, stride_s,
                                           BLOCK_D, BLOCK_S)
            centered = tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            grad = _grad_pre_activation(dy, centered, (w * rstd)[:, None], shift[:, None], SILU)
            dx = grad * (w * rstd)[:, None] + centered * k_x + k_one
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------- per group: one-kernel launches


@triton.jit
def _gn_fwd_kernel(
    X, Y, W, B, MEAN, RSTD, S, D, G, eps, stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n, g): mean and rstd of the group (stored at MEAN[n * G + g], RSTD[...]),
    then y (Y has X's strides)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    tiles = tl.cdiv(S, BLOCK_S)
    mean, m2 = _group_moments(X, n, g * D, g * D + D, S, 0, tiles, stride_n, stride_c, stride_s, ACC, BLOCK_D, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / (D * S) + eps)
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, rstd)
    _group_write_y(X, Y, W, B, n, g * D, g * D + D, mean, rstd, S, 0, tiles, stride_n, stride_c, stride_s,
                   ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


@triton.jit
def _gn_bwd_kernel(
    X, DY, DX, W, B, MEAN, RSTD, SUM_G, SUM_GXHAT, C, S, D, G, stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n, g): per-channel sums (SUM_G, SUM_GXHAT at [n, c], the dbias / dweight
    partials) and the group's A, B, then dx (DY and DX have X's strides)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng = tl.program_id(0)
    n, g = ng // G, ng % G
    c_begin, c_end = g * D, g * D + D
    count = D * S  # an int: promoted to ACC where it divides
    tiles = tl.cdiv(S, BLOCK_S)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    sum_wg = tl.zeros((BLOCK_D,), ACC)
    sum_wgxhat = tl.zeros((BLOCK_D,), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        w, sum_g, sum_gx = _group_grad_sums(X, DY, W, B, n, c_first, c_end, mean, rstd, S, 0, tiles,
                                            stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU,
                                            BLOCK_D, BLOCK_S)
        sum_gxhat = sum_gx * rstd
        tl.store(SUM_G + n.to(tl.int64) * C + c, sum_g, mask=c < c_end)
        tl.store(SUM_GXHAT + n.to(tl.int64) * C + c, sum_gxhat, mask=c < c_end)
        sum_wg += w * sum_g
        sum_wgxhat += w * sum_gxhat
    k_x = -rstd * rstd * tl.sum(sum_wgxhat, axis=0) / count
    k_one = -rstd * tl.sum(sum_wg, axis=0) / count
    _group_write_dx(X, DY, DX, W, B, n, c_begin, c_end, mean, rstd, k_x, k_one, S, 0, tiles,
                    stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


# ------------------------------------------------ channels-last: chunks of whole groups


@triton.jit
def _chunk_tile(n, c_first, s_start, S, stride_n, stride_s, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of positions [s_start, s_start + BLOCK_S) by channels [c_first,
    c_first + BLOCK_C) of sample n, channels adjacent in memory (stride_c == 1). The mask
    is along S only: the chunk's channels all exist, so rows are read and written whole
    and a GPU can access them 16 bytes at a time."""
    s = s_start + tl.arange(0, BLOCK_S)
    c = c_first + tl.arange(0, BLOCK_C)
    offsets = n.to(tl.int64) * stride_n + (s.to(tl.int64) * stride_s)[:, None] + c[None, :]
    return offsets, (s < S)[:, None]


@triton.jit
def _per_group(v, GROUPS: tl.constexpr, D: tl.constexpr):
    """(GROUPS,): the sums of a per-channel vector (GROUPS * D,) over each group's D channels."""
    return tl.sum(tl.reshape(v, (GROUPS, D)), axis=1)


@triton.jit
def _per_channel(v, GROUPS: tl.constexpr, D: tl.constexpr):
    """(GROUPS * D,): each group's value of v (GROUPS,) repeated over its D channels."""
    return tl.reshape(tl.broadcast_to(v[:, None], (GROUPS, D)), (GROUPS * D,))


@triton.jit
def _chunk_moments(X, n, c_first, S, tile_first, tiles, stride_n, stride_s,
                   ACC: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(mean, M2), (GROUPS,) each, of the chunk's groups over the tiles, in two passes over
    values shifted by each group's first (position 0, which every split can read)."""
    GROUPS: tl.constexpr = BLOCK_C // D
    count = D * _positions_in(tile_first, tiles, S, BLOCK_S)  # an int: promoted where it divides
    first = tl.load(X + n.to(tl.int64) * stride_n + c_first + tl.arange(0, GROUPS) * D).to(ACC)
    first_c = _per_channel(first, GROUPS, D)
    total = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, BLOCK_S, BLOCK_C)
        total += tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - first_c[None, :], 0.0)
    mean = first + _per_group(tl.sum(total, axis=0), GROUPS, D) / count
    mean_c = _per_channel(mean, GROUPS, D)
    # second pass over the chunk (re-read from L2): squared deviations from the mean
    squares = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, BLOCK_S, BLOCK_C)
        d = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean_c[None, :], 0.0)
        squares += d * d
    return mean, _per_group(tl.sum(squares, axis=0), GROUPS, D)


@triton.jit
def _chunk_write_y(X, Y, W, B, n, c_first, mean, rstd, S, tile_first, tiles, stride_n, stride_s,
                   ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                   D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y of the chunk over the tiles, from its groups' mean and rstd (GROUPS,)."""
    GROUPS: tl.constexpr = BLOCK_C // D
    c = c_first + tl.arange(0, BLOCK_C)
    w, shift = _affine_params(W, B, c, None, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    mean_c = _per_channel(mean, GROUPS, D)
    scale = _per_channel(rstd, GROUPS, D) * w
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, BLOCK_S, BLOCK_C)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        z = (x - mean_c[None, :]) * scale[None, :] + shift[None, :]
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(Y + offsets, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_grad_sums(X, DY, w, shift, n, c_first, mean_c, rstd_c, S, tile_first, tiles, stride_n, stride_s,
                     ACC: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel of the chunk: (sum g, sum g * (x - mean)) over the tiles."""
    acc_g = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    acc_gx = tl.zeros((BLOCK_S, BLOCK_C), ACC)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, BLOCK_S, BLOCK_C)
        centered = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean_c[None, :], 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        grad = _grad_pre_activation(dy, centered, (w * rstd_c)[None, :], shift[None, :], SILU)
        acc_g += grad
        acc_gx += grad * centered
    return tl.sum(acc_g, axis=0), tl.sum(acc_gx, axis=0)


@triton.jit
def _chunk_write_dx(X, DY, DX, w, shift, n, c_first, rstd, sum_g, sum_gxhat, mean_c, S, tile_first, tiles,
                    stride_n, stride_s, ACC: tl.constexpr, SILU: tl.constexpr, D: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx of the chunk over the tiles, from the per-channel sums over all of S (the
    groups' A, B formed here)."""
    GROUPS: tl.constexpr = BLOCK_C // D
    count = D * S  # an int: promoted where it divides
    rstd_c = _per_channel(rstd, GROUPS, D)
    k_x = _per_channel(-rstd * rstd * _per_group(w * sum_gxhat, GROUPS, D) / count, GROUPS, D)
    k_one = _per_channel(-rstd * _per_group(w * sum_g, GROUPS, D) / count, GROUPS, D)
    for t in range(tile_first, tile_first + tiles):
        offsets, mask = _chunk_tile(n, c_first, t * BLOCK_S, S, stride_n, stride_s, BLOCK_S, BLOCK_C)
        centered = tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean_c[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        grad = _grad_pre_activation(dy, centered, (w * rstd_c)[None, :], shift[None, :], SILU)
        dx = grad * (w * rstd_c)[None, :] + centered * k_x[None, :] + k_one[None, :]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------- per chunk: one-kernel launches


@triton.jit
def _gn_chunk_fwd_kernel(
    X, Y, W, B, MEAN, RSTD, C, S, eps, stride_n, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n, chunk k) of BLOCK_C channels (GROUPS whole groups; stride_c == 1): the
    groups' mean and rstd (MEAN, RSTD (N, G): at [pid * GROUPS, ...) as G = chunks *
    GROUPS), then y (Y has X's strides)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_C // D
    pid = tl.program_id(0)
    chunks = C // BLOCK_C
    n, c_first = pid // chunks, (pid % chunks) * BLOCK_C
    tiles = tl.cdiv(S, BLOCK_S)
    mean, m2 = _chunk_moments(X, n, c_first, S, 0, tiles, stride_n, stride_s, ACC, D, BLOCK_C, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / (D * S) + eps)
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    tl.store(MEAN + groups, mean)
    tl.store(RSTD + groups, rstd)
    _chunk_write_y(X, Y, W, B, n, c_first, mean, rstd, S, 0, tiles, stride_n, stride_s,
                   ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_chunk_bwd_kernel(
    X, DY, DX, W, B, MEAN, RSTD, SUM_G, SUM_GXHAT, C, S, stride_n, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n, chunk k) of BLOCK_C channels (GROUPS whole groups; stride_c == 1):
    per-channel sums (SUM_G, SUM_GXHAT at [n, c]), the groups' A, B, then dx (DY and DX
    have X's strides)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_C // D
    pid = tl.program_id(0)
    chunks = C // BLOCK_C
    n, c_first = pid // chunks, (pid % chunks) * BLOCK_C
    tiles = tl.cdiv(S, BLOCK_S)
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    rstd = tl.load(RSTD + groups)
    mean_c = _per_channel(tl.load(MEAN + groups), GROUPS, D)
    rstd_c = _per_channel(rstd, GROUPS, D)
    c = c_first + tl.arange(0, BLOCK_C)
    w, shift = _affine_params(W, B, c, None, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    sum_g, sum_gx = _chunk_grad_sums(X, DY, w, shift, n, c_first, mean_c, rstd_c, S, 0, tiles, stride_n, stride_s,
                                     ACC, SILU, BLOCK_C, BLOCK_S)
    sum_gxhat = sum_gx * rstd_c
    tl.store(SUM_G + n.to(tl.int64) * C + c, sum_g)
    tl.store(SUM_GXHAT + n.to(tl.int64) * C + c, sum_gxhat)
    _chunk_write_dx(X, DY, DX, w, shift, n, c_first, rstd, sum_g, sum_gxhat, mean_c, S, 0, tiles,
                    stride_n, stride_s, ACC, SILU, D, BLOCK_C, BLOCK_S)


# ------------------------------------------- split launches: S in SPLITS pieces, two kernels
# Program (unit, split k) takes the S tiles [k * TILES_PER_SPLIT, (k + 1) * TILES_PER_SPLIT)
# of its unit (a group, or a chunk of whole groups): SPLITS times the programs of the
# one-kernel launches, so that a GPU has enough of them, with the same steps. The partials
# are merged in split order by every program that needs them: deterministic, no atomics.


@triton.jit
def _merged_moments(PART_MEAN, PART_M2, index, split_stride, D, S, SPLITS, TILES_PER_SPLIT,
                    BLOCK_S: tl.constexpr):
    """(mean, M2) over all of S of the group(s) at `index` (a scalar or a vector), from the
    per-split (mean, M2) at PART_*[index * split_stride + k]: Chan's merge in split order
    (count-weighted, no large sums of squares: a large mean costs no precision)."""
    mean = tl.load(PART_MEAN + index * split_stride)
    m2 = tl.load(PART_M2 + index * split_stride)
    count = (D * _positions_in(0, TILES_PER_SPLIT, S, BLOCK_S)).to(mean.dtype)
    for k in range(1, SPLITS):
        count_k = (D * _positions_in(k * TILES_PER_SPLIT, TILES_PER_SPLIT, S, BLOCK_S)).to(mean.dtype)
        mean_k = tl.load(PART_MEAN + index * split_stride + k)
        m2_k = tl.load(PART_M2 + index * split_stride + k)
        total = count + count_k
        delta = mean_k - mean
        mean = mean + delta * (count_k / total)
        m2 = m2 + m2_k + delta * delta * (count * count_k / total)
        count = total
    return mean, m2


@triton.jit
def _gn_stats_kernel(
    X, PART_MEAN, PART_M2, S, D, G, TILES_PER_SPLIT, stride_n, stride_c, stride_s,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * G + g, split k): mean and M2 (sum of squared deviations) of the group's
    values in the split's positions, at PART_*[(n * G + g) * SPLITS + k]."""
    ACC: tl.constexpr = PART_MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    mean, m2 = _group_moments(X, n, g * D, g * D + D, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT,
                              stride_n, stride_c, stride_s, ACC, BLOCK_D, BLOCK_S)
    SPLITS = tl.num_programs(1)
    tl.store(PART_MEAN + ng * SPLITS + split, mean)
    tl.store(PART_M2 + ng * SPLITS + split, m2)


@triton.jit
def _gn_apply_kernel(
    X, Y, W, B, MEAN, RSTD, PART_MEAN, PART_M2, S, D, G, SPLITS, TILES_PER_SPLIT, eps,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * G + g, split k): the group's mean and rstd merged from the SPLITS
    partials (stored at MEAN[n * G + g], RSTD[...] by split 0), then y over the split's
    positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    mean, m2 = _merged_moments(PART_MEAN, PART_M2, ng, SPLITS, D, S, SPLITS, TILES_PER_SPLIT, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / (D * S) + eps)
    tl.store(MEAN + ng, mean, mask=split == 0)  # every piece merges the same: one stores
    tl.store(RSTD + ng, rstd, mask=split == 0)
    _group_write_y(X, Y, W, B, n, g * D, g * D + D, mean, rstd, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT,
                   stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


@triton.jit
def _gn_grad_sums_kernel(
    X, DY, W, B, MEAN, RSTD, PART_G, PART_GX, C, S, D, G, TILES_PER_SPLIT, stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * G + g, split k): per-channel sums of g and g * (x - mean) over the
    split's positions, at PART_*[(n * SPLITS + k) * C + c]."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    c_begin, c_end = g * D, g * D + D
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    part = (n.to(tl.int64) * tl.num_programs(1) + split) * C
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        _, sum_g, sum_gx = _group_grad_sums(X, DY, W, B, n, c_first, c_end, mean, rstd, S,
                                            split * TILES_PER_SPLIT, TILES_PER_SPLIT, stride_n, stride_c, stride_s,
                                            ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)
        tl.store(PART_G + part + c, sum_g, mask=c < c_end)
        tl.store(PART_GX + part + c, sum_gx, mask=c < c_end)


@triton.jit
def _gn_dx_kernel(
    X, DY, DX, W, B, MEAN, RSTD, PART_G, PART_GX, SUM_G, SUM_GXHAT, C, S, D, G, SPLITS, TILES_PER_SPLIT,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * G + g, split k): the per-channel sums merged from the SPLITS partials
    in order (stored at SUM_G, SUM_GXHAT [n, c] by split 0), the group's A, B, then dx over
    the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    ng, split = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    c_begin, c_end = g * D, g * D + D
    count = D * S  # an int: promoted to ACC where it divides
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    sum_wg = tl.zeros((BLOCK_D,), ACC)
    sum_wgxhat = tl.zeros((BLOCK_D,), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        cmask = c < c_end
        w, _ = _affine_params(W, B, c, cmask, ACC, BLOCK_D, HAS_WEIGHT, False)
        sum_g = tl.zeros((BLOCK_D,), ACC)
        sum_gx = tl.zeros((BLOCK_D,), ACC)
        for k in range(0, SPLITS):
            part = (n.to(tl.int64) * SPLITS + k) * C
            sum_g += tl.load(PART_G + part + c, mask=cmask, other=0.0)
            sum_gx += tl.load(PART_GX + part + c, mask=cmask, other=0.0)
        sum_gxhat = sum_gx * rstd
        tl.store(SUM_G + n.to(tl.int64) * C + c, sum_g, mask=cmask & (split == 0))
        tl.store(SUM_GXHAT + n.to(tl.int64) * C + c, sum_gxhat, mask=cmask & (split == 0))
        sum_wg += w * sum_g
        sum_wgxhat += w * sum_gxhat
    k_x = -rstd * rstd * tl.sum(sum_wgxhat, axis=0) / count
    k_one = -rstd * tl.sum(sum_wg, axis=0) / count
    _group_write_dx(X, DY, DX, W, B, n, c_begin, c_end, mean, rstd, k_x, k_one, S, split * TILES_PER_SPLIT,
                    TILES_PER_SPLIT, stride_n, stride_c, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_D, BLOCK_S)


@triton.jit
def _gn_chunk_stats_kernel(
    X, PART_MEAN, PART_M2, C, S, TILES_PER_SPLIT, stride_n, stride_s,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * chunks + chunk, split k) of BLOCK_C channels (GROUPS whole groups;
    stride_c == 1): each group's mean and M2 over the split's positions, at
    PART_*[group * SPLITS + k], group = n * G + g."""
    ACC: tl.constexpr = PART_MEAN.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_C // D
    pid, split = tl.program_id(0), tl.program_id(1)
    chunks = C // BLOCK_C
    n, c_first = pid // chunks, (pid % chunks) * BLOCK_C
    mean, m2 = _chunk_moments(X, n, c_first, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT, stride_n, stride_s,
                              ACC, D, BLOCK_C, BLOCK_S)
    SPLITS = tl.num_programs(1)
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    tl.store(PART_MEAN + groups * SPLITS + split, mean)
    tl.store(PART_M2 + groups * SPLITS + split, m2)


@triton.jit
def _gn_chunk_apply_kernel(
    X, Y, W, B, MEAN, RSTD, PART_MEAN, PART_M2, C, S, SPLITS, TILES_PER_SPLIT, eps, stride_n, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * chunks + chunk, split k): the groups' mean and rstd merged from the
    SPLITS partials (stored at MEAN, RSTD by split 0), then y over the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_C // D
    pid, split = tl.program_id(0), tl.program_id(1)
    chunks = C // BLOCK_C
    n, c_first = pid // chunks, (pid % chunks) * BLOCK_C
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    mean, m2 = _merged_moments(PART_MEAN, PART_M2, groups, SPLITS, D, S, SPLITS, TILES_PER_SPLIT, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / (D * S) + eps)
    tl.store(MEAN + groups, mean, mask=split == 0)
    tl.store(RSTD + groups, rstd, mask=split == 0)
    _chunk_write_y(X, Y, W, B, n, c_first, mean, rstd, S, split * TILES_PER_SPLIT, TILES_PER_SPLIT,
                   stride_n, stride_s, ACC, HAS_WEIGHT, HAS_BIAS, SILU, D, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_chunk_grad_sums_kernel(
    X, DY, W, B, MEAN, RSTD, PART_G, PART_GX, C, S, TILES_PER_SPLIT, stride_n, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * chunks + chunk, split k): per-channel sums of g and g * (x - mean)
    over the split's positions, at PART_*[(n * SPLITS + k) * C + c]."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_C // D
    pid, split = tl.program_id(0), tl.program_id(1)
    chunks = C // BLOCK_C
    n, c_first = pid // chunks, (pid % chunks) * BLOCK_C
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    mean_c = _per_channel(tl.load(MEAN + groups), GROUPS, D)
    rstd_c = _per_channel(tl.load(RSTD + groups), GROUPS, D)
    c = c_first + tl.arange(0, BLOCK_C)
    w, shift = _affine_params(W, B, c, None, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    sum_g, sum_gx = _chunk_grad_sums(X, DY, w, shift, n, c_first, mean_c, rstd_c, S, split * TILES_PER_SPLIT,
                                     TILES_PER_SPLIT, stride_n, stride_s, ACC, SILU, BLOCK_C, BLOCK_S)
    part = (n.to(tl.int64) * tl.num_programs(1) + split) * C
    tl.store(PART_G + part + c, sum_g)
    tl.store(PART_GX + part + c, sum_gx)


@triton.jit
def _gn_chunk_dx_kernel(
    X, DY, DX, W, B, MEAN, RSTD, PART_G, PART_GX, SUM_G, SUM_GXHAT, C, S, SPLITS, TILES_PER_SPLIT,
    stride_n, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n * chunks + chunk, split k): the per-channel sums merged from the SPLITS
    partials in order (stored at SUM_G, SUM_GXHAT [n, c] by split 0), the groups' A, B,
    then dx over the split's positions."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_C // D
    pid, split = tl.program_id(0), tl.program_id(1)
    chunks = C // BLOCK_C
    n, c_first = pid // chunks, (pid % chunks) * BLOCK_C
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    rstd = tl.load(RSTD + groups)
    mean_c = _per_channel(tl.load(MEAN + groups), GROUPS, D)
    c = c_first + tl.arange(0, BLOCK_C)
    w, shift = _affine_params(W, B, c, None, ACC, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    sum_g = tl.zeros((BLOCK_C,), ACC)
    sum_gx = tl.zeros((BLOCK_C,), ACC)
    for k in range(0, SPLITS):
        part = (n.to(tl.int64) * SPLITS + k) * C
        sum_g += tl.load(PART_G + part + c)
        sum_gx += tl.load(PART_GX + part + c)
    sum_gxhat = sum_gx * _per_channel(rstd, GROUPS, D)
    tl.store(SUM_G + n.to(tl.int64) * C + c, sum_g, mask=split == 0)
    tl.store(SUM_GXHAT + n.to(tl.int64) * C + c, sum_gxhat, mask=split == 0)
    _chunk_write_dx(X, DY, DX, w, shift, n, c_first, rstd, sum_g, sum_gxhat, mean_c, S, split * TILES_PER_SPLIT,
                    TILES_PER_SPLIT, stride_n, stride_s, ACC, SILU, D, BLOCK_C, BLOCK_S)


# ----------------------------------------------------------------------------- launch


def _blocks(C, D, S, stride_c, itemsize, device):
    """The kernel family and tile for x (N, C, S) in groups of D channels, in one place:
    ("chunk", BLOCK_C, BLOCK_S) where channels are adjacent in memory (stride_c == 1, C > 1:
    channels-last) and D is a power of two (a whole number of groups per chunk, the
    (GROUPS, D) reshape), else ("group", BLOCK_D, BLOCK_S). A tile of about 2048 values on
    a GPU (1024 in the interpreter)."""
    tile = 2048 if device.type == "cuda" else 1024
    if stride_c == 1 and C > 1 and D & (D - 1) == 0 and D <= tile:
        # whole groups, doubled while a row is under 128 bytes and C holds whole chunks:
        # full rows for the memory system, and as many programs as that allows
        block_c = D
        while block_c * itemsize < 128 and C % (2 * block_c) == 0:
            block_c *= 2
        return "chunk", block_c, min(triton.next_power_of_2(max(S, 1)), max(1, tile // block_c))
    block_s = min(triton.next_power_of_2(max(S, 1)), tile)
    block_d = min(triton.next_power_of_2(D), max(1, tile // block_s), 64)
    return "group", block_d, max(1, min(block_s, tile // block_d))


def _split_targets(device, programs=None):
    """(programs, values): a launch is split until it has about `programs` programs (given,
    or the device's), but not into tiles of fewer than `values` values. On a GPU 4 programs
    per SM (one program walks its positions serially: a few per SM keep the memory system
    busy) and tiles of 512 values or more; in the interpreter small numbers, so that the
    tests' small shapes split too."""
    if device.type == "cuda":
        return programs or 4 * torch.cuda.get_device_properties(device).multi_processor_count, 512
    return programs or 16, 16


def _plan(N, C, D, S, stride_c, itemsize, device, target_programs=None, splits=None):
    """(kind, block, BLOCK_S, SPLITS, TILES_PER_SPLIT): `_blocks`'s family and tile, and
    the pieces S is split into, in one place. A launch of fewer than `target_programs`
    programs (default: `_split_targets`'s, by device; `splits` forces a number instead,
    for tests) splits S into pieces of TILES_PER_SPLIT whole tiles, enough of them to reach
    the target where S has the tiles; for more pieces the tile takes fewer positions (and,
    per group, more channels) while it holds enough values. An input of fewer than
    `target` tiles' worth of values is not split. SPLITS == 1: the one-kernel path with
    `_blocks`'s tile."""
    kind, block, block_s = _blocks(C, D, S, stride_c, itemsize, device)
    tiles = triton.cdiv(S, block_s)
    units = N * (C // block if kind == "chunk" else C // D)
    target, min_values = _split_targets(device, target_programs)
    # small inputs (fewer than `target` tiles of `min_values`) stay whole: one launch
    small = N * C * S < target * min_values
    wanted = splits if splits is not None else 1 if small else triton.cdiv(target, max(units, 1))
    if wanted <= 1:
        return kind, block, block_s, 1, tiles
    block_split, block_s_split = block, block_s
    max_block_d = min(triton.next_power_of_2(D), 64)
    while triton.cdiv(S, block_s_split) < wanted and block_s_split > 1:
        grow = kind == "group" and block_split < max_block_d
        if block_split * (2 if grow else 1) * (block_s_split // 2) < min_values:
            break
        block_split, block_s_split = block_split * (2 if grow else 1), block_s_split // 2
    tiles_split = triton.cdiv(S, block_s_split)
    # the target: at least `wanted` pieces where S has them; a forced number: at most it
    per_split = triton.cdiv(tiles_split, wanted) if splits is not None else max(1, tiles_split // wanted)
    pieces = triton.cdiv(tiles_split, per_split)  # never an empty one
    if pieces == 1:
        return kind, block, block_s, 1, tiles
    return kind, block_split, block_s_split, pieces, per_split


def _walkable(x):
    """x itself if dense (empty_like keeps its strides: y and dx then share them), else a
    contiguous copy."""
    return x if torch.empty_like(x).stride() == x.stride() else x.contiguous()


def _acc_param(param, acc):
    return param.to(acc).contiguous() if param is not None else None


def _as_ncs(t):
    """(N, C, *spatial) -> (N, C, S): a view in either memory format where one exists."""
    if t.dim() == 3:
        return t
    return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)


def gn_fwd(x, weight, bias, groups, eps, silu, splits=None):
    """GroupNorm of x (N, C, *spatial) (taken as (N, C, S)), any strides, optionally + SiLU.

    weight, bias: (C,) or None. Returns (y, mean, rstd): y in x's dtype and layout
    (empty_like), mean and rstd (N, groups) in float32 (float64 for float64 x), what
    backward needs besides x. splits: force the number of pieces S is split into (tests;
    None: `_plan`'s choice)."""
    shape = x.shape
    x = _walkable(_as_ncs(x))
    N, C, S = x.shape
    D = C // groups
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty_like(x)
    mean = torch.zeros((N, groups), dtype=acc, device=x.device)
    rstd = torch.zeros((N, groups), dtype=acc, device=x.device)
    if x.numel() > 0:
        w, b = _acc_param(weight, acc), _acc_param(bias, acc)
        w, b = w if w is not None else mean, b if b is not None else mean  # any pointer when absent
        flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu)
        kind, block, block_s, pieces, per_split = _plan(N, C, D, S, x.stride(1), x.element_size(), x.device,
                                                        splits=splits)
        units = N * (C // block) if kind == "chunk" else N * groups
        if pieces > 1:  # per-split (mean, M2) of each group, merged by the apply kernel
            part_mean = torch.empty((N * groups * pieces,), dtype=acc, device=x.device)
            part_m2 = torch.empty_like(part_mean)
        if kind == "chunk" and pieces == 1:
            torch.library.wrap_triton(_gn_chunk_fwd_kernel)[(units,)](
                x, y, w, b, mean, rstd, C, S, eps, x.stride(0), x.stride(2), **flags,
                D=D, BLOCK_C=block, BLOCK_S=block_s,
            )
        elif kind == "chunk":
            tile = dict(D=D, BLOCK_C=block, BLOCK_S=block_s)
            torch.library.wrap_triton(_gn_chunk_stats_kernel)[(units, pieces)](
                x, part_mean, part_m2, C, S, per_split, x.stride(0), x.stride(2), **tile,
            )
            torch.library.wrap_triton(_gn_chunk_apply_kernel)[(units, pieces)](
                x, y, w, b, mean, rstd, part_mean, part_m2, C, S, pieces, per_split, eps, x.stride(0), x.stride(2),
                **flags, **tile,
            )
        elif pieces == 1:
            torch.library.wrap_triton(_gn_fwd_kernel)[(units,)](
                x, y, w, b, mean, rstd, S, D, groups, eps, *x.stride(), **flags, BLOCK_D=block, BLOCK_S=block_s,
            )
        else:
            tile = dict(BLOCK_D=block, BLOCK_S=block_s)
            torch.library.wrap_triton(_gn_stats_kernel)[(units, pieces)](
                x, part_mean, part_m2, S, D, groups, per_split, *x.stride(), **tile,
            )
            torch.library.wrap_triton(_gn_apply_kernel)[(units, pieces)](
                x, y, w, b, mean, rstd, part_mean, part_m2, S, D, groups, pieces, per_split, eps, *x.stride(),
                **flags, **tile,
            )
    return y.view(shape), mean, rstd


def gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu, splits=None):
    """Gradients of gn_fwd: (dx in x's layout, dweight, dbias), the parameter gradients
    in the parameters' dtypes (empty where absent), summed over the samples in order from
    per-sample float32 partials (N, C): deterministic. splits: as in gn_fwd."""
    shape = x.shape
    x, dy = _walkable(_as_ncs(x)), _as_ncs(dy)
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    N, C, S = x.shape
    D = C // groups
    acc = torch.promote_types(x.dtype, torch.float32)
    dx = torch.empty_like(x)
    sum_g = torch.zeros((N, C), dtype=acc, device=x.device)
    sum_gxhat = torch.zeros((N, C), dtype=acc, device=x.device)
    if x.numel() > 0:
        w, b = _acc_param(weight, acc), _acc_param(bias, acc)
        mean, rstd = mean.contiguous(), rstd.contiguous()
        w, b = w if w is not None else mean, b if b is not None else mean  # any pointer when absent
        flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu)
        kind, block, block_s, pieces, per_split = _plan(N, C, D, S, x.stride(1), x.element_size(), x.device,
                                                        splits=splits)
        units = N * (C // block) if kind == "chunk" else N * groups
        if pieces > 1:  # per-split per-channel sums (N, SPLITS, C), summed in order by the dx kernel
            part_g = torch.empty((N, pieces, C), dtype=acc, device=x.device)
            part_gx = torch.empty_like(part_g)
        if kind == "chunk" and pieces == 1:
            torch.library.wrap_triton(_gn_chunk_bwd_kernel)[(units,)](
                x, dy, dx, w, b, mean, rstd, sum_g, sum_gxhat, C, S, x.stride(0), x.stride(2), **flags,
                D=D, BLOCK_C=block, BLOCK_S=block_s,
            )
        elif kind == "chunk":
            tile = dict(D=D, BLOCK_C=block, BLOCK_S=block_s)
            torch.library.wrap_triton(_gn_chunk_grad_sums_kernel)[(units, pieces)](
                x, dy, w, b, mean, rstd, part_g, part_gx, C, S, per_split, x.stride(0), x.stride(2), **flags, **tile,
            )
            torch.library.wrap_triton(_gn_chunk_dx_kernel)[(units, pieces)](
                x, dy, dx, w, b, mean, rstd, part_g, part_gx, sum_g, sum_gxhat, C, S, pieces, per_split,
                x.stride(0), x.stride(2), **flags, **tile,
            )
        elif pieces == 1:
            torch.library.wrap_triton(_gn_bwd_kernel)[(units,)](
                x, dy, dx, w, b, mean, rstd, sum_g, sum_gxhat, C, S, D, groups, *x.stride(), **flags,
                BLOCK_D=block, BLOCK_S=block_s,
            )
        else:
            tile = dict(BLOCK_D=block, BLOCK_S=block_s)
            torch.library.wrap_triton(_gn_grad_sums_kernel)[(units, pieces)](
                x, dy, w, b, mean, rstd, part_g, part_gx, C, S, D, groups, per_split, *x.stride(), **flags, **tile,
            )
            torch.library.wrap_triton(_gn_dx_kernel)[(units, pieces)](
                x, dy, dx, w, b, mean, rstd, part_g, part_gx, sum_g, sum_gxhat, C, S, D, groups, pieces, per_split,
                *x.stride(), **flags, **tile,
            )
    dweight = sum_gxhat.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = sum_g.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx.view(shape), dweight, dbias
