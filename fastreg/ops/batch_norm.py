"""BatchNorm's ops on the four backends.

bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, batches_tracked)
-> (y, mean, invstd) over x (N, C, *) of any strides, y in x's layout, the running
statistics updated in place (training); bn_bwd(dy, x, weight, mean, invstd, training,
output_mask) -> (dx, dweight, dbias). Autograd (csrc/autograd/batch_norm.cpp, for the C++
op and its Triton twin) saves x, weight, mean and invstd; the torch backend
(fastreg/_reference.py) is differentiated by torch's autograd.

The four steps bn_stats, bn_apply, bn_bwd_reduce, bn_bwd_apply over x (N, C, S) have no
autograd of their own: SyncBatchNorm composes them with its collectives
(fastreg/_batch_norm.py).
"""

import torch

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _per_channel(x, size, dtype):
    return x.new_empty(size, dtype=dtype)


def _bn_fwd_fake(x, weight, bias, running_mean, running_var, training, momentum, eps, batches_tracked=None):
    acc = torch.promote_types(x.dtype, torch.float32)
    ncs = x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)
    return torch.empty_like(ncs).view(x.shape), _per_channel(x, x.shape[1], acc), _per_channel(x, x.shape[1], acc)


def _bn_bwd_fake(dy, x, weight, mean, invstd, training, output_mask):
    ncs = x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)
    param_dtype = weight.dtype if weight is not None else x.dtype
    return (torch.empty_like(ncs).view(x.shape) if output_mask[0] else x.new_empty(0),
            _per_channel(x, x.shape[1] if output_mask[1] else 0, param_dtype),
            _per_channel(x, x.shape[1] if output_mask[2] else 0, param_dtype))


def _bn_stats_fake(x):
    acc = torch.promote_types(x.dtype, torch.float32)  # two values per channel
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _bn_apply_fake(x, mean, var, weight, bias, eps):
    return torch.empty_like(x)  # x's strides


def _bn_bwd_reduce_fake(dy, x, mean, var, eps):
    return _bn_stats_fake(x)


def _bn_bwd_apply_fake(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
    return torch.empty_like(x)


_FAKES = {"bn_fwd": _bn_fwd_fake, "bn_bwd": _bn_bwd_fake, "bn_stats": _bn_stats_fake, "bn_apply": _bn_apply_fake, "bn_bwd_reduce": _bn_bwd_reduce_fake,
          "bn_bwd_apply": _bn_bwd_apply_fake}
for _name, _fake in _FAKES.items():
    register_fake(_name, _fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import batch_norm as _kernels

    def _bn_bwd_apply_triton(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
        return _kernels.bn_bwd_apply(dy, x, mean, var, weight, eps, sum_dy, sum_dy_xhat, count)

    register_triton("bn_fwd_triton", _kernels.bn_fwd, _bn_fwd_fake)
    register_triton("bn_bwd_triton", _kernels.bn_bwd, _bn_bwd_fake)
    register_triton("bn_stats_triton", _kernels.bn_stats, _bn_stats_fake)
    register_triton("bn_apply_triton", _kernels.bn_apply, _bn_apply_fake)
    register_triton("bn_bwd_reduce_triton", _kernels.bn_bwd_reduce, _bn_bwd_reduce_fake)
    register_triton("bn_bwd_apply_triton", _bn_bwd_apply_triton, _bn_bwd_apply_fake)

BN_FWD = op_table("bn_fwd", "bn_fwd_triton", _reference.bn_fwd)
BN_BWD = op_table("bn_bwd", "bn_bwd_triton", _reference.bn_bwd)
BN_STATS = op_table("bn_stats", "bn_stats_triton", _reference.bn_stats)
BN_APPLY = op_table("bn_apply", "bn_apply_triton", _reference.bn_apply)
BN_BWD_REDUCE = op_table("bn_bwd_reduce", "bn_bwd_reduce_triton", _reference.bn_bwd_reduce)
BN_BWD_APPLY = op_table("bn_bwd_apply", "bn_bwd_apply_triton", _reference.bn_bwd_apply)
