"""SyncBatchNorm's BatchNorm: the four step ops (bn_stats, bn_apply, bn_bwd_reduce,
bn_bwd_apply; see csrc/ops.cpp) with the collectives between them, written with
torch.distributed's functional collectives so that torch.compile(fullgraph=True) traces
them (plain BatchNorm is one bn_fwd call: fastreg/functional.py).

In training, every rank's (count, mean, biased var) is all-gathered and merged by count
(so the normalization and the running statistics are those of the global batch); in
backward the two per-channel sums are all-reduced (so dx is that of BatchNorm over the
global batch). dweight and dbias stay per rank, to be summed by data parallelism, as in
torch.

Inputs (N, C, *spatial) are handled as 3-D views (N, C, S) in their own memory format
(contiguous or channels_last / channels_last_3d): no transposing copies, and y and dx
come back in x's layout.
"""

import torch

from fastreg._backend import choose_backend
from fastreg.ops.batch_norm import BN_APPLY, BN_BWD_APPLY, BN_BWD_REDUCE, BN_STATS


def as_ncs(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S), a view in either memory format."""
    return t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)


def _all_gather(t: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """(world, *t.shape): every rank's t, in rank order."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_tensor(t, 0, group_name)).view(world, *t.shape)


def _all_reduce(t: torch.Tensor, group_name: str) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group_name))


class _SyncApply(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the global batch's mean and var
    (of `total` values, a tensor); backward all-reduces its two sums before dx."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, total, eps, group_name, backend):
        y = BN_APPLY[backend](as_ncs(x), mean, var, weight, bias, eps).view_as(x)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps, ctx.group_name, ctx.backend, ctx.has_bias = eps, group_name, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, var, total = ctx.saved_tensors
        x3, dy3 = as_ncs(x), as_ncs(grad_y)
        sum_dy, sum_dy_xhat = BN_BWD_REDUCE[ctx.backend](dy3, x3, mean, var, ctx.eps)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype if weight is not None else x.dtype) if ctx.has_bias else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = _all_reduce(torch.cat([sum_dy, sum_dy_xhat]), ctx.group_name) / total
            channels = sum_dy.numel()
            # the sums divided by the global count: bn_bwd_apply's count is then 1
            grad_x = BN_BWD_APPLY[ctx.backend](dy3, x3, mean, var, weight, ctx.eps, both[:channels],
                                               both[channels:], 1).view_as(x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group_name: str, world: int,
                    batches_tracked=None):
    """BatchNorm in training over the batch of all `world` ranks of the process group named
    `group_name`; the running statistics (when given) take torch's update with the global
    statistics (momentum replaced by 1 / batches_tracked when that is given)."""
    backend = choose_backend(x.device.type)
    x3 = as_ncs(x.detach())
    mean, var = BN_STATS[backend](x3)
    count = torch.full((1,), x3.shape[0] * x3.shape[2], dtype=mean.dtype, device=mean.device)
    gathered = _all_gather(torch.cat([count, mean, var]), group_name, world)  # (world, 1 + 2C)
    channels = mean.numel()
    counts, means, variances = gathered[:, :1], gathered[:, 1:1 + channels], gathered[:, 1 + channels:]
    total = counts.sum()
    if not torch.compiler.is_compiling() and total <= 1:  # a data-dependent check: eager only
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over all ranks")
    # Chan's parallel formula: uneven batch sizes weigh in by their counts
    global_mean = (counts * means).sum(0) / total
    global_var = (counts * (variances + (means - global_mean).pow(2))).sum(0) / total
    if running_mean is not None:
        with torch.no_grad():  # torch's update, term for term
            factor = 1.0 / batches_tracked if batches_tracked is not None else momentum
            running_mean.mul_(1 - factor).add_(global_mean.to(running_mean.dtype) * factor)
            unbiased = global_var * (total / (total - 1).clamp_min(1))
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype) * factor)
    return _SyncApply.apply(x, weight, bias, global_mean, global_var, total, eps, group_name, backend)
