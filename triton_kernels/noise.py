"""Mask-free noise in Triton: Gaussian dropout, additive Gaussian noise, alpha dropout.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

Nothing is stored for backward: every element draws from a counter-based Philox 4x32-10
stream keyed by a 64-bit seed, so backward regenerates the noise from (seed, offset)
alone. The stream is the one of fastreg's dropout and C++ kernels
(csrc/include/fastreg/philox.h), bit for bit:

    position q = offset + i // inner             (i: row-major index of the element)
    words      = philox4x32_10(counter=q // 4, key=seed)

Gaussian noise (inner = 1): element q takes the Box-Muller pair of words (0, 1) or (2, 3)
of its call, the cosine for even q and the sine for odd q, computed in float32 with
integer ops, +, -, *, correctly rounded / and sqrt, and polynomials of this file (no
libdevice log / sin / cos, no FMA: the kernels are compiled with enable_fp_fusion=False),
so the normals equal those of fastreg's C++ kernels bit for bit:

    gaussian_noise(multiplicative=True):   out = x * (1 + std * n)   (Gaussian dropout)
    gaussian_noise(multiplicative=False):  out = x + std * n

Alpha dropout: keep = word q % 4 >= round(p * 2**32), as dropout, and

    out = x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift)
"""

import struct

import torch
import triton
import triton.language as tl

NOISE_BLOCK = 1024  # elements per program: 256 Philox calls, 512 Box-Muller pairs
ALPHA_BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def philox4x32_10(c0, c1, k0, k1):
    """Philox 4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1); all uint32."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
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
def _philox_of_counter(counter, seed_ptr):
    """The four words of the calls at `counter` (int64 >= 0) under the seed at seed_ptr (int64)."""
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    return philox4x32_10(c0, c1, k0, k1)


@triton.jit
def _normal_pair(radius_word, angle_word):
    """(r cos t, r sin t), float32, of two uint32 words: r = sqrt(-2 ln u), t uniform on the circle."""
    # Float32 constants as the exact decimals of their float32 values (see normal.h).
    LN2: tl.constexpr = 0.6931471824645996
    SQRT2: tl.constexpr = 1.4142135381698608
    TWO_POW_M24: tl.constexpr = 5.9604644775390625e-08
    # u = (2k + 1) / 2^24 from the top 23 bits: exact, never 0 or 1; u = 2^e * m, m in [sqrt(1/2), sqrt(2))
    u = ((radius_word >> 9) * 2 + 1).to(tl.int32).to(tl.float32) * TWO_POW_M24
    bits = u.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    halve = m > SQRT2
    m = tl.where(halve, m * 0.5, m)
    e = tl.where(halve, e + 1, e)
    # ln m = 2 atanh(s), s = (m - 1) / (m + 1): series to s^9
    s = tl.math.div_rn(m - 1.0, m + 1.0)
    z = s * s
    series = 0.2857142984867096 + z * 0.2222222238779068
    series = 0.4000000059604645 + z * series
    series = 0.6666666865348816 + z * series
    series = 2.0 + z * series
    log_u = e.to(tl.float32) * LN2 + s * series
    r = tl.math.sqrt_rn(log_u * -2.0)
    # angle = pi/2 * (quadrant + t), t in (-1/2, 1/2) an odd multiple of 2^-24
    quadrant = (angle_word >> 30).to(tl.int32)
    t = ((((angle_word >> 7) & 0x7FFFFF) * 2 + 1).to(tl.int32) - 8388608).to(tl.float32) * TWO_POW_M24
    t2 = t * t
    sin_series = -0.004681753925979137 + t2 * 0.00016044118092395365
    sin_series = 0.07969262450933456 + t2 * sin_series
    sin_series = -0.6459640860557556 + t2 * sin_series
    sin_series = 1.5707963705062866 + t2 * sin_series
    sin_t = t * sin_series
    cos_series = 0.0009192602592520416 + t2 * -2.520204179745633e-05
    cos_series = -0.020863480865955353 + t2 * cos_series
    cos_series = 0.25366950035095215 + t2 * cos_series
    cos_series = -1.2337005138397217 + t2 * cos_series
    cos_t = 1.0 + t2 * cos_series
    swap = (quadrant & 1) == 1
    c = tl.where(swap, sin_t, cos_t)
    sn = tl.where(swap, cos_t, sin_t)
    cos_angle = tl.where((quadrant == 1) | (quadrant == 2), -c, c)
    sin_angle = tl.where(quadrant >= 2, -sn, sn)
    return r * cos_angle, r * sin_angle


@triton.jit
def _float64_of_bits(bits, ACC_DTYPE: tl.constexpr):
    # a float argument arrives as the bits of a float64 (Triton would round it to float32)
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)


@triton.jit
def _gaussian_noise_kernel(
    x_ptr,  # (n_elements,) x's dtype, contiguous
    out_ptr,  # (n_elements,) x's dtype, contiguous
    seed_ptr,  # () int64
    n_elements, offset, std_bits,  # offset: a multiple of 4; std_bits: the float64 std's bits
    MULTIPLICATIVE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit: tensors past 2**31 elements
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n_elements
    counter = (offset + start) // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = _philox_of_counter(counter, seed_ptr)
    cos01, sin01 = _normal_pair(r0, r1)
    cos23, sin23 = _normal_pair(r2, r3)
    # element 4k + j takes cos01, sin01, cos23, sin23 of call k for j = 0, 1, 2, 3
    normal = tl.reshape(tl.join(tl.join(cos01, cos23), tl.join(sin01, sin23)), (BLOCK,))
    noise = _float64_of_bits(std_bits, ACC_DTYPE) * normal.to(ACC_DTYPE)
    v = tl.load(x_ptr + idx, mask=in_bounds).to(ACC_DTYPE)
    if MULTIPLICATIVE:
        v = v * (1.0 + noise)
    else:
        v = v + noise
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _alpha_dropout_kernel(
    x_ptr,  # (n_elements,) x's dtype, contiguous
    out_ptr,  # (n_elements,) x's dtype, contiguous (may be x_ptr)
    seed_ptr,  # () int64
    n_elements, offset, threshold, inner,  # threshold = round(p * 2**32); inner: elements per draw
    scale_bits, keep_shift_bits, drop_shift_bits,  # float64 bits
    GROUPED: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n_elements
    if GROUPED:
        position = offset + idx // inner
        r0, r1, r2, r3 = _philox_of_counter(position // 4, seed_ptr)
        lane = position % 4
        word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    else:
        counter = (offset + start) // 4 + tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = _philox_of_counter(counter, seed_ptr)
        word = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
    keep = word.to(tl.int64) >= threshold
    scale = _float64_of_bits(scale_bits, ACC_DTYPE)
    keep_shift = _float64_of_bits(keep_shift_bits, ACC_DTYPE)
    drop_shift = _float64_of_bits(drop_shift_bits, ACC_DTYPE)
    v = tl.load(x_ptr + idx, mask=in_bounds).to(ACC_DTYPE) * tl.where(keep, scale, 0.0).to(ACC_DTYPE)
    v = v + tl.where(keep, keep_shift, drop_shift).to(ACC_DTYPE)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=in_bounds)


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _acc_dtype(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _check_offset(offset):
    if offset % 4 != 0 or offset < 0:
        raise ValueError(f"offset must be a non-negative multiple of 4, got {offset}")


def gaussian_noise(x, seed, std, multiplicative, offset=0):
    """x * (1 + std * n) (multiplicative) or x + std * n, n the stream's standard normals.

    x:      float16 / bfloat16 / float32 / float64 tensor, any shape, read in row-major
            order (a non-contiguous x is copied first).
    seed:   int64 tensor with one element on x's device (read in the kernel: no host sync).
    std:    float >= 0 (Gaussian dropout of rate p: std = sqrt(p / (1 - p))).
    offset: stream position of element 0, a multiple of 4.

    Returns a new contiguous tensor. The normals are float32 for every dtype; the rest is
    in float32 (float64 for float64 x), rounded once. Saves nothing: the backward of the
    multiplicative form is `gaussian_noise(grad_out, seed, std, True, offset)`, that of
    the additive form grad_out itself.
    """
    _check_offset(offset)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid = (triton.cdiv(x.numel(), NOISE_BLOCK),)
    _gaussian_noise_kernel[grid](
        x, out, seed, x.numel(), offset, _float64_bits(float(std)),
        MULTIPLICATIVE=bool(multiplicative), ACC_DTYPE=_acc_dtype(x), BLOCK=NOISE_BLOCK,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def alpha_dropout(x, seed, p, scale, keep_shift, drop_shift, offset=0, inner=1, out=None):
    """x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift), keep drawn as dropout's.

    x:        float tensor, any shape, read in row-major order (non-contiguous: copied).
    seed:     int64 tensor with one element on x's device.
    p:        drop probability in [0, 1]; keep = word >= round(p * 2**32).
    scale, keep_shift, drop_shift: floats; torch's alpha dropout has, with
              alpha = 1.7580993408473766 and a = 1 / sqrt((alpha^2 p + 1)(1 - p)):
              scale = a, keep_shift = alpha a p, drop_shift = alpha a (p - 1).
    offset:   stream position of element 0, a multiple of 4.
    inner:    elements per draw (feature alpha dropout: the spatial size).
    out:      optional contiguous output, may be x itself (in place).

    Returns out. Saves nothing: backward is alpha_dropout(grad_out, seed, p, scale, 0, 0,
    offset, inner). Arithmetic in float32 (float64 for float64 x): x * scale, then + shift.
    """
    _check_offset(offset)
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    threshold = int(p * 4294967296.0 + 0.5)  # round half up, as the C++ drop_threshold
    grid = (triton.cdiv(x.numel(), ALPHA_BLOCK),)
    _alpha_dropout_kernel[grid](
        x, out, seed, x.numel(), offset, threshold, inner,
        _float64_bits(float(scale)), _float64_bits(float(keep_shift)), _float64_bits(float(drop_shift)),
        GROUPED=inner > 1, ACC_DTYPE=_acc_dtype(x), BLOCK=ALPHA_BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out
