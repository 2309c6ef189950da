"""The dropout family's ops: dropout (out of place, with optional bias and residual) and
dropout_ (in place), on the four backends.

dropout(x, seed, p, offset, inner, bias, residual) -> residual + (x + bias) * mask * scale
Saved for backward: the seed tensor (one int64) and the scalars, never a mask; backward is
the same op on the incoming gradient (the mask regenerated from the seed).
"""

import torch

from fastreg import _ext, _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _dropout_fake(x, seed, p, offset=0, inner=1, bias=None, residual=None):
    return x.new_empty(x.shape)  # contiguous, like the kernels' output


def _dropout_inplace_fake(x, seed, p, offset=0, inner=1):
    return None


register_fake("dropout", _dropout_fake)
register_fake("dropout_", _dropout_inplace_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import dropout as _kernels

    def _dropout_triton(x, seed, p, offset=0, inner=1, bias=None, residual=None):
        return _kernels.dropout(x, seed, p, offset, inner, bias, residual)

    def _dropout_triton_(x, seed, p, offset=0, inner=1):
        _kernels.dropout(x, seed, p, offset, inner, out=x)

    register_triton("dropout_triton", _dropout_triton, _dropout_fake)
    register_triton("dropout_triton_", _dropout_triton_, _dropout_inplace_fake)

DROPOUT = op_table("dropout", "dropout_triton", _reference.dropout)
DROPOUT_ = op_table("dropout_", "dropout_triton_", None)  # the torch backend never runs in place


def _setup_context(ctx, inputs, output):
    x, seed, p, offset, inner, bias, residual = inputs
    ctx.save_for_backward(seed)
    ctx.p, ctx.offset, ctx.inner = p, offset, inner
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _backward_of(dropout_op):
    def backward(ctx, grad_out):
        (seed,) = ctx.saved_tensors
        # The same kernel regenerates the mask: d(out)/dx = mask * scale.
        grad_x = dropout_op(grad_out, seed, ctx.p, ctx.offset, ctx.inner)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[5]:
            # summed over rows in fp32 (fp64 for fp64), no atomics: deterministic
            accumulate = torch.promote_types(grad_x.dtype, torch.float32)
            grad_bias = grad_x.reshape(-1, grad_x.shape[-1]).sum(0, dtype=accumulate).to(grad_x.dtype)
        grad_residual = grad_out if ctx.has_residual else None
        return grad_x, None, None, None, None, grad_bias, grad_residual

    return backward


for _name in ("dropout", "dropout_triton"):
    if _ext.defines(_name):
        _op = getattr(torch.ops.fastreg, _name).default
        torch.library.register_autograd(f"fastreg::{_name}", _backward_of(_op), setup_context=_setup_context)
