"""The noise family's ops on the four backends: gaussian_noise (Gaussian dropout and
additive Gaussian noise) and alpha_dropout (with its in-place form, no autograd).

gaussian_noise(x, seed, std, multiplicative, offset) -> x * (1 + std * n) or x + std * n
alpha_dropout(x, seed, p, scale, keep_shift, drop_shift, offset, inner)
    -> x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift)
Autograd (csrc/autograd/noise.cpp, for the C++ ops and their Triton twins): saves the seed
tensor (one int64) and the scalars, never the noise; backward regenerates it from the seed
(gaussian_noise multiplicative: the op on the gradient; additive: the gradient itself;
alpha_dropout: the op on the gradient with the shifts 0).
"""

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _gaussian_noise_fake(x, seed, std, multiplicative, offset=0):
    return x.new_empty(x.shape)  # contiguous, like the kernels' output


def _alpha_dropout_fake(x, seed, p, scale, keep_shift, drop_shift, offset=0, inner=1):
    return x.new_empty(x.shape)


def _alpha_dropout_inplace_fake(x, seed, p, scale, keep_shift, drop_shift, offset=0, inner=1):
    return None


register_fake("gaussian_noise", _gaussian_noise_fake)
register_fake("alpha_dropout", _alpha_dropout_fake)
register_fake("alpha_dropout_", _alpha_dropout_inplace_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import noise as _kernels

    def _gaussian_noise_triton(x, seed, std, multiplicative, offset=0):
        return _kernels.gaussian_noise(x, seed, std, multiplicative, offset)

    def _alpha_dropout_triton(x, seed, p, scale, keep_shift, drop_shift, offset=0, inner=1):
        return _kernels.alpha_dropout(x, seed, p, scale, keep_shift, drop_shift, offset, inner)

    def _alpha_dropout_triton_(x, seed, p, scale, keep_shift, drop_shift, offset=0, inner=1):
        _kernels.alpha_dropout(x, seed, p, scale, keep_shift, drop_shift, offset, inner, out=x)

    register_triton("gaussian_noise_triton", _gaussian_noise_triton, _gaussian_noise_fake)
    register_triton("alpha_dropout_triton", _alpha_dropout_triton, _alpha_dropout_fake)
    register_triton("alpha_dropout_triton_", _alpha_dropout_triton_, _alpha_dropout_inplace_fake)

GAUSSIAN_NOISE = op_table("gaussian_noise", "gaussian_noise_triton", _reference.gaussian_noise)
ALPHA_DROPOUT = op_table("alpha_dropout", "alpha_dropout_triton", _reference.alpha_dropout)
ALPHA_DROPOUT_ = op_table("alpha_dropout_", "alpha_dropout_triton_", None)  # the torch backend never runs in place
