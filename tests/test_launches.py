"""Kernel launches per call of the norm families on the triton backend, counted by the
bench's counter (fastreg.bench.host.LaunchCounter: every Triton launch and every torch op
that runs a kernel, what autograd runs included): at most two each way, the dropout seed
draw included. The kernels' names are asserted, not only their number, so that a torch
op (a zero fill, a sum, a cast) that joins them shows up by name."""

import pytest
import torch

import fastreg
from fastreg import functional as F
from fastreg.bench import host
from fastreg.triton_kernels import group_norm, layer_norm
from tests.conftest import skip_unless_runs

pytest.importorskip("triton")

SEED_DRAW = "aten.randint.low"
NORM_BWD = ["_norm_bwd_kernel", "_norm_param_grads_kernel"]


def _case(fn, inputs, grads_of):
    """A host.HostCase calling fn(*inputs); backward asks for the gradients of `grads_of`
    (a subset of inputs) with incoming gradients shaped and laid out like the outputs."""

    def make(library, device):
        incoming = []  # drawn at the uncounted warm-up call

        def backward(out):
            outs = out if isinstance(out, tuple) else (out,)
            if not incoming:
                incoming.extend(torch.randn_like(o) for o in outs)  # randn_like keeps the layout
            return torch.autograd.grad(outs, grads_of, incoming)

        return (lambda: fn(*inputs)), backward

    return host.HostCase(fn.__name__ if hasattr(fn, "__name__") else "call", make)


def _counted(fn, inputs, grads_of):
    """(forward launches, backward launches) as names, Triton kernels first."""
    skip_unless_runs("triton", "cpu")
    with fastreg.use_backend("triton"):
        _, _, fwd, bwd = host.launches(_case(fn, inputs, grads_of), "cpu")
    return fwd.triton_launches + fwd.torch_ops, bwd.triton_launches + bwd.torch_ops


def _params(n, dtype, *, weight=True, bias=True):
    make = lambda: torch.randn(n, dtype=dtype, requires_grad=True)  # noqa: E731
    return make() if weight else None, make() if bias else None


# ------------------------------------------------------------------ LayerNorm, RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_one_kernel_forward_two_backward(dtype, affine):
    """Forward: the row kernel. Backward: the row kernel, and with a weight or bias the
    fixed-order sum of its partials into dweight/dbias in the weight's dtype (no torch
    sum or cast around them)."""
    weight, bias = _params(64, dtype, weight=affine != "none", bias=affine == "weight+bias")
    x = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    wanted = [t for t in (x, weight, bias) if t is not None]
    fwd, bwd = _counted(lambda *a: F.layer_norm(*a[:1], (64,), *a[1:]), (x, weight, bias), wanted)
    assert fwd == ["_norm_fwd_kernel"]
    assert bwd == (NORM_BWD if affine != "none" else ["_norm_bwd_kernel"])


def test_rms_norm_launches():
    weight, _ = _params(64, torch.float32, bias=False)
    x = torch.randn(4, 64, requires_grad=True)
    fwd, bwd = _counted(lambda x, w: F.rms_norm(x, (64,), w), (x, weight), [x, weight])
    assert (fwd, bwd) == (["_norm_fwd_kernel"], NORM_BWD)


def test_rows_too_long_for_the_chip_take_two_launches_backward(monkeypatch):
    """The looped path (rows walked in blocks): the dw/db partials come from programs of
    the row kernel's own launch, then the one fixed-order sum."""
    monkeypatch.setattr(layer_norm, "MAX_ROW_BYTES", 64)
    monkeypatch.setattr(layer_norm, "MAX_BWD_ROW_BYTES", 64)
    monkeypatch.setattr(layer_norm, "MAX_BWD_TWO_PART_BYTES", 64)
    monkeypatch.setattr(layer_norm, "LOOPED_BLOCK_N", 32)
    assert layer_norm._bwd_plan(100, 4, False)[1] == 0  # looped
    weight, bias = _params(100, torch.float32)
    x = torch.randn(6, 100, requires_grad=True)
    fwd, bwd = _counted(lambda *a: F.layer_norm(a[0], (100,), *a[1:]), (x, weight, bias), [x, weight, bias])
    assert (fwd, bwd) == (["_norm_fwd_kernel"], NORM_BWD)


@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("is_rms", [False, True])
def test_dropout_add_norm_seed_draw_and_one_kernel_each_way(is_rms, prenorm):
    """Forward: the seed draw and the fused kernel. Backward: the row kernel (dx, and
    dropout(dx) with forward's mask regenerated) and the dweight/dbias sum."""
    weight, bias = _params(64, torch.float32, bias=not is_rms)
    x, residual = (torch.randn(4, 64, requires_grad=True) for _ in range(2))
    if is_rms:
        call = lambda x, r, w: F.dropout_add_rms_norm(x, r, w, 0.1, prenorm=prenorm)  # noqa: E731
        inputs = (x, residual, weight)
    else:
        call = lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, 0.1, prenorm=prenorm)  # noqa: E731
        inputs = (x, residual, weight, bias)
    fwd, bwd = _counted(call, inputs, list(inputs))
    assert fwd == ["_norm_fwd_kernel", SEED_DRAW]
    assert bwd == NORM_BWD


# ------------------------------------------------------------------ GroupNorm


def _group_norm_counts(x, groups, weight, bias, silu=False):
    wanted = [t for t in (x, weight, bias) if t is not None]
    activation = "silu" if silu else None
    return _counted(lambda x, w, b: F.group_norm(x, groups, w, b, activation=activation), (x, weight, bias), wanted)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_one_kernel_forward_two_backward(layout, dtype):
    """Unsplit: one kernel forward (statistics written by it: no zero fill; parameters read
    in their own dtype: no casts); backward the kernel and the dweight/dbias sum."""
    x = torch.randn(2, 16, 2, 2, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert group_norm._plan(2, 16, 4, 4, x.stride(1), x.element_size(), x.device).splits == 1
    weight, bias = _params(16, dtype)
    fwd, bwd = _group_norm_counts(x.requires_grad_(), 4, weight, bias, silu=dtype == torch.bfloat16)
    family = "_gn_" if layout == "contiguous" else "_gn_chunk_"
    assert fwd == [f"{family}fwd_kernel"]
    assert bwd == [f"{family}bwd_kernel", "_gn_param_grads_kernel"]


def test_group_norm_without_affine_one_kernel_each_way():
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    assert _group_norm_counts(x, 8, None, None) == (["_gn_fwd_kernel"], ["_gn_bwd_kernel"])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_split_two_kernels_each_way(layout):
    """Few groups over a long S: split into ranges of S (`_plan`), two kernels each way;
    the dx kernel's programs past the units sum dweight/dbias (no third launch)."""
    x = torch.randn(1, 32, 8, 8)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert group_norm._plan(1, 32, 2, 64, x.stride(1), 4, x.device).splits > 1
    weight, bias = _params(32, torch.float32)
    fwd, bwd = _group_norm_counts(x.requires_grad_(), 2, weight, bias)
    family = "_gn_" if layout == "contiguous" else "_gn_chunk_"
    assert fwd == [f"{family}stats_kernel", f"{family}apply_kernel"]
    assert bwd == [f"{family}grad_sums_kernel", f"{family}dx_kernel"]
