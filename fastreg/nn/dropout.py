"""Dropout modules: torch's classes with a mask-free forward.

Constructor, attributes, repr and state_dict are torch's own, so these are drop-ins
(`isinstance(m, torch.nn.Dropout)` holds).
"""

import torch

from fastreg import functional as F


class Dropout(torch.nn.Dropout):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(torch.nn.Dropout1d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(torch.nn.Dropout3d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)


class DropPath(torch.nn.Module):
    """Stochastic depth: in training, zero each sample (dim 0) with probability p and
    scale the survivors by 1 / (1 - p); the identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if p < 0.0 or p > 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.drop_path(input, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
