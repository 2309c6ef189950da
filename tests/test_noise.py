"""Noise family on every backend: gaussian_dropout, gaussian_noise, alpha_dropout,
feature_alpha_dropout and their modules, against the formulas, torch and each other."""

import math

import pytest
import torch
import torch.nn.functional as torch_F
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg
from fastreg import _reference, _rng
from fastreg import functional as F
from fastreg.ops.noise import ALPHA_DROPOUT, GAUSSIAN_NOISE
from tests import triton_aot
from tests.conftest import interpreted, skip_unless_runs

# (atol, rtol) of an output against the float64 formula computed from the same rounded input
# and the same float32 normals / mask. The kernels round once to the dtype; the Triton
# interpreter (CPU runs) truncates float32 -> bfloat16 instead of rounding, one bf16 ulp
# (the rtol below covers it).
TOL = {
    torch.float32: (1e-6, 3e-7),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float64: (1e-12, 1e-15),
}
DTYPES = list(TOL)
SHAPES = [(1,), (7,), (3, 1023), (2, 3, 5, 7)]
ALPHA = 1.7580993408473766  # SELU's scale * alpha


def _seeded(value, device):
    return torch.tensor(value, dtype=torch.int64, device=device)


def _drawn_seed(device):
    """The seed a fastreg call right after torch.manual_seed(7) draws."""
    torch.manual_seed(7)
    return _rng.new_seed(torch.device(device))


def _assert_close(actual, expected):
    atol, rtol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------- the normals


@pytest.mark.parametrize("offset", [0, 2**31 - 4, 2**32 - 4, 2**40 + 8])
def test_normals_bitwise_identical_across_backends(kernel_backend, offset):
    """Same seed and offset: every kernel's float32 normals equal the torch reference's bit
    for bit (no libm transcendental, no FMA; csrc/include/fastreg/normal.h)."""
    name, device = kernel_backend
    numel = 2051  # a partial Triton block and a partial Philox group
    seed = _seeded(-0x123456789ABCDEF, device)
    noise = GAUSSIAN_NOISE[name](torch.zeros(numel, device=device), seed, 1.0, False, offset)
    assert torch.equal(noise, _reference.normal_noise(numel, seed, offset))


def test_triton_and_cpp_kernels_agree_bitwise():
    """The interpreted Triton kernels and the C++ CPU kernels on the same CPU tensors."""
    skip_unless_runs("cpu")
    if skip_unless_runs("triton") != "cpu":
        pytest.skip("triton runs CUDA tensors here; the CUDA comparison is the test above")
    x = torch.randn(5, 409, dtype=torch.float64)
    seed = _seeded(99, "cpu")
    for dtype in (torch.float32, torch.float64, torch.float16):  # bf16: the interpreter truncates
        for args in ((0.7, True, 8), (2.5, False, 0)):
            assert torch.equal(GAUSSIAN_NOISE["triton"](x.to(dtype), seed, *args),
                               GAUSSIAN_NOISE["cpu"](x.to(dtype), seed, *args))
        for args in ((0.3, 1.2, 0.5, -0.7, 0, 7), (0.5, 1.1, 0.2, -0.3, 2**33, 1)):
            assert torch.equal(ALPHA_DROPOUT["triton"](x.to(dtype), seed, *args),
                               ALPHA_DROPOUT["cpu"](x.to(dtype), seed, *args))


def _exact_box_muller(seed, calls):
    """The float64 transform of the reference's words: what the float32 normals approximate."""
    w0, w1, _, _ = _reference.philox4x32_10(torch.arange(calls), seed)
    u = ((w0 >> 9) * 2 + 1).double() * 2.0**-24
    fraction = (((w1 >> 7) & 0x7FFFFF) * 2 + 1 - 2**23).double() * 2.0**-24
    angle = math.pi / 2 * ((w1 >> 30).double() + fraction)
    radius = torch.sqrt(-2 * torch.log(u))
    return radius, radius * torch.cos(angle), radius * torch.sin(angle), _reference.normal_pair(w0, w1)


def test_normals_are_accurate_box_muller():
    """The float32 polynomials against the float64 transform of the same words: within a few
    float32 ulps of the radius (the series' remainders are below 3e-9)."""
    radius, cosine, sine, (c32, s32) = _exact_box_muller(_seeded(5, "cpu"), 200_000)
    assert ((c32.double() - cosine).abs() / radius).max() < 4e-7
    assert ((s32.double() - sine).abs() / radius).max() < 4e-7
    assert radius.max() <= math.sqrt(2 * 24 * math.log(2)) + 1e-12  # u >= 2^-24: |n| <= 5.77


@pytest.mark.parametrize("backend_name", ["cpu", "torch", "cuda", "triton"])
def test_normal_statistics(backend_name):
    """2**20 draws of a fixed seed: mean, variance, skewness and excess kurtosis of N(0, 1)
    within 5 standard errors, a Kolmogorov-Smirnov distance below the 1% critical value, and
    no correlation between neighbours (lags 1-4, the values and their squares: Box-Muller
    pairs are independent). Interpreted Triton draws the same bits (test above)."""
    device = skip_unless_runs(backend_name)
    if interpreted(backend_name):
        pytest.skip("interpreted Triton is covered by the bitwise test")
    numel = 2**20
    n = GAUSSIAN_NOISE[backend_name](torch.zeros(numel, device=device), _seeded(2024, device), 1.0, False).double()
    n = n.cpu()
    se = 1 / math.sqrt(numel)
    assert abs(n.mean()) < 5 * se
    assert abs(n.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((n**3).mean()) < 5 * math.sqrt(15) * se
    assert abs((n**4).mean() - 3) < 5 * math.sqrt(96) * se
    ks = (torch.special.ndtr(n.sort().values) - (torch.arange(numel, dtype=torch.float64) + 0.5) / numel).abs().max()
    assert ks < 1.63 / math.sqrt(numel)
    for lag in (1, 2, 3, 4):
        assert abs(torch.corrcoef(torch.stack([n[:-lag], n[lag:]]))[0, 1]) < 5 * se
        assert abs(torch.corrcoef(torch.stack([n[:-lag] ** 2, n[lag:] ** 2]))[0, 1]) < 5 * se


# ------------------------------------------------------------- gaussian dropout / noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_dropout_forward_backward(backend, dtype, shape):
    name, device = backend
    p = 0.3
    s = math.sqrt(p / (1 - p))
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    torch.manual_seed(7)
    y = F.gaussian_dropout(x, p)
    n = _reference.normal_noise(x.numel(), _drawn_seed(device)).reshape(shape).double()
    multiplier = 1 + float(torch.tensor(s, dtype=torch.float64).to(torch.float32 if dtype != torch.float64 else dtype)) * n
    _assert_close(y, x.detach().double() * multiplier)
    grad = torch.randn(shape, device=device).to(dtype)
    y.backward(grad)
    _assert_close(x.grad, grad.double() * multiplier)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_noise_forward_backward(backend, dtype, shape):
    name, device = backend
    std = 0.25
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    torch.manual_seed(7)
    y = F.gaussian_noise(x, std)
    n = _reference.normal_noise(x.numel(), _drawn_seed(device)).reshape(shape).double()
    _assert_close(y, x.detach().double() + std * n)
    grad = torch.randn(shape, device=device).to(dtype)
    y.backward(grad)
    assert torch.equal(x.grad, grad)  # d(x + std n)/dx = 1


def test_gaussian_dropout_statistics(backend):
    """Multiplicative noise of mean 1 and variance p / (1 - p)."""
    name, device = backend
    numel = 2**12 if interpreted(name) else 2**16
    for p in (0.1, 0.5, 0.8):
        multiplier = F.gaussian_dropout(torch.ones(numel, device=device, dtype=torch.float64), p).cpu()
        variance = p / (1 - p)
        assert abs(multiplier.mean() - 1) < 5 * math.sqrt(variance / numel)
        assert abs(multiplier.var() / variance - 1) < 5 * math.sqrt(2 / numel)


def test_gaussian_non_contiguous(backend):
    name, device = backend
    base = torch.randn(33, 20, device=device, requires_grad=True)
    x = base.t()[::2]
    torch.manual_seed(7)
    y = F.gaussian_dropout(x, 0.5)
    n = _reference.normal_noise(x.numel(), _drawn_seed(device)).reshape(x.shape)  # row-major order of x
    torch.testing.assert_close(y, x * (1 + n))
    y.sum().backward()
    expected = torch.zeros_like(base)
    expected.t()[::2] = 1 + n
    torch.testing.assert_close(base.grad, expected)


def test_rng_follows_torch(backend):
    name, device = backend
    x = torch.ones(1000, device=device)
    for op in (lambda t: F.gaussian_dropout(t, 0.5), lambda t: F.gaussian_noise(t, 1.0),
               lambda t: F.alpha_dropout(t, 0.5, True), lambda t: F.feature_alpha_dropout(t.reshape(10, 100), 0.5, True)):
        torch.manual_seed(123)
        first, second = op(x), op(x)
        torch.manual_seed(123)
        assert torch.equal(first, op(x))
        assert not torch.equal(first, second)


def test_eval_and_zero_are_identity_like_torch(backend):
    name, device = backend
    x = torch.randn(5, 3, device=device)
    assert F.gaussian_dropout(x, 0.5, training=False) is x
    assert F.gaussian_dropout(x, 0.0) is x
    assert F.gaussian_noise(x, 1.0, training=False) is x
    assert F.gaussian_noise(x, 0.0) is x
    for fastreg_fn, torch_fn in ((F.alpha_dropout, torch_F.alpha_dropout),
                                 (F.feature_alpha_dropout, torch_F.feature_alpha_dropout)):
        assert fastreg_fn(x, 0.5) is x and torch_fn(x, 0.5) is x  # training=False by default
        assert fastreg_fn(x, 0.0, True) is x and torch_fn(x, 0.0, True) is x
        empty = torch.empty(0, 4, device=device)
        assert fastreg_fn(empty, 0.5, True) is empty and torch_fn(empty, 0.5, True) is empty
    for module in (fastreg.nn.GaussianDropout(0.5), fastreg.nn.GaussianNoise(1.0), fastreg.nn.AlphaDropout(0.5),
                   fastreg.nn.FeatureAlphaDropout(0.5)):
        assert module.eval()(x) is x


def test_bad_arguments_raise_like_torch(backend):
    name, device = backend
    x = torch.ones(4, 3, device=device)
    for p in (-0.1, 1.5):
        for fastreg_fn, torch_fn in ((F.alpha_dropout, torch_F.alpha_dropout),
                                     (F.feature_alpha_dropout, torch_F.feature_alpha_dropout)):
            with pytest.raises(ValueError) as theirs:
                torch_fn(x, p, True)
            with pytest.raises(ValueError, match=f"^{theirs.value}$"):
                fastreg_fn(x, p, True)
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            F.gaussian_dropout(x, p)
    with pytest.raises(ValueError, match="p must be in \\[0, 1\\)"):
        F.gaussian_dropout(x, 1.0)
    with pytest.raises(ValueError, match="has to be in \\[0, 1\\)"):
        fastreg.nn.GaussianDropout(1.0)
    with pytest.raises(ValueError, match="std must be non-negative"):
        F.gaussian_noise(x, -1.0)
    with pytest.raises(ValueError, match="std must be non-negative"):
        fastreg.nn.GaussianNoise(-1.0)
    integers = torch.arange(4, device=device)
    for fastreg_fn, torch_fn in ((F.alpha_dropout, torch_F.alpha_dropout),
                                 (F.feature_alpha_dropout, torch_F.feature_alpha_dropout)):
        with pytest.raises(RuntimeError):
            torch_fn(integers.reshape(2, 2), 0.5, True)
        with pytest.raises(RuntimeError):
            fastreg_fn(integers.reshape(2, 2), 0.5, True)
    with pytest.raises(RuntimeError, match="floating-point 'input'"):
        F.gaussian_dropout(integers, 0.5)
    # feature dropout's rank check comes after the identity cases, as torch's
    with pytest.raises(RuntimeError, match="^Feature dropout requires at least 2 dimensions in the input$"):
        torch_F.feature_alpha_dropout(torch.ones(4, device=device), 0.5, True)
    with pytest.raises(RuntimeError, match="^Feature dropout requires at least 2 dimensions in the input$"):
        F.feature_alpha_dropout(torch.ones(4, device=device), 0.5, True)
    assert torch.equal(F.feature_alpha_dropout(torch.ones(4, device=device), 1.0, True), torch.zeros(4, device=device))


# ---------------------------------------------------------------------- alpha dropout


def _torch_alpha_formula(x, keep, p):
    """torch's _dropout_impl for alpha dropout, op for op in x's dtype, with a given keep mask."""
    if p == 1.0:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1) * (1 - p))
    noise = keep.to(x.dtype)
    b = noise.add(-1).mul_(ALPHA * a).add_(ALPHA * a * p)
    noise.mul_(a)
    return x * noise + b, noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_matches_torch_formula(backend, dtype, feature):
    """torch's own expression fed fastreg's mask: equal bit for bit in float32 and float64
    (the same constants, x * a then + b rounded as torch's two ops), within the
    table's tolerance in float16 / bfloat16 (torch rounds x * a to the dtype once more)."""
    name, device = backend
    shape, p = (4, 6, 5, 3), 0.3
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    op = F.feature_alpha_dropout if feature else F.alpha_dropout
    torch.manual_seed(7)
    y = op(x, p, True)
    inner = 15 if feature else 1
    keep = _reference.keep_mask(shape, _drawn_seed(device), p, 0, inner)
    expected, noise = _torch_alpha_formula(x.detach(), keep, p)
    grad = torch.randn(shape, device=device).to(dtype)
    y.backward(grad)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(y, expected)
        assert torch.equal(x.grad, grad * noise)
    else:
        _assert_close(y, expected.double())
        _assert_close(x.grad, grad.double() * noise.double())
    if feature:  # whole channels: each (sample, channel) either kept or dropped
        per_channel = keep.reshape(24, -1)
        assert (per_channel.all(1) | (~per_channel).all(1)).all()


def test_alpha_dropout_keeps_selu_statistics(backend):
    """For zero-mean unit-variance input, alpha dropout keeps mean 0 and variance 1 (its
    purpose), and drops a fraction p."""
    name, device = backend
    numel = 2**12 if interpreted(name) else 2**16
    x = torch.randn(numel, device=device, dtype=torch.float64)
    for p in (0.1, 0.5):
        torch.manual_seed(3)
        y = F.alpha_dropout(x, p, True)
        a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1) * (1 - p))
        dropped = (y == -ALPHA * a + ALPHA * a * p).double().mean()  # every dropped element takes this value
        assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / numel)
        assert abs(y.mean()) < 0.05 and abs(y.var() - 1) < 0.05


def test_alpha_dropout_p_one_is_zeros_like_torch(backend):
    name, device = backend
    x = torch.randn(8, device=device, requires_grad=True)
    y = F.alpha_dropout(x, 1.0, True)
    assert torch.equal(y, torch_F.alpha_dropout(x, 1.0, True))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    nan = torch.full((4,), float("nan"), device=device)
    assert torch.isnan(F.alpha_dropout(nan, 1.0, True)).all()  # NaN * 0, as torch


def test_alpha_dropout_inplace(backend):
    name, device = backend
    x = torch.randn(4, 9, device=device)
    torch.manual_seed(7)
    out_of_place = F.alpha_dropout(x, 0.4, True)
    torch.manual_seed(7)
    y = F.alpha_dropout(x, 0.4, True, inplace=True)
    assert y is x and torch.equal(x, out_of_place)
    leaf = torch.randn(4, 3, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch_F.alpha_dropout(leaf, 0.5, True, inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.alpha_dropout(leaf, 0.5, True, inplace=True)
    hidden = leaf * 1.0
    torch.manual_seed(7)
    out = F.feature_alpha_dropout(hidden, 0.5, True, inplace=True)
    out.sum().backward()
    keep = _reference.keep_mask((4, 3, 3), _drawn_seed(device), 0.5, 0, 3)  # one draw per (sample, channel)
    a = 1.0 / math.sqrt((ALPHA * ALPHA * 0.5 + 1) * 0.5)
    torch.testing.assert_close(leaf.grad, keep.float() * a)


# -------------------------------------------------------------------------- modules


def test_alpha_modules_are_drop_ins_and_convert_swaps_them():
    for ours, theirs in ((fastreg.nn.AlphaDropout(0.2, True), torch.nn.AlphaDropout(0.2, True)),
                         (fastreg.nn.FeatureAlphaDropout(0.3), torch.nn.FeatureAlphaDropout(0.3))):
        assert repr(ours) == repr(theirs) and isinstance(ours, type(theirs))
        assert ours.state_dict() == theirs.state_dict() == {}
        assert ours.training and (ours.p, ours.inplace) == (theirs.p, theirs.inplace)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SELU(), torch.nn.AlphaDropout(0.1),
                                torch.nn.FeatureAlphaDropout(0.2))
    fastreg.convert(model, verbose=False)
    assert type(model[2]) is fastreg.nn.AlphaDropout and type(model[3]) is fastreg.nn.FeatureAlphaDropout
    model(torch.randn(3, 4)).sum().backward()


def test_gaussian_modules():
    assert repr(fastreg.nn.GaussianDropout(0.25)) == "GaussianDropout(p=0.25)"
    assert repr(fastreg.nn.GaussianNoise(0.1)) == "GaussianNoise(std=0.1)"
    assert fastreg.nn.GaussianDropout().p == 0.5
    x = torch.randn(6, 5, requires_grad=True)
    torch.manual_seed(7)
    y = fastreg.nn.GaussianDropout(0.5)(x)
    torch.manual_seed(7)
    assert torch.equal(y, F.gaussian_dropout(x, 0.5))


# -------------------------------------------------------------------------- mask-free


class _RecordAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel(), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("op", ["gaussian_dropout", "gaussian_noise", "alpha_dropout"])
def test_forward_backward_saves_only_the_seed(kernel_backend, op):
    name, device = kernel_backend
    numel = 4096
    x = torch.randn(numel, device=device, requires_grad=True)
    grad = torch.randn(numel, device=device)
    call = {"gaussian_dropout": lambda t: F.gaussian_dropout(t, 0.5),
            "gaussian_noise": lambda t: F.gaussian_noise(t, 0.5),
            "alpha_dropout": lambda t: F.alpha_dropout(t, 0.5, True)}[op]
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _RecordAllocations() as record:
        y = call(x)
        y.backward(grad)
    assert saved == ([] if op == "gaussian_noise" else [(torch.int64, 1)])
    full_size = {o[3] for o in record.outputs if o[2] == numel}
    assert len(full_size) == 2, record.outputs  # y and x.grad: no noise or mask tensor


# --------------------------------------------------- opcheck, gradcheck, torch.compile

OP_NAMES = {"cpu": ("gaussian_noise", "alpha_dropout", "alpha_dropout_"),
            "cuda": ("gaussian_noise", "alpha_dropout", "alpha_dropout_"),
            "triton": ("gaussian_noise_triton", "alpha_dropout_triton", "alpha_dropout_triton_")}


def _opcheck_utils(name):
    # Under the interpreter, AOT tracing would run the Triton launcher on fake tensors
    if interpreted(name):
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    noise_op, alpha_op, alpha_inplace = (getattr(torch.ops.fastreg, n).default for n in OP_NAMES[name])
    seed = _seeded(11, device)
    x = torch.randn(6, 10, device=device, requires_grad=True)
    for args in ((x, seed, 0.5, True), (x, seed, 0.2, False, 8)):
        torch.library.opcheck(noise_op, args, test_utils=_opcheck_utils(name))
    for args in ((x, seed, 0.5, 1.2, 0.3, -0.5), (x, seed, 0.2, 1.1, 0.1, -0.2, 8, 5)):
        torch.library.opcheck(alpha_op, args, test_utils=_opcheck_utils(name))
    torch.library.opcheck(alpha_inplace, (x.detach().clone(), seed, 0.5, 1.2, 0.3, -0.5),
                          test_utils=_opcheck_utils(name))


def test_gradcheck_fp64(backend):
    name, device = backend
    seed = _seeded(5, device)  # a fixed seed makes the ops deterministic functions
    x = torch.randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
    for fn in (lambda t: GAUSSIAN_NOISE[name](t, seed, 0.6, True, 0),
               lambda t: GAUSSIAN_NOISE[name](t, seed, 0.6, False, 4),
               lambda t: ALPHA_DROPOUT[name](t, seed, 0.4, 1.3, 0.2, -0.6, 0, 1),
               lambda t: ALPHA_DROPOUT[name](t, seed, 0.4, 1.3, 0.2, -0.6, 4, 4)):
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=interpreted(name))
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=interpreted(name))


class _SeluBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.noise = fastreg.nn.GaussianNoise(0.1)
        self.gaussian = fastreg.nn.GaussianDropout(0.2)
        self.alpha = fastreg.nn.AlphaDropout(0.1)
        self.feature = fastreg.nn.FeatureAlphaDropout(0.1)

    def forward(self, x):
        return self.feature(self.alpha(torch.selu(self.gaussian(self.noise(x)))))


def test_torch_compile_fullgraph(backend):
    name, device = backend
    # a compiled Gaussian dropout regenerates its forward's noise in backward: grad == y / x
    x = torch.randn(8, 64, device=device, dtype=torch.float64).requires_grad_()
    y = torch.compile(lambda t: F.gaussian_dropout(t, 0.3), fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / x.detach())
    assert y.detach().div(x.detach()).std() > 0.3  # noise was applied
    block = _SeluBlock()
    x = torch.randn(8, 4, 16, device=device, requires_grad=True)
    out = torch.compile(block, fullgraph=True)(x)
    out.sum().backward()
    assert out.shape == x.shape and torch.isfinite(out).all() and x.grad is not None
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0
    targets = [str(node.target) for g in explanation.graphs for node in g.graph.nodes]
    if name != "torch":
        assert sum("fastreg" in t for t in targets) == 4, targets


# ------------------------------------------------------ ahead-of-time compile for a GPU


def _noise_aot_case(case_id, dtype, multiplicative, big=False):
    ints = "i64" if big else "i32"
    signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "seed_ptr": "*i64", "n_elements": ints,
                 "offset": ints, "std_bits": "i64"}
    constexprs = dict(MULTIPLICATIVE=multiplicative, ACC_DTYPE=triton_aot.dtype("fp64" if dtype == "fp64" else "fp32"),
                      BLOCK=1024)
    return triton_aot.Case(case_id, "fastreg.triton_kernels.noise", "_gaussian_noise_kernel", signature, constexprs,
                           div16=("n_elements",), options=(("enable_fp_fusion", False),))


def _alpha_aot_case(case_id, dtype, grouped, big=False):
    ints = "i64" if big else "i32"
    signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "seed_ptr": "*i64", "n_elements": ints,
                 "offset": ints, "threshold": "i64", "inner": "i32", "scale_bits": "i64",
                 "keep_shift_bits": "i64", "drop_shift_bits": "i64"}
    constexprs = dict(GROUPED=grouped, ACC_DTYPE=triton_aot.dtype("fp64" if dtype == "fp64" else "fp32"), BLOCK=2048)
    return triton_aot.Case(case_id, "fastreg.triton_kernels.noise", "_alpha_dropout_kernel", signature, constexprs,
                           div16=("n_elements",), options=(("enable_fp_fusion", False),))


NOISE_AOT_CASES = [
    *(_noise_aot_case(f"gaussian_dropout-{dtype}", dtype, True) for dtype in ("fp32", "bf16", "fp16", "fp64")),
    _noise_aot_case("gaussian_noise-fp32-int64_sizes", "fp32", False, big=True),
    *(_alpha_aot_case(f"alpha_dropout-{dtype}", dtype, False) for dtype in ("fp32", "bf16", "fp64")),
    _alpha_aot_case("feature_alpha_dropout-fp16-int64_sizes", "fp16", True, big=True),
]


@pytest.fixture(scope="module")
def noise_aot_ptx():
    return triton_aot.compile_ptx(NOISE_AOT_CASES)


@pytest.mark.parametrize("case", NOISE_AOT_CASES, ids=str)
def test_triton_kernel_compiles_for_a_gpu(noise_aot_ptx, case):
    """Every variant compiles for sm_90 (tests/triton_aot.py); no float32 FMA (each multiply
    and add rounds, as in the other backends); division and square root are the IEEE ones
    (div.rn / sqrt.rn), not the approximations; x and out move in 16-byte accesses."""
    ptx = triton_aot.ptx_of(noise_aot_ptx, case)
    assert "fma.rn.f32" not in ptx
    if case.kernel == "_gaussian_noise_kernel":
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
        assert "div.full" not in ptx and "div.approx" not in ptx and "sqrt.approx" not in ptx
    stores = triton_aot.global_accesses(ptx, "st")
    assert stores and stores == triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), stores
