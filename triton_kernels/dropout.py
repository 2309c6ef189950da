"""Mask-free dropout in Triton: dropout, channel dropout, drop path, dropout + bias + residual.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

The mask is never stored. Every element draws a 32-bit word from a counter-based
Philox 4x32-10 stream keyed by a 64-bit seed, so backward regenerates the mask from
(seed, offset) alone. The stream is the one of fastreg's C++ kernels
(csrc/include/fastreg/philox.h), bit for bit:

    position q = offset + i // inner       (i: row-major index of the element)
    word       = philox4x32_10(counter=q // 4, key=seed)[q % 4]
    keep       = word >= round(p * 2**32)  (drop probability p, to within 2**-33)
    out        = residual + (x + bias) * (keep ? 1 / (1 - p) : 0)

`inner` > 1 gives one draw per group of `inner` consecutive elements: channel dropout
(inner = spatial size) and drop path (inner = elements per sample).
"""

import math
import struct

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 2048  # elements per program: 512 Philox calls, 4 words each
NUM_WARPS = 4


@triton.jit
def philox4x32_10(c0, c1, k0, k1):
    """Philox 4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1); all uint32."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
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
    return c0, c1, c2, c3


@triton.jit
def _philox_of_counter(counter, k0, k1):
    # counter: int64 >= 0, split into the two low counter words
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    return philox4x32_10(c0, c1, k0, k1)


@triton.jit
def _dropout_kernel(
    x_ptr, out_ptr, seed_ptr, bias_ptr, residual_ptr,
    n_elements, bias_numel, offset, threshold, scale_bits, inner,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GROUPED: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)

    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit: tensors past 2**31 elements
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n_elements

    if GROUPED:
        # one word per group of `inner` elements: pick the lane of each position
        position = offset + idx // inner
        r0, r1, r2, r3 = _philox_of_counter(position // 4, k0, k1)
        lane = position % 4
        word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    else:
        # one Philox call per 4 consecutive elements; offset % 4 == 0 keeps groups aligned
        counter = (offset + start) // 4 + tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = _philox_of_counter(counter, k0, k1)
        # interleave to r0[0] r1[0] r2[0] r3[0] r0[1] ... (element 4k + j takes word j of call k)
        word = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))

    keep = word.to(tl.int64) >= threshold
    # the scale arrives as the bits of a float64 (Triton would round a float argument to fp32)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)
    multiplier = tl.where(keep, scale, 0.0).to(ACC_DTYPE)

    v = tl.load(x_ptr + idx, mask=in_bounds).to(ACC_DTYPE)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + idx % bias_numel, mask=in_bounds).to(ACC_DTYPE)
    v = v * multiplier
    if HAS_RESIDUAL:
        v = tl.load(residual_ptr + idx, mask=in_bounds).to(ACC_DTYPE) + v
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=in_bounds)


def drop_threshold(p: float) -> int:
    """Words below this are dropped: round(p * 2**32), so P(drop) = p to within 2**-33."""
    return math.floor(p * 4294967296.0 + 0.5)


def keep_scale(p: float) -> float:
    """Multiplier of a kept element; 0 when p == 1 (every element is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def dropout(x, seed, p, offset=0, inner=1, bias=None, residual=None, out=None):
    """out = residual + (x + bias) * keep / (1 - p), keep drawn from the Philox stream.

    x:        float16 / bfloat16 / float32 / float64 tensor, any shape and strides; it is
              read in row-major order (every non-contiguous tensor argument is copied first).
    seed:     int64 tensor with one element, on x's device (read inside the kernel, so
              no host synchronization and CUDA-graph safe).
    p:        drop probability in [0, 1].
    offset:   stream position of element 0, a multiple of 4 (lets two calls share a seed).
    inner:    elements per random draw (1: plain dropout).
    bias:     optional 1-D tensor of size x.shape[-1], added before dropout.
    residual: optional tensor shaped like x, added after dropout.
    out:      optional output of x's shape and dtype, may be x itself (in place); one that
              is not contiguous receives a contiguous result.

    Returns out (contiguous when not given, x's shape and dtype). Saves nothing: backward is
    `dropout(grad_out, seed, p, offset, inner)`; the bias gradient is its sum over rows.
    Arithmetic is in float32 (float64 for float64 x), rounded once to x's dtype.
    """
    if offset % 4 != 0 or offset < 0:
        raise ValueError(f"offset must be a non-negative multiple of 4, got {offset}")
    # read (and written) in row-major order: strided views are copied once (contiguous()
    # returns a contiguous tensor itself), a strided out receives the result afterwards
    x, bias, residual = (t.contiguous() if t is not None else None for t in (x, bias, residual))
    if out is not None and not out.is_contiguous():
        return out.copy_(dropout(x, seed, p, offset, inner, bias, residual))
    if out is None:
        out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid = (triton.cdiv(x.numel(), BLOCK_SIZE),)
    torch.library.wrap_triton(_dropout_kernel)[grid](
        x, out, seed,
        bias if bias is not None else x,  # unused pointer when HAS_BIAS is False
        residual if residual is not None else x,
        x.numel(), bias.numel() if bias is not None else 1,
        offset, drop_threshold(p), _float64_bits(keep_scale(p)), inner,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, GROUPED=inner > 1,
        ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
    )
    return out
