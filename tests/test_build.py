"""The build the test command asked for is the one that loaded.

`make test` sets FASTREG_EXPECT_BUILD to "cuda" where nvcc exists (the CUDA kernels must
compile even without a GPU) or "cpu": without this check, a broken build would only
turn the C++ backends' tests into skips.
"""

import os

import pytest

from fastreg import _ext

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
