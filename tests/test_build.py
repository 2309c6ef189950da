"""The build the test command asked for is the one that loaded.

`make test` sets FASTREG_EXPECT_BUILD to "cuda" where nvcc exists (the CUDA kernels must
compile even without a GPU) or "cpu": without this check, a broken build would only
turn the C++ backends' tests into skips.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastreg
from fastreg import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = os.environ.get("FASTREG_EXPECT_BUILD")


@pytest.mark.skipif(EXPECTED is None, reason="FASTREG_EXPECT_BUILD unset: not run by `make test`")
def test_extension_built_as_expected():
    assert _ext.loaded(), _ext.load_error()
    assert _ext.has_kernel("dropout", "CPU")
    assert _ext.has_kernel("dropout", "CUDA") == (EXPECTED == "cuda")


def test_import_reports_a_missing_extension_clearly(monkeypatch):
    from fastreg import _backend

    monkeypatch.setattr(_ext, "_load_error", "ImportError: no module named fastreg._C")
    monkeypatch.setattr(_backend, "_choices", {})  # choices are cached per process: forget them
    with pytest.raises(RuntimeError, match="fastreg._C is not importable.*make build"):
        with _backend.use_backend("cpu"):
            _backend.choose_backend("cpu")


def test_import_works_without_the_extension():
    """A missing fastreg._C leaves the triton and torch backends working and says how to build."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        class BlockExtension:  # as if the extension had never been built
            def find_spec(self, name, path=None, target=None):
                if name == "fastreg._C":
                    raise ImportError("No module named 'fastreg._C'")
        sys.meta_path.insert(0, BlockExtension())
        import torch, fastreg
        assert "cpu" not in fastreg.available_backends() and "cuda" not in fastreg.available_backends()
        x = torch.ones(1000)
        assert 0.3 < (fastreg.functional.dropout(x, 0.5) == 0).float().mean() < 0.7  # auto -> torch
        try:
            with fastreg.use_backend("cpu"):
                fastreg.functional.dropout(x, 0.5)
        except RuntimeError as error:
            assert "fastreg._C is not importable" in str(error) and "make build" in str(error)
        else:
            raise AssertionError("forcing the cpu backend without the extension did not raise")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_extension_without_cuda_kernels_says_so(monkeypatch):
    import torch

    from fastreg import _backend

    monkeypatch.setattr(_ext, "_load_error", None)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: key == "CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "built without CUDA kernels" in _backend._why_not("cuda", "cuda")
    assert _backend._why_not("cpu", "cpu") is None


@pytest.fixture
def setup_module(monkeypatch):
    """setup.py as a module (setup() runs only as __main__), with torch's GPU queries and
    the architecture variables in the test's hands."""
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    for variable in ("FASTREG_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(variable, raising=False)
    spec = importlib.util.spec_from_file_location("fastreg_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_archs_are_the_visible_gpus_unless_chosen(setup_module, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_module.cuda_archs() == "8.0;9.0"  # no GPU: both datacenter generations
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 6), (9, 0)][i])
    assert setup_module.cuda_archs() == "8.6;9.0"  # each architecture present, once
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert setup_module.cuda_archs() == "7.5"
    monkeypatch.setenv("FASTREG_CUDA_ARCHS", "9.0a")
    assert setup_module.cuda_archs() == "9.0a"


@pytest.mark.skipif(not _ext.loaded(), reason="needs the built extension (copied into the install)")
def test_a_regular_install_holds_every_package(tmp_path):
    """`setup.py build_py` lays the Python files out as a wheel does: fastreg.triton_kernels
    (the link fastreg/triton_kernels) as real files, every subpackage; with the extension
    beside them, fastreg imports from there alone."""
    build_lib = tmp_path / "lib"
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build_lib)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kernels = build_lib / "fastreg" / "triton_kernels"
    assert not kernels.is_symlink() and (kernels / "dropout.py").is_file()
    for package in {os.path.relpath(os.path.dirname(p), ROOT) for p in _python_files(os.path.join(ROOT, "fastreg"))}:
        assert (build_lib / package / "__init__.py").is_file(), package
    shutil.copy(fastreg._C.__file__, build_lib / "fastreg")
    probe = ("import fastreg, fastreg._C, fastreg.triton_kernels.dropout as kernels; "
             "print(fastreg.__file__); print(kernels.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(build_lib)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(line.startswith(str(build_lib)) for line in result.stdout.split()), result.stdout


def _python_files(folder):
    for path, _, files in os.walk(folder, followlinks=True):
        yield from (os.path.join(path, f) for f in files if f.endswith(".py"))
