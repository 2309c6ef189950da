"""Registration of fastreg's operators with torch.library.

C++ ops (schemas in csrc/ops.cpp, kernels per dispatch key in csrc/cpu and csrc/cuda)
get their fake kernels and autograd here; Triton ops are defined here as
`torch.library.triton_op`s over the launchers of triton_kernels/. `impl(op, backend)`
maps a backend name to the callable that runs it.
"""

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


def _missing(op, backend):
    def fail(*args, **kwargs):
        raise RuntimeError(f"fastreg op {op!r} has no {backend!r} implementation here")

    return fail


def impl(op: str, backend: str):
    """The callable running op `op` ("dropout", "dropout_") on `backend`.

    `backend` comes from fastreg._backend.choose_backend, which has already checked
    that it can run; cpu and cuda share one op, routed by the dispatcher.
    """
    if backend == "torch":
        return getattr(_reference, op)
    name = op if backend in ("cpu", "cuda") else op.replace("dropout", "dropout_triton", 1)
    packet = getattr(torch.ops.fastreg, name, None)
    return packet.default if packet is not None else _missing(op, backend)
