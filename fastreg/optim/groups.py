"""param_groups(model): the usual split into decayed and non-decayed parameters."""

import torch

# torch.nn's normalization layers; fastreg.nn's modules subclass them, so isinstance covers both.
NORM_LAYERS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.RMSNorm,
)


def default_no_decay(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> bool:
    """True for the parameters that are usually not regularized: every parameter of a
    normalization layer, every bias, and any other parameter of fewer than 2 dims (gains,
    scales, temperatures: they set a scale, not a pattern of weights). `name` is the
    parameter's name inside `module`."""
    return isinstance(module, NORM_LAYERS) or name == "bias" or param.dim() < 2


def param_groups(model: torch.nn.Module, weight_decay: float = 1e-2, l1: float = 0.0, max_norm: float | None = None,
                 no_decay=None) -> list[dict]:
    """Two param groups for a fastreg (or torch) optimizer: the regularized parameters, with
    weight_decay, l1 and max_norm, then the excluded ones with weight_decay=0, l1=0 and
    max_norm=None. Both groups are always returned (either may be empty).

    no_decay chooses the excluded parameters: None for `default_no_decay`; a callable
    (module, name, param) -> bool like it; or a collection of full parameter names as
    `model.named_parameters()` gives them. Shared parameters are listed once.
    """
    if no_decay is None:
        excluded = default_no_decay
    elif callable(no_decay):
        excluded = no_decay
    else:
        names = set(no_decay)
        known = {name for name, _ in model.named_parameters()}
        if names - known:
            raise ValueError(f"no_decay names parameters the model does not have: {sorted(names - known)}")

        full_names = {id(p): n for n, p in model.named_parameters()}

        def excluded(module, name, param):
            return full_names[id(param)] in names

    decayed, other, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            (other if excluded(module, name, param) else decayed).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay, "l1": l1, "max_norm": max_norm},
        {"params": other, "weight_decay": 0.0, "l1": 0.0, "max_norm": None},
    ]
