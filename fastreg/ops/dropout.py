"""The dropout family's ops: dropout (out of place, with optional bias and residual) and
dropout_ (in place, no autograd), on the four backends.

dropout(x, seed, p, offset, inner, bias, residual) -> residual + (x + bias) * mask * scale
Autograd (csrc/autograd/dropout.cpp, for the C++ op and its Triton twin): saves the seed
tensor (one int64) and the scalars, never a mask; backward is the same op on the incoming
gradient, the mask regenerated from the seed.
"""

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _dropout_fake(x, seed, p, offset=0, inner=1, bias=None, residual=None):
    return x.new_empty(x.shape)  # contiguous, like the kernels' output


def _dropout_inplace_fake(x, seed, p, offset=0, inner=1):
    return None


register_fake("dropout", _dropout_fake)
register_fake("dropout_", _dropout_inplace_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import dropout as _kernels

    def _dropout_triton(x, seed, p, offset=0, inner=1, bias=None, residual=None):
        return _kernels.dropout(x, seed, p, offset, inner, bias, residual)

    def _dropout_triton_(x, seed, p, offset=0, inner=1):
        _kernels.dropout(x, seed, p, offset, inner, out=x)

    register_triton("dropout_triton", _dropout_triton, _dropout_fake)
    register_triton("dropout_triton_", _dropout_triton_, _dropout_inplace_fake)

DROPOUT = op_table("dropout", "dropout_triton", _reference.dropout)
DROPOUT_ = op_table("dropout_", "dropout_triton_", None)  # the torch backend never runs in place

