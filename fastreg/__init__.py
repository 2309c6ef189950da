"""fastreg: fused kernels for the regularization and normalization layers of training.

    import fastreg
    model.drop = fastreg.nn.Dropout(0.1)     # drop-in for torch.nn.Dropout
    fastreg.available_backends()             # e.g. ['triton', 'cuda', 'cpu', 'torch']
"""

from fastreg import ops  # noqa: F401  (registers the operators)
from fastreg import functional, nn, optim
from fastreg._backend import available_backends, backend_supports, get_backend, set_backend, use_backend
from fastreg._convert import convert

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backend_supports",
    "convert",
    "functional",
    "get_backend",
    "nn",
    "optim",
    "set_backend",
    "use_backend",
]
