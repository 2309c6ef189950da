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
    with pytest.raises(RuntimeError, match="fastreg._C is not importable.*make build"):
        with _backend.use_backend("cpu"):
            _backend.choose_backend("cpu")
