"""GroupNorm (optionally + SiLU) and InstanceNorm on fastreg's two ops gn_fwd / gn_bwd
(csrc/ops.cpp): the autograd Function every backend shares.

Inputs (N, C, *spatial) are handled as 3-D views (N, C, S) in their own memory format
(contiguous or channels_last / channels_last_3d): y and dx come back in x's layout.
"""

import torch

from fastreg._batch_norm import as_ncs
from fastreg._backend import choose_backend
from fastreg.ops.group_norm import GN_BWD, GN_FWD


class _GroupNormFunction(torch.autograd.Function):
    """(y, mean, rstd) with y = silu?((x - mean) * rstd * weight + bias) per (sample, group);
    mean and rstd (N, groups) are not differentiable. Saves x, weight, bias and the
    statistics; backward recomputes the SiLU pre-activation from them."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu, backend):
        y, mean, rstd = GN_FWD[backend](as_ncs(x), weight, bias, groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu, ctx.backend = groups, silu, backend
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients
        return y.view(x.shape), mean, rstd

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if grad_y is None:  # backward reached through mean / rstd alone (gradcheck does)
            grad_y = torch.zeros_like(x)
        grad_x, grad_weight, grad_bias = GN_BWD[ctx.backend](
            as_ncs(grad_y), as_ncs(x), weight, bias, mean, rstd, ctx.groups, ctx.silu)
        return (
            grad_x.view(x.shape) if ctx.needs_input_grad[0] else None,
            grad_weight if weight is not None and ctx.needs_input_grad[1] else None,
            grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None,
        )


def group_norm(x, groups, weight, bias, eps, silu=False):
    """(y, mean, rstd) of GroupNorm over x (N, C, *), arguments already checked."""
    return _GroupNormFunction.apply(x, weight, bias, groups, eps, silu, choose_backend(x.device.type))
