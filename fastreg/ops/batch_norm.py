"""BatchNorm's four ops on the four backends: bn_stats, bn_apply, bn_bwd_reduce,
bn_bwd_apply over x (N, C, S) of any strides. No autograd of their own:
fastreg/_batch_norm.py composes them in an autograd.Function (SyncBatchNorm reduces
across ranks between the steps)."""

import torch

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _bn_stats_fake(x):
    acc = torch.promote_types(x.dtype, torch.float32)  # two values per channel
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _bn_apply_fake(x, mean, var, weight, bias, eps):
    return torch.empty_like(x)  # x's strides


def _bn_bwd_reduce_fake(dy, x, mean, var, eps):
    return _bn_stats_fake(x)


def _bn_bwd_apply_fake(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
    return torch.empty_like(x)


_FAKES = {"bn_stats": _bn_stats_fake, "bn_apply": _bn_apply_fake, "bn_bwd_reduce": _bn_bwd_reduce_fake,
          "bn_bwd_apply": _bn_bwd_apply_fake}
for _name, _fake in _FAKES.items():
    register_fake(_name, _fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import batch_norm as _kernels

    def _bn_bwd_apply_triton(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
        return _kernels.bn_bwd_apply(dy, x, mean, var, weight, eps, sum_dy, sum_dy_xhat, count)

    register_triton("bn_stats_triton", _kernels.bn_stats, _bn_stats_fake)
    register_triton("bn_apply_triton", _kernels.bn_apply, _bn_apply_fake)
    register_triton("bn_bwd_reduce_triton", _kernels.bn_bwd_reduce, _bn_bwd_reduce_fake)
    register_triton("bn_bwd_apply_triton", _bn_bwd_apply_triton, _bn_bwd_apply_fake)

BN_STATS = op_table("bn_stats", "bn_stats_triton", _reference.bn_stats)
BN_APPLY = op_table("bn_apply", "bn_apply_triton", _reference.bn_apply)
BN_BWD_REDUCE = op_table("bn_bwd_reduce", "bn_bwd_reduce_triton", _reference.bn_bwd_reduce)
BN_BWD_APPLY = op_table("bn_bwd_apply", "bn_bwd_apply_triton", _reference.bn_bwd_apply)
