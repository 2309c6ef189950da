"""What only a GPU can check (skipped elsewhere, saying so); `make gpu-check` runs this file
in its gpu-only phase, after the suite's GPU cases.

- inputs past 2**31 elements (dropout, LayerNorm, BatchNorm, GroupNorm) on the triton and
  cuda backends, where memory allows: any 32-bit offset shows in the last rows / channels,
  compared with float32 references computed from the same input;
- each bench op's forward + backward, and optimizer steps, captured in a CUDA graph and
  replayed, against the same calls run eagerly;
- tensors on a second device while another one is current;
- torch.compile(fullgraph=True) of a small block on the triton backend: no graph break, no
  "assuming every input is mutated" fallback, the eager results.
"""

import logging

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg import _reference, _rng
from fastreg import functional as F
from fastreg.bench.ops import LAYER_MODES, OPS
from tests.conftest import GPU, needs_gpu, skip_unless_runs

pytestmark = needs_gpu
GPU_BACKENDS = ("triton", "cuda")
BIG = 2**31 + 2**16  # elements: past the int32 range by a whole tail of blocks


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    skip_unless_runs(request.param)
    with fastreg.use_backend(request.param):
        yield request.param


def _needs_free_memory(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    if GPU:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ inputs past 2**31 elements
# bfloat16 inputs (4 GiB each); references in float32 over the slices compared.
BF16_TOL = dict(atol=3e-2, rtol=2e-2)


def _slices(length: int):
    """Indices along one dim to compare: the first, one in the middle, the last two."""
    return sorted({0, length // 2, length - 2, length - 1})


def test_dropout_past_2_to_31_elements(gpu_backend):
    _needs_free_memory(24)
    x = torch.randn(BIG, device="cuda", dtype=torch.bfloat16).requires_grad_()
    torch.manual_seed(11)
    y = F.dropout(x, 0.25)
    torch.manual_seed(11)
    seed = _rng.new_seed(x.device)  # the seed the call drew
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    tail = 2**20
    for start in (0, 2**31 - tail // 2, BIG - tail):  # across the int32 boundary, and the end
        window = slice(start, start + tail)
        expected = _reference.dropout(x.detach()[window], seed, 0.25, offset=start)
        assert torch.equal(y[window], expected), f"forward differs from the reference at [{start}, {start + tail})"
        expected_dx = _reference.dropout(dy[window], seed, 0.25, offset=start)
        assert torch.equal(dx[window], expected_dx), f"backward differs at [{start}, {start + tail})"
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.25) < 1e-3, dropped


def _norm_reference(x, dy, weight, bias, reduce_dims, eps, param_view):
    """y, dx of (x - mean) * rstd * weight + bias with statistics over `reduce_dims`, in float32."""
    x, dy = x.float(), dy.float()
    var, mean = torch.var_mean(x, dim=reduce_dims, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    w = weight.float().view(param_view)
    y = xhat * w + bias.float().view(param_view)
    g = dy * w
    dx = rstd * (g - g.mean(dim=reduce_dims, keepdim=True) - xhat * (g * xhat).mean(dim=reduce_dims, keepdim=True))
    return y, dx


def test_layer_norm_past_2_to_31_elements(gpu_backend):
    _needs_free_memory(40)
    hidden = 4096
    rows = BIG // hidden
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.rand(hidden, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(hidden, device="cuda").requires_grad_()
    y = F.layer_norm(x, (hidden,), weight, bias, 1e-5)
    dy = torch.randn_like(y)
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy)
    for row in _slices(rows):
        y_ref, dx_ref = _norm_reference(x.detach()[row], dy[row], weight, bias, (-1,), 1e-5, (hidden,))
        torch.testing.assert_close(y[row].float(), y_ref, **BF16_TOL, msg=lambda m: f"row {row}: {m}")
        torch.testing.assert_close(dx[row].float(), dx_ref, **BF16_TOL, msg=lambda m: f"row {row}: {m}")
    # dweight and dbias sum every row: from float32 statistics, in row chunks
    dweight_ref = torch.zeros(hidden, device="cuda")
    dbias_ref = torch.zeros(hidden, device="cuda")
    for xs, dys in zip(x.detach().split(2**16), dy.split(2**16)):
        dweight_ref += (dys.float() * torch_F.layer_norm(xs.float(), (hidden,), eps=1e-5)).sum(0)
        dbias_ref += dys.float().sum(0)
    scale = rows**0.5
    torch.testing.assert_close(dweight, dweight_ref, atol=1e-2 * scale, rtol=1e-2)
    torch.testing.assert_close(dbias, dbias_ref, atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_batch_norm_past_2_to_31_elements(gpu_backend, memory_format):
    _needs_free_memory(60)
    n, c, h, w = 2**15 + 1, 64, 32, 32  # 2**31 + 65536 elements
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory_format)
    x.requires_grad_()
    weight = (torch.rand(c, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(c, device="cuda").requires_grad_()
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref, dx_ref = _norm_reference(x.detach(), dy, weight, bias, (0, 2, 3), 1e-5, (1, c, 1, 1))
    for sample in _slices(n):
        torch.testing.assert_close(y[sample].float(), y_ref[sample], **BF16_TOL, msg=lambda m: f"sample {sample}: {m}")
        torch.testing.assert_close(dx[sample].float(), dx_ref[sample], **BF16_TOL, msg=lambda m: f"sample {sample}: {m}")
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_group_norm_one_group_past_2_to_31_elements(gpu_backend, memory_format):
    """One sample, one group of 2**31 + 2**16 elements: the group's size D*S itself past int32."""
    _needs_free_memory(60)
    c, h, w = 32, 2**13, 2**13 + 8
    x = torch.randn(1, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory_format)
    x.requires_grad_()
    weight = (torch.rand(c, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(c, device="cuda").requires_grad_()
    y = F.group_norm(x, 1, weight, bias, 1e-5)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref, dx_ref = _norm_reference(x.detach(), dy, weight, bias, (1, 2, 3), 1e-5, (1, c, 1, 1))
    for channel in _slices(c):
        torch.testing.assert_close(y[:, channel].float(), y_ref[:, channel], **BF16_TOL,
                                   msg=lambda m: f"channel {channel}: {m}")
        torch.testing.assert_close(dx[:, channel].float(), dx_ref[:, channel], **BF16_TOL,
                                   msg=lambda m: f"channel {channel}: {m}")


# ------------------------------------------------------------------ CUDA graphs

LAYER_OPS = [name for name, op in OPS.items() if op.modes == LAYER_MODES]
STEP_OPS = [name for name, op in OPS.items() if op.modes != LAYER_MODES]


def _training_step(op, inputs):
    """y and the gradients of op's fastreg function (one call, as a training step)."""
    differentiable = [t for t in inputs if t.requires_grad]
    y = op.fastreg_fn(*inputs)
    grads = torch.autograd.grad(y, differentiable, torch.ones_like(y))
    return (y, *grads)


def _op_inputs(op, device="cuda"):
    shape = op.shapes["cuda"][1][0]  # the bench's quick shape
    inputs = op.inputs(shape, torch.float32, device)
    for index, t in enumerate(inputs):
        t.requires_grad_(t.is_floating_point() and (op.differentiable is None or index < op.differentiable))
    return inputs


@pytest.mark.parametrize("name", LAYER_OPS)
def test_forward_backward_replays_in_a_cuda_graph(gpu_backend, name):
    """Captured once, replayed: the outputs of an eager call from the same generator state
    (random ops in a graph draw from torch's generator at each replay)."""
    op = OPS[name]
    inputs = _op_inputs(op)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            _training_step(op, inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _training_step(op, inputs)
    for seed in (5, 6):
        torch.manual_seed(seed)
        graph.replay()
        replayed = [t.clone() for t in static]
        torch.manual_seed(seed)
        eager = _training_step(op, inputs)
        for index, (a, b) in enumerate(zip(replayed, eager)):
            assert torch.equal(a, b), f"{name}: output {index} of the replay differs from the eager call"


@pytest.mark.parametrize("name", STEP_OPS)
def test_optimizer_step_replays_in_a_cuda_graph(gpu_backend, name):
    """A captured step replays as eager steps: the step counts, the bias corrections and the
    pointer tables stay on the device (capturable=True where the optimizer takes it, as torch
    requires of a captured Adam/AdamW step; torch's SGD has no such option)."""
    op = OPS[name]

    def fresh():
        torch.manual_seed(3)
        params = op.inputs((8, 4096), torch.float32, "cuda")
        optimizer = op.fastreg_fn(*params)
        if "capturable" in optimizer.defaults:
            for group in optimizer.param_groups:
                group["capturable"] = True
        return params, optimizer

    params, optimizer = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        optimizer.step()  # creates the state
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for _ in range(3):
        graph.replay()
    # capturing records the step without running it: the warm-up step and 3 replays
    eager_params, eager_optimizer = fresh()
    for _ in range(1 + 3):
        eager_optimizer.step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ a second device


@pytest.mark.skipif(GPU and torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("name", LAYER_OPS + STEP_OPS)
def test_tensors_on_a_second_device(gpu_backend, name):
    """cuda:1 tensors while cuda:0 is current: the results of the same call with cuda:1 current."""
    op = OPS[name]
    torch.cuda.set_device(0)
    if name in STEP_OPS:
        torch.manual_seed(3)
        params = op.inputs((8, 4096), torch.float32, "cuda:1")
        op.fastreg_fn(*params).step()
        with torch.cuda.device(1):
            torch.manual_seed(3)
            expected = op.inputs((8, 4096), torch.float32, "cuda:1")
            op.fastreg_fn(*expected).step()
        for p, q in zip(params, expected):
            assert p.device == torch.device("cuda:1") and torch.equal(p, q)
        return
    inputs = _op_inputs(op, "cuda:1")
    torch.manual_seed(4)
    results = _training_step(op, inputs)
    with torch.cuda.device(1):
        torch.manual_seed(4)
        expected = _training_step(op, inputs)
    for index, (a, b) in enumerate(zip(results, expected)):
        assert a.device == torch.device("cuda:1"), f"output {index} on {a.device}"
        assert torch.equal(a, b), f"{name}: output {index} differs when another device is current"


# ------------------------------------------------------------------ torch.compile of a block


class _Block(torch.nn.Module):
    """A pre-norm residual MLP and a conv feature map through fastreg's modules."""

    def __init__(self, width=64, channels=32):
        super().__init__()
        self.norm = fastreg.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.drop = fastreg.nn.Dropout(0.1)
        self.down = torch.nn.Linear(2 * width, width)
        self.rms = fastreg.nn.RMSNorm(width)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.group_norm = fastreg.nn.GroupNormSiLU(8, channels)
        self.batch_norm = fastreg.nn.BatchNorm2d(channels)

    def forward(self, x, image):
        x = x + self.drop(self.down(torch_F.gelu(self.up(self.norm(x)))))
        image = self.batch_norm(self.group_norm(self.conv(image)))
        return self.rms(x), image


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_compiled_block_on_the_triton_backend_has_no_graph_break_or_fallback():
    skip_unless_runs("triton")
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    records = _Records()
    torch_logger = logging.getLogger("torch")
    torch_logger.addHandler(records)
    block = _Block().cuda()
    x = torch.randn(4, 16, 64, device="cuda", requires_grad=True)
    image = torch.randn(2, 32, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    try:
        with fastreg.use_backend("triton"), torch._inductor.config.patch(fallback_random=True):
            compiled = torch.compile(block, fullgraph=True)
            torch.manual_seed(0)
            out, out_image = compiled(x, image)
            (out.sum() + out_image.sum()).backward()
            compiled_grad = x.grad.clone()
            x.grad = None
            torch.manual_seed(0)
            eager, eager_image = block(x, image)
            (eager.sum() + eager_image.sum()).backward()
    finally:
        torch_logger.removeHandler(records)
    breaks = dict(counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    fallbacks = [m for m in records.messages if "assuming every input is mutated" in m]
    assert not fallbacks, fallbacks
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_image, eager_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_grad, x.grad, atol=1e-4, rtol=1e-4)
