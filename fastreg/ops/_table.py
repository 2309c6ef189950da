"""What every op family's module uses: the backend table of an op, and the registration of
an op's Triton implementation.

Each op `<op>` of csrc/ops.cpp has a twin `<op>_triton` with the same schema (defined there
too): `<op>` runs the C++ kernels (CPU and CUDA, routed by the dispatcher), `<op>_triton`
the Triton launcher registered below for CUDA tensors and, through the Triton interpreter,
CPU tensors. Both exist only when fastreg._C is loaded.
"""

import importlib.util

import torch

from fastreg import _ext

HAVE_TRITON = importlib.util.find_spec("triton") is not None

_LIB = torch.library.Library("fastreg", "IMPL") if _ext.loaded() else None


def _missing(name: str, backend: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"fastreg op {name!r} has no {backend!r} implementation here")

    return fail


def _op(name: str, backend: str):
    if not _ext.defines(name):
        return _missing(name, backend)
    return getattr(torch.ops.fastreg, name).default


def op_table(cpp_name: str, triton_name: str, reference) -> dict:
    """{backend: callable} of one op: the C++ op serves "cpu" and "cuda", the Triton twin
    "triton", the pure-torch function `reference` "torch"."""
    cpp = _op(cpp_name, "cpu/cuda")
    return {"cpu": cpp, "cuda": cpp, "triton": _op(triton_name, "triton"), "torch": reference}


def register_triton(name: str, launcher, fake) -> None:
    """`launcher` as the CUDA and CPU (interpreter) kernel of the Triton twin `name`, and
    `fake` as the fake kernel of `name` and of its C++ op (the same outputs)."""
    if not _ext.defines(name):
        return
    torch.library.register_fake(f"fastreg::{name}", fake)
    if HAVE_TRITON:
        _LIB.impl(name, launcher, "CUDA")
        _LIB.impl(name, launcher, "CPU")


def register_fake(name: str, fake) -> None:
    if _ext.defines(name):
        torch.library.register_fake(f"fastreg::{name}", fake)
