"""BatchNorm modules: torch's classes (arguments, state_dict, repr, reset_running_stats,
input checks) with fastreg's forward, and SyncBatchNorm over torch.distributed."""

import torch
import torch.distributed as dist

from fastreg import _batch_norm
from fastreg import functional as F


def _forward_arguments(bn, input):
    """torch's _BatchNorm rules: (running_mean, running_var, use batch statistics, momentum).

    momentum=None is a cumulative average over the batches seen; the factor 1 / batches is
    kept a tensor, so torch.compile needs no graph break."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / bn.num_batches_tracked
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.running_mean if track else None), (bn.running_var if track else None), use_batch_stats, factor


class _BatchNormMixin:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = _forward_arguments(self, input)
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                            self.eps)


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    pass


class _RankReductions:
    """The two cross-rank steps of SyncBatchNorm, over one process group."""

    def __init__(self, process_group):
        self.group = process_group

    def sync_stats(self, count, mean, var):
        """Merge every rank's (count, mean, biased var) (Chan's parallel formula): uneven
        batch sizes weigh in by their counts."""
        local = torch.cat([torch.tensor([float(count)], dtype=mean.dtype, device=mean.device), mean, var])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, local, group=self.group)
        stacked = torch.stack(gathered)
        counts, means, variances = stacked[:, :1], stacked[:, 1:1 + mean.numel()], stacked[:, 1 + mean.numel():]
        total = counts.sum()
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over all ranks")
        global_mean = (counts * means).sum(0) / total
        m2 = (counts * (variances + (means - global_mean).pow(2))).sum(0)
        return int(total), global_mean, m2 / total

    def reduce_sums(self, sum_dy, sum_dy_xhat):
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=self.group)
        return both[:sum_dy.numel()], both[sum_dy.numel():]


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on fastreg's kernels, for CPU (gloo) and GPU (NCCL) tensors.

    In training, every rank's statistics are merged through all_gather (so the
    normalization and the running statistics are those of the global batch) and the
    backward sums through all_reduce (so dx is that of BatchNorm over the global batch);
    dweight and dbias stay per rank, to be summed by data parallelism, as in torch.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, use_batch_stats, factor = _forward_arguments(self, input)
        group = None
        if use_batch_stats and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) == 1:
                group = None
        if group is None:  # nothing to synchronize: plain BatchNorm
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                                self.eps)
        ranks = _RankReductions(group)
        return _batch_norm.batch_norm(input, running_mean, running_var, self.weight, self.bias, True, factor,
                                      self.eps, sync_stats=ranks.sync_stats, reduce_sums=ranks.reduce_sums)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every BatchNorm*d in `module` (torch's or fastreg's) replaced by fastreg's
        SyncBatchNorm with the same parameters, buffers, training mode and device."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
