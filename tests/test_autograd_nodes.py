"""The backward nodes of csrc/autograd/ behave as torch's own: the graph is freed with its
outputs (no reference cycle through a saved output), saved tensors go through
saved_tensors_hooks, an in-place change of a saved tensor is caught, a freed graph says
so, and forward-mode AD, which has no formulas here, raises.

Gradient values are checked per family (tests/test_<family>.py); these tests run the
cpu backend's ops, whose nodes are those of the cuda and triton backends too.
"""

import gc
import weakref

import pytest
import torch

import fastreg
from fastreg import functional as F
from tests.conftest import skip_unless_runs


def _layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], torch.ones(x.shape[-1], requires_grad=True), None)


def _prenorm_block(x):
    residual = torch.randn_like(x)
    weight, bias = torch.ones(x.shape[-1]), torch.zeros(x.shape[-1])
    y, h = F.dropout_add_layer_norm(x, residual, weight, bias, 0.2, prenorm=True)
    return y + h  # h is an output of the node that saved it


def _batch_norm(x):
    return F.batch_norm(x, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), torch.ones(x.shape[1]), None,
                        training=True)


def _cross_entropy(x):
    return F.cross_entropy(x, torch.arange(x.shape[0]) % x.shape[1], label_smoothing=0.1)


def _drop_block(x):
    return F.drop_block2d(x.view(2, 2, 4, 4), 0.3, 3).view_as(x)


OPS = {
    "dropout": lambda x: F.dropout(x, 0.3),
    "layer_norm": _layer_norm,
    "prenorm_block": _prenorm_block,
    "batch_norm": _batch_norm,
    "group_norm": lambda x: F.group_norm(x.view(2, 4, 8), 2),
    "cross_entropy": _cross_entropy,
    "gaussian_dropout": lambda x: F.gaussian_dropout(x, 0.3),
    "alpha_dropout": lambda x: F.alpha_dropout(x, 0.3, training=True),
    "drop_block2d": _drop_block,
}

# the ops whose node saves x itself (the others save a seed, statistics or a made gradient)
SAVES_X = ("layer_norm", "batch_norm", "group_norm")


@pytest.fixture(autouse=True)
def _cpu_backend():
    skip_unless_runs("cpu")
    with fastreg.use_backend("cpu"):
        yield


def _input():
    return torch.randn(4, 16, requires_grad=True)


@pytest.mark.parametrize("op", OPS)
def test_graph_is_freed_with_its_output_without_the_garbage_collector(op):
    x = _input()
    gc.disable()
    try:
        out = OPS[op](x * 1)
        node = out.grad_fn
        assert node is not None and "Backward" in node.name()
        out_ref = weakref.ref(out)
        del out, node
        assert out_ref() is None
        out = OPS[op](x * 1)  # and after a backward
        out.sum().backward()
        out_ref = weakref.ref(out)
        del out
        assert out_ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("op", OPS)
def test_saved_tensors_go_through_the_hooks(op):
    x = _input()
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # what an offloading hook does: backward must use what unpack returns

    def unpack(t):
        unpacked.append(t.shape)
        return t

    torch.manual_seed(0)
    expected = OPS[op](x).sum()
    (grad_expected,) = torch.autograd.grad(expected, x)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = OPS[op](x).sum()
    (grad,) = torch.autograd.grad(out, x)
    assert packed and len(unpacked) == len(packed)
    torch.testing.assert_close(grad, grad_expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", SAVES_X)
def test_an_in_place_change_of_a_saved_input_is_caught(op):
    x = _input() * 1
    out = OPS[op](x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("op", OPS)
def test_a_second_backward_needs_retain_graph(op):
    x = _input()
    out = OPS[op](x).sum()
    (first,) = torch.autograd.grad(out, x, retain_graph=True)
    (second,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, x)



@pytest.mark.parametrize("op", OPS)
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(op):
    """No forward-mode formulas: a dual input raises torch's NotImplementedError for such ops
    (a result without its tangent would be silently wrong)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(4, 16), torch.randn(4, 16))
        with pytest.raises(NotImplementedError, match="forward AD with fastreg::"):
            OPS[op](x)
