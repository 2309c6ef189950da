"""The one place that decides which backend runs an op.

    "triton"  Triton kernels (CUDA tensors; CPU tensors through the interpreter when
              TRITON_INTERPRET=1 was set before triton was imported)
    "cuda"    the C++/CUDA kernels of fastreg._C (CUDA tensors)
    "cpu"     the C++ CPU kernels of fastreg._C (CPU tensors)
    "torch"   the pure-PyTorch reference (any device)

"auto" (the default) picks, for CUDA tensors, triton then cuda; for CPU tensors, cpu
then torch. A forced backend that cannot run the tensors at hand raises RuntimeError
saying why.
"""

import contextlib
import functools
import importlib.metadata
import importlib.util
import os

import torch

from fastreg import _ext

BACKENDS = ("triton", "cuda", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_forced = "auto"


def set_backend(name: str) -> None:
    """Force a backend for every fastreg op ("auto" restores the default choice)."""
    global _forced
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown fastreg backend {name!r}; expected 'auto' or one of {BACKENDS}")
    _forced = name


def get_backend() -> str:
    return _forced


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run fastreg ops on backend `name` inside the block."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _interpreter_numpy_clash() -> str | None:
    """Triton's interpreter before 3.7 holds a kernel's scalars as 1-element numpy arrays, and
    numpy 2.4 no longer converts those to Python numbers: every kernel with a loop over a
    runtime bound then fails ("only 0-dimensional arrays can be converted to Python scalars")."""
    try:
        triton_version = importlib.metadata.version("triton")
        numpy_version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter does not run with numpy {numpy_version}: "
                "install numpy<2.4 (or triton>=3.7)")
    return None


def _why_not(name: str, device_type: str) -> str | None:
    """None if backend `name` can run tensors on `device_type` here, else the reason."""
    if device_type not in ("cpu", "cuda"):
        return f"fastreg supports CPU and CUDA tensors, not {device_type}" if name != "torch" else None
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device_type == "cpu" and not _triton_interpreted():
            return "Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before importing triton"
        if _triton_interpreted() and (clash := _interpreter_numpy_clash()) is not None:
            return clash
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
    if not _ext.loaded():
        return f"the compiled extension fastreg._C is not importable ({_ext.load_error()}); {_ext.BUILD_HINT}"
    if name == "triton":  # its ops' schemas and autograd are in the extension
        return None if _ext.defines("dropout_triton") else f"fastreg._C predates the Triton ops; {_ext.BUILD_HINT}"
    if name == "cpu":
        return None if device_type == "cpu" else "the 'cpu' backend runs CPU tensors; use 'cuda' or 'triton' for CUDA tensors"
    # name == "cuda"
    if device_type != "cuda":
        return "the 'cuda' backend runs CUDA tensors; use 'cpu' for CPU tensors"
    if not _ext.has_kernel("dropout", "CUDA"):
        return (
            "fastreg._C was built without CUDA kernels (no CUDA toolkit or a CPU-only torch at "
            f"build time, or FASTREG_BUILD_CUDA=0); {_ext.BUILD_HINT}"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def backend_supports(name: str, device_type: str) -> bool:
    """Whether backend `name` can run tensors of `device_type` ("cpu" or "cuda") here."""
    return _why_not(name, device_type) is None


def available_backends() -> list[str]:
    """The backends that can run some tensor on this machine."""
    return [name for name in BACKENDS if any(backend_supports(name, d) for d in ("cuda", "cpu"))]


# (forced backend, device type) -> (the backend's name, None) or (None, why it cannot run). What
# decides it (installed packages, the extension, TRITON_INTERPRET read before triton's
# import, CUDA's presence) does not change while the process runs.
_choices: dict[tuple[str, str], tuple[str | None, str | None]] = {}


def _choose(forced: str, device_type: str) -> tuple[str | None, str | None]:
    if forced != "auto":
        reason = _why_not(forced, device_type)
        if reason is not None:
            return None, f"fastreg backend {forced!r} cannot run {device_type} tensors: {reason}"
        return forced, None
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        if _why_not(name, device_type) is None:
            return name, None
    raise AssertionError("unreachable: the torch backend runs everywhere")


@torch.compiler.assume_constant_result
def choose_backend(device_type: str) -> str:
    """The backend for tensors on `device_type`: the forced one, or the auto order."""
    key = (_forced, device_type)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _choose(*key)
    name, reason = choice
    if name is None:
        raise RuntimeError(reason)
    return name
