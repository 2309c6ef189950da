"""Cross-entropy's ops on the four backends: the loss with its gradient computed in the same
pass, the in-place backward scale, and the linear form in chunks of tokens.

cross_entropy_fwd(input (N, C, S), target (N, S), weight, ignore_index, label_smoothing, z_loss,
                  reduction, compute_grad) -> (loss, z_term, grad)
cross_entropy_bwd_(grad, grad_loss): grad *= grad_loss, in place
linear_cross_entropy_fwd(input (T, H), linear_weight (V, H), linear_bias, target (T,), weight,
                         ignore_index, label_smoothing, z_loss, reduction, grad_loss,
                         grad_input, grad_weight, grad_bias, chunk_tokens=0)
    -> (loss, z_term, grad_input, grad_weight, grad_bias)
Autograd (csrc/autograd/cross_entropy.cpp, for the C++ ops and their Triton twins) saves the
gradients forward made and scales them in backward; nothing else is kept (for
linear_cross_entropy with reduction none: its inputs, and backward runs the chunks again).
"""

from fastreg import _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _reads_rows(x):
    # the layout rule of csrc/include/fastreg/cross_entropy_args.h (and of the Triton launcher)
    N, C, S = x.shape
    return (S == 1 and (C <= 1 or x.stride(1) == 1)) or (S > 1 and C > 1 and x.stride(1) == 1)


def _gradient_like(x):
    N, C, S = x.shape
    if _reads_rows(x) and S > 1:
        return x.new_empty((N, S, C)).permute(0, 2, 1)
    return x.new_empty((N, C, S))


def _cross_entropy_fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, reduction, compute_grad):
    shape = (input.shape[0], input.shape[2]) if reduction == 0 else ()
    grad = _gradient_like(input) if compute_grad else input.new_empty(0)
    return input.new_empty(shape), input.new_empty(shape), grad


def _cross_entropy_bwd_fake(grad, grad_loss):
    return None


def _linear_cross_entropy_fwd_fake(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
                                   z_loss, reduction, grad_loss=None, grad_input=False, grad_weight=False,
                                   grad_bias=False, chunk_tokens=0):
    T, H = input.shape
    V = linear_weight.shape[0]
    shape = (T,) if reduction == 0 else ()
    return (input.new_empty(shape), input.new_empty(shape), input.new_empty((T, H) if grad_input else (0,)),
            input.new_empty((V, H) if grad_weight else (0,)), input.new_empty((V,) if grad_bias else (0,)))


register_fake("cross_entropy_fwd", _cross_entropy_fwd_fake)
register_fake("cross_entropy_bwd_", _cross_entropy_bwd_fake)
register_fake("linear_cross_entropy_fwd", _linear_cross_entropy_fwd_fake)

if HAVE_TRITON:
    from fastreg.triton_kernels import cross_entropy as _kernels

    register_triton("cross_entropy_fwd_triton", _kernels.cross_entropy_fwd, _cross_entropy_fwd_fake)
    register_triton("cross_entropy_bwd_triton_", _kernels.cross_entropy_bwd_, _cross_entropy_bwd_fake)
    register_triton("linear_cross_entropy_fwd_triton", _kernels.linear_cross_entropy_fwd,
                    _linear_cross_entropy_fwd_fake)

CROSS_ENTROPY_FWD = op_table("cross_entropy_fwd", "cross_entropy_fwd_triton", _reference.cross_entropy_fwd)
CROSS_ENTROPY_BWD_ = op_table("cross_entropy_bwd_", "cross_entropy_bwd_triton_", None)  # autograd's, for the torch backend
LINEAR_CROSS_ENTROPY_FWD = op_table("linear_cross_entropy_fwd", "linear_cross_entropy_fwd_triton",
                                    _reference.linear_cross_entropy_fwd)
