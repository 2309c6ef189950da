"""Registration of fastreg's operators with torch.library.

C++ ops (schemas in csrc/ops.cpp, kernels per dispatch key in csrc/cpu and csrc/cuda)
get their fake kernels and autograd here; Triton ops are defined here as
`torch.library.triton_op`s over the launchers of triton_kernels/. `impl(op, backend)`
maps a backend name to the callable that runs it.
"""

import functools
import importlib.util

import torch

from fastreg import _ext, _reference

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------- dropout
# dropout(x, seed, p, offset, inner, bias, residual) -> residual + (x + bias) * mask * scale
# Saved for backward: the seed tensor (one int64) and the scalars, never a mask.


def _dropout_setup_context(ctx, inputs, output):
    x, seed, p, offset, inner, bias, residual = inputs
    ctx.save_for_backward(seed)
    ctx.p, ctx.offset, ctx.inner = p, offset, inner
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _make_dropout_backward(dropout_op):
    def backward(ctx, grad_out):
        (seed,) = ctx.saved_tensors
        # The same kernel regenerates the mask: d(out)/dx = mask * scale.
        grad_x = dropout_op(grad_out, seed, ctx.p, ctx.offset, ctx.inner)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[5]:
            # summed over rows in fp32 (fp64 for fp64), no atomics: deterministic
            accumulate = torch.promote_types(grad_x.dtype, torch.float32)
            grad_bias = grad_x.reshape(-1, grad_x.shape[-1]).sum(0, dtype=accumulate).to(grad_x.dtype)
        grad_residual = grad_out if ctx.has_residual else None
        return grad_x, None, None, None, None, grad_bias, grad_residual

    return backward


def _register_dropout_autograd(op_name, dropout_op):
    torch.library.register_autograd(
        op_name, _make_dropout_backward(dropout_op), setup_context=_dropout_setup_context
    )


def _dropout_fake(x, seed, p, offset=0, inner=1, bias=None, residual=None):
    return x.new_empty(x.shape)  # contiguous, like the kernels' output


def _dropout_inplace_fake(x, seed, p, offset=0, inner=1):
    return None


if _ext.loaded():
    torch.library.register_fake("fastreg::dropout", _dropout_fake)
    torch.library.register_fake("fastreg::dropout_", _dropout_inplace_fake)
    _register_dropout_autograd("fastreg::dropout", torch.ops.fastreg.dropout.default)


if _HAVE_TRITON:
    from fastreg.triton_kernels import dropout as _triton_dropout

    @torch.library.triton_op("fastreg::dropout_triton", mutates_args=())
    def dropout_triton(
        x: torch.Tensor,
        seed: torch.Tensor,
        p: float,
        offset: int = 0,
        inner: int = 1,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _triton_dropout.dropout(x, seed, p, offset, inner, bias, residual)

    @torch.library.triton_op("fastreg::dropout_triton_", mutates_args={"x"})
    def dropout_triton_(x: torch.Tensor, seed: torch.Tensor, p: float, offset: int = 0, inner: int = 1) -> None:
        _triton_dropout.dropout(x, seed, p, offset, inner, out=x)

    # Explicit fakes: triton_op would derive them by running the launcher on fake
    # tensors, which the Triton interpreter (CPU tests) cannot do.
    dropout_triton.register_fake(_dropout_fake)
    dropout_triton_.register_fake(_dropout_inplace_fake)
    _register_dropout_autograd("fastreg::dropout_triton", torch.ops.fastreg.dropout_triton.default)


# -------------------------------------------------------------- layer_norm / rms_norm
# norm_fwd(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h)
#   -> (y, h, mean, rstd) over 2-D row-contiguous x; h = residual + dropout(x) when
#   residual or seed is given (returned when store_h).
# norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh, seed, p)
#   -> (dx, dweight, dbias, dropout(dx) when seed is given)
# Saved for backward: the norm input (x, or the h the op returned), weight, mean, rstd,
# and the seed; the dropout mask is regenerated inside norm_bwd.


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


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h = inputs
    y, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output (h, when not prenorm) gets no zeros to read
    ctx.y_dtype = y.dtype
    ctx.fused = residual is not None or seed is not None
    # h not stored (an inference call, differentiated anyway): keep x and residual, and
    # recompute h in backward
    ctx.recompute_h = ctx.fused and not store_h
    ctx.eps, ctx.residual_in_fp32 = eps, residual_in_fp32
    norm_input = x if not ctx.fused or ctx.recompute_h else h
    ctx.save_for_backward(norm_input, weight, mean, rstd, seed, residual if ctx.recompute_h else None)
    ctx.is_rms, ctx.p, ctx.has_bias = is_rms, p, bias is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _make_norm_backward(norm_fwd_op, norm_bwd_op):
    def backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
        norm_input, weight, mean, rstd, seed, residual = ctx.saved_tensors
        if ctx.recompute_h:
            norm_input = norm_fwd_op(norm_input, weight, None, ctx.eps, ctx.is_rms, residual, seed, ctx.p,
                                     ctx.residual_in_fp32, True)[1]
        if grad_y is None:  # only h was used
            grad_y = torch.zeros(norm_input.shape, dtype=ctx.y_dtype, device=norm_input.device)
        # grad_h is None when h went unused (or was not returned)
        grad_h = grad_h if ctx.fused and not ctx.recompute_h else None
        grad_input, grad_weight, grad_bias, grad_input_dropped = norm_bwd_op(
            grad_y, norm_input, weight, mean, rstd, ctx.is_rms, ctx.has_bias, grad_h, seed, ctx.p,
        )
        grad_x, grad_residual = grad_input, None
        if ctx.fused:
            if ctx.residual_dtype is not None:
                grad_residual = grad_input.to(ctx.residual_dtype)
            if seed is not None:  # through the dropout, in the same pass: forward's mask, regenerated
                grad_x = grad_input_dropped
            grad_x = grad_x.to(ctx.x_dtype)
        return (
            grad_x,
            grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None,
            None, None, grad_residual, None, None, None, None,
        )

    return backward


class NormFunction(torch.autograd.Function):
    """norm_fwd of a C++ or Triton backend, differentiable, for eager calls: the same
    setup_context and backward as the ops' registered autograd, without the registered
    path's per-call Python (schema defaults filled, an extra redispatch), which a small
    input's training step pays in full. (Eager only: torch.compile cannot trace the
    below-autograd guard, and takes the registered path.)"""

    @staticmethod
    def forward(ctx, backend, *inputs):
        with torch._C._AutoDispatchBelowAutograd():  # the kernel itself, not the op's autograd
            output = impl("norm_fwd", backend)(*inputs)
        _norm_setup_context(ctx, inputs, output)
        ctx.backend = backend
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_norm_backward_of(ctx.backend)(ctx, *grads))


@functools.cache
def _norm_backward_of(backend):
    """The backward of the norm ops of `backend`, made once."""
    return _make_norm_backward(impl("norm_fwd", backend), impl("norm_bwd", backend))


def _register_norm_autograd(op_name, norm_fwd_op, norm_bwd_op):
    torch.library.register_autograd(
        op_name, _make_norm_backward(norm_fwd_op, norm_bwd_op), setup_context=_norm_setup_context
    )


if _ext.defines("norm_fwd"):
    torch.library.register_fake("fastreg::norm_fwd", _norm_fwd_fake)
    torch.library.register_fake("fastreg::norm_bwd", _norm_bwd_fake)
    _register_norm_autograd("fastreg::norm_fwd", torch.ops.fastreg.norm_fwd.default, torch.ops.fastreg.norm_bwd.default)


if _HAVE_TRITON:
    from fastreg.triton_kernels import layer_norm as _triton_norm

    @torch.library.triton_op("fastreg::norm_fwd_triton", mutates_args=())
    def norm_fwd_triton(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        is_rms: bool,
        residual: torch.Tensor | None = None,
        seed: torch.Tensor | None = None,
        p: float = 0.0,
        residual_in_fp32: bool = False,
        store_h: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_norm.norm_fwd(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h)

    @torch.library.triton_op("fastreg::norm_bwd_triton", mutates_args=())
    def norm_bwd_triton(
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        is_rms: bool,
        has_bias: bool,
        dh: torch.Tensor | None = None,
        seed: torch.Tensor | None = None,
        p: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_norm.norm_bwd(dy, x, weight, mean, rstd, is_rms, has_bias, dh, seed, p)

    norm_fwd_triton.register_fake(_norm_fwd_fake)
    norm_bwd_triton.register_fake(_norm_bwd_fake)
    _register_norm_autograd(
        "fastreg::norm_fwd_triton", torch.ops.fastreg.norm_fwd_triton.default, torch.ops.fastreg.norm_bwd_triton.default
    )


# ---------------------------------------------------------------------- batch_norm
# bn_stats, bn_apply, bn_bwd_reduce, bn_bwd_apply over x (N, C, S) of any strides; no
# autograd of their own: fastreg/_batch_norm.py composes them in an autograd.Function.


def _bn_stats_fake(x):
    acc = torch.promote_types(x.dtype, torch.float32)  # two values per channel
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _bn_apply_fake(x, mean, var, weight, bias, eps):
    return torch.empty_like(x)  # x's strides


def _bn_bwd_reduce_fake(dy, x, mean, var, eps):
    return _bn_stats_fake(x)


def _bn_bwd_apply_fake(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
    return torch.empty_like(x)


_BN_FAKES = {"bn_stats": _bn_stats_fake, "bn_apply": _bn_apply_fake, "bn_bwd_reduce": _bn_bwd_reduce_fake,
             "bn_bwd_apply": _bn_bwd_apply_fake}

if _ext.defines("bn_stats"):
    for _name, _fake in _BN_FAKES.items():
        torch.library.register_fake(f"fastreg::{_name}", _fake)


if _HAVE_TRITON:
    from fastreg.triton_kernels import batch_norm as _triton_bn

    @torch.library.triton_op("fastreg::bn_stats_triton", mutates_args=())
    def bn_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_bn.bn_stats(x)

    @torch.library.triton_op("fastreg::bn_apply_triton", mutates_args=())
    def bn_apply_triton(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        return _triton_bn.bn_apply(x, mean, var, weight, bias, eps)

    @torch.library.triton_op("fastreg::bn_bwd_reduce_triton", mutates_args=())
    def bn_bwd_reduce_triton(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_bn.bn_bwd_reduce(dy, x, mean, var, eps)

    @torch.library.triton_op("fastreg::bn_bwd_apply_triton", mutates_args=())
    def bn_bwd_apply_triton(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                            weight: torch.Tensor | None, eps: float, sum_dy: torch.Tensor | None = None,
                            sum_dy_xhat: torch.Tensor | None = None, count: int = 0) -> torch.Tensor:
        return _triton_bn.bn_bwd_apply(dy, x, mean, var, weight, eps, sum_dy, sum_dy_xhat, count)

    for _op, _fake in ((bn_stats_triton, _bn_stats_fake), (bn_apply_triton, _bn_apply_fake),
                       (bn_bwd_reduce_triton, _bn_bwd_reduce_fake), (bn_bwd_apply_triton, _bn_bwd_apply_fake)):
        _op.register_fake(_fake)


# ------------------------------------------------------------------ optimizer steps
# sgd_step_, adam_step_: in place over lists of tensors, no outputs, no autograd.


def _sgd_step_fake(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1, max_norm,
                   nesterov, maximize, first_step, inv_grad_scale):
    return None


def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, beta1, beta2, eps,
                    weight_decay, decoupled, l1, max_norm, maximize, bias_correction1, bias_correction2,
                    inv_grad_scale):
    return None


if _ext.defines("adam_step_"):
    torch.library.register_fake("fastreg::sgd_step_", _sgd_step_fake)
    torch.library.register_fake("fastreg::adam_step_", _adam_step_fake)


def _add_to_steps_fake(steps, value):
    return None


if _ext.defines("add_to_steps_"):
    torch.library.register_fake("fastreg::add_to_steps_", _add_to_steps_fake)


def add_to_steps_(steps: list[torch.Tensor], value: float) -> None:
    """steps[i] += value for the optimizers' step counts (float32 CPU scalars): the C++
    host loop where the extension is built, else torch's _foreach_add_."""
    if _ext.defines("add_to_steps_"):
        torch.ops.fastreg.add_to_steps_(steps, value)
    else:
        torch._foreach_add_(steps, value)


if _HAVE_TRITON:
    from fastreg.triton_kernels import optim as _triton_optim

    @torch.library.triton_op("fastreg::sgd_step_triton_", mutates_args={"params", "momentum_buffers", "masters"})
    def sgd_step_triton_(
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        momentum_buffers: list[torch.Tensor],
        masters: list[torch.Tensor],
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        l1: float,
        max_norm: float,
        nesterov: bool,
        maximize: bool,
        first_step: bool,
        inv_grad_scale: float,
    ) -> None:
        _triton_optim.sgd_step_(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1,
                                max_norm, nesterov, maximize, first_step, inv_grad_scale)

    @torch.library.triton_op(
        "fastreg::adam_step_triton_",
        mutates_args={"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters"},
    )
    def adam_step_triton_(
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor],
        masters: list[torch.Tensor],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        l1: float,
        max_norm: float,
        maximize: bool,
        bias_correction1: float,
        bias_correction2: float,
        inv_grad_scale: float,
    ) -> None:
        _triton_optim.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, beta1, beta2,
                                 eps, weight_decay, decoupled, l1, max_norm, maximize, bias_correction1,
                                 bias_correction2, inv_grad_scale)

    sgd_step_triton_.register_fake(_sgd_step_fake)
    adam_step_triton_.register_fake(_adam_step_fake)


# ---------------------------------------------------------------------- group_norm
# gn_fwd(x, weight, bias, groups, eps, silu) -> (y, mean, rstd) over x (N, C, S) of any
# strides, y in x's layout, mean / rstd (N, groups) in float32 (float64 for float64 x).
# gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu) -> (dx, dweight, dbias).
# No autograd of their own: fastreg/_group_norm.py composes them in an autograd.Function
# (one for every backend, the torch reference included). Saved for backward: x, weight,
# bias, mean, rstd; the SiLU pre-activation is recomputed from x.


def _gn_fwd_fake(x, weight, bias, groups, eps, silu):
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.empty_like(x), x.new_empty((x.shape[0], groups), dtype=acc), x.new_empty((x.shape[0], groups), dtype=acc)


def _gn_bwd_fake(dy, x, weight, bias, mean, rstd, groups, silu):
    def param_grad(param):
        return x.new_empty((x.shape[1],) if param is not None else (0,), dtype=param.dtype if param is not None else x.dtype)

    return torch.empty_like(x), param_grad(weight), param_grad(bias)


if _ext.defines("gn_fwd"):
    torch.library.register_fake("fastreg::gn_fwd", _gn_fwd_fake)
    torch.library.register_fake("fastreg::gn_bwd", _gn_bwd_fake)


if _HAVE_TRITON:
    from fastreg.triton_kernels import group_norm as _triton_gn

    @torch.library.triton_op("fastreg::gn_fwd_triton", mutates_args=())
    def gn_fwd_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                      eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_gn.gn_fwd(x, weight, bias, groups, eps, silu)

    @torch.library.triton_op("fastreg::gn_bwd_triton", mutates_args=())
    def gn_bwd_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      mean: torch.Tensor, rstd: torch.Tensor, groups: int,
                      silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_gn.gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu)

    gn_fwd_triton.register_fake(_gn_fwd_fake)
    gn_bwd_triton.register_fake(_gn_bwd_fake)


def _missing(op, backend):
    def fail(*args, **kwargs):
        raise RuntimeError(f"fastreg op {op!r} has no {backend!r} implementation here")

    return fail


def impl(op: str, backend: str):
    """The callable running op `op` ("dropout", "dropout_", "norm_fwd") on `backend`.

    `backend` comes from fastreg._backend.choose_backend, which has already checked
    that it can run; cpu and cuda share one op, routed by the dispatcher.
    """
    if backend == "torch":
        return getattr(_reference, op)
    name = op if backend in ("cpu", "cuda") else op.rstrip("_") + "_triton" + "_" * op.endswith("_")
    packet = getattr(torch.ops.fastreg, name, None)
    return packet.default if packet is not None else _missing(op, backend)
