"""LayerNorm and RMSNorm in Triton, forward and backward, optionally fused with
`h = residual + dropout(x)` before the norm (pre-norm transformer blocks).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

Rows are the leading dims flattened (M rows of N elements, N = the normalized size).
Statistics are float32 whatever the input dtype (float64 for float64 inputs).
The dropout mask is never stored: element (i, j) draws from the counter-based Philox
4x32-10 stream at position i * N + j, the stream of fastreg's dropout kernels
(triton_kernels/dropout.py), so backward regenerates it from the seed.

Forward: one program per row. A row of up to MAX_ROW_BYTES of input is held on chip and
read once; a longer row is walked in blocks, three passes (sum, squared deviations,
normalize).

Backward: two launches. The row kernel: each program takes a range of rows and keeps
float32 (float64) sums of dy * xhat and dy for dweight and dbias over them in registers,
one value per column, stored as that program's partial row. Per row, two phases: the row
sums that dx needs (sum g * xhat, sum g), then dx; the second phase reads the row again
(from L1/L2, where the first left it) instead of holding x and dy across the reductions,
so the registers go to the dweight/dbias sums. Rows of more than 8192 columns take their
columns in two halves, each with its own sums (`_bwd_plan`). A row too long for its column
sums to stay on chip is walked in blocks (two passes per row for dx), and the same launch
has further programs, one per (range of rows, column block), that write the partials.
Then `_norm_param_grads_kernel` sums the partial rows in a fixed order (deterministic, no
atomics) into dweight and dbias in the weight's dtype.
"""

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

MAX_ROW_BYTES = 65536  # forward: a row of up to this many input bytes is held on chip
# Backward: rows whose columns' dweight/dbias sums and phase values fit the registers of
# one program (16 warps x 128 registers) without spilling, in input bytes per row: one
# part up to 16 KiB, two parts (each phase over half the row at a time) up to 32 KiB of a
# 16-bit dtype. From the sm_90 compile (tests/test_triton_aot.py checks for spills).
MAX_BWD_ROW_BYTES = 16384
MAX_BWD_TWO_PART_BYTES = 32768
LOOPED_BLOCK_N = 4096  # columns per block of the looped paths
# _norm_param_grads_kernel: partial rows per step x columns per program (fp32 partials:
# rows of 256 bytes, each thread 16 bytes per access)
PARAM_GRADS_BLOCK_ROWS = 32
PARAM_GRADS_BLOCK_N = 64
# Backward grid: about this many resident warps per SM (programs per SM = this //
# num_warps), each program taking at least MIN_ROWS_PER_PROGRAM rows (its dweight/dbias
# partial row, N values, is written once per program). A GPU run decides both.
WARPS_PER_SM = 32
MIN_ROWS_PER_PROGRAM = 8


@triton.jit
def _philox(c0, c1, k0, k1):
    """Philox 4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1); all uint32."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    # Philox multipliers and Weyl key increments, constexpr locals: a GPU compile rejects
    # module globals that are not tl.constexpr objects
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
    return c0, c1, c2, c3


@triton.jit
def _keep_scales(row, start, N, seed, threshold, scale, BLOCK: tl.constexpr, ROW_ALIGNED: tl.constexpr):
    """(BLOCK,): `scale` where the element at stream position row * N + start + j is kept,
    else 0. Position q draws word q % 4 of Philox at counter q // 4. With ROW_ALIGNED
    (N % 4 == 0, start % 4 == 0) the block's positions are whole groups of 4: one Philox
    call per 4 elements, its words interleaved; otherwise one call per element."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    first = (row * N + start).to(tl.int64)  # row is int64 in a compiled kernel
    if ROW_ALIGNED:
        counter = first // 4 + tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = _philox((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
        # element 4k + j takes word j of call k: r0[0] r1[0] r2[0] r3[0] r0[1] ...
        word = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
    else:
        position = first + tl.arange(0, BLOCK)
        counter = position // 4
        r0, r1, r2, r3 = _philox((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
        lane = position % 4
        word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.where(word.to(tl.int64) >= threshold, scale, 0.0)


# ------------------------------------------------------------------------ forward


@triton.jit
def _norm_input(X, RES, H, row, start, N, seed, threshold, scale, ACC: tl.constexpr, HAS_RES: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, FUSED: tl.constexpr, STORE_H: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The values (in ACC) the norm sees at columns [start, start + BLOCK_N) of `row` (0
    past N): x, or h = residual + dropout(x) rounded to H's dtype (what backward reads),
    stored when STORE_H."""
    cols = start + tl.arange(0, BLOCK_N)
    mask = cols < N
    offsets = row * N + cols
    v = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    if HAS_DROPOUT:
        v = v * _keep_scales(row, start, N, seed, threshold, scale, BLOCK_N, ROW_ALIGNED)
    if HAS_RES:
        v = tl.load(RES + offsets, mask=mask, other=0.0).to(ACC) + v
    if FUSED:
        h = v.to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + offsets, h, mask=mask)
        v = h.to(ACC)
    return v


@triton.jit
def _norm_store(W, B, Y, row, cols, mask, N, v, mean, rstd, ACC: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr):
    """y = (v - mean) * rstd * w + b at columns `cols` of `row`."""
    y = (v - mean) * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) rows contiguous, x.dtype
    RES,  # (M, N) like X, residual.dtype; any pointer unless HAS_RES
    W,  # (N,) weight.dtype; any pointer unless HAS_W
    B,  # (N,) bias.dtype; any pointer unless HAS_B
    Y,  # (M, N) out, x.dtype
    H,  # (M, N) out: residual + dropout(x) in h's dtype (read back by the looped path); (0,) unless STORE_H
    MEAN,  # (M,) out, ACC (float32; float64 for float64 x); any pointer if IS_RMS
    RSTD,  # (M,) out, ACC
    SEED,  # (1,) int64 dropout seed; any pointer unless HAS_DROPOUT
    N,  # int: columns
    eps,  # float
    threshold,  # int: a Philox word below it drops its element (round(p * 2^32))
    scale_bits,  # int64: the bits of the float64 1 / (1 - p)
    IS_RMS: tl.constexpr,  # RMSNorm (no mean) instead of LayerNorm
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FUSED: tl.constexpr,  # the norm input is h = residual + dropout(x), rounded to H's dtype
    STORE_H: tl.constexpr,
    ROW_ON_CHIP: tl.constexpr,  # the row fits one block: read once
    ROW_ALIGNED: tl.constexpr,  # N % 4 == 0: one Philox call per 4 dropout positions
    BLOCK_N: tl.constexpr,  # columns per block: >= N when ROW_ON_CHIP
):
    """Program `row`: the row's mean (LayerNorm) and rstd, then y (and h)."""
    ACC: tl.constexpr = RSTD.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    cols = tl.arange(0, BLOCK_N)
    if ROW_ON_CHIP:
        mask = cols < N
        v = _norm_input(X, RES, H, row, 0, N, seed, threshold, scale, ACC, HAS_RES, HAS_DROPOUT, FUSED, STORE_H,
                        ROW_ALIGNED, BLOCK_N)
        if IS_RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
        else:
            mean = tl.sum(v, axis=0) / N
            centered = tl.where(mask, v - mean, 0.0)  # two passes over the row on chip: stable
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
        _norm_store(W, B, Y, row, cols, mask, N, v, mean, rstd, ACC, HAS_W, HAS_B)
    else:
        # pass 1: sum (or sum of squares); h (when fused) is written here and re-read below
        total = tl.zeros((BLOCK_N,), ACC)
        for start in range(0, N, BLOCK_N):
            v = _norm_input(X, RES, H, row, start, N, seed, threshold, scale, ACC, HAS_RES, HAS_DROPOUT, FUSED,
                            STORE_H, ROW_ALIGNED, BLOCK_N)
            if IS_RMS:
                total += v * v
            else:
                total += v  # 0 past N
        SRC = X
        if FUSED:
            SRC = H
        if IS_RMS:
            mean = 0.0
            variance = tl.sum(total, axis=0) / N
        else:
            mean = tl.sum(total, axis=0) / N
            # pass 2: squared deviations from the mean (two-pass: stable for large means)
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


# ------------------------------------------------------------------------ backward
#     xhat = (x - mean) * rstd,  g = dy * w
#     LayerNorm: dx = rstd * (g - mean(g * xhat) * xhat - mean(g))
#     RMSNorm:   dx = rstd * (g - mean(g * xhat) * xhat)
# plus dh (the gradient reaching the pre-norm sum directly, pre-norm blocks), and for the
# fused block dropout(dx) with forward's mask (the gradient of x).


@triton.jit
def _row_sums(DY, X, W, row, start, N, mean, rstd, ACC: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """(sum g * xhat, sum g) over columns [start, start + BLOCK_N) of `row`. The loads ask
    the cache to keep the row: _row_dx reads it again."""
    cols = start + tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    g = tl.load(DY + row * N + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    if HAS_W:
        g = g * tl.load(W + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    return tl.sum(g * xhat, axis=0), tl.sum(g, axis=0)


@triton.jit
def _row_dx(DY, X, W, DH, DX, DX_DROPOUT, row, start, N, mean, rstd, c1, c2, dw, db, seed, threshold, scale,
            ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_DH: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            ROW_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx over columns [start, start + BLOCK_N) of `row` from the row's c1 = mean(g * xhat),
    c2 = mean(g) (0 for RMSNorm), and for the fused block dropout(dx) with forward's mask
    (regenerated) on the rounded dx; returns the column sums dw + dy * xhat, db + dy."""
    cols = start + tl.arange(0, BLOCK_N)
    mask = cols < N
    offsets = row * N + cols
    # dw, db take dy and xhat as soon as they exist, so fewer values are live at once:
    # the two-part row path sits at 128 registers (16 warps) and spills otherwise
    dy = tl.load(DY + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    db += dy
    x = tl.load(X + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dw += dy * xhat
    g = dy
    if HAS_W:
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dx = (g - xhat * c1 - c2) * rstd
    if HAS_DH:
        dx += tl.load(DH + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    dx = dx.to(DX.dtype.element_ty)
    tl.store(DX + offsets, dx, mask=mask)
    if HAS_DROPOUT:
        dropped = dx.to(ACC) * _keep_scales(row, start, N, seed, threshold, scale, BLOCK_N, ROW_ALIGNED)
        tl.store(DX_DROPOUT + offsets, dropped.to(DX.dtype.element_ty), mask=mask)
    return dw, db


@triton.jit
def _norm_bwd_kernel(
    DY,  # (M, N) rows contiguous, y's dtype
    X,  # (M, N) rows contiguous: the norm input (x, or the stored h), its dtype
    W,  # (N,) weight.dtype; any pointer unless HAS_W
    MEAN,  # (M,) ACC (float32; float64 for float64 x); any pointer if IS_RMS
    RSTD,  # (M,) ACC
    DH,  # (M, N) like X: gradient reaching the norm input directly; any pointer unless HAS_DH
    DX,  # (M, N) out, X's dtype
    DX_DROPOUT,  # (M, N) out: dropout(dx) with forward's mask, X's dtype; any pointer unless HAS_DROPOUT
    SEED,  # (1,) int64 dropout seed; any pointer unless HAS_DROPOUT
    DW_PARTIAL,  # (dx_programs, N) out: column sums of dy * xhat over a program's rows, ACC (if HAS_W)
    DB_PARTIAL,  # (dx_programs, N) out: column sums of dy over a program's rows, ACC (if HAS_B)
    M,  # int: rows
    N,  # int: columns
    rows_per_program,  # int
    dx_programs,  # int: programs [0, dx_programs) take rows for dx; looped, the rest (rows, column block) for dw, db
    threshold,  # int: a Philox word below it drops its element (round(p * 2^32))
    scale_bits,  # int64: the bits of the float64 1 / (1 - p)
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROW_PARTS: tl.constexpr,  # 1 or 2: the row on chip in that many column parts; 0: looped (no dw, db)
    ROW_ALIGNED: tl.constexpr,  # N % 4 == 0: one Philox call per 4 dropout positions
    BLOCK_N: tl.constexpr,  # columns per part (ROW_PARTS * BLOCK_N >= N), or per block when looped
):
    """dx of rows [pid * rows_per_program, ...), and their partial dw, db: summed by
    this program where the row is on chip; looped, by the programs past dx_programs, one
    per (rows, column block)."""
    ACC: tl.constexpr = RSTD.dtype.element_ty
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    first_row = pid.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    if ROW_PARTS > 0:
        cols_hi = BLOCK_N + cols  # the second part's columns (ROW_PARTS == 2)
        dw = tl.zeros((BLOCK_N,), ACC)
        db = tl.zeros((BLOCK_N,), ACC)
        dw_hi = tl.zeros((BLOCK_N,), ACC)
        db_hi = tl.zeros((BLOCK_N,), ACC)
        for row in range(first_row, last_row):
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            sum_gxhat, sum_g = _row_sums(DY, X, W, row, 0, N, mean, rstd, ACC, HAS_W, BLOCK_N)
            if ROW_PARTS == 2:
                sum_gxhat_hi, sum_g_hi = _row_sums(DY, X, W, row, BLOCK_N, N, mean, rstd, ACC, HAS_W, BLOCK_N)
                sum_gxhat += sum_gxhat_hi
                sum_g += sum_g_hi
            c1 = sum_gxhat / N
            c2 = 0.0
            if not IS_RMS:
                c2 = sum_g / N
            dw, db = _row_dx(DY, X, W, DH, DX, DX_DROPOUT, row, 0, N, mean, rstd, c1, c2, dw, db, seed, threshold,
                             scale, ACC, HAS_W, HAS_DH, HAS_DROPOUT, ROW_ALIGNED, BLOCK_N)
            if ROW_PARTS == 2:
                dw_hi, db_hi = _row_dx(DY, X, W, DH, DX, DX_DROPOUT, row, BLOCK_N, N, mean, rstd, c1, c2, dw_hi,
                                       db_hi, seed, threshold, scale, ACC, HAS_W, HAS_DH, HAS_DROPOUT, ROW_ALIGNED,
                                       BLOCK_N)
        if HAS_W:
            tl.store(DW_PARTIAL + pid * N + cols, dw, mask=cols < N)
            if ROW_PARTS == 2:
                tl.store(DW_PARTIAL + pid * N + cols_hi, dw_hi, mask=cols_hi < N)
        if HAS_B:
            tl.store(DB_PARTIAL + pid * N + cols, db, mask=cols < N)
            if ROW_PARTS == 2:
                tl.store(DB_PARTIAL + pid * N + cols_hi, db_hi, mask=cols_hi < N)
    elif pid >= dx_programs:
        # looped path: dw, db of one column block over one program's rows (one launch
        # with dx, in programs of their own)
        part = pid - dx_programs
        col_blocks = tl.cdiv(N, BLOCK_N)
        _weight_partials(DY, X, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, part // col_blocks,
                         (part % col_blocks) * BLOCK_N + cols, M, N, rows_per_program, ACC, IS_RMS, HAS_W, HAS_B,
                         BLOCK_N)
    else:
        # rows longer than the chip holds: two passes per row over blocks of columns for dx
        for row in range(first_row, last_row):
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            sum_gxhat = tl.zeros((BLOCK_N,), ACC)
            sum_g = tl.zeros((BLOCK_N,), ACC)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                g = tl.load(DY + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                if HAS_W:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(ACC)
                sum_gxhat += g * tl.where(mask, (x - mean) * rstd, 0.0)
                sum_g += g
            c1 = tl.sum(sum_gxhat, axis=0) / N
            c2 = 0.0
            if not IS_RMS:
                c2 = tl.sum(sum_g, axis=0) / N
            for start in range(0, N, BLOCK_N):
                _row_dx(DY, X, W, DH, DX, DX_DROPOUT, row, start, N, mean, rstd, c1, c2, 0.0, 0.0, seed, threshold,
                        scale, ACC, HAS_W, HAS_DH, HAS_DROPOUT, ROW_ALIGNED, BLOCK_N)


@triton.jit
def _weight_partials(DY, X, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, program, cols, M, N, rows_per_program,
                     ACC: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """The looped path's partial dw, db of columns `cols` (BLOCK_N,) over the rows
    [program * rows_per_program, ...), stored in row `program` of the partials."""
    mask = cols < N
    program = program.to(tl.int64)
    first_row = program * rows_per_program
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
        tl.store(DW_PARTIAL + program * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PARTIAL + program * N + cols, db, mask=mask)


@triton.jit
def _norm_param_grads_kernel(
    DW_PARTIAL,  # (programs, N) per-program column sums of dy * xhat, ACC (float32; float64 for float64 x)
    DB_PARTIAL,  # (programs, N) per-program column sums of dy, ACC
    DW,  # (N,) out: dweight, weight.dtype; any pointer unless HAS_W
    DB,  # (N,) out: dbias, weight.dtype; any pointer unless HAS_B
    programs,  # int: rows of the partials
    N,  # int: columns
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # partial rows per step
    BLOCK_N: tl.constexpr,  # columns per program
):
    """Program `pid`: dweight and dbias of columns [pid * BLOCK_N, ...): the partials'
    column sums in a fixed order (deterministic), cast to the output dtype."""
    ACC: tl.constexpr = DW_PARTIAL.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros((BLOCK_ROWS, BLOCK_N), ACC)
    db = tl.zeros((BLOCK_ROWS, BLOCK_N), ACC)
    for first in range(0, programs, BLOCK_ROWS):
        rows = first + tl.arange(0, BLOCK_ROWS)
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < programs)[:, None] & (cols < N)[None, :]
        if HAS_W:
            dw += tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0)
        if HAS_B:
            db += tl.load(DB_PARTIAL + offsets, mask=mask, other=0.0)
    if HAS_W:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=cols < N)
    if HAS_B:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=cols < N)


# ------------------------------------------------------------------------ launchers


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


def _fwd_plan(n: int, element_size: int):
    """(BLOCK_N, row_on_chip, num_warps) of the forward for rows of n elements: 8 values
    per thread of a block held on chip."""
    block = triton.next_power_of_2(max(n, 1))
    if block * element_size <= MAX_ROW_BYTES:
        return block, True, min(max(block // 256, 1), 16)
    return LOOPED_BLOCK_N, False, 8


def _bwd_plan(n: int, element_size: int, dh_and_dropout: bool):
    """(BLOCK_N, row_parts, num_warps) of the backward for rows of n elements: the row on
    chip in one part, in two parts of BLOCK_N columns (16-bit dtypes, unless dx takes
    both dh and the dropout mask: more live values than the registers hold), or looped
    (row_parts 0)."""
    block = triton.next_power_of_2(max(n, 1))
    if block * element_size <= MAX_BWD_ROW_BYTES:
        return block, 1, min(max(block // 256, 1), 16)
    if block * element_size <= MAX_BWD_TWO_PART_BYTES and element_size <= 2 and not dh_and_dropout:
        return block // 2, 2, min(max(block // 512, 1), 16)
    return LOOPED_BLOCK_N, 0, 8


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
    block_n, row_on_chip, num_warps = _fwd_plan(N, x.element_size())
    write_h = fused and (store_h or not row_on_chip)  # the looped path re-reads h: scratch
    y = torch.empty_like(x)
    h = torch.empty((M, N) if write_h else (0,), dtype=h_dtype, device=x.device)
    mean = torch.empty((0,) if is_rms else (M,), dtype=acc_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=acc_dtype, device=x.device)
    if M > 0:
        with _launch_device(x):
            _norm_fwd_kernel[(M,)](
                x, residual if residual is not None else x, weight if weight is not None else x,
                bias if bias is not None else x, y, h, mean if not is_rms else rstd, rstd,
                seed if seed is not None else rstd,
                N, eps, _drop_threshold(p), _float64_bits(_keep_scale(p)),
                IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
                HAS_DROPOUT=seed is not None, FUSED=fused, STORE_H=write_h, ROW_ON_CHIP=row_on_chip,
                ROW_ALIGNED=N % 4 == 0, BLOCK_N=block_n, num_warps=num_warps,
            )
    return y, h if store_h or not fused else h.new_empty(0), mean, rstd


def _bwd_programs(M: int, num_warps: int, device) -> int:
    """Programs of the backward grid: WARPS_PER_SM resident warps per SM on a GPU, each
    program taking at least MIN_ROWS_PER_PROGRAM rows; few in the interpreter."""
    if device.type != "cuda":
        return min(M, 4)  # the interpreter: few programs keep it fast
    per_sm = max(1, WARPS_PER_SM // num_warps)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms * per_sm, triton.cdiv(M, MIN_ROWS_PER_PROGRAM)))


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
    block_n, row_parts, num_warps = _bwd_plan(N, x.element_size(), dh is not None and seed is not None)
    programs = _bwd_programs(M, num_warps, x.device)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    params = weight is not None or has_bias
    dw_partial = torch.empty((programs, N) if weight is not None else (0,), dtype=rstd.dtype, device=x.device)
    db_partial = torch.empty((programs, N) if has_bias else (0,), dtype=rstd.dtype, device=x.device)
    dw = torch.empty(N if weight is not None else 0, dtype=w_dtype, device=x.device)
    db = torch.empty(N if has_bias else 0, dtype=w_dtype, device=x.device)
    # looped rows: dw, db partials by programs of their own, one per (rows, column block)
    weight_programs = programs * triton.cdiv(N, block_n) if row_parts == 0 and params else 0
    flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=has_bias)
    with _launch_device(x):
        _norm_bwd_kernel[(programs + weight_programs,)](
            dy, x, weight if weight is not None else x, mean if not is_rms else rstd, rstd,
            dh.contiguous() if dh is not None else dy, dx, dx_dropout, seed if seed is not None else rstd,
            dw_partial, db_partial, M, N, rows_per_program, programs, _drop_threshold(p),
            _float64_bits(_keep_scale(p)), HAS_DH=dh is not None, HAS_DROPOUT=seed is not None, ROW_PARTS=row_parts,
            ROW_ALIGNED=N % 4 == 0, BLOCK_N=block_n, num_warps=num_warps, **flags,
        )
        if params:  # the partials summed over programs in a fixed order: deterministic
            _norm_param_grads_kernel[(triton.cdiv(N, PARAM_GRADS_BLOCK_N),)](
                dw_partial, db_partial, dw if weight is not None else dx, db if has_bias else dx, programs, N,
                HAS_W=weight is not None, HAS_B=has_bias, BLOCK_ROWS=PARAM_GRADS_BLOCK_ROWS,
                BLOCK_N=PARAM_GRADS_BLOCK_N, num_warps=4,
            )
    return dx, dw, db, dx_dropout
