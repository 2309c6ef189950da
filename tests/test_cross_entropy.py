"""Cross-entropy (label smoothing, class weights, ignore_index, z-loss) and its linear form
against PyTorch on every backend."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as torch_F
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg
from fastreg import functional as F
from fastreg.ops.cross_entropy import LINEAR_CROSS_ENTROPY_FWD
from tests import triton_aot
from tests.conftest import GPU, interpreted

# The relative rule: against a float64 reference from the same rounded logits, fastreg's
# error may be at most twice PyTorch's own error in the logits' dtype, plus an atol.
# fastreg computes in float32 and rounds once (the loss, each gradient element); torch
# rounds log_softmax to the input dtype first. The loss is a mean of sums over C classes
# (atol for float32: a few ulps of log C); a gradient element is one softmax term minus
# the target's, each of size <= 1 (scaled by 1 / rows for a mean).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
GRAD_ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 8e-4, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CLASSES = [1, 7, 1000, 4097]
# (reduction, label_smoothing, weighted)
CONFIGS = [("mean", 0.0, False), ("mean", 0.1, True), ("sum", 0.2, False), ("none", 0.1, True)]
# the linear form's tolerances: a matmul of `hidden` products per logit first
LINEAR_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _interpreter_slack(backend_name, reference, dtype):
    # The Triton interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to
    # nearest): allow it one more bfloat16 ulp of the largest value.
    if interpreted(backend_name) and dtype == torch.bfloat16:
        return torch.finfo(dtype).eps * reference.abs().max().item()
    return 0.0


def _assert_relative_rule(ours, torch_own, reference, atol, slack=0.0):
    """|ours - reference| <= 2 * |torch_own - reference| + atol, elementwise (max); nan where the reference is."""
    assert torch.equal(ours.isnan(), reference.isnan()), (ours, reference)
    keep = ~reference.isnan()
    ours_error = (ours[keep].double() - reference[keep].double()).abs().max().item() if keep.any() else 0.0
    torch_error = (torch_own[keep].double() - reference[keep].double()).abs().max().item() if keep.any() else 0.0
    assert ours_error <= 2 * torch_error + atol + slack, (ours_error, torch_error, atol, slack)


def _targets(shape, classes, device, ignored=0.25, ignore_index=-100):
    """Class indices with about a quarter of them ignore_index."""
    target = torch.randint(0, classes, shape, device=device)
    return torch.where(torch.rand(shape, device=device) < ignored, torch.full_like(target, ignore_index), target)


def _loss_and_grad(fn, x, target, **kwargs):
    x = x.detach().requires_grad_()
    loss = fn(x, target, **kwargs)
    # a mean or sum is differentiated alone (incoming gradient 1); per-row losses with weights
    grad_loss = torch.ones_like(loss) if loss.dim() == 0 else torch.randn_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    return loss.detach(), grad, grad_loss


def _check_against_torch(name, x, target, **kwargs):
    """fastreg's loss and gradient against torch's in x's dtype and torch's in float64."""
    dtype = x.dtype
    loss, grad, grad_loss = _loss_and_grad(F.cross_entropy, x, target, **kwargs)
    x_torch = x.detach().requires_grad_()
    loss_torch = torch_F.cross_entropy(x_torch, target, **kwargs)
    (grad_torch,) = torch.autograd.grad(loss_torch, x_torch, grad_loss.to(loss_torch.dtype))
    ref_kwargs = dict(kwargs, weight=kwargs["weight"].double()) if kwargs.get("weight") is not None else kwargs
    x_ref = x.detach().double().requires_grad_()
    loss_ref = torch_F.cross_entropy(x_ref, target, **ref_kwargs)
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref, grad_loss.double())
    assert loss.dtype == dtype and loss.shape == loss_torch.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    _assert_relative_rule(loss, loss_torch.detach(), loss_ref.detach(), ATOL[dtype],
                          _interpreter_slack(name, loss_ref, dtype))
    _assert_relative_rule(grad, grad_torch, grad_ref, GRAD_ATOL[dtype], _interpreter_slack(name, grad_ref, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("reduction, label_smoothing, weighted", CONFIGS)
def test_matches_torch(backend, dtype, classes, reduction, label_smoothing, weighted):
    name, device = backend
    rows = 5
    x = (torch.randn(rows, classes, device=device) * 3 + 1).to(dtype)
    target = _targets((rows,), classes, device)
    target[0] = classes - 1  # at least one counted row, and the last class
    weight = (torch.rand(classes, device=device) + 0.5).to(dtype) if weighted else None
    _check_against_torch(name, x, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spatial_inputs(backend, layout, dtype):
    """(N, C, d1, d2): contiguous read in columns (positions contiguous), channels-last in rows
    (classes contiguous), a slice of positions copied first; a gradient in the input's layout."""
    name, device = backend
    x = torch.randn(2, 11, 5, 6, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 11, 5, 9, device=device).to(dtype)[..., 1:7]
    target = _targets((2, 5, 6), 11, device)
    weight = (torch.rand(11, device=device) + 0.5).to(dtype)
    for reduction, smoothing in (("mean", 0.1), ("none", 0.0), ("sum", 0.3)):
        _check_against_torch(name, x, target, weight=weight, reduction=reduction, label_smoothing=smoothing)
    x = x.detach().requires_grad_()
    F.cross_entropy(x, target).backward()
    if layout != "sliced":  # same memory order as the logits (a slice's gradient is dense)
        assert x.grad.stride() == x.stride()


def test_unbatched_and_3d_inputs(backend):
    name, device = backend
    x = torch.randn(13, device=device)
    for target in (torch.tensor(4, device=device), torch.tensor(-100, device=device)):
        for reduction in ("mean", "sum", "none"):
            _check_against_torch(name, x, target, reduction=reduction, label_smoothing=0.2)
    x = torch.randn(3, 9, 7, device=device)
    _check_against_torch(name, x, _targets((3, 7), 9, device), label_smoothing=0.1, reduction="none")


def test_non_contiguous_logits(backend):
    """Sliced classes (copied), transposed (N, C) logits (read as positions, no copy), an
    expanded batch."""
    name, device = backend
    target = _targets((6,), 10, device)
    wide = torch.randn(6, 20, device=device)
    transposed = torch.randn(10, 6, device=device).t()
    for x in (wide[:, ::2], wide[:, 3:13], transposed):
        _check_against_torch(name, x, target, label_smoothing=0.1)
        _check_against_torch(name, x, target, reduction="none", weight=torch.rand(10, device=device))


def test_ignore_index_and_all_ignored(backend):
    name, device = backend
    x = torch.randn(4, 6, device=device)
    for ignore_index in (-100, 2, 0):
        target = torch.tensor([2, 0, 5, 2], device=device)
        _check_against_torch(name, x, target, ignore_index=ignore_index, label_smoothing=0.2)
        _check_against_torch(name, x, target, ignore_index=ignore_index, weight=torch.rand(6, device=device))
    nothing = torch.full((4,), -100, device=device)
    for kwargs in ({}, {"label_smoothing": 0.1}, {"weight": torch.rand(6, device=device)}):
        for reduction in ("mean", "sum", "none"):
            loss, grad, _ = _loss_and_grad(F.cross_entropy, x, nothing, reduction=reduction, **kwargs)
            expected = torch_F.cross_entropy(x, nothing, reduction=reduction, **kwargs)
            torch.testing.assert_close(loss, expected, equal_nan=True)  # mean: 0 / 0 = nan, as torch
            assert torch.equal(grad, torch.zeros_like(x))


def test_empty_batch(backend):
    name, device = backend
    x = torch.randn(0, 5, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        loss = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(loss, torch_F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1),
                                   equal_nan=True)


def test_vocabulary_of_256k(backend):
    """Rows longer than a program's tile and the CPU's block: the online softmax over blocks."""
    name, device = backend
    x = torch.randn(2, 262144, device=device) * 4
    x[1, 200000] = 40.0  # a late maximum rescales the running sum
    target = torch.tensor([5, 200000], device=device)
    _check_against_torch(name, x, target, label_smoothing=0.1)


def test_extreme_logits(backend):
    """-inf logits (masked classes) get exactly 0 gradient; a large common offset loses nothing."""
    name, device = backend
    x = torch.randn(3, 50, device=device)
    x[:, 10:20] = float("-inf")
    target = torch.tensor([1, 2, 49], device=device)
    loss, grad, _ = _loss_and_grad(F.cross_entropy, x, target)
    torch.testing.assert_close(loss, torch_F.cross_entropy(x, target))
    assert torch.equal(grad[:, 10:20], torch.zeros(3, 10, device=device))
    _check_against_torch(name, x[:, 20:] + 1e4, target - 20 * (target >= 20), label_smoothing=0.3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_against_its_formula(backend, reduction):
    """z_loss * logsumexp^2 per counted row, added to the loss; a mean takes it over the
    counted rows (the cross-entropy part over their total weight), with its gradient."""
    name, device = backend
    x = torch.randn(6, 9, dtype=torch.float64, device=device) * 3
    target = torch.tensor([0, -100, 3, 8, -100, 2], device=device)
    weight = torch.rand(9, dtype=torch.float64, device=device) + 0.5
    z_loss = 1e-2

    def formula(x):
        counted = target != -100
        z = torch.where(counted, z_loss * torch.logsumexp(x, 1) ** 2, 0)
        ce = torch_F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        if reduction == "mean":
            return ce + z.sum() / counted.sum(), z.sum() / counted.sum()
        return (ce + z.sum(), z.sum()) if reduction == "sum" else (ce + z, z)

    x_ours, x_formula = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = F.cross_entropy(x_ours, target, weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=z_loss)
    expected, z_expected = formula(x_formula)
    tol = dict(atol=1e-5, rtol=1e-5) if name == "triton" else dict(atol=1e-10, rtol=1e-10)  # fp32 constants
    torch.testing.assert_close(loss, expected, **tol)
    grad_loss = torch.rand_like(loss)
    torch.testing.assert_close(torch.autograd.grad(loss, x_ours, grad_loss)[0],
                               torch.autograd.grad(expected, x_formula, grad_loss)[0], **tol)
    # the z-loss term on its own, as linear_cross_entropy(return_z_loss=True) returns it
    _, z_term = F._cross_entropy(x, target, weight, -100, reduction, 0.1, z_loss)
    torch.testing.assert_close(z_term, z_expected.detach(), **tol)


def test_probability_targets_run_on_torch(backend):
    name, device = backend
    x = torch.randn(4, 5, device=device, requires_grad=True)
    probabilities = torch.softmax(torch.randn(4, 5, device=device), 1)
    torch.testing.assert_close(F.cross_entropy(x, probabilities, label_smoothing=0.1),
                               torch_F.cross_entropy(x, probabilities, label_smoothing=0.1))
    with_z = F.cross_entropy(x, probabilities, z_loss=0.1)
    expected = torch_F.cross_entropy(x, probabilities) + 0.1 * (torch.logsumexp(x, 1) ** 2).mean()
    torch.testing.assert_close(with_z, expected)


def test_uint8_targets_and_legacy_reduction_arguments(backend):
    name, device = backend
    x = torch.randn(4, 5, device=device)
    target = torch.tensor([0, 4, 2, 1], device=device)
    torch.testing.assert_close(F.cross_entropy(x, target.to(torch.uint8)), torch_F.cross_entropy(x, target))
    with pytest.warns(UserWarning):
        loss = F.cross_entropy(x, target, None, True, -100, False)  # size_average, reduce: positional, as torch
    torch.testing.assert_close(loss, torch_F.cross_entropy(x, target, reduction="none"))


def _raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 (what torch raises is the expectation)
        return type(error), str(error)
    return None


def test_bad_arguments_raise_what_torch_raises(backend):
    name, device = backend
    x = torch.randn(4, 5, device=device)
    target = torch.tensor([0, 1, 2, 3], device=device)
    cases = [
        lambda f: f(x, torch.tensor([0, 1, 2], device=device)),  # batch sizes differ
        lambda f: f(x, target.int()),  # int32 targets
        lambda f: f(x, target.float().unsqueeze(1)),  # float targets of another shape
        lambda f: f(x, target, weight=torch.rand(4, device=device)),
        lambda f: f(x, target, weight=torch.rand(5, device=device, dtype=torch.float64)),
        lambda f: f(x, target, label_smoothing=1.5),
        lambda f: f(x, target, reduction="average"),
        lambda f: f(torch.randn((), device=device), torch.tensor(0, device=device)),
        lambda f: f(x.long(), target),
        lambda f: f(torch.randn(4, 5, 3, device=device), torch.zeros(4, 2, dtype=torch.long, device=device)),
        lambda f: f(torch.randn(4, 5, 3, 2, device=device), torch.zeros(4, 3, dtype=torch.long, device=device)),
    ]
    if name != "triton":  # the Triton kernel makes the row nan (an assert in debug mode): no host sync
        cases += [lambda f: f(x, torch.tensor([0, 1, 2, 5], device=device)),
                  lambda f: f(x, torch.tensor([0, -3, 2, 1], device=device), label_smoothing=0.1),
                  lambda f: f(torch.randn(2, 5, 3, device=device), torch.full((2, 3), 7, device=device))]
    for case in cases:
        expected = _raised(lambda: case(torch_F.cross_entropy))
        assert expected is not None
        assert _raised(lambda: case(F.cross_entropy)) == expected
    with pytest.raises(ValueError, match="z_loss"):
        F.cross_entropy(x, target, z_loss=-1.0)


def test_out_of_range_target_on_triton_is_nan():
    device = "cuda" if GPU else "cpu"
    if fastreg._backend._why_not("triton", device) is not None:
        pytest.skip("triton cannot run here")
    with fastreg.use_backend("triton"):
        x = torch.randn(3, 5, device=device, requires_grad=True)
        loss = F.cross_entropy(x, torch.tensor([0, 9, 1], device=device), reduction="none")
        assert loss.isnan().tolist() == [False, True, False]


def test_modules_are_drop_ins():
    weight = torch.rand(7)
    ours = fastreg.nn.CrossEntropyLoss(weight=weight, ignore_index=3, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=3, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, target = torch.randn(5, 7), torch.tensor([3, 1, 6, 0, 3])
    torch.testing.assert_close(ours(x, target), theirs(x, target))


def test_convert_swaps_losses_only_when_included():
    model = torch.nn.ModuleDict({"head": torch.nn.Linear(4, 3), "drop": torch.nn.Dropout(0.1),
                                 "loss": torch.nn.CrossEntropyLoss(label_smoothing=0.1)})
    fastreg.convert(model, verbose=False)
    assert type(model["loss"]) is torch.nn.CrossEntropyLoss and type(model["drop"]) is fastreg.nn.Dropout
    fastreg.convert(model, include=["loss"], verbose=False)
    assert type(model["loss"]) is fastreg.nn.CrossEntropyLoss and model["loss"].label_smoothing == 0.1
    other = torch.nn.Sequential(torch.nn.CrossEntropyLoss())
    fastreg.convert(other, include=[torch.nn.CrossEntropyLoss], verbose=False)
    assert type(other[0]) is fastreg.nn.CrossEntropyLoss


# ----------------------------------------------- the gradient made in the forward's pass


class _RecordCalls(TorchDispatchMode):
    """Records (op name, args, outputs) of every fastreg op call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastreg":
            self.calls.append((func.__name__.split(".")[0], args, out))
        return out


def test_no_gradient_without_requires_grad(kernel_backend):
    name, device = kernel_backend
    x = torch.randn(8, 100, device=device)
    target = _targets((8,), 100, device)
    with _RecordCalls() as record:
        F.cross_entropy(x, target, label_smoothing=0.1)
    ((op, args, (loss, z_term, grad)),) = record.calls
    assert op.startswith("cross_entropy_fwd") and args[-1] is False and grad.numel() == 0
    x.requires_grad_()
    with _RecordCalls() as record:
        F.cross_entropy(x, target, label_smoothing=0.1).backward()
    ops = [call[0] for call in record.calls]
    assert ops[0].startswith("cross_entropy_fwd") and ops[1].startswith("cross_entropy_bwd")
    assert record.calls[0][2][2].shape == (*x.shape, 1)  # the gradient, made in forward


def test_saved_is_the_gradient_not_the_logits(kernel_backend):
    """Backward keeps the gradient of the logits (one logits-sized tensor), not the logits or
    a softmax; x.grad is that very tensor, scaled in place."""
    name, device = kernel_backend
    x = torch.randn(8, 100, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(x, _targets((8,), 100, device), label_smoothing=0.1)
    assert [t.shape for t in saved] == [(8, 100, 1)]  # the gradient, of the (N, C, S) view of x
    loss.backward()
    assert x.grad.data_ptr() == saved[0].data_ptr()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_and_incoming_gradients(kernel_backend, reduction):
    """Backward scales the saved gradient in place, except when the graph is retained: then
    into a new tensor, and the next backward finds the saved gradient intact."""
    name, device = kernel_backend
    x = torch.randn(4, 10, device=device, requires_grad=True)
    target = _targets((4,), 10, device)
    target[0] = 3
    loss = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    expected = torch_F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    grad_loss = torch.rand_like(loss) + 0.5
    for scale in (3.0, 1.0, 2.0):
        (grad,) = torch.autograd.grad(loss, x, grad_loss * scale, retain_graph=scale != 2.0)
        torch.testing.assert_close(grad, torch.autograd.grad(expected, x, grad_loss * scale, retain_graph=True)[0])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, x, grad_loss)


# --------------------------------------------------- opcheck, gradcheck, torch.compile

OPS = {"cpu": ("cross_entropy_fwd", "cross_entropy_bwd_", "linear_cross_entropy_fwd"),
       "cuda": ("cross_entropy_fwd", "cross_entropy_bwd_", "linear_cross_entropy_fwd"),
       "triton": ("cross_entropy_fwd_triton", "cross_entropy_bwd_triton_", "linear_cross_entropy_fwd_triton")}


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(name):  # AOT tracing runs the launcher on fake tensors: not in the interpreter
        utils += ("test_aot_dispatch_dynamic",)
    fwd, bwd, linear = (getattr(torch.ops.fastreg, n).default for n in OPS[name])
    x = torch.randn(5, 7, 3, device=device, requires_grad=True)
    target = _targets((5, 3), 7, device)
    weight = torch.rand(7, device=device)
    rows = torch.randn(6, 7, device=device, requires_grad=True).unsqueeze(2)
    for args in ((x, target, None, -100, 0.0, 0.0, 1, True), (x, target, weight, -100, 0.1, 1e-3, 0, True),
                 (x.transpose(1, 2).contiguous().transpose(1, 2), target.clamp(min=0), weight, 2, 0.2, 0.0, 2, False),
                 (rows, _targets((6, 1), 7, device), None, -100, 0.1, 0.0, 1, True)):
        torch.torch.library.opcheck(fwd, args, test_utils=utils)
    grad = torch.randn(5, 7, 3, device=device)
    torch.library.opcheck(bwd, (grad, torch.tensor(2.0, device=device)), test_utils=utils)
    torch.library.opcheck(bwd, (grad, torch.randn(5, 3, device=device)), test_utils=utils)
    tokens = torch.randn(9, 4, device=device, requires_grad=True)
    linear_weight = torch.randn(11, 4, device=device, requires_grad=True)
    bias = torch.randn(11, device=device, requires_grad=True)
    target = _targets((9,), 11, device)
    for args in ((tokens, linear_weight, bias, target, None, -100, 0.1, 1e-3, 1, None, False, False, False, 4),
                 (tokens, linear_weight, None, target, torch.rand(11, device=device), -100, 0.0, 0.0, 0, None, False,
                  False, False, 0),
                 (tokens.detach(), linear_weight.detach(), bias.detach(), target, None, -100, 0.0, 0.0, 2, None,
                  True, True, True, 3)):
        torch.library.opcheck(linear, args, test_utils=utils)


def test_gradcheck_fp64(backend):
    name, device = backend
    fast = interpreted(name)
    target = torch.tensor([[0, 3], [-100, 5], [2, 2]], device=device)
    weight = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    x = torch.randn(3, 6, 2, dtype=torch.float64, device=device, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x: F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1,
                                      z_loss=0.01), (x,), fast_mode=fast)
    tokens = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    linear_weight = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 5, -100, 3, 3], device=device)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: F.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, reduction=reduction,
                                                   label_smoothing=0.2, z_loss=0.01), (tokens, linear_weight, bias),
            fast_mode=fast)


class _Head(torch.nn.Module):
    def __init__(self, hidden, classes):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, classes)
        self.loss = fastreg.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        h = torch.relu(self.proj(x))
        return self.loss(self.out(h), target) + F.linear_cross_entropy(h, self.out.weight, target,
                                                                       linear_bias=self.out.bias, z_loss=1e-3)


def test_torch_compile_fullgraph(backend):
    """One graph, no break: the count of ignored targets stays on the device; the loss and
    gradients are eager's."""
    name, device = backend
    head = _Head(8, 13).to(device)
    x = torch.randn(6, 8, device=device)
    target = torch.tensor([1, -100, 12, 0, -100, 5], device=device)
    compiled = torch.compile(head, fullgraph=True)
    loss = compiled(x, target)
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    eager = head(x, target)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for g, g_eager in zip(grads, [p.grad for p in head.parameters()]):
        torch.testing.assert_close(g, g_eager)
    assert torch._dynamo.explain(head)(x, target).graph_break_count == 0


# ------------------------------------------------------------------------ the linear form


def _linear_case(device, dtype, tokens=37, hidden=16, classes=53, bias=True):
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(classes, hidden, device=device, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
    b = torch.randn(classes, device=device, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b, _targets((tokens,), classes, device)


def _grads(loss, inputs, grad_loss):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, inputs, grad_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_unfused_sequence(backend, reduction, bias):
    name, device = backend
    x, w, b, target = _linear_case(device, torch.float32, bias=bias)
    weight = torch.rand(53, device=device) + 0.5
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1, ignore_index=-100)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, z_loss=1e-3, **kwargs)
    unfused = F.cross_entropy(torch_F.linear(x, w, b), target, z_loss=1e-3, **kwargs)
    torch.testing.assert_close(loss, unfused, rtol=LINEAR_RTOL[torch.float32], atol=1e-5)
    grad_loss = torch.rand_like(loss)
    for g, g_unfused in zip(_grads(loss, (x, w, b), grad_loss), _grads(unfused, (x, w, b), grad_loss)):
        torch.testing.assert_close(g, g_unfused, rtol=LINEAR_RTOL[torch.float32], atol=1e-5)
    if hasattr(torch_F, "linear_cross_entropy"):  # torch 2.13 and later
        native = torch_F.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)
        ours = F.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)
        torch.testing.assert_close(ours, native, rtol=LINEAR_RTOL[torch.float32], atol=1e-5)
        for g, g_native in zip(_grads(ours, (x, w, b), grad_loss), _grads(native, (x, w, b), grad_loss)):
            torch.testing.assert_close(g, g_native, rtol=LINEAR_RTOL[torch.float32], atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 37])
def test_linear_chunks_give_the_same_result(kernel_backend, chunk):
    """Chunks of tokens: each chunk's gradients accumulate into the same sums; the chunk size
    (the op's last argument, 0: its default) changes nothing beyond float32 rounding."""
    name, device = kernel_backend
    x, w, b, target = _linear_case(device, torch.float32)
    op = LINEAR_CROSS_ENTROPY_FWD[name]
    args = (x.detach(), w.detach(), b.detach(), target, None, -100, 0.1, 1e-3, 1, None, True, True, True)
    whole = op(*args, 0)
    chunked = op(*args, chunk)
    for out, expected in zip(chunked, whole):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_vocabulary_past_one_block(kernel_backend, bias):
    """A vocabulary of several blocks and a ragged last one (the cpu backend computes a
    chunk's logits in slices of 512 weight rows, one matmul each): float64 against the
    unfused sequence, and the loss of the cpu backend the same on one thread as on all."""
    name, device = kernel_backend
    x, w, b, target = _linear_case(device, torch.float64, bias=bias, tokens=40, hidden=24, classes=1100)
    kwargs = dict(reduction="mean", label_smoothing=0.1)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)
    unfused = F.cross_entropy(torch_F.linear(x, w, b), target, **kwargs)
    torch.testing.assert_close(loss, unfused, rtol=LINEAR_RTOL[torch.float64], atol=1e-12)
    for g, g_unfused in zip(_grads(loss, (x, w, b), None), _grads(unfused, (x, w, b), None)):
        torch.testing.assert_close(g, g_unfused, rtol=LINEAR_RTOL[torch.float64], atol=1e-12)
    if device == "cpu" and torch.get_num_threads() > 1:
        threads = torch.get_num_threads()
        x32, w32 = x.detach().float(), w.detach().float()
        b32 = b.detach().float() if bias else None
        on_all = F.linear_cross_entropy(x32, w32, target, linear_bias=b32, **kwargs)
        torch.set_num_threads(1)
        try:
            on_one = F.linear_cross_entropy(x32, w32, target, linear_bias=b32, **kwargs)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(on_all, on_one)


def test_linear_strided_arguments(backend):
    """A strided input, a transposed weight and a strided bias, across several vocabulary
    blocks: float64 against the unfused sequence."""
    name, device = backend
    tokens, hidden, classes = 40, 24, 1100
    x = torch.randn(tokens, 2 * hidden, device=device, dtype=torch.float64)[:, ::2].requires_grad_()
    w = torch.randn(hidden, classes, device=device, dtype=torch.float64).t().requires_grad_()
    b = torch.randn(2 * classes, device=device, dtype=torch.float64)[::2].requires_grad_()
    target = _targets((tokens,), classes, device)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1)
    unfused = F.cross_entropy(torch_F.linear(x, w, b), target, label_smoothing=0.1)
    torch.testing.assert_close(loss, unfused, rtol=LINEAR_RTOL[torch.float64], atol=1e-12)
    for g, g_unfused in zip(_grads(loss, (x, w, b), None), _grads(unfused, (x, w, b), None)):
        torch.testing.assert_close(g, g_unfused, rtol=LINEAR_RTOL[torch.float64], atol=1e-12)


@pytest.mark.parametrize("tokens,hidden,classes,element_size,expected", [
    (4096, 1024, 32768, 4, 128),     # the bench's shape: a buffer the input's size, 16 MiB
    (100, 64, 1000, 4, 32),          # at least 32 tokens
    (4096, 4096, 1000, 4, 820),      # V < H: at most a fifth of the tokens
    (1 << 20, 4096, 131072, 2, 1024),  # at most 256 MiB of logits
    (5, 8, 3, 4, 5),                 # never more than the tokens
])
def test_linear_chunk_rule(tokens, hidden, classes, element_size, expected):
    """The triton backend's chunk rule (the C++ backends' linear_chunk_rows is the same)."""
    from fastreg.triton_kernels.cross_entropy import linear_chunk_tokens

    rows = linear_chunk_tokens(tokens, hidden, classes, element_size)
    assert rows == expected
    if tokens >= 5 * 32:  # the buffer holds at most a fifth of the logits (rounded up)
        assert rows <= -(-tokens // 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_low_precision(backend, dtype):
    """float16/bfloat16: the logits as the unfused F.linear rounds them, float32 math after;
    grad_weight accumulated in float32 over the chunks (closer to float64 than torch's)."""
    name, device = backend
    x, w, b, target = _linear_case(device, dtype, tokens=64, hidden=32, classes=40)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1)
    unfused = torch_F.cross_entropy(torch_F.linear(x, w, b), target, label_smoothing=0.1)
    reference = torch_F.cross_entropy(torch_F.linear(x.double(), w.double(), b.double()), target, label_smoothing=0.1)
    slack = _interpreter_slack(name, reference, dtype)
    _assert_relative_rule(loss, unfused, reference, ATOL[dtype], slack)
    grads = _grads(loss, (x, w, b), None)
    grads_unfused = _grads(unfused, (x, w, b), None)
    grads_reference = _grads(reference, (x, w, b), None)
    for g, g_unfused, g_reference in zip(grads, grads_unfused, grads_reference):
        assert g.dtype == dtype
        _assert_relative_rule(g, g_unfused, g_reference, 4 * GRAD_ATOL[dtype] * 64**0.5,
                              _interpreter_slack(name, g_reference, dtype))


def test_linear_signature_and_errors_match_torch():
    ours = inspect.signature(F.linear_cross_entropy).parameters
    if not hasattr(torch_F, "linear_cross_entropy"):
        pytest.skip("torch < 2.13 has no linear_cross_entropy")
    theirs = inspect.signature(torch_F.linear_cross_entropy).parameters
    for name, parameter in theirs.items():
        assert ours[name].kind == parameter.kind and ours[name].default == parameter.default, name
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    target = torch.tensor([0, 1, 4, -100])
    cases = [
        lambda f: f(torch.randn(2, 4, 3), w, target),
        lambda f: f(x, torch.randn(5), target),
        lambda f: f(x, torch.randn(5, 2), target),
        lambda f: f(x, w, target, linear_bias=torch.randn(4)),
        lambda f: f(torch.randn(3), torch.randn(5, 2, 3), target),
        lambda f: f(x, w, torch.softmax(torch.randn(4, 5), 1), ignore_index=-100),
        lambda f: f(x, w, target, reduction="bad"),
        lambda f: f(x, w, target, label_smoothing=2.0),
        lambda f: f(x, w.double(), target),
        lambda f: f(x, w, target[:3]),
        lambda f: f(x, w, target.int()),
        lambda f: f(x, w, torch.tensor([0, 1, 9, 2])),
    ]
    for case in cases:
        expected = _raised(lambda: case(torch_F.linear_cross_entropy))
        assert expected is not None
        assert _raised(lambda: case(F.linear_cross_entropy)) == expected


def test_linear_unbatched_k_dim_and_probability_targets(backend):
    name, device = backend
    w = torch.randn(5, 3, device=device)
    x = torch.randn(3, device=device)
    for reduction in ("mean", "none"):
        torch.testing.assert_close(F.linear_cross_entropy(x, w, torch.tensor(2, device=device), reduction=reduction),
                                   torch_F.cross_entropy(torch_F.linear(x, w), torch.tensor(2, device=device),
                                                         reduction=reduction))
    # K-dimensional weights (C, d1, in_features): the unfused path, per position
    x = torch.randn(4, 3, device=device)
    w_k = torch.randn(5, 2, 3, device=device)
    target = torch.randint(0, 5, (4, 2), device=device)
    logits = torch_F.linear(x, w_k.reshape(10, 3)).reshape(4, 5, 2)
    torch.testing.assert_close(F.linear_cross_entropy(x, w_k, target), torch_F.cross_entropy(logits, target))
    probabilities = torch.softmax(torch.randn(4, 5, device=device), 1)
    torch.testing.assert_close(F.linear_cross_entropy(x, w, probabilities),
                               torch_F.cross_entropy(torch_F.linear(x, w), probabilities))


def test_linear_returns_z_loss(backend):
    name, device = backend
    x, w, b, target = _linear_case(device, torch.float64)
    loss, z_term = F.linear_cross_entropy(x, w, target, linear_bias=b, z_loss=1e-2, return_z_loss=True)
    logits = torch_F.linear(x, w, b)
    counted = target != -100
    expected_z = 1e-2 * (torch.logsumexp(logits, 1)[counted] ** 2).mean()
    torch.testing.assert_close(z_term, expected_z.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, torch_F.cross_entropy(logits, target) + expected_z, rtol=1e-6, atol=0)
    assert not z_term.requires_grad  # for logging: its gradient is part of the loss's


def test_linear_module_is_a_drop_in():
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("torch < 2.13 has no LinearCrossEntropyLoss")
    torch.manual_seed(1)
    theirs = torch.nn.LinearCrossEntropyLoss(6, 9, bias=True, label_smoothing=0.1)
    ours = fastreg.nn.LinearCrossEntropyLoss(6, 9, bias=True, label_smoothing=0.1)
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x, target = torch.randn(4, 6), torch.tensor([0, 8, 3, -100])
    torch.testing.assert_close(ours(x, target), theirs(x, target))


# ------------------------------------------------------ ahead-of-time compile for a GPU
# The launchers' kernels as they launch them: the arguments of launches recorded on CPU
# tensors (nothing runs), typed as a launch types them (a tensor: a 16-byte aligned pointer
# to its dtype; an int: i32, or the constexpr 1 when it is 1, marked divisible by 16 when it
# is; a float: fp32), compiled for sm_90 (tests/triton_aot.py).


class _RecordedKernel:
    """Stands in for a @triton.jit kernel: records each launch's arguments, runs nothing."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))

        return launch


_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
             torch.int64: "i64"}


def _aot_case(case_id, kernel, args, kwargs):
    fn = getattr(kernel, "fn", kernel)
    names = list(inspect.signature(fn).parameters)
    signature, constexprs, div16 = {}, {}, []
    for arg_name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[arg_name] = "*" + _TL_DTYPE[value.dtype]
        elif isinstance(value, bool):
            constexprs[arg_name] = value
        elif isinstance(value, int):
            if value == 1:
                constexprs[arg_name] = 1
            else:
                signature[arg_name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    div16.append(arg_name)
        else:
            signature[arg_name] = "fp32"
    num_warps = kwargs.pop("num_warps", 4)
    constexprs.update(kwargs)
    return triton_aot.Case(case_id, "fastreg.triton_kernels.cross_entropy", fn.__name__, signature, constexprs,
                           num_warps=num_warps, div16=tuple(div16))


def _recorded_launches():
    """(case id, kernel, args, kwargs) of the launches of the forward (rows: vocabularies of
    32K and 256K; columns: a segmentation map), the backward scale and the linear form."""
    pytest.importorskip("triton")
    from fastreg.triton_kernels import cross_entropy as kernels

    launches, cases = [], []
    originals = (kernels._cross_entropy_kernel, kernels._scale_kernel)
    kernels._cross_entropy_kernel = _RecordedKernel(originals[0], launches)
    kernels._scale_kernel = _RecordedKernel(originals[1], launches)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for label, shape, smoothing, weighted in (("rows-32k", (4, 32768, 1), 0.1, True),
                                                      ("rows-256k", (2, 262144, 1), 0.0, False),
                                                      ("columns", (2, 21, 4096), 0.1, False)):
                x = torch.empty(shape, dtype=dtype)
                target = torch.zeros(shape[0], shape[2], dtype=torch.long)
                weight = torch.ones(shape[1], dtype=dtype) if weighted else None
                before = len(launches)
                loss, z_term, grad = kernels.cross_entropy_fwd(x, target, weight, -100, smoothing, 1e-4, 1, True)
                cases += [(f"fwd-{label}-{dtype}", *launches[before])]
                kernels.cross_entropy_bwd_(grad, torch.tensor(2.0, dtype=dtype))
                cases += [(f"bwd-{label}-{dtype}", *launches[before + 1])]
        before = len(launches)
        kernels.linear_cross_entropy_fwd(torch.zeros(8, 64), torch.zeros(1024, 64), None, torch.zeros(8, dtype=torch.long),
                                         None, -100, 0.0, 0.0, 1, None, True, True, False)
        cases += [("linear-fp32", *launches[before])]
    finally:
        kernels._cross_entropy_kernel, kernels._scale_kernel = originals
    return [_aot_case(case_id, kernel, args, dict(kwargs)) for case_id, kernel, args, kwargs in cases]


@pytest.fixture(scope="module")
def aot_cases():
    return _recorded_launches()


@pytest.fixture(scope="module")
def aot_ptx(aot_cases):
    return triton_aot.compile_ptx(aot_cases)


def test_triton_kernels_compile_for_a_gpu(aot_cases, aot_ptx):
    """Every recorded launch compiles for sm_90; the rows read and write the logits 16 bytes
    at a time (vocabulary rows are contiguous)."""
    for case in aot_cases:
        ptx = triton_aot.ptx_of(aot_ptx, case)
        if case.id.startswith(("fwd-rows", "bwd-rows", "linear")) and case.kernel == "_cross_entropy_kernel":
            assert triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True), f"{case.id}: no 16-byte loads"
            assert triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), f"{case.id}: no 16-byte stores"
