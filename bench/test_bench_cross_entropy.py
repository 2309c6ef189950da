"""pytest-benchmark timings of cross-entropy forward+backward on CPU, and the linear form's
memory bound measured as the bench measures it: `pytest bench/`.

`make test` runs these with --benchmark-disable (each once, as a smoke test).
"""

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg.bench.runner import peak_memory

ROWS, CLASSES = 256, 8192


def _step(fn, label_smoothing):
    x = torch.randn(ROWS, CLASSES, requires_grad=True)
    target = torch.randint(0, CLASSES, (ROWS,))
    return lambda: torch.autograd.grad(fn(x, target, label_smoothing=label_smoothing), x)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fastreg_cross_entropy_fwd_bwd(benchmark, backend, label_smoothing):
    if not fastreg.backend_supports(backend, "cpu"):
        pytest.skip(f"backend {backend!r} cannot run CPU tensors here")
    with fastreg.use_backend(backend):
        (grad,) = benchmark(_step(fastreg.functional.cross_entropy, label_smoothing))
    torch.testing.assert_close(grad.sum(1), torch.zeros(ROWS), atol=1e-5, rtol=0)  # softmax - target sums to 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_torch_cross_entropy_fwd_bwd(benchmark, label_smoothing):
    benchmark(_step(torch_F.cross_entropy, label_smoothing))


def _linear_step(fn, tokens, hidden, classes):
    x = torch.randn(tokens, hidden, requires_grad=True)
    weight = (torch.randn(classes, hidden) / hidden**0.5).requires_grad_()
    target = torch.randint(0, classes, (tokens,))
    return lambda: torch.autograd.grad(fn(x, weight, target), (x, weight))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_cross_entropy_memory_bound(backend):
    """Above its inputs and outputs (the loss and the two gradients), fastreg's fused form
    holds at most 1/4 of the (tokens, classes) logits it avoids during a training step (the
    bench's check, `python -m fastreg.bench linear_cross_entropy`, at 4096 x 1024 x 32768);
    the unfused sequence holds more than the logits (a sanity check of the measure). The
    torch backend is the unfused reference: it is held to the second."""
    if not fastreg.backend_supports(backend, "cpu"):
        pytest.skip(f"backend {backend!r} cannot run CPU tensors here")
    tokens, hidden, classes = 1024, 64, 8192
    logits_bytes = tokens * classes * 4
    with fastreg.use_backend(backend):
        _, extra = peak_memory(_linear_step(fastreg.functional.linear_cross_entropy, tokens, hidden, classes), "cpu")
    _, unfused_extra = peak_memory(
        _linear_step(lambda x, w, t: torch_F.cross_entropy(torch_F.linear(x, w), t), tokens, hidden, classes), "cpu")
    assert unfused_extra >= logits_bytes
    if backend == "torch":
        assert extra >= logits_bytes
    else:
        assert extra <= logits_bytes / 4, (extra / 2**20, logits_bytes / 2**20)
