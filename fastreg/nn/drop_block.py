"""DropBlock modules with torchvision's constructor, attributes and repr
(torchvision.ops.DropBlock2d / DropBlock3d), without importing torchvision."""

import torch

from fastreg import functional as F


class DropBlock2d(torch.nn.Module):
    """See fastreg.functional.drop_block2d. shared_mask=True: one mask per sample for all
    its channels (timm's couple_channels)."""

    def __init__(self, p: float, block_size: int, inplace: bool = False, eps: float = 1e-06, *,
                 shared_mask: bool = False) -> None:
        super().__init__()
        self.p = p
        self.block_size = block_size
        self.inplace = inplace
        self.eps = eps
        self.shared_mask = shared_mask

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.drop_block2d(input, self.p, self.block_size, self.inplace, self.eps, self.training,
                              shared_mask=self.shared_mask)

    def __repr__(self) -> str:
        shared = ", shared_mask=True" if self.shared_mask else ""
        return f"{self.__class__.__name__}(p={self.p}, block_size={self.block_size}, inplace={self.inplace}{shared})"


class DropBlock3d(DropBlock2d):
    """See fastreg.functional.drop_block3d."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.drop_block3d(input, self.p, self.block_size, self.inplace, self.eps, self.training,
                              shared_mask=self.shared_mask)
