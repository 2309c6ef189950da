"""What the benchmark measures, op by op: sizes, modes, the minimum-bytes model, providers.

Adding an op is adding one `BenchOp` to `OPS`. Its byte model gives, per mode, the bytes
per element of the main input a kernel must move at the least (E = element size), the
figure behind the GB/s column; see the table in the engineering guide.

Layer ops run the modes fwd, bwd and fwd+bwd. Losses run fwd and fwd+bwd, with an incoming
gradient of 1, what loss.backward() passes (fastreg's make their gradient in the forward;
a backward repeated over a retained graph, the bwd mode, would time a copy no training
step makes). Optimizer ops run one mode, `step`: their "main input" is the parameter set, shape
(tensors, elements per tensor), and their functions build an optimizer over it (see
`make_callable`).
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as torch_F

import fastreg

Fn = Callable[[], object]


Shape = tuple[int, ...]

LAYER_MODES = ("fwd", "bwd", "fwd+bwd")
LOSS_MODES = ("fwd", "fwd+bwd")
STEP_MODES = ("step",)


@dataclass(frozen=True)
class BenchOp:
    """One op to time. `make_inputs(shape, dtype, device)` builds its tensor arguments (the
    first is the main input, whose element count the byte model scales with);
    `fastreg_fn` and `torch_fn` take them and return one tensor."""

    name: str
    bytes_per_element: dict[str, float]  # mode -> minimum bytes per element, in units of E
    shapes: dict[str, tuple[list[Shape], list[Shape]]]  # device -> (full, quick) main-input shapes
    fastreg_fn: Callable[..., torch.Tensor]  # the op as fastreg runs it
    torch_fn: Callable[..., torch.Tensor]  # the same op in eager PyTorch
    make_inputs: Callable[[Shape, torch.dtype, str], tuple[torch.Tensor, ...]] = None
    differentiable: int | None = None  # how many leading inputs get gradients (None: every floating one)
    modes: tuple[str, ...] = LAYER_MODES
    # more eager torch providers than `torch_fn`: name -> function (e.g. torch-fused)
    torch_variants: dict[str, Callable[..., object]] = field(default_factory=dict)
    unit_grad: bool = False  # backward from an incoming gradient of ones (a loss's), not random
    # elements of the main input the byte model and the copy bandwidth count (default: all)
    numel_of: Callable[[Shape], int] | None = None
    # minimum bytes of a mode for a shape and dtype, where bytes_per_element * numel * E is
    # not the whole model (default: that product)
    byte_model: Callable[[str, Shape, torch.dtype], float] | None = None
    measure_memory: bool = False  # also record each provider's peak memory above its inputs
    # bytes fastreg may hold above inputs and outputs (checked where memory is measured)
    memory_bound: Callable[[Shape, torch.dtype], float] | None = None

    def inputs(self, shape: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
        if self.make_inputs is None:
            return (torch.randn(shape, device=device).to(dtype),)
        return self.make_inputs(shape, dtype, device)

    def numel(self, shape: Shape) -> int:
        return self.numel_of(shape) if self.numel_of is not None else math.prod(shape)

    def min_bytes(self, mode: str, numel: int, dtype: torch.dtype, shape: Shape | None = None) -> float:
        if self.byte_model is not None and shape is not None:
            return self.byte_model(mode, shape, dtype)
        return self.bytes_per_element[mode] * numel * dtype.itemsize


def make_callable(op: BenchOp, fn, mode: str, shape: Shape, dtype: torch.dtype, device: str) -> Fn:
    """A no-argument callable running `mode` of `fn` (op's fastreg_fn or torch_fn) on fresh inputs.

    fwd:      y = fn(*inputs), no autograd graph
    bwd:      the gradients of a precomputed y with respect to the differentiable inputs
              (autograd.grad, nothing accumulated)
    fwd+bwd:  both, as a training step runs them
    step:     optimizer.step() of the optimizer fn builds over the inputs (params with
              grads), after one untimed step that creates its state
    """
    inputs = op.inputs(shape, dtype, device)
    if mode == "step":
        optimizer = fn(*inputs)
        optimizer.step()
        return optimizer.step
    if mode == "fwd":
        return lambda: fn(*inputs)
    for index, t in enumerate(inputs):
        t.requires_grad_(t.is_floating_point() and (op.differentiable is None or index < op.differentiable))
    differentiable = [t for t in inputs if t.requires_grad]
    grad = (torch.ones_like if op.unit_grad else torch.randn_like)(fn(*inputs))
    if mode == "bwd":
        y = fn(*inputs)
        return lambda: torch.autograd.grad(y, differentiable, grad, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*inputs), differentiable, grad)
    raise ValueError(f"unknown mode {mode!r}")


def _rows_and_params(shape, dtype, device, residual=False, bias=True):
    """(x[, residual], weight[, bias]) for a norm over the last dim of `shape`."""
    n = shape[-1]
    tensors = [torch.randn(shape, device=device).to(dtype)]
    if residual:
        tensors.append(torch.randn(shape, device=device).to(dtype))
    tensors.append(torch.randn(n, device=device).to(dtype))
    if bias:
        tensors.append(torch.randn(n, device=device).to(dtype))
    return tuple(tensors)


DROPOUT_P = 0.5
FUSED_P = 0.1
EPS = 1e-5
# GPU rows: M = 8192 rows of the hidden sizes of common transformers
NORM_SHAPES = {"cuda": ([(8192, n) for n in (1024, 4096, 8192, 32768)], [(8192, 4096)]),
               "cpu": ([(4096, 1024), (1024, 8192)], [(4096, 1024)])}


def _channels_and_params(shape, dtype, device, memory_format=torch.contiguous_format):
    """(x, weight, bias) for a BatchNorm over dim 1 of `shape`; parameters in float32, as torch keeps them."""
    x = torch.randn(shape, device=device).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=memory_format)
    return x, torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)


# training mode: statistics of the batch (running statistics are C values: left out)
def _batch_norm_fastreg(x, w, b):
    return fastreg.functional.batch_norm(x, None, None, w, b, training=True, eps=EPS)


def _batch_norm_torch(x, w, b):
    return torch_F.batch_norm(x, None, None, w, b, training=True, eps=EPS)


# read x, write y; read x and dy, write dx (a second read of x for the statistics, and
# the per-channel sums, are not counted: the minimum)
BATCH_NORM_BYTES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


# eval mode: fixed (running) statistics, an affine map per channel
def _batch_norm_eval_inputs(shape, dtype, device):
    x, w, b = _channels_and_params(shape, dtype, device, torch.channels_last)
    return x, w, b, torch.randn(shape[1], device=device), torch.rand(shape[1], device=device) + 0.5


def _batch_norm_eval_fastreg(x, w, b, running_mean, running_var):
    return fastreg.functional.batch_norm(x, running_mean, running_var, w, b, training=False, eps=EPS)


def _batch_norm_eval_torch(x, w, b, running_mean, running_var):
    return torch_F.batch_norm(x, running_mean, running_var, w, b, training=False, eps=EPS)


# Optimizer steps: 100M params in 200 tensors on a GPU, 10M in 100 on a CPU.
OPTIM_SHAPES = {"cuda": ([(200, 500_000)], [(200, 50_000)]), "cpu": ([(100, 100_000)], [(20, 50_000)])}
LR, WEIGHT_DECAY, MOMENTUM = 1e-3, 1e-2, 0.9


def _params_with_grads(shape, dtype, device):
    tensors, numel = shape
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(numel, device=device).to(dtype))
        p.grad = torch.randn_like(p)
        params.append(p)
    return tuple(params)


def _step_variants(torch_cls, **kwargs):
    return {"torch-foreach": lambda *params: torch_cls(params, foreach=True, **kwargs),
            "torch-fused": lambda *params: torch_cls(params, fused=True, **kwargs)}


NUM_GROUPS = 32
# diffusion UNets: GroupNorm(32) over (N, C, H, W) activations, mostly channels-last
GROUP_NORM_SHAPES = {"cuda": ([(2, 512, 64, 64), (16, 256, 32, 32)], [(16, 256, 32, 32)]),
                     "cpu": ([(16, 256, 32, 32)], [(16, 256, 32, 32)])}
# read x, write y (the group's statistics from a first read that stays on chip / in cache);
# read x and dy, write dx
GROUP_NORM_BYTES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def _group_norm_inputs(shape, dtype, device, memory_format=torch.contiguous_format):
    """(x, weight, bias), the parameters in x's dtype (a model cast to it)."""
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
    return x, torch.rand(shape[1], device=device).to(dtype) + 0.5, torch.randn(shape[1], device=device).to(dtype)


def _group_norm_silu_torch(x, w, b):
    return torch_F.silu(torch_F.group_norm(x, NUM_GROUPS, w, b, EPS))


def _group_norm_ops():
    ops = []
    for suffix, memory_format in (("", torch.contiguous_format), ("_channels_last", torch.channels_last)):
        def make_inputs(shape, dtype, device, memory_format=memory_format):
            return _group_norm_inputs(shape, dtype, device, memory_format)

        ops.append(BenchOp(
            name="group_norm" + suffix,
            bytes_per_element=GROUP_NORM_BYTES,
            shapes=GROUP_NORM_SHAPES,
            make_inputs=make_inputs,
            fastreg_fn=lambda x, w, b: fastreg.functional.group_norm(x, NUM_GROUPS, w, b, EPS),
            torch_fn=lambda x, w, b: torch_F.group_norm(x, NUM_GROUPS, w, b, EPS),
        ))
        ops.append(BenchOp(
            name="group_norm_silu" + suffix,
            # the activation is recomputed in backward, never stored: the same bytes
            bytes_per_element=GROUP_NORM_BYTES,
            shapes=GROUP_NORM_SHAPES,
            make_inputs=make_inputs,
            fastreg_fn=lambda x, w, b: fastreg.functional.group_norm(x, NUM_GROUPS, w, b, EPS, activation="silu"),
            torch_fn=_group_norm_silu_torch,
        ))
    return ops


def _dropout_add_layer_norm_eager(x, residual, weight, bias):
    return torch_F.layer_norm(torch_F.dropout(x, FUSED_P) + residual, x.shape[-1:], weight, bias, EPS)


GAUSSIAN_P = 0.5
GAUSSIAN_STD = math.sqrt(GAUSSIAN_P / (1 - GAUSSIAN_P))
NOISE_STD = 0.1
ALPHA_P = 0.1
NOISE_SHAPES = {"cuda": ([(2**24,), (2**26,)], [(2**24,)]), "cpu": ([(2**22,)], [(2**20,)])}
# the noise is regenerated, never stored: read x, write y; read dy, write dx
NOISE_BYTES = {"fwd": 2, "bwd": 2, "fwd+bwd": 4}

# DropBlock as ResNets use it (block 7, drop probability 0.1) on a stage's activations
DROP_BLOCK_P, DROP_BLOCK_SIZE = 0.1, 7
DROP_BLOCK_SHAPES = {"cuda": ([(64, 256, 56, 56)], [(32, 256, 28, 28)]),
                     "cpu": ([(16, 64, 56, 56)], [(4, 64, 56, 56)])}
# read x, write y; read dy, write dx. Not counted: the stored keep bits, 1 bit per element
# written once and read by the forward's multiply and by backward
DROP_BLOCK_BYTES = {"fwd": 2, "bwd": 2, "fwd+bwd": 4}


def _drop_block2d_torch(x):
    """torchvision.ops.drop_block2d's expression in torch ops (torchvision is optional)."""
    n, c, h, w = x.shape
    block = min(DROP_BLOCK_SIZE, w, h)
    gamma = (DROP_BLOCK_P * h * w) / ((block**2) * ((h - block + 1) * (w - block + 1)))
    noise = torch.empty((n, c, h - block + 1, w - block + 1), dtype=x.dtype, device=x.device).bernoulli_(gamma)
    noise = torch_F.pad(noise, [block // 2] * 4, value=0)
    noise = torch_F.max_pool2d(noise, stride=(1, 1), kernel_size=(block, block), padding=block // 2)
    noise = 1 - noise
    return x * noise * (noise.numel() / (1e-6 + noise.sum()))


def _torchvision_variants():
    try:
        import torchvision.ops
    except Exception:  # not installed, or built against another torch
        return {}
    return {"torchvision": lambda x: torchvision.ops.drop_block2d(x, DROP_BLOCK_P, DROP_BLOCK_SIZE)}


def _drop_block_ops():
    ops = []
    for suffix, memory_format in (("", torch.contiguous_format), ("_channels_last", torch.channels_last)):
        def make_inputs(shape, dtype, device, memory_format=memory_format):
            return (torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format),)

        ops.append(BenchOp(
            name="drop_block2d" + suffix,
            bytes_per_element=DROP_BLOCK_BYTES,
            shapes=DROP_BLOCK_SHAPES,
            make_inputs=make_inputs,
            fastreg_fn=lambda x: fastreg.functional.drop_block2d(x, DROP_BLOCK_P, DROP_BLOCK_SIZE),
            torch_fn=_drop_block2d_torch,
            torch_variants=_torchvision_variants(),
        ))
    return ops


# Cross-entropy of (rows, classes) logits against class indices, a quarter of them ignored.
# fwd reads the logits once; fwd+bwd also writes their gradient once (fastreg makes it in
# the forward's pass; backward hands it on), plus the int64 targets: 2E per logit.
LABEL_SMOOTHING = 0.1
CROSS_ENTROPY_BYTES = {"fwd": 1, "fwd+bwd": 2}
CROSS_ENTROPY_SHAPES = {"cuda": ([(8192, 32768), (4096, 131072), (1024, 262144)], [(8192, 32768)]),
                        "cpu": ([(4096, 8192), (256, 131072)], [(4096, 8192)])}


def _cross_entropy_inputs(shape, dtype, device):
    rows, classes = shape
    target = torch.randint(0, classes, (rows,), device=device)
    target[torch.rand(rows, device=device) < 0.25] = -100
    return torch.randn(shape, device=device).to(dtype), target


def _cross_entropy_bytes(mode, shape, dtype):
    return CROSS_ENTROPY_BYTES[mode] * math.prod(shape) * dtype.itemsize + 8 * shape[0]


def _cross_entropy_ops():
    ops = []
    for suffix, smoothing in (("", 0.0), ("_smooth", LABEL_SMOOTHING)):
        ops.append(BenchOp(
            name="cross_entropy" + suffix,
            bytes_per_element=CROSS_ENTROPY_BYTES,
            byte_model=_cross_entropy_bytes,
            shapes=CROSS_ENTROPY_SHAPES,
            make_inputs=_cross_entropy_inputs,
            differentiable=1,
            modes=LOSS_MODES,
            unit_grad=True,
            fastreg_fn=lambda x, t, s=smoothing: fastreg.functional.cross_entropy(x, t, label_smoothing=s),
            torch_fn=lambda x, t, s=smoothing: torch_F.cross_entropy(x, t, label_smoothing=s),
        ))
    return ops


# The output layer and its loss: input (tokens, hidden), weight (classes, hidden), shape
# (tokens, hidden, classes). Matmul-bound; the byte model is what any implementation moves at
# the least (read input and weight, write their gradients; the targets): it never holds the
# (tokens, classes) logits. Peak memory is measured too: fastreg's must stay under 1/4 of
# the logits it avoids (4096 x 32768 float32: 512 MiB).
LINEAR_CROSS_ENTROPY_SHAPES = {"cuda": ([(8192, 4096, 131072), (16384, 2048, 32768)], [(8192, 4096, 131072)]),
                               "cpu": ([(4096, 1024, 32768)], [(1024, 256, 8192)])}


def _linear_cross_entropy_inputs(shape, dtype, device):
    tokens, hidden, classes = shape
    target = torch.randint(0, classes, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < 0.25] = -100
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    weight = (torch.randn(classes, hidden, device=device) / math.sqrt(hidden)).to(dtype)
    return x, weight, target


def _linear_cross_entropy_bytes(mode, shape, dtype):
    tokens, hidden, classes = shape
    operands = (tokens + classes) * hidden * dtype.itemsize
    return (operands if mode == "fwd" else 2 * operands) + 8 * tokens


def _linear_cross_entropy_unfused(x, w, t):
    return torch_F.cross_entropy(torch_F.linear(x, w), t)


def _torch_linear_cross_entropy_variants():
    if not hasattr(torch_F, "linear_cross_entropy"):  # torch 2.13 and later
        return {}
    options = torch.nn.LinearCrossEntropyOptions()  # the chunked path (None: the unfused reference)
    return {"torch-native-chunked": lambda x, w, t: torch_F.linear_cross_entropy(x, w, t, options=options)}


OPS = {
    op.name: op
    for op in [
        BenchOp(
            name="dropout",
            # the mask is regenerated, never stored: read x, write y; read dy, write dx
            bytes_per_element={"fwd": 2, "bwd": 2, "fwd+bwd": 4},
            shapes={"cuda": ([(2**24,), (2**26,)], [(2**24,)]), "cpu": ([(2**22,)], [(2**20,)])},
            fastreg_fn=lambda x: fastreg.functional.dropout(x, DROPOUT_P, training=True),
            torch_fn=lambda x: torch_F.dropout(x, DROPOUT_P, training=True),
        ),
        BenchOp(
            name="layer_norm",
            # read x, write y; read x and dy, write dx (weight, bias and their gradients
            # are one row each: negligible)
            bytes_per_element={"fwd": 2, "bwd": 3, "fwd+bwd": 5},
            shapes=NORM_SHAPES,
            make_inputs=_rows_and_params,
            fastreg_fn=lambda x, w, b: fastreg.functional.layer_norm(x, x.shape[-1:], w, b, EPS),
            torch_fn=lambda x, w, b: torch_F.layer_norm(x, x.shape[-1:], w, b, EPS),
        ),
        BenchOp(
            name="rms_norm",
            bytes_per_element={"fwd": 2, "bwd": 3, "fwd+bwd": 5},
            shapes=NORM_SHAPES,
            make_inputs=lambda shape, dtype, device: _rows_and_params(shape, dtype, device, bias=False),
            fastreg_fn=lambda x, w: fastreg.functional.rms_norm(x, x.shape[-1:], w, EPS),
            torch_fn=lambda x, w: torch_F.rms_norm(x, x.shape[-1:], w, EPS),
        ),
        BenchOp(
            name="dropout_add_layer_norm",
            # y = layer_norm(residual + dropout(x)). fwd (inference): read x and residual,
            # write y. bwd: read dy and h, write dresidual and dx (the mask is regenerated).
            # fwd+bwd: the training forward also writes h, which backward reads
            bytes_per_element={"fwd": 3, "bwd": 4, "fwd+bwd": 8},
            shapes=NORM_SHAPES,
            make_inputs=lambda shape, dtype, device: _rows_and_params(shape, dtype, device, residual=True),
            fastreg_fn=lambda x, r, w, b: fastreg.functional.dropout_add_layer_norm(x, r, w, b, FUSED_P, EPS),
            torch_fn=_dropout_add_layer_norm_eager,
        ),
        BenchOp(
            name="batch_norm",
            bytes_per_element=BATCH_NORM_BYTES,
            shapes={"cuda": ([(65536, 512), (64, 256, 56, 56)], [(65536, 512)]),
                    "cpu": ([(65536, 256), (32, 64, 56, 56)], [(65536, 256)])},
            make_inputs=_channels_and_params,
            fastreg_fn=_batch_norm_fastreg,
            torch_fn=_batch_norm_torch,
        ),
        BenchOp(
            name="batch_norm_channels_last",
            bytes_per_element=BATCH_NORM_BYTES,
            shapes={"cuda": ([(64, 256, 56, 56)], [(64, 256, 56, 56)]), "cpu": ([(32, 64, 56, 56)], [(32, 64, 56, 56)])},
            make_inputs=lambda shape, dtype, device: _channels_and_params(shape, dtype, device, torch.channels_last),
            fastreg_fn=_batch_norm_fastreg,
            torch_fn=_batch_norm_torch,
        ),
        BenchOp(
            name="batch_norm_eval",
            # fwd: read x, write y; bwd: read x and dy (dweight needs xhat), write dx
            bytes_per_element={"fwd": 2, "bwd": 3, "fwd+bwd": 5},
            shapes={"cuda": ([(64, 256, 56, 56)], [(64, 256, 56, 56)]), "cpu": ([(32, 64, 56, 56)], [(32, 64, 56, 56)])},
            make_inputs=_batch_norm_eval_inputs,
            differentiable=3,  # x, weight, bias; not the running statistics
            fastreg_fn=_batch_norm_eval_fastreg,
            torch_fn=_batch_norm_eval_torch,
        ),
        BenchOp(
            name="adamw",
            # read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq (28 B/param in float32)
            bytes_per_element={"step": 7},
            shapes=OPTIM_SHAPES,
            make_inputs=_params_with_grads,
            modes=STEP_MODES,
            fastreg_fn=lambda *params: fastreg.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY),
            # torch's default: foreach on CUDA, a loop over the tensors on CPU
            torch_fn=lambda *params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY),
            torch_variants=_step_variants(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
        ),
        BenchOp(
            name="sgd_momentum",
            # read p, g, momentum_buffer; write p, momentum_buffer (20 B/param in float32)
            bytes_per_element={"step": 5},
            shapes=OPTIM_SHAPES,
            make_inputs=_params_with_grads,
            modes=STEP_MODES,
            fastreg_fn=lambda *params: fastreg.optim.SGD(params, lr=LR, momentum=MOMENTUM),
            torch_fn=lambda *params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM),
            torch_variants=_step_variants(torch.optim.SGD, lr=LR, momentum=MOMENTUM),
        ),
        *_group_norm_ops(),
        BenchOp(
            name="gaussian_dropout",
            bytes_per_element=NOISE_BYTES,
            shapes=NOISE_SHAPES,
            fastreg_fn=lambda x: fastreg.functional.gaussian_dropout(x, GAUSSIAN_P),
            torch_fn=lambda x: x * (1 + GAUSSIAN_STD * torch.randn_like(x)),
        ),
        BenchOp(
            name="gaussian_noise",
            # backward passes the gradient through (no kernel, for torch too): no bwd mode
            bytes_per_element={"fwd": 2, "fwd+bwd": 2},
            modes=LOSS_MODES,
            shapes=NOISE_SHAPES,
            fastreg_fn=lambda x: fastreg.functional.gaussian_noise(x, NOISE_STD),
            torch_fn=lambda x: x + NOISE_STD * torch.randn_like(x),
        ),
        BenchOp(
            name="alpha_dropout",
            bytes_per_element=NOISE_BYTES,
            shapes=NOISE_SHAPES,
            fastreg_fn=lambda x: fastreg.functional.alpha_dropout(x, ALPHA_P, training=True),
            torch_fn=lambda x: torch_F.alpha_dropout(x, ALPHA_P, training=True),
        ),
        *_drop_block_ops(),
        *_cross_entropy_ops(),
        BenchOp(
            name="linear_cross_entropy",
            bytes_per_element={"fwd": 1, "fwd+bwd": 2},  # per input element; the model is byte_model
            byte_model=_linear_cross_entropy_bytes,
            numel_of=lambda shape: shape[0] * shape[1],
            shapes=LINEAR_CROSS_ENTROPY_SHAPES,
            make_inputs=_linear_cross_entropy_inputs,
            differentiable=2,
            modes=LOSS_MODES,
            unit_grad=True,
            measure_memory=True,
            memory_bound=lambda shape, dtype: shape[0] * shape[2] * dtype.itemsize / 4,  # 1/4 of the logits
            fastreg_fn=lambda x, w, t: fastreg.functional.linear_cross_entropy(x, w, t),
            torch_fn=_linear_cross_entropy_unfused,
            torch_variants=_torch_linear_cross_entropy_variants(),
        ),
    ]
}
# `python -m fastreg.bench optim`: the optimizer steps; `cross_entropy`: with and without label smoothing
OP_GROUPS = {"optim": ["adamw", "sgd_momentum"], "cross_entropy": ["cross_entropy", "cross_entropy_smooth"]}
# `python -m fastreg.bench noise`: the noise ops and DropBlock
OP_GROUPS["noise"] = ["gaussian_dropout", "gaussian_noise", "alpha_dropout", "drop_block2d", "drop_block2d_channels_last"]
