"""BatchNorm in Triton: per-channel statistics, normalization, and backward, over inputs
(N, C, S) in either memory format (contiguous or channels-last: any strides), in four
launches SyncBatchNorm can reduce across ranks between.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

A tile is BLOCK_P positions (n, s) by BLOCK_C channels, addressed through the strides,
so channels-last inputs are read along C and contiguous ones along S, without a
transposing copy. Reductions are per-program partial sums (over a fixed split of the
positions) reduced in a second, fixed-order step: deterministic, no atomics. Statistics
are float32 (float64 for float64 inputs); the sums are of x - x[0, c, 0] (shifted by
one value of the channel), so a large mean costs no precision.
"""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(p_start, c_block, P, C, S, stride_n, stride_c, stride_s, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of the tile of positions [p_start, p_start + BLOCK_P) x channel block c_block."""
    p = p_start + tl.arange(0, BLOCK_P).to(tl.int64)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    n, s = p // S, p % S
    offsets = (n * stride_n + s * stride_s)[:, None] + (c.to(tl.int64) * stride_c)[None, :]
    mask = (p < P)[:, None] & (c < C)[None, :]
    return offsets, mask, c


@triton.jit
def _bn_partial_sums_kernel(
    X,  # (N, C, S) strides (sx_n, sx_c, sx_s), x.dtype
    DY,  # (N, C, S) strides (sdy_n, sdy_c, sdy_s), x.dtype; any pointer unless HAS_DY
    SHIFT,  # (C,) ACC (float32; float64 for float64 x): x[0, c, 0] (statistics) or the mean (backward)
    PARTIAL_A,  # (programs, C) out, ACC
    PARTIAL_B,  # (programs, C) out, ACC
    P,  # int: positions N * S
    C,  # int: channels
    S,  # int: positions per sample
    positions_per_program,  # int: a multiple of BLOCK_P
    sx_n, sx_c, sx_s,  # int: X's strides, in elements
    sdy_n, sdy_c, sdy_s,  # int: DY's strides (0 without DY)
    HAS_DY: tl.constexpr,
    BLOCK_P: tl.constexpr,  # positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile (grid axis 1: channel blocks)
):
    """Program (pid, channel block): per channel over this program's positions, with d = x - shift[c]:
    statistics (no DY):  A = sum d,  B = sum d * d
    backward (DY):       A = sum dy, B = sum dy * d   (shift = mean)"""
    ACC: tl.constexpr = PARTIAL_A.dtype.element_ty
    pid, c_block = tl.program_id(0), tl.program_id(1)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    shift = tl.load(SHIFT + c, mask=c < C, other=0.0)
    sum_a = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    sum_b = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    first = pid.to(tl.int64) * positions_per_program
    last = tl.minimum(first + positions_per_program, P)
    for p_start in range(first, last, BLOCK_P):
        offsets, mask, _ = _tile(p_start, c_block, last, C, S, sx_n, sx_c, sx_s, BLOCK_P, BLOCK_C)
        d = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - shift[None, :], 0.0)
        if HAS_DY:
            dy_offsets, _, _ = _tile(p_start, c_block, last, C, S, sdy_n, sdy_c, sdy_s, BLOCK_P, BLOCK_C)
            dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(ACC)
            sum_a += dy
            sum_b += dy * d
        else:
            sum_a += d
            sum_b += d * d
    tl.store(PARTIAL_A + pid * C + c, tl.sum(sum_a, axis=0), mask=c < C)
    tl.store(PARTIAL_B + pid * C + c, tl.sum(sum_b, axis=0), mask=c < C)


@triton.jit
def _bn_affine_kernel(
    X,  # (N, C, S) strides (sx_n, sx_c, sx_s), x.dtype
    DY,  # (N, C, S) strides (sdy_n, sdy_c, sdy_s), x.dtype; any pointer unless HAS_DY
    OUT,  # (N, C, S) out, strides (so_n, so_c, so_s), x.dtype
    MEAN,  # (C,) ACC (float32; float64 for float64 x)
    COEF_X,  # (C,) ACC
    COEF_DY,  # (C,) ACC; any pointer unless HAS_DY
    COEF_ONE,  # (C,) ACC
    P,  # int: positions N * S
    C,  # int: channels
    S,  # int: positions per sample
    sx_n, sx_c, sx_s,  # int: X's strides, in elements
    sdy_n, sdy_c, sdy_s,  # int: DY's strides (0 without DY)
    so_n, so_c, so_s,  # int: OUT's strides
    HAS_DY: tl.constexpr,
    BLOCK_P: tl.constexpr,  # positions per tile (grid axis 0)
    BLOCK_C: tl.constexpr,  # channels per tile (grid axis 1)
):
    """out = (x - mean[c]) * coef_x[c] (+ dy * coef_dy[c]) + coef_one[c], per element:
    forward y (no DY), and backward dx (DY)."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    offsets, mask, c = _tile(tl.program_id(0).to(tl.int64) * BLOCK_P, tl.program_id(1), P, C, S,
                             sx_n, sx_c, sx_s, BLOCK_P, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    out = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean[None, :]) * \
        tl.load(COEF_X + c, mask=cmask, other=0.0)[None, :] + tl.load(COEF_ONE + c, mask=cmask, other=0.0)[None, :]
    if HAS_DY:
        dy_offsets, _, _ = _tile(tl.program_id(0).to(tl.int64) * BLOCK_P, tl.program_id(1), P, C, S,
                                 sdy_n, sdy_c, sdy_s, BLOCK_P, BLOCK_C)
        out += tl.load(DY + dy_offsets, mask=mask, other=0.0).to(ACC) * \
            tl.load(COEF_DY + c, mask=cmask, other=0.0)[None, :]
    out_offsets, _, _ = _tile(tl.program_id(0).to(tl.int64) * BLOCK_P, tl.program_id(1), P, C, S,
                              so_n, so_c, so_s, BLOCK_P, BLOCK_C)
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=mask)


_BLOCK_C = 32


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


def _block_p(x):
    return 64 if x.device.type == "cuda" else 16


def _programs(x, channel_blocks):
    """Programs along the positions: a fixed split for a given device (deterministic)."""
    if x.device.type == "cuda":
        return max(1, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count // channel_blocks)
    return 2  # the interpreter: few programs keep it fast


def _partial_sums(x, shift, dy=None):
    N, C, S = x.shape
    P = N * S
    acc = torch.promote_types(x.dtype, torch.float32)
    channel_blocks = triton.cdiv(C, _BLOCK_C)
    block_p = _block_p(x)
    per_program = max(1, triton.cdiv(triton.cdiv(P, _programs(x, channel_blocks)), block_p)) * block_p
    programs = max(1, triton.cdiv(P, per_program))
    partial_a = torch.zeros((programs, C), dtype=acc, device=x.device)
    partial_b = torch.zeros((programs, C), dtype=acc, device=x.device)
    if P > 0:
        dy_strides = dy.stride() if dy is not None else (0, 0, 0)
        with _launch_device(x):
            _bn_partial_sums_kernel[(programs, channel_blocks)](
                x, dy if dy is not None else x, shift, partial_a, partial_b, P, C, S, per_program,
                *x.stride(), *dy_strides, HAS_DY=dy is not None, BLOCK_P=block_p, BLOCK_C=_BLOCK_C,
            )
    return partial_a.sum(0), partial_b.sum(0)  # second reduction, in a fixed order


def _affine(x, mean, coef_x, coef_one, dy=None, coef_dy=None):
    N, C, S = x.shape
    out = torch.empty_like(x)  # x's strides: channels-last stays channels-last
    if out.numel() > 0:
        block_p = _block_p(x)
        dy_strides = dy.stride() if dy is not None else (0, 0, 0)
        with _launch_device(x):
            _bn_affine_kernel[(triton.cdiv(N * S, block_p), triton.cdiv(C, _BLOCK_C))](
                x, dy if dy is not None else x, out, mean, coef_x, coef_dy if coef_dy is not None else coef_x,
                coef_one, N * S, C, S, *x.stride(), *dy_strides, *out.stride(),
                HAS_DY=dy is not None, BLOCK_P=block_p, BLOCK_C=_BLOCK_C,
            )
    return out


def bn_stats(x):
    """(mean, biased variance) per channel of x (N, C, S), in float32 (float64 for float64)."""
    N, C, S = x.shape
    count = N * S
    acc = torch.promote_types(x.dtype, torch.float32)
    shift = x[0, :, 0].to(acc).contiguous() if count > 0 else torch.zeros(C, dtype=acc, device=x.device)
    sum_d, sum_dd = _partial_sums(x, shift)
    mean_d = sum_d / max(count, 1)
    return shift + mean_d, (sum_dd / max(count, 1) - mean_d * mean_d).clamp_min(0.0)


def bn_apply(x, mean, var, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in x's dtype and strides."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = bias.to(scale.dtype).contiguous() if bias is not None else torch.zeros_like(scale)
    return _affine(x, mean.contiguous(), scale.contiguous(), shift)


def bn_bwd_reduce(dy, x, mean, var, eps):
    """(sum dy, sum dy * xhat) per channel."""
    sum_dy, sum_dy_centered = _partial_sums(x, mean.contiguous(), dy)
    return sum_dy, sum_dy_centered * torch.rsqrt(var + eps)


def bn_bwd_apply(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
    """dx: with the sums (batch statistics over `count` values)
    (dy - sum_dy / count - xhat * sum_dy_xhat / count) * weight / sqrt(var + eps), else
    dy * weight / sqrt(var + eps)."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
    if sum_dy is None:  # dx = dy * scale: x is not read (a NaN in x stays out of dx, as in torch)
        zeros = torch.zeros_like(scale)
        dy_like_x = dy if dy.dtype == x.dtype and dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)
        return _affine(dy_like_x, zeros, scale.contiguous(), zeros.clone())
    coef_x = -scale * invstd * sum_dy_xhat / count
    coef_one = -scale * sum_dy / count
    return _affine(x, mean.contiguous(), coef_x.contiguous(), coef_one.contiguous(), dy, scale.contiguous())
