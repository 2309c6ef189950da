"""pytest-benchmark timings of the norms (LayerNorm, the fused dropout + add + LayerNorm,
BatchNorm in training and eval, GroupNorm alone and + SiLU), forward and backward, on CPU: `pytest bench/`. `make test`
runs each once (--benchmark-disable)."""

import pytest
import torch

import fastreg
from fastreg.bench.ops import OPS, make_callable

SHAPE = (512, 64, 4, 4)  # rows x hidden for the row norms, (N, C, H, W) for BatchNorm and GroupNorm


@pytest.mark.parametrize("op", ["layer_norm", "dropout_add_layer_norm", "batch_norm", "batch_norm_eval",
                                "group_norm", "group_norm_silu_channels_last"])
@pytest.mark.parametrize("provider", ["cpu", "torch-eager"])
def test_fwd_bwd(benchmark, op, provider):
    bench_op = OPS[op]
    if provider == "torch-eager":
        fn = bench_op.torch_fn
    elif not fastreg.backend_supports(provider, "cpu"):
        pytest.skip(f"backend {provider!r} cannot run CPU tensors here")
    else:
        def fn(*inputs):
            with fastreg.use_backend(provider):
                return bench_op.fastreg_fn(*inputs)

    grads = benchmark(make_callable(bench_op, fn, "fwd+bwd", SHAPE, torch.float32, "cpu"))
    assert grads[0].shape == SHAPE and all(torch.isfinite(g).all() for g in grads)
