"""BatchNorm modules: torch's classes (arguments, state_dict, repr, reset_running_stats,
input checks) with fastreg's forward, and SyncBatchNorm over torch.distributed."""

import torch
import torch.distributed as dist

from fastreg import _batch_norm
from fastreg import functional as F


def _forward_arguments(bn):
    """torch's _BatchNorm rules: (running_mean, running_var, use batch statistics, momentum,
    batches_tracked). momentum=None is a cumulative average over the batches seen: the
    counter goes to the op (batches_tracked), which reads 1 / batches on the device, so
    neither eager mode synchronizes nor torch.compile breaks the graph."""
    momentum, batches_tracked = (0.0 if bn.momentum is None else bn.momentum), None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            batches_tracked = bn.num_batches_tracked
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.running_mean if track else None), (bn.running_var if track else None), use_batch_stats, momentum, \
        batches_tracked


class _BatchNormMixin:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, momentum, batches_tracked = _forward_arguments(self)
        return F._batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                             self.eps, batches_tracked)


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    pass


def _group_of(process_group):
    """(name, size) of the process group SyncBatchNorm synchronizes over, or None when
    there is nothing to synchronize (no process group, or one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group or dist.group.WORLD
    world = dist.get_world_size(group)
    return (group.group_name, world) if world > 1 else None


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on fastreg's kernels, for CPU (gloo) and GPU (NCCL) tensors.

    In training, every rank's statistics are merged through an all-gather (so the
    normalization and the running statistics are those of the global batch) and the
    backward sums through an all-reduce (so dx is that of BatchNorm over the global batch);
    dweight and dbias stay per rank, to be summed by data parallelism, as in torch. The
    collectives are torch.distributed's functional ones: torch.compile(fullgraph=True)
    traces the module without a graph break.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, use_batch_stats, momentum, batches_tracked = _forward_arguments(self)
        group = _group_of(self.process_group) if use_batch_stats and self.training else None
        if group is None:  # nothing to synchronize: plain BatchNorm
            return F._batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                                 self.eps, batches_tracked)
        return _batch_norm.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, momentum,
                                           self.eps, *group, batches_tracked)

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
