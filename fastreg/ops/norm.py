"""The row norms' ops: norm_fwd / norm_bwd (LayerNorm, RMSNorm, and the fused
dropout + residual add + norm block) on the four backends.

norm_fwd(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h)
  -> (y, h, mean, rstd) over 2-D row-contiguous x; h = residual + dropout(x) when
  residual or seed is given (returned when store_h).
norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh, seed, p)
  -> (dx, dweight, dbias, dropout(dx) when seed is given)
Saved for backward: the norm input (x, or the h the op returned), weight, mean, rstd, and
the seed; the dropout mask is regenerated inside norm_bwd.
"""

import torch

from fastreg import _ext, _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _norm_fwd_fake(x, weight, bias, eps, is_rms, residual=None, seed=None, p=0.0, residual_in_fp32=False,
                   store_h=True):
    M, N = x.shape
    fused = (residual is not None or seed is not None) and store_h
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # statistics: float32, float64 for float64
    h_dtype = acc_dtype if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
    return (
        x.new_empty((M, N)),
        x.new_empty((M, N) if fused else (0,), dtype=h_dtype),
        x.new_empty((0,) if is_rms else (M,), dtype=acc_dtype),
        x.new_empty((M,), dtype=acc_dtype),
    )


def _norm_bwd_fake(dy, x, weight, mean, rstd, is_rms, has_bias, dh=None, seed=None, p=0.0):
    N = x.shape[1]
    w_dtype = weight.dtype if weight is not None else x.dtype
    return (
        x.new_empty(x.shape),
        x.new_empty((N,) if weight is not None else (0,), dtype=w_dtype),
        x.new_empty((N,) if has_bias else (0,), dtype=w_dtype),
        x.new_empty(x.shape if seed is not None else (0,)),
    )


register_fake("norm_fwd", _norm_fwd_fake)
register_fake("norm_bwd", _norm_bwd_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import layer_norm as _kernels

    def _norm_fwd_triton(x, weight, bias, eps, is_rms, residual=None, seed=None, p=0.0, residual_in_fp32=False,
                         store_h=True):
        return _kernels.norm_fwd(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h)

    def _norm_bwd_triton(dy, x, weight, mean, rstd, is_rms, has_bias, dh=None, seed=None, p=0.0):
        return _kernels.norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh, seed, p)

    register_triton("norm_fwd_triton", _norm_fwd_triton, _norm_fwd_fake)
    register_triton("norm_bwd_triton", _norm_bwd_triton, _norm_bwd_fake)

NORM_FWD = op_table("norm_fwd", "norm_fwd_triton", _reference.norm_fwd)
NORM_BWD = op_table("norm_bwd", "norm_bwd_triton", None)  # the torch backend is differentiated by autograd


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h = inputs
    y, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output (h, when not prenorm) gets no zeros to read
    ctx.y_dtype = y.dtype
    ctx.fused = residual is not None or seed is not None
    # h not stored (an inference call, differentiated anyway): keep x and residual, and
    # recompute h in backward
    ctx.recompute_h = ctx.fused and not store_h
    ctx.eps, ctx.residual_in_fp32 = eps, residual_in_fp32
    norm_input = x if not ctx.fused or ctx.recompute_h else h
    ctx.save_for_backward(norm_input, weight, mean, rstd, seed, residual if ctx.recompute_h else None)
    ctx.is_rms, ctx.p, ctx.has_bias = is_rms, p, bias is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _backward_of(norm_fwd_op, norm_bwd_op):
    def backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
        norm_input, weight, mean, rstd, seed, residual = ctx.saved_tensors
        if ctx.recompute_h:
            norm_input = norm_fwd_op(norm_input, weight, None, ctx.eps, ctx.is_rms, residual, seed, ctx.p,
                                     ctx.residual_in_fp32, True)[1]
        if grad_y is None:  # only h was used
            grad_y = torch.zeros(norm_input.shape, dtype=ctx.y_dtype, device=norm_input.device)
        # grad_h is None when h went unused (or was not returned)
        grad_h = grad_h if ctx.fused and not ctx.recompute_h else None
        grad_input, grad_weight, grad_bias, grad_input_dropped = norm_bwd_op(
            grad_y, norm_input, weight, mean, rstd, ctx.is_rms, ctx.has_bias, grad_h, seed, ctx.p,
        )
        grad_x, grad_residual = grad_input, None
        if ctx.fused:
            if ctx.residual_dtype is not None:
                grad_residual = grad_input.to(ctx.residual_dtype)
            if seed is not None:  # through the dropout, in the same pass: forward's mask, regenerated
                grad_x = grad_input_dropped
            grad_x = grad_x.to(ctx.x_dtype)
        return (
            grad_x,
            grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None,
            None, None, grad_residual, None, None, None, None,
        )

    return backward


for _fwd, _bwd in (("norm_fwd", "norm_bwd"), ("norm_fwd_triton", "norm_bwd_triton")):
    if _ext.defines(_fwd):
        torch.library.register_autograd(
            f"fastreg::{_fwd}",
            _backward_of(getattr(torch.ops.fastreg, _fwd).default, getattr(torch.ops.fastreg, _bwd).default),
            setup_context=_setup_context,
        )
