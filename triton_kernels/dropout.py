"""Mask-free dropout in Triton: dropout, channel dropout, drop path, dropout + bias + residual.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

The mask is never stored. Every element draws a 32-bit word from a counter-based
Philox 4x32-10 stream keyed by a 64-bit seed, so backward regenerates the mask from
(seed, offset) alone. The stream is the one of fastreg's C++ kernels
(csrc/include/fastreg/philox.h), bit for bit:

    position q = offset + i // inner       (i: row-major index of the element)
    word       = philox4x32_10(counter=q // 4, key=seed)[q % 4]
    keep       = word >= round(p * 2**32)  (drop probability p, to within 2**-33)
    out        = residual + (x + bias[i % bias_numel]) * (keep ? 1 / (1 - p) : 0)

`inner` > 1 gives one draw per group of `inner` consecutive elements: channel dropout
(inner = spatial size) and drop path (inner = elements per sample).

A program takes BLOCK consecutive elements. Where an element's group (i // inner) or bias
column (i % bias_numel) is needed, the program divides its first index once and steps
from there (`_block_divmod`): per element a compare (divisor >= BLOCK: the block spans at
most two groups) or a 32-bit multiply-high (a smaller divisor), no 64-bit division. The
grouped path computes Philox once per 4 of the block's groups, not once per element,
and hands each element its group's word.
"""

import contextlib
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
def _words(first_counter, k0, k1, COUNTERS: tl.constexpr):
    """(4 * COUNTERS,): the stream's words from counter first_counter (int64) on, in
    position order: word j of call k at 4k + j."""
    counter = first_counter + tl.arange(0, COUNTERS)
    r0, r1, r2, r3 = philox4x32_10((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
    # join(join(r0, r2), join(r1, r3)) is (COUNTERS, 2, 2) with [k, a, b] = r[2b + a]:
    # row-major that is r0[k] r1[k] r2[k] r3[k]
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (4 * COUNTERS,))


@triton.jit
def _block_divmod(start, divisor, magic, BLOCK: tl.constexpr, SHORT: tl.constexpr, VEC: tl.constexpr):
    """(q0, q, r): (start + j) // divisor = q0 + q[j] and (start + j) % divisor = r[j] for
    j in [0, BLOCK); start >= 0 a multiple of VEC, divisor >= 1 a multiple of VEC. One
    64-bit division per program; per element, with local = start % divisor + j:
      SHORT (divisor < BLOCK): q = (2 * local * magic) >> 32, magic = ceil(2^31 / divisor),
        exact for local < 2 * BLOCK: local * (magic * divisor - 2^31) < 2^31;
      else: the block spans at most two quotients, q = local >= divisor.
    r wraps only at multiples of VEC: runs of VEC contiguous values starting at multiples
    of VEC, which the compiler is told (vector loads of what r indexes)."""
    q0 = start // divisor
    first = start - q0 * divisor
    if SHORT:
        local = first.to(tl.int32) + tl.arange(0, BLOCK)  # < 2 * BLOCK
        q = tl.umulhi((2 * local).to(tl.uint32), magic.to(tl.uint32)).to(tl.int32)
        r = local - q * divisor
    else:
        local = first + tl.arange(0, BLOCK)
        wraps = local >= divisor
        q = wraps.to(tl.int32)
        r = tl.where(wraps, local - divisor, local)
    r = tl.max_contiguous(tl.multiple_of(r, VEC), VEC)
    return q0, q, r


@triton.jit
def _dropout_kernel(
    x_ptr,  # (n_elements,) contiguous, x.dtype
    out_ptr,  # (n_elements,) out, x.dtype; may be x_ptr (in place)
    seed_ptr,  # (1,) int64: the Philox key
    bias_ptr,  # (bias_numel,) x.dtype, element i adds bias[i % bias_numel]; any pointer unless HAS_BIAS
    residual_ptr,  # (n_elements,) x.dtype; any pointer unless HAS_RESIDUAL
    n_elements,  # int
    bias_numel,  # int >= 1
    bias_magic,  # int: ceil(2^31 / bias_numel) (used where BIAS_SHORT)
    offset,  # int: stream position of element 0, a multiple of 4
    threshold,  # int: a word below it drops its element (round(p * 2^32))
    scale_bits,  # int64: the bits of the float64 1 / (1 - p)
    inner,  # int >= 1: elements per draw
    inner_magic,  # int: ceil(2^31 / inner) (used where GROUPS_SHORT)
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GROUPED: tl.constexpr,  # inner > 1
    BIAS_SHORT: tl.constexpr,  # bias_numel < BLOCK
    BIAS_VEC: tl.constexpr,  # a power of two dividing bias_numel (up to 16 bytes of x.dtype): bias runs aligned to it
    GROUPS_SHORT: tl.constexpr,  # inner < BLOCK
    GROUP_COUNTERS: tl.constexpr,  # Philox calls covering a block's groups: a power of two >= (3 + groups + 1) / 4
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 x
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)

    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit: tensors past 2**31 elements
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n_elements

    if GROUPED:
        # element j of the block draws the word at position offset + group0 + q[j]
        group0, q, _ = _block_divmod(start, inner, inner_magic, BLOCK, GROUPS_SHORT, 1)
        first_position = offset + group0
        words = _words(first_position // 4, k0, k1, GROUP_COUNTERS)
        word = tl.gather(words, (first_position % 4).to(tl.int32) + q, 0)
    else:
        # one Philox call per 4 consecutive elements; offset % 4 == 0 keeps groups aligned
        word = _words((offset + start) // 4, k0, k1, BLOCK // 4)

    keep = word.to(tl.int64) >= threshold
    # the scale arrives as the bits of a float64 (Triton would round a float argument to fp32)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)
    multiplier = tl.where(keep, scale, 0.0).to(ACC_DTYPE)

    v = tl.load(x_ptr + idx, mask=in_bounds, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        _, _, column = _block_divmod(start, bias_numel, bias_magic, BLOCK, BIAS_SHORT, BIAS_VEC)
        v = v + tl.load(bias_ptr + column, mask=in_bounds, other=0.0).to(ACC_DTYPE)
    v = v * multiplier
    if HAS_RESIDUAL:
        v = tl.load(residual_ptr + idx, mask=in_bounds, other=0.0).to(ACC_DTYPE) + v
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=in_bounds)


def drop_threshold(p: float) -> int:
    """Words below this are dropped: round(p * 2**32), so P(drop) = p to within 2**-33."""
    return math.floor(p * 4294967296.0 + 0.5)


def keep_scale(p: float) -> float:
    """Multiplier of a kept element; 0 when p == 1 (every element is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _magic(divisor: int) -> int:
    """ceil(2^31 / divisor): _block_divmod's multiplier for a divisor below BLOCK."""
    return -(-(1 << 31) // divisor)


def _vector(numel: int, element_size: int) -> int:
    """The largest power of two dividing numel, up to 16 bytes of elements."""
    vec = 16 // element_size
    while numel % vec:
        vec //= 2
    return vec


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
    bias_numel = bias.numel() if bias is not None else 1
    # groups a block of BLOCK_SIZE elements can touch, and the Philox calls covering them
    # from the first group's counter (which may be its call's word 3)
    groups = 2 + (BLOCK_SIZE - 2) // inner
    grid = (triton.cdiv(x.numel(), BLOCK_SIZE),)
    with _launch_device(x):
        _dropout_kernel[grid](
            x, out, seed,
            bias if bias is not None else x,  # unused pointer when HAS_BIAS is False
            residual if residual is not None else x,
            x.numel(), bias_numel, _magic(bias_numel),
            offset, drop_threshold(p), _float64_bits(keep_scale(p)), inner, _magic(inner),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, GROUPED=inner > 1,
            BIAS_SHORT=bias_numel < BLOCK_SIZE, BIAS_VEC=_vector(bias_numel, x.element_size()),
            GROUPS_SHORT=inner < BLOCK_SIZE, GROUP_COUNTERS=triton.next_power_of_2(triton.cdiv(3 + groups, 4)),
            ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
            BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
        )
    return out
