"""LayerNorm and RMSNorm in Triton, forward and backward, optionally fused with
`h = residual + dropout(x)` before the norm (pre-norm transformer blocks).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

Rows are the leading dims flattened (M rows of N elements, N = the normalized size).
Statistics are float32 whatever the input dtype (float64 for float64 inputs). A row
that fits on chip (N <= 64 KiB of input) is read once; longer rows take a looped
multi-pass path.
The dropout mask is never stored: element (i, j) draws from the counter-based Philox
4x32-10 stream at position i * N + j, the stream of fastreg's dropout kernels
(triton_kernels/dropout.py), so backward regenerates it from the seed.

Backward is deterministic: the weight and bias gradients are per-program float32
(float64) partial sums reduced in a second, fixed-order step; no atomics.
"""

import math
import struct

import torch
import triton
import triton.language as tl

MAX_FUSED_BYTES = 65536  # a row of up to this many input bytes is held on chip


@triton.jit
def _philox_word(position, seed):
    """Word position % 4 of Philox 4x32-10 at counter position // 4 (position: int64)."""
    counter = position // 4
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # Philox multipliers and Weyl key increments, as constexpr locals: a GPU compile rejects
    # module globals that are not tl.constexpr objects (the interpreter accepts them); to the
    # interpreter these are plain ints, as before, to the compiler literal constants.
    PHILOX_M0: tl.constexpr = 0xD2511F53
    PHILOX_M1: tl.constexpr = 0xCD9E8D57
    PHILOX_W0: tl.constexpr = 0x9E3779B9
    PHILOX_W1: tl.constexpr = 0xBB67AE85
    for round in tl.static_range(10):
        if round > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    lane = position % 4
    return tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))


@triton.jit
def _norm_input(X, RES, H, row, cols, mask, N, seed, threshold, scale, ACC: tl.constexpr,
                HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSED: tl.constexpr, STORE_H: tl.constexpr):
    """The values (in ACC) the norm sees: x, or h = residual + dropout(x) rounded to H's dtype
    (what backward reads), stored when STORE_H."""
    offsets = row * N + cols
    v = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    if HAS_DROPOUT:
        keep = _philox_word(offsets, seed).to(tl.int64) >= threshold
        v = v * tl.where(keep, scale, 0.0)
    if HAS_RES:
        v = tl.load(RES + offsets, mask=mask, other=0.0).to(ACC) + v
    if FUSED:
        h = v.to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + offsets, h, mask=mask)
        v = h.to(ACC)
    return v


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, H, MEAN, RSTD, SEED,
    N, eps, threshold, scale_bits,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, FUSED: tl.constexpr, STORE_H: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    ACC: tl.constexpr = RSTD.dtype.element_ty  # float32, or float64 for float64 inputs
    row = tl.program_id(0).to(tl.int64)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        mask = cols < N
        v = _norm_input(X, RES, H, row, cols, mask, N, seed, threshold, scale, ACC, HAS_RES, HAS_DROPOUT,
                        FUSED, STORE_H)
        if IS_RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
        else:
            mean = tl.sum(v, axis=0) / N
            centered = tl.where(mask, v - mean, 0.0)  # two passes over the row on chip: stable
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
        _norm_store(W, B, Y, row, cols, mask, N, v, mean, rstd, ACC, HAS_W, HAS_B)
    else:
        # pass 1: mean (or mean square); h (when fused) is written here and re-read below
        total = tl.zeros((BLOCK_N,), ACC)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            v = _norm_input(X, RES, H, row, start + cols, mask, N, seed, threshold, scale, ACC,
                            HAS_RES, HAS_DROPOUT, FUSED, STORE_H)
            if IS_RMS:
                total += v * v
            else:
                total += v
        SRC = X
        if FUSED:
            SRC = H
        if IS_RMS:
            mean = 0.0
            variance = tl.sum(total, axis=0) / N
        else:
            mean = tl.sum(total, axis=0) / N
            # pass 2: variance around the mean (two-pass: stable for large means)
            total = tl.zeros((BLOCK_N,), ACC)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                v = tl.load(SRC + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                centered = tl.where(mask, v - mean, 0.0)
                total += centered * centered
            variance = tl.sum(total, axis=0) / N
        rstd = 1.0 / tl.sqrt(variance + eps)
        # pass 3: normalize
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            v = tl.load(SRC + row * N + start + cols, mask=mask, other=0.0).to(ACC)
            _norm_store(W, B, Y, row, start + cols, mask, N, v, mean, rstd, ACC, HAS_W, HAS_B)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_store(W, B, Y, row, cols, mask, N, v, mean, rstd, ACC: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr):
    y = (v - mean) * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask).to(ACC)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask).to(ACC)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _store_dx(DX, DX_DROPOUT, offsets, mask, dx, seed, threshold, scale, ACC: tl.constexpr,
              HAS_DROPOUT: tl.constexpr):
    """dx, and for the fused block dropout(dx) with forward's mask (regenerated) on the rounded dx."""
    dx = dx.to(DX.dtype.element_ty)
    tl.store(DX + offsets, dx, mask=mask)
    if HAS_DROPOUT:
        keep = _philox_word(offsets.to(tl.int64), seed).to(tl.int64) >= threshold
        tl.store(DX_DROPOUT + offsets, (dx.to(ACC) * tl.where(keep, scale, 0.0)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DH, DX, DX_DROPOUT, SEED, DW_PARTIAL, DB_PARTIAL,
    M, N, rows_per_program, threshold, scale_bits,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DH: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    SINGLE_PASS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx for rows [pid * rows_per_program, ...), and this program's partial dw, db.

    With xhat = (x - mean) * rstd and g = dy * w:
        LayerNorm: dx = rstd * (g - mean(g * xhat) * xhat - mean(g))
        RMSNorm:   dx = rstd * (g - mean(g * xhat) * xhat)
    plus dh (the gradient flowing into the pre-norm sum directly, prenorm blocks).
    """
    ACC: tl.constexpr = RSTD.dtype.element_ty  # float32, or float64 for float64 inputs
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    first_row = pid.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    if SINGLE_PASS:
        mask = cols < N
        w = 1.0
        if HAS_W:
            w = tl.load(W + cols, mask=mask).to(ACC)
        dw = tl.zeros((BLOCK_N,), ACC)
        db = tl.zeros((BLOCK_N,), ACC)
        for row in range(first_row, last_row):
            x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(g * xhat, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / N
                dx = (g - xhat * c1 - c2) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * N + cols, mask=mask, other=0.0).to(ACC)
            _store_dx(DX, DX_DROPOUT, row * N + cols, mask, dx, seed, threshold, scale, ACC, HAS_DROPOUT)
            dw += dy * xhat
            db += dy
        if HAS_W:
            tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)
    else:
        # rows longer than the chip holds: two passes per row for dx; dw and db come
        # from _norm_bwd_weight_kernel
        for row in range(first_row, last_row):
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            sum_gx = tl.zeros((BLOCK_N,), ACC)
            sum_g = tl.zeros((BLOCK_N,), ACC)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                g = tl.load(DY + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                if HAS_W:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(ACC)
                sum_gx += g * tl.where(mask, (x - mean) * rstd, 0.0)
                sum_g += g
            c1 = tl.sum(sum_gx, axis=0) / N
            c2 = 0.0
            if not IS_RMS:
                c2 = tl.sum(sum_g, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                g = tl.load(DY + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                if HAS_W:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(ACC)
                dx = (g - (x - mean) * rstd * c1 - c2) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                _store_dx(DX, DX_DROPOUT, row * N + start + cols, mask, dx, seed, threshold, scale, ACC, HAS_DROPOUT)


@triton.jit
def _norm_bwd_weight_kernel(
    DY, X, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial dw, db of a block of columns over this program's rows (the looped path)."""
    ACC: tl.constexpr = RSTD.dtype.element_ty
    pid, col_block = tl.program_id(0), tl.program_id(1)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    first_row = pid.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    dw = tl.zeros((BLOCK_N,), ACC)
    db = tl.zeros((BLOCK_N,), ACC)
    for row in range(first_row, last_row):
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
        if HAS_W:
            x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            dw += dy * (x - mean) * tl.load(RSTD + row)
        db += dy
    if HAS_W:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)


def _block_n(n: int, element_size: int):
    """(BLOCK_N, single_pass, num_warps) for rows of n elements."""
    max_block = MAX_FUSED_BYTES // element_size
    block = triton.next_power_of_2(max(n, 1))
    if block <= max_block:
        return block, True, min(max(block // 256, 1), 16)
    return 4096, False, 8


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _drop_threshold(p: float) -> int:
    return math.floor(p * 4294967296.0 + 0.5)  # dropped: word < round(p * 2^32)


def _keep_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def norm_fwd(x, weight, bias, eps, is_rms, residual=None, seed=None, p=0.0, residual_in_fp32=False, store_h=True):
    """y = norm(h) * weight + bias over the last dim of the 2-D, row-contiguous x.

    x:        (M, N) float32 / float16 / bfloat16 / float64.
    weight, bias: (N,) or None, any float dtype (float32 with low-precision x is fine).
    Any strides: tensors that are not contiguous are copied to contiguous ones first.
    residual: (M, N) or None; seed: int64 one-element tensor on x's device, or None for
              no dropout; p: drop probability. With either, h = residual + dropout(x) is
              formed in the accumulate dtype (float32; float64 for float64 x) and stored
              (in that dtype if residual_in_fp32, else in residual's dtype, or x's without
              residual); the norm is taken of h.
    store_h:  return h (backward needs it; inference may not).
    Returns (y, h, mean, rstd): y like x; h, or an empty tensor when the norm input is x
    itself or store_h is False; mean ((M,), empty for RMSNorm) and rstd ((M,)) in the
    accumulate dtype, which backward uses with the norm input.
    """
    M, N = x.shape
    # the kernel reads rows and parameters as contiguous: strided views are copied once
    # (contiguous() returns a contiguous tensor itself)
    x, residual, weight, bias = (t.contiguous() if t is not None else None for t in (x, residual, weight, bias))
    fused = residual is not None or seed is not None
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # statistics: float32, float64 for float64
    h_dtype = acc_dtype if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
    block_n, single_pass, num_warps = _block_n(N, x.element_size())
    write_h = fused and (store_h or not single_pass)  # the looped path re-reads h: scratch
    y = torch.empty_like(x)
    h = torch.empty((M, N) if write_h else (0,), dtype=h_dtype, device=x.device)
    mean = torch.empty((0,) if is_rms else (M,), dtype=acc_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=acc_dtype, device=x.device)
    if M > 0:
        torch.library.wrap_triton(_norm_fwd_kernel)[(M,)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, h, mean if not is_rms else rstd, rstd,
            seed if seed is not None else rstd,
            N, eps, _drop_threshold(p), _float64_bits(_keep_scale(p)),
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            HAS_DROPOUT=seed is not None, FUSED=fused, STORE_H=write_h, SINGLE_PASS=single_pass,
            BLOCK_N=block_n, num_warps=num_warps,
        )
    return y, h if store_h or not fused else h.new_empty(0), mean, rstd


def _programs(device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep it fast


def norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh=None, seed=None, p=0.0):
    """Gradients of norm_fwd with respect to its norm input x (or h), weight and bias.

    dy: (M, N) like y; x: the norm input (M, N) (x, or the stored h); mean, rstd from
    norm_fwd; dh: optional (M, N) gradient reaching h directly, added to dx; seed, p: the
    fused block's dropout, to return dropout(dx) with forward's mask as well.
    Returns (dx in x's dtype, dweight in weight's dtype or empty, dbias or empty,
    dropout(dx) in x's dtype or empty). Any strides (non-contiguous tensors are copied first).
    """
    M, N = x.shape
    if dy.shape != x.shape or (dh is not None and dh.shape != x.shape):
        raise ValueError(f"norm_bwd: dy and dh must have x's shape {tuple(x.shape)}")
    # read as contiguous (contiguous() returns a contiguous tensor itself)
    dy, x, weight, mean, rstd = (t.contiguous() if t is not None else None for t in (dy, x, weight, mean, rstd))
    dx = torch.empty_like(x)
    dx_dropout = torch.empty_like(x) if seed is not None else x.new_empty(0)
    w_dtype = weight.dtype if weight is not None else x.dtype
    if M == 0:  # distinct tensors: an op's outputs may not alias each other
        return dx, *(torch.zeros(N if wanted else 0, dtype=w_dtype, device=x.device)
                     for wanted in (weight is not None, has_bias)), dx_dropout
    block_n, single_pass, num_warps = _block_n(N, x.element_size())
    programs = min(_programs(x.device), M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, N), dtype=rstd.dtype, device=x.device)
    db_partial = torch.empty((programs, N), dtype=rstd.dtype, device=x.device)
    flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=has_bias)
    torch.library.wrap_triton(_norm_bwd_kernel)[(programs,)](
        dy, x, weight if weight is not None else x, mean if not is_rms else rstd, rstd,
        dh.contiguous() if dh is not None else dy, dx, dx_dropout, seed if seed is not None else rstd,
        dw_partial, db_partial, M, N, rows_per_program, _drop_threshold(p), _float64_bits(_keep_scale(p)),
        HAS_DH=dh is not None, HAS_DROPOUT=seed is not None, SINGLE_PASS=single_pass, BLOCK_N=block_n,
        num_warps=num_warps, **flags,
    )
    if not single_pass and (weight is not None or has_bias):
        torch.library.wrap_triton(_norm_bwd_weight_kernel)[(programs, triton.cdiv(N, 1024))](
            dy, x, mean if not is_rms else rstd, rstd, dw_partial, db_partial, M, N, rows_per_program,
            BLOCK_N=1024, num_warps=4, **flags,
        )
    # second reduction, over programs in a fixed order: deterministic
    dw = dw_partial.sum(0).to(w_dtype) if weight is not None else dw_partial.new_empty(0, dtype=w_dtype)
    db = db_partial.sum(0).to(w_dtype) if has_bias else db_partial.new_empty(0, dtype=w_dtype)
    return dx, dw, db, dx_dropout
