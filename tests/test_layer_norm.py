"""LayerNorm, RMSNorm and the fused dropout + add + norm against PyTorch on every backend."""

import re

import pytest
import torch
import torch.nn.functional as torch_F
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg
from fastreg import _reference, _rng
from fastreg.ops.norm import _NORM_FWD_Y_ENTRY, NORM_FWD
from fastreg import functional as F
from tests.conftest import interpreted, skip_unless_runs

# The relative rule: against a float32 reference computed from the same rounded input,
# fastreg's error may be at most twice PyTorch's own error in the input dtype, plus an
# atol. For float32 there is no "own error" to speak of, so a plain tolerance.
# Backward is looser than forward: dx sums N products per element, and dweight/dbias
# sum over the rows (their atol grows with sqrt(rows)).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}
BACKWARD_ATOL_FACTOR = 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 7, 1023, 4097]


def _interpreter_slack(backend_name, reference, dtype):
    # The Triton interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to
    # nearest): allow it one more bfloat16 ulp of the largest value.
    if interpreted(backend_name) and dtype == torch.bfloat16:
        return torch.finfo(dtype).eps * reference.abs().max().item()
    return 0.0


def _assert_relative_rule(ours, torch_own, reference, atol, slack=0.0):
    """|ours - reference| <= 2 * |torch_own - reference| + atol, elementwise (max)."""
    ours_error = (ours.double() - reference.double()).abs().max().item()
    torch_error = (torch_own.double() - reference.double()).abs().max().item()
    assert ours_error <= 2 * torch_error + atol + slack, (ours_error, torch_error, atol, slack)


def _layer_norm_grads(fn, x, weight, bias, grad):
    inputs = [t for t in (x, weight, bias) if t is not None]
    return torch.autograd.grad(fn(x, weight, bias), inputs, grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_matches_torch(backend, dtype, hidden, is_rms):
    name, device = backend
    rows = 3
    x = (torch.randn(rows, hidden, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    weight = torch.randn(hidden, device=device).to(dtype).requires_grad_()
    bias = None if is_rms else torch.randn(hidden, device=device).to(dtype).requires_grad_()
    grad = torch.randn(rows, hidden, device=device).to(dtype)

    def ours(x, w, b):
        return F.rms_norm(x, (hidden,), w, 1e-5) if is_rms else F.layer_norm(x, (hidden,), w, b)

    def theirs(x, w, b):
        return torch_F.rms_norm(x, (hidden,), w, 1e-5) if is_rms else torch_F.layer_norm(x, (hidden,), w, b)

    def as_float64(t):  # the reference: float64 from the same rounded inputs
        return t.detach().double().requires_grad_() if t is not None else None

    reference_inputs = [as_float64(t) for t in (x, weight, bias)]
    y, y_torch, y_reference = ours(x, weight, bias), theirs(x, weight, bias), theirs(*reference_inputs)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_relative_rule(y, y_torch, y_reference, ATOL[dtype], _interpreter_slack(name, y_reference, dtype))

    grads = _layer_norm_grads(ours, x, weight, bias, grad)
    grads_torch = _layer_norm_grads(theirs, x, weight, bias, grad)
    grads_reference = _layer_norm_grads(theirs, *reference_inputs, grad.double())
    for g, g_torch, g_reference in zip(grads, grads_torch, grads_reference):
        assert g.dtype == dtype
        atol = BACKWARD_ATOL_FACTOR * ATOL[dtype] * rows**0.5
        _assert_relative_rule(g, g_torch, g_reference, atol, _interpreter_slack(name, g_reference, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_weights(backend, dtype):
    name, device = backend
    x = torch.randn(5, 96, device=device).to(dtype).requires_grad_()
    weight = torch.randn(96, device=device, requires_grad=True)
    bias = torch.randn(96, device=device, requires_grad=True)
    y = F.layer_norm(x, (96,), weight, bias)
    assert y.dtype == dtype
    reference = torch_F.layer_norm(x.detach().float(), (96,), weight, bias)
    torch.testing.assert_close(y.float(), reference, atol=ATOL[dtype] * 4, rtol=0.02)
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == dtype


@pytest.mark.parametrize("hidden", [65537, 262144])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_rows_longer_than_the_chip_holds(backend, hidden, is_rms):
    """Past 64 KiB per row the kernels loop over the row (several passes), not error out."""
    name, device = backend
    if interpreted(name) and hidden > 65537:
        pytest.skip("the Triton kernels loop over float32 rows past 16384 (forward) and 4096 (backward) "
                    "columns: 65537 takes those paths")
    x = (torch.randn(2, hidden, device=device) + 3).requires_grad_()
    weight = torch.randn(hidden, device=device, requires_grad=True)
    bias = None if is_rms else torch.randn(hidden, device=device, requires_grad=True)
    if is_rms:
        y, reference = F.rms_norm(x, (hidden,), weight, 1e-6), torch_F.rms_norm(x, (hidden,), weight, 1e-6)
    else:
        y, reference = F.layer_norm(x, (hidden,), weight, bias), torch_F.layer_norm(x, (hidden,), weight, bias)
    torch.testing.assert_close(y, reference, atol=2e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    inputs = [t for t in (x, weight, bias) if t is not None]
    for ours, theirs in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# (hidden, dtype, dh, dropout) -> the Triton backward's plan (layer_norm._bwd_plan): the
# row on chip in one part, in two parts, or looped (two passes per row, a second kernel
# for dweight / dbias)
BACKWARD_PLANS = {
    (1000, torch.bfloat16, True, True): 1,
    (12000, torch.bfloat16, False, False): 2,
    (12000, torch.bfloat16, True, False): 2,
    (12000, torch.bfloat16, False, True): 2,
    (12000, torch.bfloat16, True, True): 0,
    (12000, torch.float32, False, False): 0,
}


@pytest.mark.parametrize("plan", list(BACKWARD_PLANS), ids=lambda plan: "-".join(map(str, plan)).replace("torch.", ""))
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_triton_backward_plans_match_the_cpu_kernel(plan, is_rms):
    """Each way the Triton backward walks a row gives the C++ CPU kernel's dx, dweight,
    dbias and dropout(dx) (that kernel is checked against torch above)."""
    from tests.conftest import skip_unless_runs

    if skip_unless_runs("triton") != "cpu" or skip_unless_runs("cpu") != "cpu":
        pytest.skip("compares the interpreted Triton kernel with the CPU kernel on the same CPU tensors")
    from fastreg.triton_kernels import layer_norm

    hidden, dtype, with_dh, with_dropout = plan
    assert layer_norm._bwd_plan(hidden, dtype.itemsize, with_dh and with_dropout)[1] == BACKWARD_PLANS[plan]
    rows = 3
    x = (torch.randn(rows, hidden) * 2 + 0.5).to(dtype)
    weight = torch.randn(hidden).to(dtype)
    dy = torch.randn(rows, hidden).to(dtype)
    dh = torch.randn(rows, hidden).to(dtype) if with_dh else None
    seed = torch.tensor([1234], dtype=torch.int64) if with_dropout else None
    p = 0.3 if with_dropout else 0.0
    _, _, mean, rstd = torch.ops.fastreg.norm_fwd(x, weight, None, 1e-5, is_rms, None, None, 0.0, False, False)
    ours = layer_norm.norm_bwd(dy, x, weight, mean, rstd, is_rms, not is_rms, dh, seed, p)
    theirs = torch.ops.fastreg.norm_bwd(dy, x, weight, mean, rstd, is_rms, not is_rms, dh, seed, p)
    for mine, expected in zip(ours, theirs):
        assert mine.shape == expected.shape and mine.dtype == expected.dtype
        torch.testing.assert_close(mine.float(), expected.float(), atol=ATOL[dtype] * 8, rtol=0.02)


def test_statistics_stable_for_large_means(backend):
    """Rows with mean 1e4 and unit variance normalize correctly in float32."""
    name, device = backend
    x = (torch.randn(4, 4096, device=device, dtype=torch.float64) + 1e4).float()
    reference = torch_F.layer_norm(x.double(), (4096,))  # exact statistics of the rounded input
    # atol: half an ulp of float32 at 1e4 (2**-11), the resolution of a float32 mean there,
    # which every float32 LayerNorm (torch's included) subtracts; with unit variance it
    # shows as is in y. A one-pass E[x^2] - E[x]^2 would be off by ~1 instead.
    _assert_relative_rule(F.layer_norm(x, (4096,)), torch_F.layer_norm(x, (4096,)), reference, atol=2**-11)


def test_multi_dim_normalized_shape_zero_rows_and_non_contiguous(backend):
    name, device = backend
    x = torch.randn(2, 5, 3, 4, device=device)
    weight, bias = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    torch.testing.assert_close(F.layer_norm(x, (3, 4), weight, bias), torch_F.layer_norm(x, (3, 4), weight, bias))
    empty = torch.randn(0, 7, device=device, requires_grad=True)
    weight7 = torch.randn(7, device=device, requires_grad=True)
    out = F.layer_norm(empty, (7,), weight7)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert torch.equal(weight7.grad, torch.zeros(7, device=device))
    strided = torch.randn(6, 40, device=device)[:, ::2].t()  # (20, 6), no row is contiguous
    torch.testing.assert_close(F.rms_norm(strided, (6,)), torch_F.rms_norm(strided, (6,)))


def test_deterministic_weight_gradients(backend):
    name, device = backend
    x = torch.randn(300, 129, device=device, requires_grad=True)
    weight = torch.randn(129, device=device, requires_grad=True)
    bias = torch.randn(129, device=device, requires_grad=True)
    grad = torch.randn(300, 129, device=device)
    first = torch.autograd.grad(F.layer_norm(x, (129,), weight, bias), (weight, bias), grad)
    second = torch.autograd.grad(F.layer_norm(x, (129,), weight, bias), (weight, bias), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_arguments_raise_what_torch_raises(backend):
    name, device = backend
    x = torch.randn(2, 3, 4, device=device)
    cases = [
        (torch_F.layer_norm, F.layer_norm, (x, (5,))),
        (torch_F.layer_norm, F.layer_norm, (x, (3, 4, 5))),
        (torch_F.layer_norm, F.layer_norm, (x, (4,), torch.ones(3, device=device))),
        (torch_F.layer_norm, F.layer_norm, (x, (4,), torch.ones(4, device=device), torch.ones(3, device=device))),
        (torch_F.rms_norm, F.rms_norm, (x, (5,))),
        (torch_F.rms_norm, F.rms_norm, (x, (4,), torch.ones(3, device=device))),
    ]
    for theirs, ours, args in cases:
        with pytest.raises(RuntimeError) as expected:
            theirs(*args)
        with pytest.raises(RuntimeError) as got:
            ours(*args)
        assert str(got.value) == str(expected.value)


def test_modules_are_drop_ins():
    pairs = [
        (fastreg.nn.LayerNorm(8), torch.nn.LayerNorm(8)),
        (fastreg.nn.LayerNorm((2, 8), elementwise_affine=False), torch.nn.LayerNorm((2, 8), elementwise_affine=False)),
        (fastreg.nn.LayerNorm(8, bias=False), torch.nn.LayerNorm(8, bias=False)),
        (fastreg.nn.RMSNorm(8), torch.nn.RMSNorm(8)),
        (fastreg.nn.RMSNorm(8, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6)),
    ]
    x = torch.randn(3, 2, 8)
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs) and isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))
    fused = fastreg.nn.DropoutAddLayerNorm(8, p=0.1)
    assert fused.state_dict().keys() == torch.nn.LayerNorm(8).state_dict().keys()
    assert "p=0.1" in repr(fused)
    fused.eval()
    residual = torch.randn(3, 2, 8)
    torch.testing.assert_close(fused(x, residual), torch_F.layer_norm(x + residual, (8,), fused.weight, fused.bias))


# --------------------------------------------------------------------- fused block


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_dropout_add_norm_matches_unfused_sequence(backend, dtype, is_rms, residual_in_fp32):
    name, device = backend
    shape, p = (4, 3, 67), 0.25
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    residual = torch.randn(shape, device=device).to(dtype).requires_grad_()
    weight = torch.randn(67, device=device).to(dtype).requires_grad_()
    bias = None if is_rms else torch.randn(67, device=device).to(dtype).requires_grad_()
    torch.manual_seed(11)
    if is_rms:
        out, h = F.dropout_add_rms_norm(x, residual, weight, p, 1e-5, prenorm=True, residual_in_fp32=residual_in_fp32)
    else:
        out, h = F.dropout_add_layer_norm(x, residual, weight, bias, p, prenorm=True, residual_in_fp32=residual_in_fp32)
    torch.manual_seed(11)
    keep = _reference.keep_mask(shape, _rng.new_seed(torch.device(device)), p)
    assert h.dtype == (torch.float32 if residual_in_fp32 else dtype)

    # the unfused sequence in float32 with the same mask
    xr, rr = x.detach().float().requires_grad_(), residual.detach().float().requires_grad_()
    wr = weight.detach().float().requires_grad_()
    br = bias.detach().float().requires_grad_() if bias is not None else None
    hr = rr + xr * keep / (1 - p)
    hr_rounded = hr if residual_in_fp32 else hr.to(dtype).float()
    if is_rms:
        out_reference = torch_F.rms_norm(hr_rounded, (67,), wr, 1e-5)
    else:
        out_reference = torch_F.layer_norm(hr_rounded, (67,), wr, br)
    atol = ATOL[dtype]
    slack = _interpreter_slack(name, hr, dtype) if not residual_in_fp32 else 0.0
    torch.testing.assert_close(h.float(), hr.to(h.dtype).float(), atol=atol + slack, rtol=0)
    torch.testing.assert_close(out.float(), out_reference, atol=4 * atol, rtol=0.02)

    # backward through both outputs
    grad_out, grad_h = torch.randn_like(out), torch.randn_like(h)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    reference_inputs = [t for t in (xr, rr, wr, br) if t is not None]
    ours = torch.autograd.grad((out, h), inputs, (grad_out, grad_h))
    theirs = torch.autograd.grad((out_reference, hr_rounded), reference_inputs, (grad_out.float(), grad_h.float()))
    for g, expected in zip(ours, theirs):
        torch.testing.assert_close(g.float(), expected, atol=BACKWARD_ATOL_FACTOR * atol * 12**0.5, rtol=0.03)


def test_gradient_through_h_alone(backend):
    """prenorm with only h used: dx = mask / (1 - p), dresidual = 1 (no zeros for the unused output)."""
    name, device = backend
    x, residual = (torch.randn(6, 36, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(36, device=device)
    torch.manual_seed(4)
    _, h = F.dropout_add_rms_norm(x, residual, weight, 0.25, prenorm=True)
    h.sum().backward()
    torch.manual_seed(4)
    keep = _reference.keep_mask(x.shape, _rng.new_seed(torch.device(device)), 0.25)
    torch.testing.assert_close(x.grad, keep.float() / 0.75)
    assert torch.equal(residual.grad, torch.ones_like(residual))


def test_dropout_add_norm_without_residual_and_in_eval(backend):
    name, device = backend
    x = torch.randn(6, 32, device=device, requires_grad=True)
    weight, bias = torch.randn(32, device=device), torch.randn(32, device=device)
    out = F.dropout_add_layer_norm(x, None, weight, bias, 0.5)
    assert out.shape == x.shape
    out.sum().backward()
    evaluated = F.dropout_add_layer_norm(x, x, weight, bias, 0.5, training=False)
    torch.testing.assert_close(evaluated, torch_F.layer_norm(2 * x, (32,), weight, bias))
    with pytest.raises(RuntimeError, match="'residual' must match x"):
        F.dropout_add_layer_norm(x, x[:, :3], weight, bias, 0.5)
    with pytest.raises(ValueError, match="dropout probability"):
        F.dropout_add_rms_norm(x, x, weight, 1.5)


# --------------------------------------------------- opcheck, gradcheck, torch.compile

NORM_OPS = {"cpu": ("norm_fwd", "norm_bwd"), "cuda": ("norm_fwd", "norm_bwd"),
            "triton": ("norm_fwd_triton", "norm_bwd_triton")}


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(name):  # AOT tracing runs the launcher on fake tensors: not in the interpreter
        utils += ("test_aot_dispatch_dynamic",)
    fwd, bwd = (getattr(torch.ops.fastreg, n).default for n in NORM_OPS[name])
    x = torch.randn(5, 24, device=device, requires_grad=True)
    w, b = torch.randn(24, device=device, requires_grad=True), torch.randn(24, device=device, requires_grad=True)
    residual = torch.randn(5, 24, device=device, requires_grad=True)
    seed = torch.tensor(3, device=device)
    for args in ((x, w, b, 1e-5, False), (x, w, None, 1e-5, True), (x, None, None, 1e-5, False, residual, seed, 0.3),
                 (x, w, b, 1e-5, False, residual, None, 0.0, True), (x, w, b, 1e-5, False, residual, seed, 0.3, False, False)):
        # (the last: inference, h not stored; autograd registration is still checked)
        torch.library.opcheck(fwd, args, test_utils=utils)
    y, h, mean, rstd = fwd(x.detach(), w.detach(), b.detach(), 1e-5, False)
    dy, xd, wd = torch.randn_like(y), x.detach(), w.detach()
    torch.library.opcheck(bwd, (dy, xd, wd, mean, rstd, False, True), test_utils=utils)
    torch.library.opcheck(bwd, (dy, xd, wd, mean, rstd, False, True, torch.randn_like(y), seed, 0.3), test_utils=utils)


class _RecordTorchFunctions(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class _RecordDispatches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class _LoggingTensor(torch.Tensor):
    """A subclass with its own __torch_function__ (it records the functions it sees)."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_direct_entry_is_the_op_seen_from_python(name):
    """fastreg._C.norm_fwd_y, the C++ backends' entry for the plain norm, gives the op's y and
    autograd, is seen by dispatch modes as the op, and leaves __torch_function__ to the op."""
    device = skip_unless_runs(name)
    assert _NORM_FWD_Y_ENTRY is not None
    op = torch.ops.fastreg.norm_fwd.default
    x = torch.randn(6, 40, device=device, requires_grad=True)
    w, b = (torch.nn.Parameter(torch.randn(40, device=device)) for _ in range(2))
    y = _NORM_FWD_Y_ENTRY(x, w, b, 1e-5, False)
    assert torch.equal(y, op(x, w, b, 1e-5, False)[0]) and y.grad_fn is not None
    assert torch.equal(_NORM_FWD_Y_ENTRY(x, w, None, 1e-6, True), op(x, w, None, 1e-6, True)[0])
    grad = torch.randn_like(y)
    expected = torch.autograd.grad(op(x, w, b, 1e-5, False)[0], (x, w, b), grad)
    for ours, theirs in zip(torch.autograd.grad(y, (x, w, b), grad), expected):
        assert torch.equal(ours, theirs)
    # the op's own errors, as the op raises them
    with pytest.raises(RuntimeError) as through_op:
        op(x[0], w, b, 1e-5, False)
    with pytest.raises(type(through_op.value), match=re.escape(str(through_op.value).splitlines()[0])):
        _NORM_FWD_Y_ENTRY(x[0], w, b, 1e-5, False)
    with pytest.raises(TypeError, match="takes 5 positional arguments"):
        _NORM_FWD_Y_ENTRY(x, w, b, 1e-5)
    # what it does not take, it hands back: other argument types, __torch_function__
    assert _NORM_FWD_Y_ENTRY(x, w, b, 1, False) is NotImplemented
    assert _NORM_FWD_Y_ENTRY(x, w, b, 1e-5, 0) is NotImplemented
    assert _NORM_FWD_Y_ENTRY(x, w.detach().as_subclass(_LoggingTensor), b, 1e-5, False) is NotImplemented
    with _RecordTorchFunctions():
        assert _NORM_FWD_Y_ENTRY(x, w, b, 1e-5, False) is NotImplemented
    # and fastreg's layer_norm then calls the op, which those see
    with _RecordTorchFunctions() as functions:
        assert torch.equal(F.layer_norm(x, (40,), w, b), y)
    assert op in functions.calls
    _LoggingTensor.seen = []
    F.layer_norm(x.detach().as_subclass(_LoggingTensor), (40,), w, b)
    assert op in _LoggingTensor.seen
    with _RecordDispatches() as dispatches:
        assert torch.equal(F.layer_norm(x, (40,), w, b), y)
    assert op in dispatches.calls


def test_fused_inference_skips_h_and_matches_training_output(backend):
    """Without grad and prenorm, h is not written; the output is that of the training path."""
    name, device = backend
    x, residual = torch.randn(5, 40, device=device), torch.randn(5, 40, device=device)
    weight, bias = torch.randn(40, device=device), torch.randn(40, device=device)
    fwd = NORM_FWD[name]
    seed = torch.tensor(5, device=device)
    y_stored, h, _, _ = fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, True)
    y_inference, h_skipped, _, _ = fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, False)
    assert h.shape == (5, 40) and h_skipped.numel() == 0
    assert torch.equal(y_stored, y_inference)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = F.dropout_add_layer_norm(x, residual, weight, bias, 0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(F.dropout_add_layer_norm(x, residual, weight, bias, 0.2), expected, rtol=0, atol=0)
    # differentiated anyway, it recomputes h: the same gradients
    x.requires_grad_()
    grad = torch.randn_like(x)
    stored = torch.autograd.grad(fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, True)[0], x, grad)
    recomputed = torch.autograd.grad(fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, False)[0], x, grad)
    assert torch.equal(stored[0], recomputed[0])


def test_gradcheck_fp64(backend):
    name, device = backend
    fwd = NORM_FWD[name]
    fast = interpreted(name)
    seed = torch.tensor(21, device=device)
    x, residual = (torch.randn(3, 10, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(10, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, w, b: fwd(x, w, b, 1e-5, False)[0], (x, w, b), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda x, w: fwd(x, w, None, 1e-5, True)[0], (x, w), fast_mode=fast)
    # fused, through both outputs (the seed fixes the mask)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: fwd(x, w, b, 1e-5, False, r, seed, 0.3)[:2], (x, residual, w, b), fast_mode=fast
    )


class _PreNormBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = fastreg.nn.DropoutAddLayerNorm(16, p=0.1, prenorm=True)
        self.linear = torch.nn.Linear(16, 16)
        self.norm2 = fastreg.nn.RMSNorm(16)
        self.norm3 = fastreg.nn.LayerNorm(16)

    def forward(self, x, residual):
        y, h = self.norm1(x, residual)
        return self.norm3(self.norm2(self.linear(y)) + h)


def test_torch_compile_fullgraph(backend):
    name, device = backend
    block = _PreNormBlock().to(device)
    x, residual = (torch.randn(4, 5, 16, device=device, requires_grad=True) for _ in range(2))
    out = torch.compile(block, fullgraph=True)(x, residual)
    out.sum().backward()
    assert torch.isfinite(out).all() and x.grad is not None and block.norm1.weight.grad is not None
    block.eval()
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, residual), block(x, residual))
    explanation = torch._dynamo.explain(block)(x, residual)
    assert explanation.graph_break_count == 0
