"""pytest-benchmark timings of dropout forward+backward on CPU: `pytest bench/`.

`make test` runs these with --benchmark-disable (each once, as a smoke test).
"""

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg

NUMEL = 2**18


def _step(fn):
    x = torch.randn(NUMEL, requires_grad=True)
    grad = torch.randn(NUMEL)
    return lambda: torch.autograd.grad(fn(x), x, grad)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fastreg_dropout_fwd_bwd(benchmark, backend):
    if not fastreg.backend_supports(backend, "cpu"):
        pytest.skip(f"backend {backend!r} cannot run CPU tensors here")
    with fastreg.use_backend(backend):
        (grad,) = benchmark(_step(lambda x: fastreg.functional.dropout(x, 0.5)))
    assert 0.4 < (grad == 0).float().mean() < 0.6


def test_torch_dropout_fwd_bwd(benchmark):
    (grad,) = benchmark(_step(lambda x: torch_F.dropout(x, 0.5)))
    assert 0.4 < (grad == 0).float().mean() < 0.6
