"""Drop-in replacements for torch.optim.SGD, Adam and AdamW on fastreg's multi-tensor
step kernels, with per-group L1 (proximal), max-norm and float32 master weights.

    opt = fastreg.optim.AdamW(fastreg.optim.param_groups(model, weight_decay=0.1), lr=1e-3)
"""

from fastreg.optim.groups import NORM_LAYERS, default_no_decay, param_groups
from fastreg.optim.optimizers import SGD, Adam, AdamW

__all__ = ["NORM_LAYERS", "SGD", "Adam", "AdamW", "default_no_decay", "param_groups"]
