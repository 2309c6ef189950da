"""BatchNorm 1d/2d/3d against torch.nn.BatchNorm on every backend: training steps with
running statistics, eval, layouts, options, errors, opcheck, gradcheck, torch.compile."""

import pytest
import torch

import fastreg
from fastreg import functional as F
from tests.conftest import GPU, interpreted, skip_unless_runs


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


@pytest.mark.skipif(not GPU, reason="the CUDA kernels' grid limit: needs a CUDA GPU (the CPU kernels have none)")
@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["contiguous", "channels_last"])
def test_more_channels_than_a_grid_axis_holds(backend, memory_format):
    """70000 channels: past the 65535 blocks of a CUDA grid's y axis, where a launch with
    one block per channel on that axis fails."""
    name, device = backend
    channels = 70000
    ours, theirs = fastreg.nn.BatchNorm2d(channels).to(device), torch.nn.BatchNorm2d(channels).to(device)
    x = _input((2, channels, 2, 2), memory_format, device, torch.float32)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    _close(y_ours, y_theirs, torch.float32)
    grad = torch.randn_like(y_theirs)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    _close(x_ours.grad, x_theirs.grad, torch.float32)
    _close(ours.weight.grad, theirs.weight.grad, torch.float32, count=8)


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


# Shapes past the CPU kernels' vector widths and pieces (csrc/cpu/batch_norm.cpp): channel
# blocks of 64 float32 lanes with a remainder (C = 80), rows of more than a 1024-value
# piece (C = 1100 channels-last, S = 1200 contiguous), channels-last positions that are not
# packed (every other column of a wider tensor; 320 positions, so that the kernel's chunks
# of positions hold several rows), and (N, C) rows one sample stride apart
# that are not packed either (a column range: rows of 200 values 300 apart). Each is a
# view of values drawn in the dtype, so that the kernels see its strides.
CPU_SHAPES = {
    "NC-C80": lambda dtype: torch.randn(70, 80, dtype=dtype),
    "NC-column_range": lambda dtype: torch.randn(70, 300, dtype=dtype)[:, 10:210],
    "channels_last-C1100": lambda dtype: torch.randn(2, 1100, 3, 2, dtype=dtype).contiguous(
        memory_format=torch.channels_last),
    "contiguous-S1200": lambda dtype: torch.randn(3, 5, 40, 30, dtype=dtype),
    "channels_last-strided": lambda dtype: torch.randn(2, 80, 16, 20, dtype=dtype).contiguous(
        memory_format=torch.channels_last)[..., ::2],
}


@pytest.mark.parametrize("shape", list(CPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("grad_layout", ["like_input", "contiguous"])
def test_cpu_vector_paths_match_float64(shape, dtype, grad_layout):
    """The CPU kernels' vector, piece and remainder paths, forward and backward, against
    torch's batch_norm in float64 on the same (rounded) values. The gradient in the input's
    memory format (dense), or contiguous: the backward's rows of x and dy side by side, or
    each value on its own."""
    skip_unless_runs("cpu")
    x = CPU_SHAPES[shape](dtype)
    x.mul_(3).add_(2)  # in place: the view keeps its strides
    channels = x.shape[1]
    weight, bias = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    grad = torch.randn_like(x) if grad_layout == "like_input" else torch.randn(x.shape, dtype=dtype)
    with fastreg.use_backend("cpu"):
        inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]  # detach keeps the strides
        y = F.batch_norm(inputs[0], None, None, inputs[1], inputs[2], training=True)
        y.backward(grad)
    reference = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y_ref = torch.nn.functional.batch_norm(reference[0], None, None, reference[1], reference[2], training=True)
    y_ref.backward(grad.double())
    count = x.numel() // channels
    _close(y.double(), y_ref.detach(), dtype)
    _close(inputs[0].grad.double(), reference[0].grad, dtype)
    for ours, ref in zip(inputs[1:], reference[1:]):
        _close(ours.grad.double(), ref.grad, dtype, count)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_16_bit_values_round_trip(dtype):
    """Every 16-bit pattern through the CPU kernels' conversions to float and back
    (csrc/cpu/convert.cpp): an eval BatchNorm with mean 0 and variance + eps exactly 1
    (eps 0 is an error before torch 2.14) is y = (x - 0) * 1 + 0, exact in float, so
    y == x (NaNs stay NaN; -0 becomes +0)."""
    skip_unless_runs("cpu")
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 2)
    eps = 2.0**-20
    with fastreg.use_backend("cpu"):
        y = F.batch_norm(x, torch.zeros(2), torch.full((2,), 1 - eps), training=False, eps=eps)
    torch.testing.assert_close(y.float(), x.float(), rtol=0, atol=0, equal_nan=True)


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


# --------------------------------------------------- launches per step (triton backend)


def _launch_case(module, shape, memory_format=None, params_grad=True):
    """A fastreg.bench.host case: forward of `module` on a fresh x, backward to x (and to
    the parameters when params_grad)."""
    from fastreg.bench import host

    def make(library, device):
        x = _input(shape, memory_format, device, torch.float32).requires_grad_()
        params = [p for p in module.parameters() if p.requires_grad] if params_grad else []
        grad = torch.randn(shape, device=device)
        return (lambda: module(x)), (lambda y: torch.autograd.grad(y, [x] + params, grad))

    return host.HostCase("batch_norm", make)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("shape", [(4, 64), (4, 64, 8, 8)], ids=["one-program", "split"])
def test_launches_per_step(training, shape):
    """training: the counter's add_ (torch's too), the statistics and the apply (running
    statistics folded in): <= 3 forward, sums and dx: <= 3 backward; one launch each way
    when a program covers all positions. eval: one forward, one backward for dx."""
    from fastreg.bench import host

    device = skip_unless_runs("triton")
    module = (fastreg.nn.BatchNorm1d(64) if len(shape) == 2 else fastreg.nn.BatchNorm2d(64)).to(device)
    module.train(training)
    split = len(shape) == 4
    with fastreg.use_backend("triton"):
        fwd, bwd, fwd_counter, bwd_counter = host.launches(_launch_case(module, shape, params_grad=not split), device)
    launched = (fwd_counter.torch_ops, fwd_counter.triton_launches, bwd_counter.torch_ops, bwd_counter.triton_launches)
    if training:
        assert fwd_counter.torch_ops == ["aten.add_.Tensor"], launched  # num_batches_tracked
        assert fwd_counter.triton_launches == (["_bn_partial_sums_kernel", "_bn_fwd_kernel"] if split
                                               else ["_bn_fwd_kernel"]), launched
        assert bwd_counter.triton_launches == (["_bn_partial_sums_kernel", "_bn_bwd_kernel"] if split
                                               else ["_bn_bwd_kernel"]), launched
    else:
        assert fwd_counter.triton_launches == ["_bn_fwd_kernel"], launched
        assert bwd_counter.triton_launches == ["_bn_bwd_kernel"], launched
    assert bwd_counter.torch_ops == [], launched
    assert fwd <= (3 if training else 1) and bwd <= (3 if training else 1), launched


# --------------------------------------------------- opcheck, gradcheck, torch.compile

BN_OPS = ("bn_stats", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply")


def _fused_samples(device):
    """(bn_fwd args, bn_bwd args) over layouts, affine options, training / eval, momentum /
    batches_tracked."""
    samples = []
    for x in (torch.randn(4, 5, 6, device=device), torch.randn(4, 6, 3, 5, device=device).permute(0, 3, 1, 2),
              torch.randn(6, 5, device=device)):
        w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
        for training in (True, False):
            for weight, bias, running, counter in ((w, b, True, None), (None, None, False, None), (w, None, True, 3),
                                                   (None, b, True, None)):
                if not training and not running:
                    continue
                stats = (torch.randn(5, device=device), torch.rand(5, device=device) + 0.5) if running else (None, None)
                batches = torch.tensor(counter, device=device) if counter is not None else None
                fwd_args = (x, weight, bias, *stats, training, 0.1, 1e-5, batches)
                samples.append((fwd_args, (torch.randn_like(x), x, weight, training)))
    return samples


def test_fused_ops_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(name):
        utils += ("test_aot_dispatch_dynamic",)
    suffix = "_triton" if name == "triton" else ""
    fwd, bwd = getattr(torch.ops.fastreg, "bn_fwd" + suffix).default, getattr(torch.ops.fastreg, "bn_bwd" + suffix).default
    for fwd_args, (dy, x, weight, training) in _fused_samples(device):
        torch.library.opcheck(fwd, fwd_args, test_utils=utils)
        _, mean, invstd = fwd(*fwd_args)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(bwd, (dy, x, weight, mean, invstd, training, mask), test_utils=utils)


def test_fused_ops_match_the_reference(kernel_backend):
    """bn_fwd / bn_bwd against fastreg/_reference.py: outputs, statistics, the running
    statistics left behind, and each gradient (or the empty tensor output_mask asks for)."""
    from fastreg import _reference

    name, device = kernel_backend
    suffix = "_triton" if name == "triton" else ""
    fwd, bwd = getattr(torch.ops.fastreg, "bn_fwd" + suffix).default, getattr(torch.ops.fastreg, "bn_bwd" + suffix).default
    for fwd_args, (dy, x, weight, training) in _fused_samples(device):
        clone = [a.clone() if torch.is_tensor(a) else a for a in fwd_args]
        got, expected = fwd(*fwd_args), _reference.bn_fwd(*clone)
        for a, b in zip(list(got) + list(fwd_args[3:5]), list(expected) + clone[3:5]):
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert got[0].stride() == x.stride() or not x.is_contiguous()
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            args = (dy, x, weight, got[1], got[2], training, mask)
            for a, b in zip(bwd(*args), _reference.bn_bwd(*args)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(name):
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


@pytest.mark.parametrize("affine", ["weight+bias", "bias", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_gradcheck_fp64(backend, training, affine):
    name, device = backend
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w, b = (torch.randn(4, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    w = w if affine == "weight+bias" else None
    b = b if affine != "none" else None
    running_mean = torch.randn(4, dtype=torch.float64, device=device)
    running_var = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        given = dict(zip(("x", "w", "b") if w is not None else ("x", "b"), args))
        return F.batch_norm(given["x"], running_mean.clone(), running_var.clone(), given.get("w"), given.get("b"),
                            training=training)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted(name))


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
