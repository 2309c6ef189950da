"""BatchNorm 1d/2d/3d against torch.nn.BatchNorm on every backend: training steps with
running statistics, eval, layouts, options, errors, opcheck, gradcheck, torch.compile."""

import pytest
import torch

import fastreg
from fastreg import functional as F
from tests import triton_aot
from tests.conftest import GPU

# Per-dtype tolerances against torch (same dtype). Backward sums over N * S values per
# channel: dweight / dbias get the atol times sqrt of that count.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9),
       torch.float16: dict(atol=2e-3, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (module class, input shape, memory format)
CASES = {
    "1d-NC": (1, (9, 6), None),
    "1d-NCL": (1, (4, 6, 5), None),
    "2d": (2, (3, 6, 5, 3), None),
    "2d-channels_last": (2, (3, 6, 5, 3), torch.channels_last),
    "3d-channels_last_3d": (3, (2, 6, 3, 2, 3), torch.channels_last_3d),
}
OURS = {1: fastreg.nn.BatchNorm1d, 2: fastreg.nn.BatchNorm2d, 3: fastreg.nn.BatchNorm3d}
THEIRS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def _input(shape, memory_format, device, dtype, mean=2.0, scale=3.0):
    x = (torch.randn(shape, device=device) * scale + mean).to(dtype)
    return x.to(memory_format=memory_format) if memory_format is not None else x


def _pair(rank, device, dtype=torch.float32, **options):
    ours, theirs = OURS[rank](6, **options), THEIRS[rank](6, **options)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours.to(device, dtype), theirs.to(device, dtype)


def _close(ours, theirs, dtype, count=1):
    tol = TOL[dtype]
    torch.testing.assert_close(ours, theirs, atol=tol["atol"] * count**0.5, rtol=tol["rtol"])


def _steps(ours, theirs, shape, memory_format, device, dtype, steps=3):
    count = shape[0] * (torch.Size(shape[2:]).numel())
    for _ in range(steps):
        x = _input(shape, memory_format, device, dtype)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        _close(y_ours, y_theirs, dtype)
        if memory_format is not None:
            assert y_ours.is_contiguous(memory_format=memory_format)
        grad = torch.randn_like(y_theirs)
        y_ours.backward(grad)
        y_theirs.backward(grad)
        _close(x_ours.grad, x_theirs.grad, dtype)
        if memory_format is not None:
            assert x_ours.grad.is_contiguous(memory_format=memory_format)
        if theirs.weight is not None:
            _close(ours.weight.grad, theirs.weight.grad, dtype, count)
            _close(ours.bias.grad, theirs.bias.grad, dtype, count)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(theirs, name) is not None:
                _close(getattr(ours, name), getattr(theirs, name), torch.float32)
    ours.eval()
    theirs.eval()
    x = _input(shape, memory_format, device, dtype)
    _close(ours(x), theirs(x), dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_then_eval_match_torch(backend, case, momentum):
    name, device = backend
    rank, shape, memory_format = CASES[case]
    ours, theirs = _pair(rank, device, momentum=momentum)
    _steps(ours, theirs, shape, memory_format, device, torch.float32)


@pytest.mark.parametrize("options", [dict(affine=False), dict(track_running_stats=False), dict(eps=1e-3)],
                         ids=["no-affine", "no-running-stats", "eps"])
def test_options(backend, options):
    name, device = backend
    ours, theirs = _pair(2, device, **options)
    _steps(ours, theirs, (3, 6, 4, 3), torch.channels_last, device, torch.float32, steps=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    name, device = backend
    ours, _ = _pair(2, device)
    x = _input((4, 6, 3, 3), torch.channels_last, device, dtype).requires_grad_()
    ours = ours.to(dtype)
    y = ours(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    reference = torch.nn.functional.batch_norm(x.detach().double(), None, None, ours.weight.double(),
                                               ours.bias.double(), True)
    _close(y.double(), reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_parameters(backend, dtype):
    """As under autocast: fp16/bf16 activations, fp32 weights and running statistics."""
    name, device = backend
    ours, _ = _pair(2, device)
    x = _input((4, 6, 3, 3), None, device, dtype).requires_grad_()
    y = ours(x)
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    reference = torch.nn.functional.batch_norm(x.detach().float(), None, None, ours.weight, ours.bias, True)
    _close(y.float(), reference, dtype)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32


def test_statistics_stable_for_large_means(backend):
    """Mean 1e3, unit variance, float32: the variance stays right."""
    name, device = backend
    x = torch.randn(64, 4, 16, device=device, dtype=torch.float64) + 1e3
    running_var = torch.ones(4, device=device)
    F.batch_norm(x.float(), torch.zeros(4, device=device), running_var, training=True, momentum=1.0)
    exact = x.float().double().var((0, 2))  # unbiased, of the rounded input
    torch.testing.assert_close(running_var.double(), exact, rtol=1e-4, atol=0)


def test_deterministic_gradients(backend):
    name, device = backend
    ours, _ = _pair(2, device)
    x = _input((5, 6, 4, 4), torch.channels_last, device, torch.float32).requires_grad_()
    grad = torch.randn_like(x)
    first = torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), grad)
    second = torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_input_raises_what_torch_raises(backend):
    name, device = backend
    cases = [
        (lambda bn: bn(torch.randn(1, 6, device=device)), 1),  # one value per channel, training
        (lambda bn: bn(torch.randn(2, 6, 3, 3, device=device)), 1),  # 4-D into BatchNorm1d
        (lambda bn: bn(torch.randn(2, 6, 3, device=device)), 2),  # 3-D into BatchNorm2d
    ]
    for call, rank in cases:
        ours, theirs = _pair(rank, device)
        with pytest.raises(ValueError) as expected:
            call(theirs)
        with pytest.raises(ValueError) as got:
            call(ours)
        assert str(got.value) == str(expected.value)
    x = torch.randn(4, 6, device=device)
    for args in [(x, None, None), (x, torch.zeros(4, device=device), torch.ones(4, device=device))]:
        with pytest.raises(RuntimeError) as expected:
            torch.nn.functional.batch_norm(*args, training=False)
        with pytest.raises(RuntimeError) as got:
            F.batch_norm(*args, training=False)
        assert str(got.value) == str(expected.value)


def test_modules_are_drop_ins():
    for rank in (1, 2, 3):
        for options in (dict(), dict(affine=False, momentum=None), dict(track_running_stats=False)):
            ours, theirs = OURS[rank](6, **options), THEIRS[rank](6, **options)
            assert repr(ours) == repr(theirs) and isinstance(ours, THEIRS[rank])
            assert ours.state_dict().keys() == theirs.state_dict().keys()
    bn = fastreg.nn.BatchNorm2d(6)
    bn(torch.randn(2, 6, 3, 3))
    bn.reset_running_stats()
    assert bn.num_batches_tracked == 0 and torch.equal(bn.running_var, torch.ones(6))


# --------------------------------------------------- opcheck, gradcheck, torch.compile

BN_OPS = ("bn_stats", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply")


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if GPU or name != "triton":
        utils += ("test_aot_dispatch_dynamic",)
    suffix = "_triton" if name == "triton" else ""
    stats, apply, reduce, bwd_apply = (getattr(torch.ops.fastreg, op + suffix).default for op in BN_OPS)
    for x in (torch.randn(4, 5, 6, device=device), torch.randn(4, 6, 5, device=device).transpose(1, 2)):
        dy = torch.randn_like(x)
        mean, var = stats(x)
        w, b = torch.randn(5, device=device), torch.randn(5, device=device)
        torch.library.opcheck(stats, (x,), test_utils=utils)
        torch.library.opcheck(apply, (x, mean, var, w, b, 1e-5), test_utils=utils)
        torch.library.opcheck(apply, (x, mean, var, None, None, 1e-5), test_utils=utils)
        torch.library.opcheck(reduce, (dy, x, mean, var, 1e-5), test_utils=utils)
        sums = reduce(dy, x, mean, var, 1e-5)
        torch.library.opcheck(bwd_apply, (dy, x, mean, var, w, 1e-5, *sums, 24), test_utils=utils)
        torch.library.opcheck(bwd_apply, (dy, x, mean, var, None, 1e-5), test_utils=utils)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_gradcheck_fp64(backend, training):
    name, device = backend
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w, b = (torch.randn(4, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    running_mean = torch.randn(4, dtype=torch.float64, device=device)
    running_var = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fn(x, w, b):
        return F.batch_norm(x, running_mean.clone(), running_var.clone(), w, b, training=training)

    assert torch.autograd.gradcheck(fn, (x, w, b))


class _ConvBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = fastreg.nn.BatchNorm2d(8)
        self.bn_cumulative = fastreg.nn.BatchNorm2d(8, momentum=None)
        self.head = fastreg.nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.bn_cumulative(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


def test_torch_compile_fullgraph(backend):
    name, device = backend
    block = _ConvBlock().to(device).to(memory_format=torch.channels_last)
    reference = _ConvBlock().to(device).to(memory_format=torch.channels_last)
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, device=device).to(memory_format=torch.channels_last)
        compiled(x).sum().backward()
        reference(x).sum().backward()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(block.state_dict()[key], value, atol=1e-5, rtol=1e-4)
    block.eval()
    reference.eval()
    x = torch.randn(4, 3, 6, 6, device=device)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), reference(x), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------ ahead-of-time compile for a GPU
# Both kernels of triton_kernels/batch_norm.py in every variant its launchers use (HAS_DY:
# statistics / backward sums, forward / backward apply), with the pointer types they pass:
# x and dy in the input dtype, per-channel vectors and partial sums in the accumulate
# dtype (fp64 for fp64 inputs, else fp32); sizes and strides i32, the unit stride of the
# layout (S of a contiguous input, C of a channels-last one) a constexpr 1 as a launch
# specializes it, the others divisible by 16 (e.g. 64 channels of 56 x 56); the GPU tile
# (BLOCK_P = 64 positions x BLOCK_C = 32 channels), default num_warps.


def _bn_aot_case(case_id, kernel, x, *, has_dy, layout="contiguous"):
    acc = "fp64" if x == "fp64" else "fp32"
    tensors = ("x", "dy") if kernel == "_bn_partial_sums_kernel" else ("x", "dy", "o")
    if kernel == "_bn_partial_sums_kernel":
        pointers = {"X": x, "DY": x, "SHIFT": acc, "PARTIAL_A": acc, "PARTIAL_B": acc}
        sizes = ("P", "C", "S", "positions_per_program")
    else:
        pointers = {"X": x, "DY": x, "OUT": x, "MEAN": acc, "COEF_X": acc, "COEF_DY": acc, "COEF_ONE": acc}
        sizes = ("P", "C", "S")
    unit = "s" if layout == "contiguous" else "c"
    # without dy the launcher passes x in its place with strides (0, 0, 0)
    ones = {f"s{t}_{unit}": 1 for t in tensors if t != "dy" or has_dy}
    ints = [name for name in (*sizes, *(f"s{t}_{d}" for t in tensors for d in "ncs")) if name not in ones]
    signature = {name: f"*{ty}" for name, ty in pointers.items()}
    signature.update({name: "i32" for name in ints})
    return triton_aot.Case(case_id, "fastreg.triton_kernels.batch_norm", kernel, signature,
                           dict(HAS_DY=has_dy, BLOCK_P=64, BLOCK_C=32, **ones), num_warps=4, div16=tuple(ints))


BN_AOT_CASES = [
    *(_bn_aot_case(f"stats-{x}", "_bn_partial_sums_kernel", x, has_dy=False) for x in ("fp32", "bf16", "fp16", "fp64")),
    _bn_aot_case("stats-fp32-channels_last", "_bn_partial_sums_kernel", "fp32", has_dy=False, layout="channels_last"),
    *(_bn_aot_case(f"bwd_reduce-{x}", "_bn_partial_sums_kernel", x, has_dy=True) for x in ("fp32", "bf16", "fp64")),
    _bn_aot_case("bwd_reduce-bf16-channels_last", "_bn_partial_sums_kernel", "bf16", has_dy=True,
                 layout="channels_last"),
    *(_bn_aot_case(f"apply-{x}", "_bn_affine_kernel", x, has_dy=False) for x in ("fp32", "bf16", "fp16", "fp64")),
    _bn_aot_case("apply-fp16-channels_last", "_bn_affine_kernel", "fp16", has_dy=False, layout="channels_last"),
    *(_bn_aot_case(f"bwd_apply-{x}", "_bn_affine_kernel", x, has_dy=True) for x in ("fp32", "bf16", "fp64")),
    _bn_aot_case("bwd_apply-fp32-channels_last", "_bn_affine_kernel", "fp32", has_dy=True, layout="channels_last"),
]


@pytest.fixture(scope="module")
def bn_aot_ptx():
    return triton_aot.compile_ptx(BN_AOT_CASES)


@pytest.mark.parametrize("case", BN_AOT_CASES, ids=str)
def test_triton_kernel_compiles_for_a_gpu(bn_aot_ptx, case):
    """The interpreter accepts code a GPU compile rejects: every variant compiles for sm_90,
    no GPU needed (tests/triton_aot.py), and reads x (and dy) 16 bytes at a time along the
    unit stride; apply writes its output so too."""
    ptx = triton_aot.ptx_of(bn_aot_ptx, case)
    assert triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True), "no 16-byte loads of x"
    if case.kernel == "_bn_affine_kernel":
        stores = triton_aot.global_accesses(ptx, "st")
        assert stores == triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), stores
