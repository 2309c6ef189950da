"""Noise modules: Gaussian dropout and additive Gaussian noise (fastreg's own modules), and
torch's AlphaDropout / FeatureAlphaDropout with a mask-free forward (subclasses: constructor,
attributes, repr and state_dict are torch's, so `fastreg.convert` swaps them in place).
"""

import torch

from fastreg import functional as F


class GaussianDropout(torch.nn.Module):
    """In training, multiply each element by 1 + sqrt(p / (1 - p)) * n, n ~ N(0, 1): noise of
    mean 1 and variance p / (1 - p), the variance of dropout with rate p. The identity in eval."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if p < 0.0 or p >= 1.0:
            raise ValueError(f"gaussian dropout probability has to be in [0, 1), but got {p}")
        self.p = p

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gaussian_dropout(input, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GaussianNoise(torch.nn.Module):
    """In training, add std * n to each element, n ~ N(0, 1). The identity in eval."""

    def __init__(self, std: float) -> None:
        super().__init__()
        if std < 0.0:
            raise ValueError(f"gaussian_noise: std must be non-negative, but got {std}")
        self.std = std

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gaussian_noise(input, self.std, self.training)

    def extra_repr(self) -> str:
        return f"std={self.std}"


class AlphaDropout(torch.nn.AlphaDropout):
    # torch's forward passes no `inplace` either
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.alpha_dropout(input, self.p, self.training)


class FeatureAlphaDropout(torch.nn.FeatureAlphaDropout):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.feature_alpha_dropout(input, self.p, self.training)
