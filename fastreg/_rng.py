"""Where dropout's randomness comes from: seeds, the drop threshold and the scale.

A seed is an int64 tensor on the input's device drawn from torch's default generator
for that device, so `torch.manual_seed` makes fastreg reproducible and consecutive
calls differ. It stays on the device (the kernels read it there): no host sync, and
torch.compile traces the draw like any other random op.
"""

import math

import torch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def new_seed(device: torch.device) -> torch.Tensor:
    return torch.randint(_INT64_MIN, _INT64_MAX, (), dtype=torch.int64, device=device)


def drop_threshold(p: float) -> int:
    """32-bit words below round(p * 2**32) are dropped: P(drop) = p to within 2**-33.

    Same rule as drop_threshold in csrc/include/fastreg/philox.h and
    triton_kernels/dropout.py (a test holds all three to the same masks).
    """
    return math.floor(p * 4294967296.0 + 0.5)


def keep_scale(p: float) -> float:
    """Multiplier of a kept element; 0 when p == 1 (every element is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0
