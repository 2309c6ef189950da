"""Shared test set-up: the Triton interpreter without a GPU, and backend parametrization.

Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be
switched on before triton is first imported (importing torch does not import it).
"""

import os

# pytest-xdist runs a worker per core, and each worker's torch keeps a thread per core: idle
# OpenMP threads that spin-wait take cores from the other workers (a gradcheck of many
# small ops runs 3-4x slower). Passive threads sleep instead; the kernels still run threaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import fastreg  # noqa: E402

# Generated cases (tests/test_properties.py, tests/test_nonfinite.py): "ci", the default,
# is derandomized (the same examples on every run, so a failure reproduces) and small;
# `pytest --hypothesis-profile=long` draws many more, from a fresh seed each run.
_HYPOTHESIS_COMMON = dict(deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_HYPOTHESIS_COMMON)
settings.register_profile("long", max_examples=1000, **_HYPOTHESIS_COMMON)
settings.load_profile("ci")  # --hypothesis-profile, read after this file, overrides it

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")

# Each backend runs on the device it is built for; without a GPU, triton runs CPU
# tensors in the interpreter (slow: keep interpreted shapes small).
BACKEND_DEVICE = {
    "triton": "cuda" if GPU else "cpu",
    "cuda": "cuda",
    "cpu": "cpu",
    "torch": "cuda" if GPU else "cpu",
}
KERNEL_BACKENDS = ("triton", "cuda", "cpu")


def interpreted(backend: str) -> bool:
    """Whether `backend` runs in the Triton interpreter here: a few tenths of a second per
    launch, so its tests take small shapes, and its gradchecks take gradcheck's fast mode
    (the analytical and numerical Jacobians compared along one random direction instead of
    column by column)."""
    return backend == "triton" and not GPU


def skip_unless_runs(backend: str, device: str | None = None) -> str:
    """The device for `backend` (its own, or `device`), or skip the test saying why the
    backend cannot run tensors there."""
    device = device or BACKEND_DEVICE[backend]
    reason = fastreg._backend._why_not(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    return device


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its inputs from the same seed: a failure reproduces alone."""
    torch.manual_seed(0)


@pytest.fixture(params=fastreg._backend.BACKENDS)
def backend(request):
    """(backend name, device) with that backend forced for the test's duration."""
    device = skip_unless_runs(request.param)
    with fastreg.use_backend(request.param):
        yield request.param, device


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Like `backend`, for the compiled/Triton kernels only (not the torch reference)."""
    device = skip_unless_runs(request.param)
    with fastreg.use_backend(request.param):
        yield request.param, device


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large: tensors past 2**31 elements (minutes, GiBs); run only when -m names 'large'")


def pytest_collection_modifyitems(config, items):
    """Tests marked `large` run only when the -m expression names the marker
    (`pytest -m large`, `-m "large or not large"`); otherwise they skip saying so."""
    if "large" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="past 2**31 elements: run with -m large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)
