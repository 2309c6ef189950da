"""The DropBlock family's ops on the four backends: drop_block (y, mask, scale), drop_block_
(in place, no autograd) and drop_block_apply (x * keep * scale for a stored mask: the
backward).

Autograd (csrc/autograd/drop_block.cpp, for the C++ ops and their Triton twins): saves the
bit-packed mask (1 bit per element) and the float64 scale; backward is drop_block_apply on
the gradient, laid out as forward's x.
"""

import math

import torch

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _drop_block_fake(x, seed, gamma, block_size, eps, shared_mask=False):
    channels_last = _reference.drop_block_channels_last(x)
    n, c = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    rows, row_length = (n, c * spatial) if channels_last else (n * c, spatial)
    layout = (torch.channels_last if x.dim() == 4 else torch.channels_last_3d) if channels_last else torch.contiguous_format
    y = torch.empty_like(x, memory_format=layout)
    mask = x.new_empty((rows, (row_length + 7) // 8), dtype=torch.uint8)
    return y, mask, x.new_empty((), dtype=torch.float64)


def _drop_block_inplace_fake(x, seed, gamma, block_size, eps, shared_mask=False):
    return None


def _drop_block_apply_fake(x, mask, scale):
    return torch.empty_like(x)  # x is dense: its strides


register_fake("drop_block", _drop_block_fake)
register_fake("drop_block_", _drop_block_inplace_fake)
register_fake("drop_block_apply", _drop_block_apply_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import drop_block as _kernels

    def _drop_block_triton(x, seed, gamma, block_size, eps, shared_mask=False):
        return _kernels.drop_block(x, seed, gamma, block_size, eps, shared_mask)

    def _drop_block_triton_(x, seed, gamma, block_size, eps, shared_mask=False):
        if not (x.is_contiguous() or _kernels.channels_last(x)):
            raise RuntimeError("fastreg::drop_block_: 'x' must be contiguous or channels-last")
        _kernels.drop_block(x, seed, gamma, block_size, eps, shared_mask, out=x)

    def _drop_block_apply_triton(x, mask, scale):
        return _kernels.drop_block_apply(x, mask, scale)

    register_triton("drop_block_triton", _drop_block_triton, _drop_block_fake)
    register_triton("drop_block_triton_", _drop_block_triton_, _drop_block_inplace_fake)
    register_triton("drop_block_apply_triton", _drop_block_apply_triton, _drop_block_apply_fake)

DROP_BLOCK = op_table("drop_block", "drop_block_triton", _reference.drop_block)
DROP_BLOCK_ = op_table("drop_block_", "drop_block_triton_", None)  # the torch backend never runs in place
DROP_BLOCK_APPLY = op_table("drop_block_apply", "drop_block_apply_triton", _reference.drop_block_apply)
