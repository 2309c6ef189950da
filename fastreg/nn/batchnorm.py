"""BatchNorm modules: torch's classes (arguments, state_dict, repr, reset_running_stats,
input checks) with fastreg's forward."""

import torch

from fastreg import functional as F


class _BatchNormMixin:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # torch's rules: momentum=None is a cumulative average over the batches seen (a
        # tensor factor here, 1 / batches, so torch.compile needs no graph break)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, use_batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    pass
