"""Dropout family against PyTorch on every backend: dropout, Dropout1d/2d/3d, DropPath, dropout_add."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as torch_F
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg
from fastreg import _reference, _rng
from fastreg.ops.dropout import DROPOUT
from fastreg import functional as F
from tests.conftest import GPU, interpreted, skip_unless_runs

# (atol, rtol) of an output against the float64 reference computed from the same rounded
# input and mask. The kernels round once to the dtype (x * scale; r + (x + b) * scale), so
# half an ulp of the dtype, plus an atol for r + v * m, which CUDA may contract into an
# FMA (one rounding less) and whose result can be near zero.
TOL = {
    torch.float32: (1e-6, 2e-7),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float64: (1e-12, 1e-15),
}
DTYPES = list(TOL)
SHAPES = [(1,), (7,), (3, 1023), (2, 3, 5, 7)]  # odd sizes, tails of a 4-element Philox group


def _input(shape, dtype, device, *, nonzero=True, requires_grad=False):
    x = torch.randn(shape, dtype=torch.float32, device=device)
    if nonzero:  # so a zero output means a dropped element
        x = torch.where(x >= 0, x + 0.5, x - 0.5)
    return x.to(dtype).requires_grad_(requires_grad)


def _seeded(seed_value: int, device) -> torch.Tensor:
    return torch.tensor(seed_value, dtype=torch.int64, device=device)


def _assert_close(actual, expected):
    atol, rtol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ------------------------------------------------------------------- the Philox stream


def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10: counter 0, key 0.
    words = _reference.philox4x32_10(torch.tensor([0]), torch.tensor(0))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_drop_threshold_is_p_times_2_pow_32():
    from fastreg.triton_kernels import dropout as triton_dropout

    for p in (0.0, 0.1, 1 / 3, 0.5, 0.9, 1.0 - 2**-40, 1.0):
        assert _rng.drop_threshold(p) == round(p * 2**32) == triton_dropout.drop_threshold(p)


@pytest.mark.parametrize("offset", [0, 2**31 - 4, 2**32 - 4, 2**40 + 8])
@pytest.mark.parametrize("inner", [1, 3, 700, 2048, 3000])
def test_masks_bitwise_identical_across_backends(kernel_backend, offset, inner):
    """Same seed and offset: the kernels' masks equal the torch reference bit for bit.

    Offsets past 2**31 and 2**32 exercise the 64-bit stream positions (what an element
    past index 2**31 of a giant tensor would draw) without allocating one. Group sizes
    below and from the Triton block (2048 elements) on take its two ways of finding an
    element's group: several groups per block, and at most two.
    """
    name, device = kernel_backend
    numel = 4103  # a partial Triton block and a partial Philox group
    seed = _seeded(-0x123456789ABCDEF, device)  # negative: the key is the two's complement pattern
    ones = torch.ones(numel, device=device)
    out = DROPOUT[name](ones, seed, 0.3, offset, inner)
    expected = _reference.keep_mask((numel,), seed, 0.3, offset, inner)
    assert torch.equal(out != 0, expected)
    if inner <= 3:  # enough draws for the rate to show
        assert 0.25 < (out == 0).float().mean() < 0.35


def test_triton_and_cpp_kernels_agree_bitwise():
    """The Triton kernel (interpreted here) and the C++ CPU kernel on the same CPU tensor."""
    skip_unless_runs("cpu")
    if skip_unless_runs("triton") != "cpu":
        pytest.skip("triton runs CUDA tensors here; the CUDA comparison is the test above")
    # bias columns: odd (409), aligned runs of 4 (512), and past the Triton block (4100)
    for columns in (409, 512, 4100):
        x = _input((5, columns), torch.float32, "cpu")
        bias, residual = _input((columns,), torch.float32, "cpu"), _input((5, columns), torch.float32, "cpu")
        for args in ((0.3,), (0.5, 2**33, 7), (0.25, 0, 1, bias, residual)):
            triton_out = DROPOUT["triton"](x, _seeded(99, "cpu"), *args)
            cpp_out = DROPOUT["cpu"](x, _seeded(99, "cpu"), *args)
            assert torch.equal(triton_out, cpp_out)


@pytest.mark.parametrize("p", [0.1, 1 / 3, 0.5, 0.9])
@pytest.mark.parametrize("backend_name", ["cpu", "torch", "cuda", "triton"])
def test_drop_rate_is_exactly_p(backend_name, p):
    """2**20 draws: the drop rate is within 5 standard errors of p.

    On CPU-only machines the interpreted Triton kernel is skipped here (2**20 elements
    take it ~10 s); its masks are bitwise those of the other backends (test above).
    """
    device = skip_unless_runs(backend_name)
    if interpreted(backend_name):
        pytest.skip("interpreted Triton is covered by the bitwise mask test")
    numel = 2**20
    out = DROPOUT[backend_name](torch.ones(numel, device=device), _seeded(2024, device), p)
    rate = (out == 0).double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / numel)


# ---------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_forward_backward_matches_torch(backend, dtype, shape):
    name, device = backend
    p = 0.3
    x = _input(shape, dtype, device, requires_grad=True)
    torch.manual_seed(7)
    y = F.dropout(x, p)
    # the mask is the reference Philox mask for the seed this call drew from torch's RNG
    torch.manual_seed(7)
    keep = _reference.keep_mask(shape, _rng.new_seed(torch.device(device)), p)
    assert torch.equal(y != 0, keep)
    _assert_close(y, x.double() * keep / (1 - p))
    grad = _input(shape, dtype, device)
    y.backward(grad)
    _assert_close(x.grad, grad.double() * keep / (1 - p))


def test_dropout_non_contiguous(backend):
    name, device = backend
    base = _input((33, 20), torch.float32, device, requires_grad=True)
    x = base.t()[::2]  # transposed and strided
    y = F.dropout(x, 0.5)
    assert y.shape == x.shape
    keep = y != 0
    torch.testing.assert_close(y, x * keep * 2.0)
    y.sum().backward()
    expected = torch.zeros_like(base)
    expected.t()[::2] = keep * 2.0
    torch.testing.assert_close(base.grad, expected)


def test_rng_follows_torch(backend):
    name, device = backend
    x = torch.ones(1000, device=device)
    torch.manual_seed(123)
    first, second = F.dropout(x, 0.5), F.dropout(x, 0.5)
    torch.manual_seed(123)
    again = F.dropout(x, 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_identity_cases_return_input(backend):
    name, device = backend
    x = _input((5, 3), torch.float32, device)
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.7, training=False) is x
    empty = torch.empty(0, 4, device=device)
    assert F.dropout(empty, 0.5).shape == (0, 4)


def test_p_one_gives_zeros_and_propagates_nan_like_torch(backend):
    name, device = backend
    x = _input((10,), torch.float32, device, requires_grad=True)
    y = F.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    nan = torch.full((8,), float("nan"), device=device)
    assert torch.isnan(F.dropout(nan, 0.5)).all() == torch.isnan(torch_F.dropout(nan, 0.5)).all()


def test_inplace(backend):
    name, device = backend
    x = _input((4, 9), torch.float32, device)
    original = x.clone()
    y = F.dropout(x, 0.5, inplace=True)
    assert y is x
    keep = x != 0
    torch.testing.assert_close(x, original * keep * 2.0)
    assert 0 < keep.sum() < keep.numel()
    # with autograd: torch's in-place semantics (non-leaf works, a leaf raises)
    leaf = _input((4, 9), torch.float32, device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(leaf, 0.5, inplace=True)
    hidden = leaf * 1.0
    out = F.dropout(hidden, 0.5, inplace=True)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, (out != 0) * 2.0)


def test_bad_arguments_raise_like_torch(backend):
    name, device = backend
    x = torch.ones(4, device=device)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            F.dropout(x, p)
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            fastreg.nn.Dropout(p)
        with pytest.raises(ValueError, match="drop probability has to be between 0 and 1"):
            F.drop_path(x, p)
    with pytest.raises(RuntimeError) as torch_error:
        torch_F.dropout(torch.arange(4, device=device), 0.5)
    with pytest.raises(RuntimeError) as ours:  # torch's error, in torch's words (tests/test_errors.py)
        F.dropout(torch.arange(4, device=device), 0.5)
    assert str(ours.value) == str(torch_error.value)


def test_forced_backend_that_cannot_run_says_why():
    with fastreg.use_backend("cuda"):
        if not fastreg.backend_supports("cuda", "cpu"):
            with pytest.raises(RuntimeError, match="'cuda' cannot run cpu tensors"):
                F.dropout(torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="unknown fastreg backend"):
        fastreg.set_backend("fast")
    assert fastreg.get_backend() == "auto"


def test_auto_backend_choice():
    choose = fastreg._backend.choose_backend
    assert choose("cpu") == ("cpu" if fastreg.backend_supports("cpu", "cpu") else "torch")
    if GPU:
        assert choose("cuda") == "triton"
    assert "torch" in fastreg.available_backends()


# -------------------------------------------------------------------------- mask-free


class _RecordAllocations(TorchDispatchMode):
    """Records (op, dtype, numel, storage) of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel(), t.untyped_storage().data_ptr()))
        return out


def test_forward_backward_allocates_no_mask(kernel_backend):
    """Saved for backward: the seed alone. Allocated: the output and the gradient, no mask."""
    name, device = kernel_backend
    numel = 4096
    x = torch.randn(numel, device=device, requires_grad=True)
    grad = torch.randn(numel, device=device)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _RecordAllocations() as record:
        y = F.dropout(x, 0.5)
        y.backward(grad)
    assert saved == [(torch.int64, 1)]
    mask_like = [o for o in record.outputs if o[2] == numel and o[1] in (torch.bool, torch.uint8)]
    assert mask_like == []
    full_size_storages = {o[3] for o in record.outputs if o[2] == numel}
    assert len(full_size_storages) == 2, record.outputs  # y and x.grad (views such as detach share one)


# ------------------------------------------------------------------- channels and paths


@pytest.mark.parametrize(
    "module_cls, torch_cls, shape, groups",
    [
        (fastreg.nn.Dropout1d, torch.nn.Dropout1d, (4, 6, 5), 24),
        (fastreg.nn.Dropout1d, torch.nn.Dropout1d, (6, 5), 6),  # unbatched (C, L)
        (fastreg.nn.Dropout2d, torch.nn.Dropout2d, (3, 5, 4, 3), 15),
        (fastreg.nn.Dropout3d, torch.nn.Dropout3d, (2, 4, 3, 2, 3), 8),
        (fastreg.nn.Dropout3d, torch.nn.Dropout3d, (4, 3, 2, 3), 4),  # unbatched (C, D, H, W)
    ],
)
def test_channel_dropout_zeroes_whole_channels(backend, module_cls, torch_cls, shape, groups):
    name, device = backend
    module = module_cls(p=0.5)
    assert repr(module) == repr(torch_cls(p=0.5)) and isinstance(module, torch_cls)
    x = _input(shape, torch.float32, device, requires_grad=True)
    y = module(x)
    channels = (y != 0).reshape(groups, -1)
    assert (channels.all(1) | (~channels).all(1)).all(), "a channel was partly dropped"
    keep = y != 0
    torch.testing.assert_close(y, x * keep * 2.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep * 2.0)
    module.eval()
    assert torch.equal(module(x), x)


def test_channel_dropout_rank_errors_and_warnings_like_torch():
    x4 = torch.ones(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="dropout1d: Expected 2D or 3D input, but received a 4D input"):
        F.dropout1d(x4)
    with pytest.warns(UserWarning, match="Received a 3D input to dropout2d"):
        F.dropout2d(torch.ones(2, 3, 4))
    with pytest.warns(UserWarning, match="Received a 2-D input to dropout3d"):
        F.dropout3d(torch.ones(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.dropout2d(x4)


def test_drop_path_drops_whole_samples(backend):
    name, device = backend
    module = fastreg.nn.DropPath(0.25)
    assert repr(module) == "DropPath(p=0.25)"
    x = _input((64, 3, 5), torch.float32, device, requires_grad=True)
    y = module(x)
    keep = (y != 0).reshape(64, -1)
    assert (keep.all(1) | (~keep).all(1)).all()
    assert 0 < keep.all(1).sum() < 64
    torch.testing.assert_close(y, x * (y != 0) / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0) / 0.75)
    module.eval()
    assert module(x) is x
    assert torch.equal(F.drop_path(x, 1.0), torch.zeros_like(x))


# ------------------------------------------------------------------------ dropout_add


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_add_matches_unfused_sequence(backend, dtype, with_bias):
    name, device = backend
    shape, p = (5, 67), 0.4
    x = _input(shape, dtype, device, requires_grad=True)
    residual = _input(shape, dtype, device, requires_grad=True)
    bias = _input((67,), dtype, device, requires_grad=True) if with_bias else None
    torch.manual_seed(3)
    out = F.dropout_add(x, residual, p, bias=bias)
    torch.manual_seed(3)
    keep = _reference.keep_mask(shape, _rng.new_seed(torch.device(device)), p)

    # the reference: the unfused torch sequence in float64 with the same mask
    xr, rr = x.detach().double().requires_grad_(), residual.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_() if with_bias else None
    expected = rr + (xr + br if with_bias else xr) * keep / (1 - p)
    _assert_close(out, expected)
    grad = _input(shape, dtype, device)
    out.backward(grad)
    expected.backward(grad.double())
    _assert_close(x.grad, xr.grad)
    _assert_close(residual.grad, rr.grad)
    if with_bias:
        atol, rtol = TOL[dtype]
        # summed over 5 rows in fp32 then rounded once
        torch.testing.assert_close(bias.grad, br.grad.to(dtype), atol=atol * 5, rtol=rtol * 2)


def test_dropout_add_eval_is_plain_add_and_checks_arguments(backend):
    name, device = backend
    x, residual, bias = (_input(s, torch.float32, device) for s in ((3, 4), (3, 4), (4,)))
    torch.testing.assert_close(F.dropout_add(x, residual, 0.5, training=False, bias=bias), residual + x + bias)
    with pytest.raises(RuntimeError, match="'residual' must match x"):
        F.dropout_add(x, residual[:, :2], 0.5)
    with pytest.raises(RuntimeError, match="'bias' must be 1-D of size x.shape"):
        F.dropout_add(x, residual, 0.5, bias=bias[:3])
    with pytest.raises(ValueError, match="dropout probability"):
        F.dropout_add(x, residual, 2.0)


# -------------------------------------------------------------------------- modules


def test_dropout_module_is_a_drop_in():
    for p, inplace in ((0.5, False), (0.1, True)):
        ours, theirs = fastreg.nn.Dropout(p, inplace), torch.nn.Dropout(p, inplace)
        assert repr(ours) == repr(theirs)
        assert (ours.p, ours.inplace) == (theirs.p, theirs.inplace)
        assert ours.state_dict() == theirs.state_dict() == {}
        assert isinstance(ours, torch.nn.Dropout)
    module = fastreg.nn.Dropout(0.5).eval()
    x = torch.randn(3)
    assert module(x) is x


# --------------------------------------------------- opcheck, gradcheck, torch.compile

OP_NAMES = {"cpu": ("dropout", "dropout_"), "cuda": ("dropout", "dropout_"), "triton": ("dropout_triton", "dropout_triton_")}


def _opcheck_utils(name):
    # Under the interpreter, AOT tracing would run the Triton launcher on fake tensors,
    # which the interpreter cannot do; on a GPU the Triton ops get every check.
    if interpreted(name):
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    functional_op, inplace_op = (getattr(torch.ops.fastreg, n).default for n in OP_NAMES[name])
    seed = _seeded(11, device)
    x = torch.randn(6, 10, device=device, requires_grad=True)
    bias = torch.randn(10, device=device, requires_grad=True)
    residual = torch.randn(6, 10, device=device, requires_grad=True)
    for args in ((x, seed, 0.5), (x, seed, 0.2, 8, 3), (x, seed, 0.5, 0, 1, bias, residual)):
        torch.library.opcheck(functional_op, args, test_utils=_opcheck_utils(name))
    torch.library.opcheck(inplace_op, (x.detach().clone(), seed, 0.5), test_utils=_opcheck_utils(name))


def test_gradcheck_fp64(backend):
    name, device = backend
    op = DROPOUT[name]
    seed = _seeded(5, device)  # a fixed seed makes the op a deterministic function
    args = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in ((3, 8), (8,), (3, 8))]
    fast = interpreted(name)
    assert torch.autograd.gradcheck(lambda x, b, r: op(x, seed, 0.4, 0, 1, b, r), args, fast_mode=fast)
    assert torch.autograd.gradgradcheck(lambda x: op(x, seed, 0.4, 4, 2), args[:1], fast_mode=fast)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = fastreg.nn.Dropout(0.3)
        self.path = fastreg.nn.DropPath(0.2)
        self.channels = fastreg.nn.Dropout1d(0.1)

    def forward(self, x, residual, bias):
        h = F.dropout_add(self.drop(x), residual, 0.25, bias=bias)
        return self.path(self.channels(h))


def test_torch_compile_fullgraph(backend):
    name, device = backend
    # values: a compiled dropout is still x * keep / (1 - p), forward and backward
    x = _input((8, 64), torch.float32, device, requires_grad=True)
    y = torch.compile(lambda t: F.dropout(t, 0.3), fullgraph=True)(x)
    keep = y != 0
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(y, x * keep / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep / 0.7)
    # the whole family in one graph, without breaks, running fastreg's ops
    block = _Block()
    x, residual = (torch.randn(8, 4, 16, device=device, requires_grad=True) for _ in range(2))
    bias = torch.randn(16, device=device, requires_grad=True)
    out = torch.compile(block, fullgraph=True)(x, residual, bias)
    out.sum().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert x.grad is not None and residual.grad is not None and bias.grad is not None
    explanation = torch._dynamo.explain(block)(x, residual, bias)
    assert explanation.graph_break_count == 0
    targets = [str(node.target) for g in explanation.graphs for node in g.graph.nodes]
    if name != "torch":
        assert any("fastreg" in t for t in targets), targets


def test_torch_compile_inplace_inference(backend):
    """nn.Dropout(inplace=True) under torch.compile: the mutating op, functionalized."""
    name, device = backend
    module = torch.nn.Sequential(torch.nn.ReLU(), fastreg.nn.Dropout(0.5, inplace=True))
    x = _input((16, 32), torch.float32, device).abs()
    with torch.no_grad():
        y = torch.compile(module, fullgraph=True)(x)
    keep = y != 0
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(y, x * keep * 2.0)
