"""Drop-in replacements for torch.nn modules (subclasses overriding forward only)."""

from fastreg.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from fastreg.nn.drop_block import DropBlock2d, DropBlock3d
from fastreg.nn.dropout import DropPath, Dropout, Dropout1d, Dropout2d, Dropout3d
from fastreg.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from fastreg.nn.noise import AlphaDropout, FeatureAlphaDropout, GaussianDropout, GaussianNoise
from fastreg.nn.loss import CrossEntropyLoss
from fastreg.nn.normalization import (DropoutAddLayerNorm, DropoutAddRMSNorm, GroupNorm, GroupNormSiLU, LayerNorm,
                                      RMSNorm)

__all__ = [
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "DropPath",
    "LayerNorm", "RMSNorm", "DropoutAddLayerNorm", "DropoutAddRMSNorm",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "GroupNorm", "GroupNormSiLU", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GaussianDropout", "GaussianNoise", "AlphaDropout", "FeatureAlphaDropout", "DropBlock2d", "DropBlock3d",
    "CrossEntropyLoss",
]
try:  # torch 2.13 and later
    from fastreg.nn.loss import LinearCrossEntropyLoss  # noqa: F401

    __all__.append("LinearCrossEntropyLoss")
except ImportError:
    pass
