"""Losses: drop-in subclasses of torch's that override forward only (fastreg.convert swaps
them only when asked, by its include=)."""

import torch

from fastreg import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on fastreg.functional.cross_entropy (the gradient of the
    logits computed in the forward's pass over them)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # torch 2.13 and later

    class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
        """torch.nn.LinearCrossEntropyLoss on fastreg.functional.linear_cross_entropy (the
        logits never held whole; `options` ignored)."""

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
            linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                           if self.linear.bias is not None else None)
            return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                          reduction=self.reduction, ignore_index=self.ignore_index,
                                          label_smoothing=self.label_smoothing, options=self.options)
