"""The benchmark CLI runs end to end and writes its table, JSON and plot."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from fastreg.bench.__main__ import main
from fastreg.bench.ops import LAYER_MODES, LOSS_MODES, OPS, STEP_MODES
from tests.conftest import skip_unless_runs


@pytest.mark.parametrize("op, shape, text", [("dropout", [4096], "4,096"),
                                             ("dropout_add_layer_norm", [64, 96], "64x96")])
def test_bench_cli_writes_table_json_and_plot(tmp_path, capsys, op, shape, text):
    assert main([op, "--device", "cpu", "--quick", "--shapes", "x".join(map(str, shape)), "--min-time", "0.01",
                 "--out", str(tmp_path), "--default-malloc"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{op}-quick.json", f"{op}-quick.md", f"{op}-quick.png"]
    report = json.loads((tmp_path / f"{op}-quick.json").read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu" and "git_commit" in env
    providers = {r["provider"] for r in report["results"]}
    assert {"torch", "torch.compile"} <= providers
    assert {r["mode"] for r in report["results"]} == {"fwd", "bwd", "fwd+bwd"}
    numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
    for row in report["results"]:
        assert row["shape"] == shape
        if row["provider"] != "torch.compile":  # may be unavailable on a machine; reported, not fatal
            assert row["error"] is None and row["timing"]["median_ms"] > 0 and row["gbps"] > 0
            assert row["min_bytes"] == OPS[op].bytes_per_element[row["mode"]] * numel * 4
    assert report["copy_gbps"][0]["gbps"] > 0
    assert f"| {op} | fwd | {text} | float32 |" in capsys.readouterr().out


def test_every_op_has_shapes_for_both_devices_and_a_complete_byte_model():
    for op in OPS.values():
        assert set(op.shapes) == {"cuda", "cpu"} and all(full and quick for full, quick in op.shapes.values())
        assert op.modes in (LAYER_MODES, LOSS_MODES, STEP_MODES) and set(op.bytes_per_element) == set(op.modes)
        assert all(bytes_per_element > 0 for bytes_per_element in op.bytes_per_element.values())
        if op.modes == LAYER_MODES:
            # a training forward may write more than an inference one (what backward reads)
            assert op.bytes_per_element["fwd+bwd"] >= op.bytes_per_element["fwd"] + op.bytes_per_element["bwd"]
        if op.modes == LOSS_MODES:  # equal where backward moves nothing (gaussian_noise passes the gradient on)
            assert op.bytes_per_element["fwd+bwd"] >= op.bytes_per_element["fwd"]
    # cross-entropy: 2E per logit and the int64 targets; the linear form reads input and weight,
    # writes their gradients, never the logits
    assert OPS["cross_entropy"].min_bytes("fwd+bwd", 64 * 10, torch.float32, (64, 10)) == 2 * 640 * 4 + 64 * 8
    assert OPS["linear_cross_entropy"].min_bytes("fwd+bwd", 0, torch.bfloat16, (64, 8, 100)) == \
        2 * (64 + 100) * 8 * 2 + 64 * 8
    # the optimizer steps: 28 B/param for AdamW and 20 for SGD + momentum in float32
    assert OPS["adamw"].min_bytes("step", 1, torch.float32) == 28
    assert OPS["sgd_momentum"].min_bytes("step", 1, torch.float32) == 20


def test_bench_cli_times_optimizer_steps(tmp_path, capsys):
    assert main(["optim", "--device", "cpu", "--quick", "--shapes", "3x1000", "--min-time", "0.01",
                 "--out", str(tmp_path), "--default-malloc"]) == 0
    report = json.loads((tmp_path / "optim-quick.json").read_text())
    rows = report["results"]
    assert {r["op"] for r in rows} == {"adamw", "sgd_momentum"} and {r["mode"] for r in rows} == {"step"}
    assert {"torch", "torch-foreach", "torch-fused"} <= {r["provider"] for r in rows}
    for row in rows:
        assert row["error"] is None and row["gbps"] > 0 and row["numel"] == 3000
    assert "| adamw | step | 3x1000 | float32 |" in capsys.readouterr().out


def test_cpu_bench_interleaves_rounds_and_keeps_the_heap(tmp_path):
    """In a process of its own (keeping glibc's heap lasts for the process): every provider
    is timed in each of the 3 rounds, and the results say how malloc was set."""
    subprocess.run([sys.executable, "-m", "fastreg.bench", "dropout", "--device", "cpu", "--quick", "--shapes", "4096",
                    "--modes", "fwd", "--min-time", "0.03", "--rounds", "3", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    report = json.loads((tmp_path / "dropout-quick.json").read_text())
    glibc = platform.libc_ver()[0] == "glibc"
    assert report["environment"]["malloc"] == ("glibc heap kept (M_MMAP_MAX=0, no trimming)" if glibc else "default")
    for row in report["results"]:
        assert row["error"] is None and len(row["timing"]["raw_ms"]) >= 3
    assert ("malloc: glibc heap kept" in (tmp_path / "dropout-quick.md").read_text()) == glibc


def test_host_mode_times_every_case_and_counts_launches(tmp_path, capsys):
    """--host: one row per case with both libraries timed, launches counted on triton."""
    from fastreg.bench import host

    assert main(["--host", "--device", "cpu", "--min-time", "0.02", "--rounds", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "host.json").read_text())
    assert [row["case"] for row in report["rows"]] == [case.name for case in host.CASES]
    for row in report["rows"]:
        assert row["fastreg_us"] > 0 and row["torch_us"] > 0
        assert row["launches_fwd"] >= 1
    assert "| call | fastreg (us) | torch (us) |" in capsys.readouterr().out


def test_launch_counter_sees_triton_launches_and_torch_kernels_not_views():
    """A dropout forward on triton is the seed draw and one kernel; its backward one kernel."""
    import fastreg
    from fastreg.bench import host

    case = next(c for c in host.CASES if c.name.startswith("dropout fwd+bwd"))
    skip_unless_runs("triton", "cpu")
    with fastreg.use_backend("triton"):
        fwd, bwd, fwd_counter, bwd_counter = host.launches(case, "cpu")
    assert fwd_counter.triton_launches == ["_dropout_kernel"] and fwd_counter.torch_ops == ["aten.randint.low"]
    assert (fwd, bwd) == (2, 1) and bwd_counter.triton_launches == ["_dropout_kernel"]
    counter = host.LaunchCounter()
    x = torch.randn(4, 4)
    with counter:
        x.view(16)
        torch.empty(3)
        x.add(1)
    assert counter.torch_ops == ["aten.add.Tensor"]


def test_bench_cli_times_losses_and_measures_memory(tmp_path, capsys):
    """Losses run fwd and fwd+bwd (with an incoming gradient of 1); the linear form's table has
    peak memory with fastreg's checked against its bound."""
    assert main(["linear_cross_entropy", "cross_entropy_smooth", "--device", "cpu", "--quick", "--min-time", "0.01",
                 "--rounds", "1", "--out", str(tmp_path), "--default-malloc"]) == 0
    report = json.loads((tmp_path / "linear_cross_entropy-cross_entropy_smooth-quick.json").read_text())
    rows = report["results"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    linear = [r for r in rows if r["op"] == "linear_cross_entropy"]
    assert {"fastreg-cpu", "torch", "torch.compile"} <= {r["provider"] for r in linear}
    for row in linear:
        if row["error"] is None:
            assert row["peak_mib"] is not None and row["extra_mib"] <= row["peak_mib"]
    out = capsys.readouterr().out
    assert "| linear_cross_entropy | fwd+bwd | 1024x256x8192 | float32 | fastreg-cpu |" in out
    assert "within 8 |" in out  # 1/4 of the 1024 x 8192 float32 logits, MiB
