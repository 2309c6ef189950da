"""GroupNorm (and InstanceNorm: one group per channel) in Triton, optionally fused with SiLU,
forward and backward, over inputs (N, C, S) in either memory format (contiguous or
channels-last: any strides).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

One program per (sample n, group g) of D = C / G channels: it walks the group's D x S
values in tiles of BLOCK_D channels x BLOCK_S positions addressed through the strides
(no transposing copy), so the group's statistics and gradient sums come out of one
program, in a fixed order: deterministic, no atomics. Statistics are float32 (float64
for float64 inputs), in two passes (the mean of values shifted by the group's first,
then squared deviations): a large mean costs no precision.

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
    c_begin, c_end = g * D, g * D + D
    count = D * S  # an int: promoted to ACC where it divides
    # the mean of values shifted by the group's first: a large mean costs no precision
    first = tl.load(X + n.to(tl.int64) * stride_n + c_begin.to(tl.int64) * stride_c).to(ACC)
    total = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        for s_start in range(0, S, BLOCK_S):
            offsets, mask, _ = _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s, BLOCK_D, BLOCK_S)
            total += tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - first, 0.0)
    mean = first + tl.sum(tl.sum(total, axis=1), axis=0) / count
    squares = tl.zeros((BLOCK_D, BLOCK_S), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        for s_start in range(0, S, BLOCK_S):
            offsets, mask, _ = _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s, BLOCK_D, BLOCK_S)
            d = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            squares += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / count + eps)
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, rstd)
    for c_first in range(c_begin, c_end, BLOCK_D):
        cmask = c_first + tl.arange(0, BLOCK_D) < c_end
        scale = tl.full((BLOCK_D,), 1.0, ACC) * rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(W + c_first + tl.arange(0, BLOCK_D), mask=cmask, other=0.0)
        shift = tl.zeros((BLOCK_D,), ACC)
        if HAS_BIAS:
            shift = tl.load(B + c_first + tl.arange(0, BLOCK_D), mask=cmask, other=0.0)
        for s_start in range(0, S, BLOCK_S):
            offsets, mask, _ = _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s, BLOCK_D, BLOCK_S)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
            z = (x - mean) * scale[:, None] + shift[:, None]
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(Y + offsets, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre_activation(dy, centered, scale, shift, SILU: tl.constexpr):
    """The gradient reaching z = centered * scale + shift: dy, or dy * silu'(z)."""
    if SILU:
        z = centered * scale[:, None] + shift[:, None]
        sig = 1.0 / (1.0 + tl.exp(-z))
        return dy * sig * (1.0 + z * (1.0 - sig))
    else:
        return dy


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
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    sum_wg = tl.zeros((BLOCK_D,), ACC)
    sum_wgxhat = tl.zeros((BLOCK_D,), ACC)
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        cmask = c < c_end
        w = tl.full((BLOCK_D,), 1.0, ACC)
        if HAS_WEIGHT:
            w = tl.load(W + c, mask=cmask, other=0.0)
        shift = tl.zeros((BLOCK_D,), ACC)
        if HAS_BIAS:
            shift = tl.load(B + c, mask=cmask, other=0.0)
        acc_g = tl.zeros((BLOCK_D, BLOCK_S), ACC)
        acc_gx = tl.zeros((BLOCK_D, BLOCK_S), ACC)
        for s_start in range(0, S, BLOCK_S):
            offsets, mask, _ = _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s, BLOCK_D, BLOCK_S)
            centered = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            grad = _grad_pre_activation(dy, centered, w * rstd, shift, SILU)
            acc_g += grad
            acc_gx += grad * centered
        sum_g = tl.sum(acc_g, axis=1)
        sum_gxhat = tl.sum(acc_gx, axis=1) * rstd
        tl.store(SUM_G + n.to(tl.int64) * C + c, sum_g, mask=cmask)
        tl.store(SUM_GXHAT + n.to(tl.int64) * C + c, sum_gxhat, mask=cmask)
        sum_wg += w * sum_g
        sum_wgxhat += w * sum_gxhat
    k_x = -rstd * rstd * tl.sum(sum_wgxhat, axis=0) / count
    k_one = -rstd * tl.sum(sum_wg, axis=0) / count
    for c_first in range(c_begin, c_end, BLOCK_D):
        c = c_first + tl.arange(0, BLOCK_D)
        cmask = c < c_end
        w = tl.full((BLOCK_D,), 1.0, ACC)
        if HAS_WEIGHT:
            w = tl.load(W + c, mask=cmask, other=0.0)
        shift = tl.zeros((BLOCK_D,), ACC)
        if HAS_BIAS:
            shift = tl.load(B + c, mask=cmask, other=0.0)
        for s_start in range(0, S, BLOCK_S):
            offsets, mask, _ = _group_tile(n, c_first, c_end, s_start, S, stride_n, stride_c, stride_s, BLOCK_D, BLOCK_S)
            centered = tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            grad = _grad_pre_activation(dy, centered, w * rstd, shift, SILU)
            dx = grad * (w * rstd)[:, None] + centered * k_x + k_one
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(D, S, device):
    """(BLOCK_D, BLOCK_S): a tile of about 2048 values on a GPU (1024 in the interpreter)."""
    tile = 2048 if device.type == "cuda" else 1024
    block_s = min(triton.next_power_of_2(max(S, 1)), tile)
    block_d = min(triton.next_power_of_2(D), max(1, tile // block_s), 64)
    return block_d, max(1, min(block_s, tile // block_d))


def _walkable(x):
    """x itself if dense (empty_like keeps its strides: y and dx then share them), else a
    contiguous copy."""
    return x if torch.empty_like(x).stride() == x.stride() else x.contiguous()


def _acc_param(param, acc):
    return param.to(acc).contiguous() if param is not None else None


def gn_fwd(x, weight, bias, groups, eps, silu):
    """GroupNorm of x (N, C, S), any strides, optionally + SiLU.

    weight, bias: (C,) or None. Returns (y, mean, rstd): y in x's dtype and layout
    (empty_like), mean and rstd (N, groups) in float32 (float64 for float64 x), what
    backward needs besides x."""
    x = _walkable(x)
    N, C, S = x.shape
    D = C // groups
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty_like(x)
    mean = torch.zeros((N, groups), dtype=acc, device=x.device)
    rstd = torch.zeros((N, groups), dtype=acc, device=x.device)
    if x.numel() > 0:
        w, b = _acc_param(weight, acc), _acc_param(bias, acc)
        block_d, block_s = _blocks(D, S, x.device)
        torch.library.wrap_triton(_gn_fwd_kernel)[(N * groups,)](
            x, y, w if w is not None else mean, b if b is not None else mean, mean, rstd, S, D, groups, eps,
            *x.stride(), HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, SILU=silu,
            BLOCK_D=block_d, BLOCK_S=block_s,
        )
    return y, mean, rstd


def gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu):
    """Gradients of gn_fwd: (dx in x's layout, dweight, dbias), the parameter gradients
    in the parameters' dtypes (empty where absent), summed over the samples in order from
    per-sample float32 partials (N, C): deterministic."""
    x = _walkable(x)
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
        block_d, block_s = _blocks(D, S, x.device)
        torch.library.wrap_triton(_gn_bwd_kernel)[(N * groups,)](
            x, dy, dx, w if w is not None else mean, b if b is not None else mean, mean.contiguous(),
            rstd.contiguous(), sum_g, sum_gxhat, C, S, D, groups, *x.stride(),
            HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, SILU=silu, BLOCK_D=block_d, BLOCK_S=block_s,
        )
    dweight = sum_gxhat.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = sum_g.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias
