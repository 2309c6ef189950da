"""BatchNorm in Triton over inputs (N, C, *) in either memory format (contiguous or
channels-last: any strides), addressed as (N, C, S).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

Fused (one autograd step each way):
    bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps) -> (y, mean, invstd)
        training: a partial-sums launch and an apply launch; the apply programs fold the
        partials of their channels (in a fixed order), one program per channel block also
        writes mean / invstd and the running statistics. When one program covers all
        positions (small inputs) the sums are taken inside the apply launch: one launch.
        eval: one launch.
    bn_bwd(dy, x, weight, mean, invstd, training, output_mask) -> (dx, dweight, dbias)
        the same two launches (one for small inputs, or when dx alone is needed in eval).
Steps (SyncBatchNorm reduces across ranks between them): bn_stats, bn_apply,
bn_bwd_reduce, bn_bwd_apply over x (N, C, S).

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
def _chunk_sums(X, DY, shift, first, last, c_block, C, S, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s,
                HAS_DY: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel of block c_block over the positions [first, last), with d = x - shift[c]:
    (sum d, sum d * d), or with DY (sum dy, sum dy * d); two (BLOCK_C,) ACC vectors."""
    sum_a = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    sum_b = tl.zeros((BLOCK_P, BLOCK_C), ACC)
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
    return tl.sum(sum_a, axis=0), tl.sum(sum_b, axis=0)


@triton.jit
def _first_position_x(X, c, C, P, sx_c, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """x[0, c, 0] in ACC for the channels c, the shift of the statistics' sums; 0 where there is
    no position (P == 0)."""
    shift = tl.zeros((BLOCK_C,), ACC)
    # a branch on the scalar rather than a mask `& (P > 0)`: triton 3.9's interpreter rejects
    # a load masked by a scalar comparison broadcast against a block
    if P > 0:
        shift = tl.load(X + c.to(tl.int64) * sx_c, mask=c < C, other=0.0).to(ACC)
    return shift


@triton.jit
def _bn_partial_sums_kernel(
    X,  # (N, C, S) strides (sx_n, sx_c, sx_s), x.dtype
    DY,  # (N, C, S) strides (sdy_n, sdy_c, sdy_s), x.dtype; any pointer unless HAS_DY
    SHIFT,  # (C,) ACC (float32; float64 for float64 x): the mean (backward); unless SHIFT_FROM_X
    PARTIAL_A,  # (programs, C) out, ACC
    PARTIAL_B,  # (programs, C) out, ACC
    P,  # int: positions N * S
    C,  # int: channels
    S,  # int: positions per sample
    positions_per_program,  # int: a multiple of BLOCK_P
    sx_n, sx_c, sx_s,  # int: X's strides, in elements
    sdy_n, sdy_c, sdy_s,  # int: DY's strides (0 without DY)
    HAS_DY: tl.constexpr,
    SHIFT_FROM_X: tl.constexpr,  # shift by x[0, c, 0] (statistics), SHIFT unread
    BLOCK_P: tl.constexpr,  # positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile (grid axis 1: channel blocks)
):
    """Program (pid, channel block): per channel over this program's positions, with d = x - shift[c]:
    statistics (no DY):  A = sum d,  B = sum d * d
    backward (DY):       A = sum dy, B = sum dy * d   (shift = mean)"""
    ACC: tl.constexpr = PARTIAL_A.dtype.element_ty
    pid, c_block = tl.program_id(0), tl.program_id(1)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    if SHIFT_FROM_X:
        shift = _first_position_x(X, c, C, P, sx_c, ACC, BLOCK_C)
    else:
        shift = tl.load(SHIFT + c, mask=c < C, other=0.0)
    first = pid.to(tl.int64) * positions_per_program
    last = tl.minimum(first + positions_per_program, P)
    sum_a, sum_b = _chunk_sums(X, DY, shift, first, last, c_block, C, S, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s,
                               HAS_DY, ACC, BLOCK_P, BLOCK_C)
    tl.store(PARTIAL_A + pid * C + c, sum_a, mask=c < C)
    tl.store(PARTIAL_B + pid * C + c, sum_b, mask=c < C)


@triton.jit
def _channel_sums(X, DY, shift, PARTIAL_A, PARTIAL_B, partial_programs, P, C, S, c_block,
                  sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s,
                  HAS_DY: tl.constexpr, FUSED: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """The whole batch's (A, B) of _bn_partial_sums_kernel for channel block c_block: taken
    here over all P positions (FUSED), else the partial_programs rows of PARTIAL_A / B
    added in order (every program adds them alike: the same values everywhere)."""
    if FUSED:
        sum_a, sum_b = _chunk_sums(X, DY, shift, 0, P, c_block, C, S, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s,
                                   HAS_DY, ACC, BLOCK_P, BLOCK_C)
    else:
        c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
        sum_a = tl.zeros((BLOCK_C,), ACC)
        sum_b = tl.zeros((BLOCK_C,), ACC)
        for row in range(0, partial_programs):
            sum_a += tl.load(PARTIAL_A + row * C + c, mask=c < C, other=0.0)
            sum_b += tl.load(PARTIAL_B + row * C + c, mask=c < C, other=0.0)
    return sum_a, sum_b


@triton.jit
def _bn_fwd_kernel(
    X,  # (N, C, S) strides (sx_n, sx_c, sx_s), x.dtype
    Y,  # (N, C, S) out, strides (sy_n, sy_c, sy_s), x.dtype
    WEIGHT,  # (C,) any float dtype; any pointer unless HAS_WEIGHT
    BIAS,  # (C,) any float dtype; any pointer unless HAS_BIAS
    RUNNING_MEAN,  # (C,) in/out (training) or in (eval), any float dtype; any pointer unless HAS_RUNNING
    RUNNING_VAR,  # (C,) likewise
    BATCHES_TRACKED,  # (1,) int64: momentum = 1 / its value; any pointer unless HAS_BATCHES
    MEAN,  # (C,) out, ACC (float32; float64 for float64 x)
    INVSTD,  # (C,) out, ACC
    PARTIAL_A,  # (partial_programs, C) ACC: _bn_partial_sums_kernel's sums of d; any pointer if FUSED
    PARTIAL_B,  # (partial_programs, C) ACC: its sums of d * d
    partial_programs,  # int
    P,  # int: positions N * S
    C,  # int: channels
    S,  # int: positions per sample
    positions_per_program,  # int: a multiple of BLOCK_P
    momentum,  # float
    eps,  # float
    unbias,  # float: count / (count - 1), the running variance's factor
    sx_n, sx_c, sx_s,  # int: X's strides, in elements
    sy_n, sy_c, sy_s,  # int: Y's strides
    TRAINING: tl.constexpr,  # batch statistics (else the running ones)
    FUSED: tl.constexpr,  # training: take the sums here (one program along the positions)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    HAS_BATCHES: tl.constexpr,
    BLOCK_P: tl.constexpr,  # positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile (grid axis 1: channel blocks)
):
    """Program (pid, channel block): y = (x - mean) * invstd * weight + bias over its positions;
    program 0 of each channel block writes mean, invstd and (training) the running statistics."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    pid, c_block = tl.program_id(0), tl.program_id(1)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if TRAINING:
        shift = _first_position_x(X, c, C, P, sx_c, ACC, BLOCK_C)
        sum_d, sum_dd = _channel_sums(X, X, shift, PARTIAL_A, PARTIAL_B, partial_programs, P, C, S, c_block,
                                      sx_n, sx_c, sx_s, 0, 0, 0, False, FUSED, ACC, BLOCK_P, BLOCK_C)
        count = tl.maximum(P, 1).to(ACC)
        mean_d = sum_d / count
        var = sum_dd / count - mean_d * mean_d
        var = tl.where(var < 0.0, 0.0, var)  # rounding below 0 clamped; a NaN (non-finite x) kept
        mean = shift + mean_d
    else:
        mean = tl.load(RUNNING_MEAN + c, mask=cmask, other=0.0).to(ACC)
        var = tl.load(RUNNING_VAR + c, mask=cmask, other=1.0).to(ACC)
    invstd = 1.0 / tl.sqrt(var + eps)
    if pid == 0:
        tl.store(MEAN + c, mean, mask=cmask)
        tl.store(INVSTD + c, invstd, mask=cmask)
        if TRAINING and HAS_RUNNING:
            if HAS_BATCHES:
                factor = 1.0 / tl.load(BATCHES_TRACKED).to(ACC)
            else:
                factor = momentum
            running_mean = tl.load(RUNNING_MEAN + c, mask=cmask, other=0.0).to(ACC)
            running_var = tl.load(RUNNING_VAR + c, mask=cmask, other=0.0).to(ACC)
            tl.store(RUNNING_MEAN + c, (running_mean * (1.0 - factor) + mean * factor).to(
                RUNNING_MEAN.dtype.element_ty), mask=cmask)
            tl.store(RUNNING_VAR + c, (running_var * (1.0 - factor) + var * unbias * factor).to(
                RUNNING_VAR.dtype.element_ty), mask=cmask)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(WEIGHT + c, mask=cmask, other=0.0).to(ACC)
    shift_y = tl.zeros((BLOCK_C,), ACC)
    if HAS_BIAS:
        shift_y = tl.load(BIAS + c, mask=cmask, other=0.0).to(ACC)
    first = pid.to(tl.int64) * positions_per_program
    last = tl.minimum(first + positions_per_program, P)
    for p_start in range(first, last, BLOCK_P):
        offsets, mask, _ = _tile(p_start, c_block, last, C, S, sx_n, sx_c, sx_s, BLOCK_P, BLOCK_C)
        y = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean[None, :]) * scale[None, :] + shift_y[None, :]
        y_offsets, _, _ = _tile(p_start, c_block, last, C, S, sy_n, sy_c, sy_s, BLOCK_P, BLOCK_C)
        tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_kernel(
    DY,  # (N, C, S) strides (sdy_n, sdy_c, sdy_s), any float dtype
    X,  # (N, C, S) strides (sx_n, sx_c, sx_s), x.dtype
    DX,  # (N, C, S) out, strides (sdx_n, sdx_c, sdx_s), x.dtype; any pointer unless HAS_DX
    WEIGHT,  # (C,) any float dtype; any pointer unless HAS_WEIGHT
    MEAN,  # (C,) ACC (float32; float64 for float64 x)
    INVSTD,  # (C,) ACC
    DWEIGHT,  # (C,) out, weight's dtype; any pointer unless HAS_DWEIGHT
    DBIAS,  # (C,) out; any pointer unless HAS_DBIAS
    PARTIAL_A,  # (partial_programs, C) ACC: _bn_partial_sums_kernel's sums of dy; any pointer if FUSED
    PARTIAL_B,  # (partial_programs, C) ACC: its sums of dy * (x - mean)
    partial_programs,  # int
    P,  # int: positions N * S
    C,  # int: channels
    S,  # int: positions per sample
    positions_per_program,  # int: a multiple of BLOCK_P
    sdy_n, sdy_c, sdy_s,  # int: DY's strides, in elements
    sx_n, sx_c, sx_s,  # int: X's strides
    sdx_n, sdx_c, sdx_s,  # int: DX's strides
    TRAINING: tl.constexpr,  # dx through the batch statistics (else dx = dy * weight * invstd, x unread)
    SUMS: tl.constexpr,  # the sums are needed (training, or dweight / dbias)
    FUSED: tl.constexpr,  # take the sums here (one program along the positions)
    HAS_DX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DWEIGHT: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,  # positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile (grid axis 1: channel blocks)
):
    """Program (pid, channel block), with xhat = (x - mean) * invstd, n = P:
    dx = (dy - sum dy / n - xhat * sum (dy * xhat) / n) * weight * invstd (training) over its
    positions; program 0 of each channel block writes dweight = sum dy * xhat, dbias = sum dy."""
    ACC: tl.constexpr = MEAN.dtype.element_ty
    pid, c_block = tl.program_id(0), tl.program_id(1)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(WEIGHT + c, mask=cmask, other=0.0).to(ACC)
    coef_x = tl.zeros((BLOCK_C,), ACC)
    coef_one = tl.zeros((BLOCK_C,), ACC)
    if SUMS:
        sum_dy, sum_dy_centered = _channel_sums(X, DY, mean, PARTIAL_A, PARTIAL_B, partial_programs, P, C, S,
                                                c_block, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s, True, FUSED, ACC,
                                                BLOCK_P, BLOCK_C)
        sum_dy_xhat = sum_dy_centered * invstd
        if pid == 0:
            if HAS_DWEIGHT:
                tl.store(DWEIGHT + c, sum_dy_xhat.to(DWEIGHT.dtype.element_ty), mask=cmask)
            if HAS_DBIAS:
                tl.store(DBIAS + c, sum_dy.to(DBIAS.dtype.element_ty), mask=cmask)
        count = tl.maximum(P, 1).to(ACC)
        coef_x = -scale * invstd * sum_dy_xhat / count
        coef_one = -scale * sum_dy / count
    if HAS_DX:
        first = pid.to(tl.int64) * positions_per_program
        last = tl.minimum(first + positions_per_program, P)
        for p_start in range(first, last, BLOCK_P):
            dy_offsets, mask, _ = _tile(p_start, c_block, last, C, S, sdy_n, sdy_c, sdy_s, BLOCK_P, BLOCK_C)
            dx = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(ACC) * scale[None, :]
            if TRAINING:
                offsets, _, _ = _tile(p_start, c_block, last, C, S, sx_n, sx_c, sx_s, BLOCK_P, BLOCK_C)
                dx += (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean[None, :]) * coef_x[None, :] + \
                    coef_one[None, :]
            dx_offsets, _, _ = _tile(p_start, c_block, last, C, S, sdx_n, sdx_c, sdx_s, BLOCK_P, BLOCK_C)
            tl.store(DX + dx_offsets, dx.to(DX.dtype.element_ty), mask=mask)


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
                *x.stride(), *dy_strides, HAS_DY=dy is not None, SHIFT_FROM_X=False, BLOCK_P=block_p,
                BLOCK_C=_BLOCK_C,
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


def _as_ncs(t):
    """(N, C, *spatial) -> (N, C, S): a view where the spatial dims collapse (any dense
    layout), else a contiguous copy."""
    if t.dim() == 3:
        return t
    return t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)


def _split(x3):
    """(programs along the positions, positions per program, BLOCK_P): the fixed split
    both launches of a step use."""
    N, C, S = x3.shape
    P = N * S
    block_p = _block_p(x3)
    per_program = max(1, triton.cdiv(triton.cdiv(P, _programs(x3, triton.cdiv(C, _BLOCK_C))), block_p)) * block_p
    return max(1, triton.cdiv(P, per_program)), per_program, block_p


def _partials(x3, dy3, shift, programs, per_program, block_p):
    """The (programs, C) partial sums of _bn_partial_sums_kernel: of x - x[0, c, 0] without
    dy3, else of dy and dy * (x - shift)."""
    N, C, S = x3.shape
    acc = torch.promote_types(x3.dtype, torch.float32)
    partial_a = torch.empty((programs, C), dtype=acc, device=x3.device)
    partial_b = torch.empty((programs, C), dtype=acc, device=x3.device)
    _bn_partial_sums_kernel[(programs, triton.cdiv(C, _BLOCK_C))](
        x3, dy3 if dy3 is not None else x3, shift if shift is not None else partial_a, partial_a, partial_b,
        N * S, C, S, per_program, *x3.stride(), *(dy3.stride() if dy3 is not None else (0, 0, 0)),
        HAS_DY=dy3 is not None, SHIFT_FROM_X=dy3 is None, BLOCK_P=block_p, BLOCK_C=_BLOCK_C,
    )
    return partial_a, partial_b


def _contiguous_or_none(t):
    return t.contiguous() if t is not None else None


def bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, batches_tracked=None):
    """BatchNorm of x (N, C, *) in x's dtype and layout: returns (y, mean, invstd), mean and
    invstd (C,) float32 (float64 for float64 x).

    training: the batch's statistics; running_mean / running_var (C,) (both or neither),
    when given, take torch's update in place: running = (1 - momentum) * running +
    momentum * statistic, the variance unbiased; batches_tracked (a one-element int64
    tensor) replaces momentum by 1 / its value, read on the device. Else the running
    statistics are used. weight, bias (C,) or None. Launches: eval one; training one when
    a program covers all positions, else two (partial sums, then apply).
    """
    x3 = _as_ncs(x)
    N, C, S = x3.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    y3 = torch.empty_like(x3)  # x's strides: channels-last stays channels-last
    mean = torch.empty(C, dtype=acc, device=x.device)
    invstd = torch.empty(C, dtype=acc, device=x.device)
    weight, bias = _contiguous_or_none(weight), _contiguous_or_none(bias)
    has_running = running_mean is not None
    stats = (running_mean.contiguous(), running_var.contiguous()) if has_running else (mean, invstd)
    programs, per_program, block_p = _split(x3)
    fused = programs == 1
    P = N * S
    with _launch_device(x):
        partials = (mean, invstd)  # unread when fused or in eval
        if training and not fused:
            partials = _partials(x3, None, None, programs, per_program, block_p)
        _bn_fwd_kernel[(programs, triton.cdiv(C, _BLOCK_C))](
            x3, y3, weight if weight is not None else mean, bias if bias is not None else mean, *stats,
            batches_tracked if batches_tracked is not None else mean, mean, invstd, *partials, programs, P, C, S,
            per_program, momentum, eps, P / max(P - 1, 1), *x3.stride(), *y3.stride(),
            TRAINING=training, FUSED=fused, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RUNNING=has_running, HAS_BATCHES=batches_tracked is not None, BLOCK_P=block_p, BLOCK_C=_BLOCK_C,
        )
    if training and has_running:  # running statistics that were not contiguous: copied back
        for given, updated in zip((running_mean, running_var), stats):
            if given is not updated:
                given.copy_(updated)
    return y3.view(x.shape), mean, invstd


def bn_bwd(dy, x, weight, mean, invstd, training, output_mask):
    """(dx, dweight, dbias) of bn_fwd for the gradient dy of y, each computed where
    output_mask (three bools) says so, else an empty tensor. dx in x's dtype and layout;
    dweight and dbias in weight's dtype (x's without weight). training: the gradient through
    the batch statistics; else dx = dy * weight * invstd (x unread). mean, invstd: bn_fwd's.
    Launches: one when a program covers all positions or only dx of eval is asked, else two.
    """
    x3, dy3 = _as_ncs(x), _as_ncs(dy)
    N, C, S = x3.shape
    P = N * S
    want_dx, want_dweight, want_dbias = output_mask
    sums = training or want_dweight or want_dbias
    param_dtype = weight.dtype if weight is not None else x.dtype
    dx3 = torch.empty_like(x3) if want_dx else None
    dweight = torch.empty(C if want_dweight else 0, dtype=param_dtype, device=x.device)
    dbias = torch.empty(C if want_dbias else 0, dtype=param_dtype, device=x.device)
    weight, mean, invstd = _contiguous_or_none(weight), mean.contiguous(), invstd.contiguous()
    programs, per_program, block_p = _split(x3)
    fused = programs == 1
    if want_dx or sums:
        with _launch_device(x):
            partials = (mean, invstd)  # unread when fused or without sums
            if sums and not fused:
                partials = _partials(x3, dy3, mean, programs, per_program, block_p)
            _bn_bwd_kernel[(programs, triton.cdiv(C, _BLOCK_C))](
                dy3, x3, dx3 if want_dx else x3, weight if weight is not None else mean, mean, invstd,
                dweight if want_dweight else mean, dbias if want_dbias else mean, *partials, programs, P, C, S,
                per_program, *dy3.stride(), *x3.stride(), *(dx3.stride() if want_dx else (0, 0, 0)),
                TRAINING=training, SUMS=sums, FUSED=fused, HAS_DX=want_dx, HAS_WEIGHT=weight is not None,
                HAS_DWEIGHT=want_dweight, HAS_DBIAS=want_dbias, BLOCK_P=block_p, BLOCK_C=_BLOCK_C,
            )
    dx = dx3.view(x.shape) if want_dx else x.new_empty(0)
    return dx, dweight, dbias


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
