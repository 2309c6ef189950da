"""The row norms' ops: norm_fwd / norm_bwd (LayerNorm, RMSNorm, and the fused
dropout + residual add + norm block) on the four backends.

norm_fwd(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h)
  -> (y, h, mean, rstd) over 2-D row-contiguous x; h = residual + dropout(x) when
  residual or seed is given (returned when store_h).
norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh, seed, p)
  -> (dx, dweight, dbias, dropout(dx) when seed is given)
Autograd (csrc/autograd/norm.cpp, for the C++ op and its Triton twin) saves the norm input
(x, or the h the op returned), weight, mean, rstd and the seed; the dropout mask is
regenerated inside norm_bwd.

norm_fwd_y is the plain norm's y on any backend, taking fastreg._C's direct entry to the
C++ op where it can (csrc/python_module.cpp).
"""

import torch

from fastreg import _ext, _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _norm_fwd_fake(x, weight, bias, eps, is_rms, residual=None, seed=None, p=0.0, residual_in_fp32=False,
                   store_h=True):
    M, N = x.shape
    fused = (residual is not None or seed is not None) and store_h
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # statistics: float32, float64 for float64
    h_dtype = acc_dtype if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
    return (
        x.new_empty((M, N)),
        x.new_empty((M, N) if fused else (0,), dtype=h_dtype),
        x.new_empty((0,) if is_rms else (M,), dtype=acc_dtype),
        x.new_empty((M,), dtype=acc_dtype),
    )


def _norm_bwd_fake(dy, x, weight, mean, rstd, is_rms, has_bias, dh=None, seed=None, p=0.0):
    N = x.shape[1]
    w_dtype = weight.dtype if weight is not None else x.dtype
    return (
        x.new_empty(x.shape),
        x.new_empty((N,) if weight is not None else (0,), dtype=w_dtype),
        x.new_empty((N,) if has_bias else (0,), dtype=w_dtype),
        x.new_empty(x.shape if seed is not None else (0,)),
    )


register_fake("norm_fwd", _norm_fwd_fake)
register_fake("norm_bwd", _norm_bwd_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import layer_norm as _kernels

    def _norm_fwd_triton(x, weight, bias, eps, is_rms, residual=None, seed=None, p=0.0, residual_in_fp32=False,
                         store_h=True):
        return _kernels.norm_fwd(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h)

    def _norm_bwd_triton(dy, x, weight, mean, rstd, is_rms, has_bias, dh=None, seed=None, p=0.0):
        return _kernels.norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh, seed, p)

    register_triton("norm_fwd_triton", _norm_fwd_triton, _norm_fwd_fake)
    register_triton("norm_bwd_triton", _norm_bwd_triton, _norm_bwd_fake)

NORM_FWD = op_table("norm_fwd", "norm_fwd_triton", _reference.norm_fwd)
NORM_BWD = op_table("norm_bwd", "norm_bwd_triton", None)  # the torch backend is differentiated by autograd

# fastreg._C.norm_fwd_y(x, weight, bias, eps, is_rms): norm_fwd's y through the dispatcher's
# typed path; NotImplemented where __torch_function__ may apply
_NORM_FWD_Y_ENTRY = _ext.function("norm_fwd_y")


def norm_fwd_y(backend: str, x, weight, bias, eps: float, is_rms: bool) -> torch.Tensor:
    """NORM_FWD[backend](x, weight, bias, eps, is_rms)[0]. On the C++ backends in eager mode the
    call goes through fastreg._C's entry, which skips the boxing of torch.ops: on a small layer
    that is a large part of the call. torch.compile traces the op itself."""
    if _NORM_FWD_Y_ENTRY is not None and backend in ("cpu", "cuda") and not torch.compiler.is_compiling():
        y = _NORM_FWD_Y_ENTRY(x, weight, bias, eps, is_rms)
        if y is not NotImplemented:
            return y
    return NORM_FWD[backend](x, weight, bias, eps, is_rms)[0]
