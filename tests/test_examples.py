"""The examples run: the regularization demo (quick mode) and convert + torch.compile."""

import importlib.util
import os

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    demo = _load("regularization_demo")
    out = tmp_path_factory.mktemp("demo")
    return demo, demo.run(epochs=4, device="cpu", out=str(out), progress=None), out


def test_demo_prints_table_and_writes_plot(demo_results, capsys):
    demo, results, out = demo_results
    assert [r.config.name for r in results] == [c.name for c in demo.CONFIGS]
    assert (out / "regularization_demo.png").stat().st_size > 0
    text = demo.table(results)
    assert text.count("\n") == len(results) + 1 and "| L1 (proximal) |" in text
    for r in results:
        assert 0.0 <= r.val_acc <= 1.0 and r.val_loss == r.val_loss and r.epochs >= 1


def test_demo_regularizers_act_as_they_must(demo_results):
    _, results, _ = demo_results
    by_name = {r.config.name: r for r in results}
    # the proximal L1 step makes exact zeros; nothing else does
    assert by_name["L1 (proximal)"].sparsity > 0 and by_name["elastic net"].sparsity > 0
    assert by_name["none"].sparsity == 0 and by_name["dropout (p=0.3)"].sparsity == 0
    # max-norm keeps every weight row inside the ball; without it rows grow past it
    assert by_name["max-norm (r=0.5)"].max_row_norm <= 0.5 + 1e-6
    assert by_name["none"].max_row_norm > 0.5


def test_convert_example_trains_under_compile():
    example = _load("convert_example")
    torch.manual_seed(0)
    results = example.main(["--steps", "8", "--compile-backend", "aot_eager"])
    for losses in results.values():
        assert losses[-1] < losses[0]
