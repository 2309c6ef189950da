"""BatchNorm on fastreg's four ops (bn_stats, bn_apply, bn_bwd_reduce, bn_bwd_apply; see
csrc/ops.cpp): the autograd Function, the running-statistics update, and the hooks
SyncBatchNorm uses to reduce across ranks between the steps.

Inputs (N, C, *spatial) are handled as 3-D views (N, C, S) in their own memory format
(contiguous or channels_last / channels_last_3d): no transposing copies, and y and dx
come back in x's layout.
"""

import math

import torch

from fastreg.ops.batch_norm import BN_APPLY, BN_BWD_APPLY, BN_BWD_REDUCE, BN_STATS
from fastreg._backend import choose_backend


def as_ncs(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S), a view in either memory format."""
    return t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)


class _BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, where mean and var are the batch
    statistics (`training`, summed over `count` values, gradients flowing through them)
    or fixed ones. `reduce_sums` (SyncBatchNorm) all-reduces backward's two sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, training, count, backend, reduce_sums):
        y = BN_APPLY[backend](as_ncs(x), mean, var, weight, bias, eps).view(x.shape)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.training, ctx.count, ctx.backend, ctx.reduce_sums = eps, training, count, backend, reduce_sums
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, var = ctx.saved_tensors
        x3, dy3 = as_ncs(x), as_ncs(grad_y)
        sum_dy, sum_dy_xhat = BN_BWD_REDUCE[ctx.backend](dy3, x3, mean, var, ctx.eps)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype if weight is not None else x.dtype) if ctx.has_bias else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                if ctx.reduce_sums is not None:  # the whole batch's sums, across ranks
                    sum_dy, sum_dy_xhat = ctx.reduce_sums(sum_dy, sum_dy_xhat)
                grad_x = BN_BWD_APPLY[ctx.backend](
                    dy3, x3, mean, var, weight, ctx.eps, sum_dy, sum_dy_xhat, ctx.count)
            else:
                grad_x = BN_BWD_APPLY[ctx.backend](dy3, x3, mean, var, weight, ctx.eps)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, sync_stats=None,
               reduce_sums=None):
    """torch.nn.functional.batch_norm on fastreg's ops.

    sync_stats(count, mean, var) -> (count, mean, var) and reduce_sums(sum_dy, sum_dy_xhat)
    let SyncBatchNorm merge statistics and gradient sums across ranks.
    """
    backend = choose_backend(x.device.type)
    if training:
        count = x.shape[0] * math.prod(x.shape[2:])
        mean, var = BN_STATS[backend](as_ncs(x.detach()))
        if sync_stats is not None:
            count, mean, var = sync_stats(count, mean, var)
        with torch.no_grad():  # torch's update, term for term
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype) * momentum)
            if running_var is not None:  # the unbiased variance, as torch keeps
                unbiased = var * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)
    else:
        count = 0
        acc = torch.promote_types(x.dtype, torch.float32)
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
    return _BatchNormFunction.apply(x, weight, bias, mean, var, eps, training, count, backend, reduce_sums)
