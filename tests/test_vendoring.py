"""Each file of triton_kernels/ can be copied into another codebase on its own: it imports
torch, triton and the standard library only (no fastreg module, no sibling kernel file)."""

import ast
import pathlib
import sys

import pytest

FOLDER = pathlib.Path(__file__).resolve().parent.parent / "triton_kernels"
FILES = sorted(path for path in FOLDER.glob("*.py") if path.name != "__init__.py")


def _imported_roots(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield (node.module or "").split(".")[0] if node.level == 0 else "<relative>"


def test_there_are_kernel_files():
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_kernel_file_imports_only_torch_triton_and_the_standard_library(path):
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    roots = set(_imported_roots(ast.parse(path.read_text())))
    assert roots <= allowed, f"{path.name} imports {sorted(roots - allowed)}"


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_kernel_file_loads_as_a_module_of_its_own(path, tmp_path):
    """A copy of the file, outside the package and under another name, loads: it needs no
    sibling module and no package context."""
    import importlib.util

    pytest.importorskip("triton")
    copy = tmp_path / f"vendored_{path.name}"
    copy.write_text(path.read_text())
    spec = importlib.util.spec_from_file_location(f"vendored_{path.stem}", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert any(name.endswith("_kernel") for name in vars(module))
