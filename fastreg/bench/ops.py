"""What the benchmark measures, op by op: sizes, modes, the minimum-bytes model, providers.

Adding an op is adding one `BenchOp` to `OPS`. Its byte model gives, per mode, the bytes
per element a kernel must move at the least (E = element size), the figure behind the
GB/s column; see the table in the engineering guide.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as torch_F

import fastreg

Fn = Callable[[], object]


@dataclass(frozen=True)
class BenchOp:
    name: str
    bytes_per_element: dict[str, float]  # mode -> minimum bytes per element, in units of E
    sizes: dict[str, tuple[list[int], list[int]]]  # device -> (full, quick) element counts
    fastreg_fn: Callable[[torch.Tensor], torch.Tensor]  # the op as fastreg runs it
    torch_fn: Callable[[torch.Tensor], torch.Tensor]  # the same op in eager PyTorch

    def min_bytes(self, mode: str, numel: int, dtype: torch.dtype) -> float:
        return self.bytes_per_element[mode] * numel * dtype.itemsize


def make_callable(fn, mode: str, numel: int, dtype: torch.dtype, device: str) -> Fn:
    """A no-argument callable running `mode` of the elementwise op `fn` on fresh inputs.

    fwd:      y = fn(x)
    bwd:      the gradient of a precomputed y (autograd.grad, nothing accumulated)
    fwd+bwd:  both, as a training step runs them
    """
    x = torch.randn(numel, dtype=dtype, device=device, requires_grad=mode != "fwd")
    grad = torch.randn(numel, dtype=dtype, device=device)
    if mode == "fwd":
        return lambda: fn(x)
    if mode == "bwd":
        y = fn(x)
        return lambda: torch.autograd.grad(y, x, grad, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(x), x, grad)
    raise ValueError(f"unknown mode {mode!r}")


DROPOUT_P = 0.5

OPS = {
    op.name: op
    for op in [
        BenchOp(
            name="dropout",
            # the mask is regenerated, never stored: read x, write y; read dy, write dx
            bytes_per_element={"fwd": 2, "bwd": 2, "fwd+bwd": 4},
            sizes={"cuda": ([2**24, 2**26], [2**24]), "cpu": ([2**22], [2**20])},
            fastreg_fn=lambda x: fastreg.functional.dropout(x, DROPOUT_P, training=True),
            torch_fn=lambda x: torch_F.dropout(x, DROPOUT_P, training=True),
        ),
    ]
}
