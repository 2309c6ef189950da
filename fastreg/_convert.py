"""fastreg.convert(model): swap torch's regularization and normalization modules for fastreg's.

fastreg's modules subclass torch's and override `forward` only (no `__init__`, no state
of their own), so a module is converted by changing its class in place: its parameters,
buffers, hooks, training mode, device, dtype and state_dict keys stay exactly what they
were, and an optimizer built before the conversion keeps working.
"""

import logging
from collections import Counter
from typing import Callable, Iterable

import torch

from fastreg import nn as fastreg_nn

_log = logging.getLogger("fastreg")

# torch class -> name of its drop-in in fastreg.nn (exact types only: a user's subclass
# may override forward itself, so it is left alone)
_DROP_INS = {
    torch.nn.Dropout: "Dropout",
    torch.nn.Dropout1d: "Dropout1d",
    torch.nn.Dropout2d: "Dropout2d",
    torch.nn.Dropout3d: "Dropout3d",
    torch.nn.AlphaDropout: "AlphaDropout",
    torch.nn.FeatureAlphaDropout: "FeatureAlphaDropout",
    torch.nn.BatchNorm1d: "BatchNorm1d",
    torch.nn.BatchNorm2d: "BatchNorm2d",
    torch.nn.BatchNorm3d: "BatchNorm3d",
    torch.nn.SyncBatchNorm: "SyncBatchNorm",
    torch.nn.LayerNorm: "LayerNorm",
    torch.nn.RMSNorm: "RMSNorm",
    torch.nn.GroupNorm: "GroupNorm",
    torch.nn.InstanceNorm1d: "InstanceNorm1d",
    torch.nn.InstanceNorm2d: "InstanceNorm2d",
    torch.nn.InstanceNorm3d: "InstanceNorm3d",
}
# drop-ins swapped only when include= selects them: a loss is not a layer of the model, and
# swapping it changes what a training script computes (its kernels, not its values)
_OPT_IN = {torch.nn.CrossEntropyLoss: "CrossEntropyLoss"}
if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # torch 2.13 and later
    _OPT_IN[torch.nn.LinearCrossEntropyLoss] = "LinearCrossEntropyLoss"

Selector = Iterable[str | type] | Callable[[str, torch.nn.Module], bool] | None


def drop_in_for(module_type: type) -> type | None:
    """fastreg's drop-in for exactly `module_type`, or None."""
    name = _DROP_INS.get(module_type) or _OPT_IN.get(module_type)
    replacement = getattr(fastreg_nn, name, None) if name is not None else None
    if replacement is None:
        return None
    # a class swap is only sound for a subclass with torch's constructor and state
    if not issubclass(replacement, module_type) or "__init__" in vars(replacement):
        raise AssertionError(f"fastreg.nn.{name} is not a forward-only subclass of {module_type.__name__}")
    return replacement


def _matches(selector: Selector, name: str, module: torch.nn.Module) -> bool:
    """Whether `selector` (names, type names, types, or a predicate) selects the module at `name`."""
    if callable(selector) and not isinstance(selector, type):
        return bool(selector(name, module))
    for item in selector:
        if isinstance(item, type):
            if type(module) is item:
                return True
        elif item == name or item == type(module).__name__ or name.startswith(item + "."):
            return True
    return False


def convert(model: torch.nn.Module, include: Selector = None, exclude: Selector = None,
            verbose: bool = True) -> torch.nn.Module:
    """Replace, in place, every torch.nn Dropout*, AlphaDropout, FeatureAlphaDropout, BatchNorm*,
    SyncBatchNorm, LayerNorm, RMSNorm, GroupNorm and InstanceNorm* module of `model` (exact
    types) with fastreg's; CrossEntropyLoss and LinearCrossEntropyLoss only when `include`
    selects them.

    include / exclude: module names as in `model.named_modules()` (a name also selects
    the modules under it), class names ("Dropout"), classes, or a predicate
    `(name, module) -> bool`. A module is converted if it is included (everything, when
    include is None) and not excluded. Returns `model`; what was replaced is logged to
    the "fastreg" logger and, when verbose, printed as one line.
    """
    replaced = Counter()
    for name, module in model.named_modules():
        replacement = drop_in_for(type(module))
        if replacement is None:
            continue
        if include is not None and not _matches(include, name, module):
            continue
        if include is None and type(module) in _OPT_IN:
            continue
        if exclude is not None and _matches(exclude, name, module):
            continue
        replaced[type(module).__name__] += 1
        module.__class__ = replacement
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(replaced.items())) or "nothing"
    _log.info("fastreg.convert replaced %s", summary)
    if verbose:
        print(f"fastreg.convert: replaced {summary}")
    return model
