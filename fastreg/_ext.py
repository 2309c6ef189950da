"""Loading the compiled extension fastreg._C, which `import fastreg` never requires.

A missing or broken build must not break `import fastreg`: the Triton and torch
backends still run, and asking for a C++ backend says what is missing and how to
build it.
"""

import importlib

import torch

BUILD_HINT = (
    "build it from the repository root with `make build` "
    "(or `pip install -e . --no-build-isolation`; a CUDA toolkit and a CUDA build of "
    "torch at build time add the CUDA kernels)"
)

_load_error = None
try:
    importlib.import_module("fastreg._C")
except (ImportError, OSError) as error:  # not built, or built against another torch
    _load_error = f"{type(error).__name__}: {error}"


def loaded() -> bool:
    return _load_error is None


def load_error() -> str | None:
    return _load_error


def defines(op: str) -> bool:
    """Whether the loaded extension defines `fastreg::<op>` (a stale build may not)."""
    if not loaded():
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(f"fastreg::{op}", "")
    except RuntimeError:
        return False
    return True


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `fastreg::<op>` for a dispatch key ("CPU", "CUDA")."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastreg::{op}", dispatch_key)


def function(name: str):
    """The function `name` of the loaded fastreg._C module, or None (not built, or a stale build)."""
    if not loaded():
        return None
    return getattr(importlib.import_module("fastreg._C"), name, None)
