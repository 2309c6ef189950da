"""DropBlock in Triton (torchvision's drop_block2d / drop_block3d semantics).

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

x is (N, C, *spatial), 2 or 3 spatial dims, seen as (N, C, D, H, W) with D = 1 in 2-D.
Seeds are Bernoulli(gamma) draws on the grid (planes, D - bd + 1, H - bs + 1, W - bs + 1)
(bd = bs in 3-D, 1 in 2-D; a plane is (n, c), or n with shared_mask=True), grid point g
drawing word g % 4 of Philox 4x32-10 call g // 4 under the seed (the stream of fastreg's
dropout, bit for bit), a seed when the word is below round(gamma * 2**32). A seed at grid
point s drops the block [s, s + block) of its plane, wholly inside it: torchvision's
placement. Then

    y = x * keep * scale,   scale = numel / (eps + number of kept elements)  (whole tensor)

The launch sequence: seeds (one byte per grid point), sliding ORs along W, H (and D) that
widen seeds into blocks, a pass that packs the keep bits in x's memory order and counts them
per program, the scale from the counts (torch ops on the device: no host sync), and the
multiply. The mask is returned (1 bit per element) for backward, which is
`drop_block_apply(grad_out, mask, scale)`.

Mask layout: one row per plane (contiguous x: (n, c) rows of D*H*W elements) or per sample
(channels-last x: n rows of D*H*W*C elements), each padded to whole bytes; bit j of byte k
of a row is element 8k + j of the row in memory order.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements (or bytes) per program
PACK_BYTES = 128  # mask bytes per program of the pack kernel (1024 elements)
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
def _seeds_kernel(
    seeds_ptr,  # (n_points,) uint8: 1 where the grid point is a seed
    seed_ptr,  # () int64
    n_points, threshold,  # threshold = round(gamma * 2**32)
    BLOCK: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    counter = start // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = philox4x32_10((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
    word = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))  # point 4k + j: word j of call k
    idx = start + tl.arange(0, BLOCK)
    tl.store(seeds_ptr + idx, (word.to(tl.int64) < threshold).to(tl.uint8), mask=idx < n_points)


@triton.jit
def _sliding_or_kernel(
    in_ptr,  # (rows, in_length * inner) uint8
    out_ptr,  # (rows, out_length * inner) uint8
    in_length, out_length, inner, block,
    BLOCK: tl.constexpr,
):
    """out[r, a, i] = OR of in[r, a - k, i] over k < block with 0 <= a - k < in_length."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a = t // inner
    i = t % inner
    in_bounds = t < out_length * inner
    acc = tl.zeros((BLOCK,), dtype=tl.uint8)
    for k in range(0, block):
        source = a - k
        valid = in_bounds & (source >= 0) & (source < in_length)
        acc = acc | tl.load(in_ptr + row * in_length * inner + source * inner + i, mask=valid, other=0)
    tl.store(out_ptr + row * out_length * inner + t, acc, mask=in_bounds)


@triton.jit
def _pack_kernel(
    drop_ptr,  # (planes, D*H*W) uint8, 1 = dropped
    mask_ptr,  # (rows, row_bytes) uint8: keep bits in x's memory order
    kept_ptr,  # (programs,) int64: kept elements per program
    n_bytes, row_bytes, row_length, channels, spatial,
    CHANNELS_LAST: tl.constexpr, SHARED: tl.constexpr, BYTES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # mask byte
    row = b // row_bytes
    e = (b % row_bytes)[:, None] * 8 + tl.arange(0, 8)[None, :]  # (BYTES, 8) elements of the row
    valid = (b < n_bytes)[:, None] & (e < row_length)
    if CHANNELS_LAST:  # row = sample n, element e = s * C + c
        n = row[:, None]
        s = e // channels
        c = e % channels
    else:  # row = (n, c), element e = s
        n = (row // channels)[:, None]
        s = e
        c = (row % channels)[:, None]
    plane = n if SHARED else n * channels + c
    drop = tl.load(drop_ptr + plane * spatial + s, mask=valid, other=1)
    keep = (drop == 0) & valid
    byte = tl.sum(keep.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
    tl.store(mask_ptr + b, byte.to(tl.uint8), mask=b < n_bytes)
    tl.store(kept_ptr + tl.program_id(0), tl.sum(tl.sum(keep.to(tl.int64), axis=1), axis=0))


@triton.jit
def _apply_kernel(
    x_ptr,  # (numel,) x's memory, dense
    out_ptr,  # (numel,) out's memory, x's strides (may be x_ptr)
    mask_ptr,  # (rows, row_bytes) uint8
    scale_ptr,  # () float64
    numel, row_length, row_bytes,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < numel
    row = idx // row_length
    e = idx % row_length
    byte = tl.load(mask_ptr + row * row_bytes + e // 8, mask=in_bounds, other=0).to(tl.int32)
    keep = ((byte >> (e % 8).to(tl.int32)) & 1) != 0
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    v = tl.load(x_ptr + idx, mask=in_bounds).to(ACC_DTYPE) * tl.where(keep, scale, 0.0).to(ACC_DTYPE)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=in_bounds)


def channels_last(x) -> bool:
    """x dense in the channels_last(_3d) order and not also contiguous (then the orders differ)."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _sliding_or(src, rows, in_length, out_length, inner, block):
    out = torch.empty(rows * out_length * inner, dtype=torch.uint8, device=src.device)
    if out.numel() > 0:
        grid = (rows, triton.cdiv(out_length * inner, BLOCK_SIZE))
        _sliding_or_kernel[grid](src, out, in_length, out_length, inner, block, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return out


def _acc_dtype(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def drop_block_apply(x, mask, scale, out=None):
    """x * keep * scale for the mask and scale `drop_block` returned (its backward on a
    gradient): x must be dense in the memory order of that call's x. Returns out (new,
    with x's strides, unless given; may be x)."""
    if out is None:
        out = torch.empty_like(x)
    rows = mask.shape[0]
    if x.numel() == 0 or rows == 0:
        return out
    row_length = x.numel() // rows
    grid = (triton.cdiv(x.numel(), BLOCK_SIZE),)
    _apply_kernel[grid](x, out, mask, scale, x.numel(), row_length, mask.shape[1],
                        ACC_DTYPE=_acc_dtype(x), BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return out


def drop_block(x, seed, gamma, block_size, eps=1e-6, shared_mask=False, out=None):
    """(y, mask, scale): DropBlock of x with seed probability gamma and blocks of block_size.

    x:           float16 / bfloat16 / float32 / float64, (N, C, H, W) or (N, C, D, H, W);
                 contiguous or channels-last (other layouts are copied to contiguous).
    seed:        int64 tensor with one element on x's device.
    gamma:       seed probability in [0, 1] (torchvision's: p * spatial numel /
                 (block_size^dims * seed grid numel)).
    block_size:  in [1, smallest spatial size].
    eps:         added to the kept count in the scale.
    shared_mask: one mask per sample shared by all channels (timm's couple_channels).
    out:         optional output with x's layout, may be x (in place).

    Returns y (x's layout), mask (uint8 bits, see the module docstring) and scale (float64
    scalar tensor, numel / (eps + kept)). Arithmetic in float32 (float64 for float64 x).
    """
    is_channels_last = channels_last(x)
    if not is_channels_last:
        x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    three_d = x.dim() == 5
    n, c = x.shape[:2]
    depth = x.shape[2] if three_d else 1
    height, width = x.shape[-2:]
    block_depth = block_size if three_d else 1
    grid_d, grid_h, grid_w = depth - block_depth + 1, height - block_size + 1, width - block_size + 1
    planes = n if shared_mask else n * c
    spatial = depth * height * width
    rows, row_length = (n, c * spatial) if is_channels_last else (n * c, spatial)
    row_bytes = (row_length + 7) // 8
    mask = torch.empty((rows, row_bytes), dtype=torch.uint8, device=x.device)
    if x.numel() == 0:
        kept = torch.zeros((), dtype=torch.int64, device=x.device)
    else:
        n_points = planes * grid_d * grid_h * grid_w
        seeds = torch.empty(n_points, dtype=torch.uint8, device=x.device)
        threshold = int(gamma * 4294967296.0 + 0.5)  # round half up, as the C++ drop_threshold
        _seeds_kernel[(triton.cdiv(n_points, BLOCK_SIZE),)](seeds, seed, n_points, threshold, BLOCK=BLOCK_SIZE,
                                                             num_warps=NUM_WARPS)
        drop = _sliding_or(seeds, planes * grid_d * grid_h, grid_w, width, 1, block_size)
        drop = _sliding_or(drop, planes * grid_d, grid_h, height, width, block_size)
        if three_d:
            drop = _sliding_or(drop, planes, grid_d, depth, height * width, block_depth)
        programs = triton.cdiv(mask.numel(), PACK_BYTES)
        kept_per_program = torch.empty(programs, dtype=torch.int64, device=x.device)
        _pack_kernel[(programs,)](drop, mask, kept_per_program, mask.numel(), row_bytes, row_length, c, spatial,
                                  CHANNELS_LAST=is_channels_last, SHARED=bool(shared_mask), BYTES=PACK_BYTES,
                                  num_warps=NUM_WARPS)
        kept = kept_per_program.sum()  # integers: exact in any order
    # numel / (eps + kept) in float64, as the C++ kernels
    scale = torch.full((), float(x.numel()), dtype=torch.float64, device=x.device) / (eps + kept.to(torch.float64))
    drop_block_apply(x, mask, scale, out=out)
    return out, mask, scale
