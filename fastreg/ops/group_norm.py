"""GroupNorm's two ops on the four backends (InstanceNorm is GroupNorm with one group per
channel).

gn_fwd(x, weight, bias, groups, eps, silu) -> (y, mean, rstd) over x (N, C, S) of any
strides, y in x's layout, mean / rstd (N, groups) in float32 (float64 for float64 x).
gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu) -> (dx, dweight, dbias).
No autograd of their own: fastreg/_group_norm.py composes them in an autograd.Function.
Saved for backward: x, weight, bias, mean, rstd; the SiLU pre-activation is recomputed.
"""

import torch

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _gn_fwd_fake(x, weight, bias, groups, eps, silu):
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.empty_like(x), x.new_empty((x.shape[0], groups), dtype=acc), x.new_empty((x.shape[0], groups), dtype=acc)


def _gn_bwd_fake(dy, x, weight, bias, mean, rstd, groups, silu):
    def param_grad(param):
        return x.new_empty((x.shape[1],) if param is not None else (0,), dtype=param.dtype if param is not None else x.dtype)

    return torch.empty_like(x), param_grad(weight), param_grad(bias)


register_fake("gn_fwd", _gn_fwd_fake)
register_fake("gn_bwd", _gn_bwd_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import group_norm as _kernels

    register_triton("gn_fwd_triton", _kernels.gn_fwd, _gn_fwd_fake)
    register_triton("gn_bwd_triton", _kernels.gn_bwd, _gn_bwd_fake)

GN_FWD = op_table("gn_fwd", "gn_fwd_triton", _reference.gn_fwd)
GN_BWD = op_table("gn_bwd", "gn_bwd_triton", _reference.gn_bwd)
