"""`make gpu-check` in its CPU mode (bench/gpu_check.py --device cpu): every phase that can
run here end to end, with tiny phases, and the deadline logic, so that CI pays about a
minute. The build phase is left out: it would replace the extension this test session has
loaded (the same command builds the torch 2.11 leg of .ci/run)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.fixture(scope="module")
def cpu_mode_run(tmp_path_factory):
    """Every phase but the build, each cut to a few seconds of work."""
    out = tmp_path_factory.mktemp("gpu-check") / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "FASTREG_EXPECT_BUILD")}
    result = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--out", str(out), "--deadline", "300",
         "--phases", "env,tests,gpu-only,host,bench",
         "--tests-args", "tests/test_build.py -k 'missing_extension_clearly or without_cuda_kernels'",
         "--bench-ops", "dropout", "--bench-args", "--modes fwd bwd --shapes 65536 --min-time 0.02 --rounds 1",
         "--host-args", "--min-time 0.02 --rounds 1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    with open(out / "gpu-check" / "status.json") as f:
        return out, result, json.load(f)


def test_cpu_mode_runs_every_phase_and_writes_as_it_goes(cpu_mode_run):
    out, result, status = cpu_mode_run
    phases = status["phases"]
    assert list(phases) == ["env", "tests", "gpu-only", "host", "bench"]
    assert phases["env"]["status"] == "ok" and status["environment"]["torch"]
    assert phases["tests"]["status"] == "ok" and phases["tests"]["data"]["counts"]["passed"] == 2, phases["tests"]
    # on a CPU every GPU-only check skips, saying why; none fails
    gpu_only = phases["gpu-only"]
    assert gpu_only["status"] == "ok" and gpu_only["data"]["counts"]["skipped"] > 0, gpu_only
    assert gpu_only["data"]["counts"]["failed"] == 0
    assert phases["host"]["status"] in ("ok", "skipped"), phases["host"]
    assert phases["bench"]["status"] == "ok", phases["bench"]
    assert (out / "dropout-quick.json").exists() and (out / "dropout-quick.md").exists()
    assert result.returncode == 0, result.stdout[-3000:]
    for name in ("summary.md", "console.log", "logs/env.log", "logs/tests.log", "logs/bench.log", "tests.jsonl"):
        assert (out / "gpu-check" / name).exists(), name


def test_summary_evaluates_the_targets_on_this_runs_bench(cpu_mode_run):
    out, result, status = cpu_mode_run
    by_text = {t["target"]: t for t in status["targets"]}
    dropout_fwd = by_text["dropout fwd >= 90% of copy"]
    assert dropout_fwd["met"] is not None  # measured: the fastreg-cpu rows of this run
    assert "bfloat16" in dropout_fwd["values"] and "float32" in dropout_fwd["values"]
    adamw = by_text["AdamW step >= 90% of copy (28 B/param)"]
    assert adamw["met"] is None and adamw["values"] == "not measured"
    summary = (out / "gpu-check" / "summary.md").read_text()
    assert "| bench | ok |" in summary and "| dropout fwd >= 90% of copy | fwd |" in summary
    assert result.stdout.rstrip().splitlines()[-1].startswith("results: ")  # the summary is printed last


def _check(tmp_path, *argv):
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path / "results"), *argv])
    return gpu_check.Check(args)


def _phase(name, status="ok", min_s=1, needs=(), calls=None):
    def run(check, timeout):
        if calls is not None:
            calls.append((name, timeout))
        return gpu_check.Outcome(status, f"{name} ran")

    return gpu_check.Phase(name, run, {"cpu": 30, "cuda": 30}, min_s, needs)


def test_a_phase_runs_only_with_its_minimum_time_left_and_its_needs_met(tmp_path):
    check = _check(tmp_path, "--deadline", "100")
    check.args.selected, check.args.budgets = ["a", "b", "c", "d"], {"c": 7}
    calls = []
    phases = [_phase("a", "failed", calls=calls), _phase("b", needs=("a",), calls=calls),
              _phase("c", calls=calls), _phase("d", min_s=500, calls=calls)]
    gpu_check.run_phases(check, phases)
    outcomes = check.outcomes
    assert [name for name, _ in calls] == ["a", "c"]
    assert calls[0][1] == 30 and calls[1][1] == 7  # the table's budget, then --budget's
    assert outcomes["b"].status == "skipped" and outcomes["b"].detail == "needs a"
    assert outcomes["d"].status == "skipped" and "needs 500 s" in outcomes["d"].detail
    status = json.loads((tmp_path / "results" / "gpu-check" / "status.json").read_text())
    assert list(status["phases"]) == ["a", "b", "c", "d"]  # written after each phase


def test_a_command_past_its_time_is_stopped_and_logged(tmp_path):
    check = _check(tmp_path)
    began = time.monotonic()
    code, seconds = check.run("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert code is None and time.monotonic() - began < 30
    assert "stopped after 1 s" in open(check.log_path("sleeper")).read()


def test_tests_past_the_phase_deadline_are_not_started(tmp_path):
    """The plugin (-p gpu_check) skips every test once the phase's time is up, and the
    report counts them as not reached."""
    check = _check(tmp_path)
    outcome = gpu_check._pytest(check, "tests", gpu_check.PYTEST_GRACE_S,
                                ["tests/test_build.py", "-k", "without_cuda_kernels"], parallel=False)
    assert outcome.status == "timed out", outcome
    assert outcome.data["counts"]["not reached"] == 1 and outcome.data["counts"]["passed"] == 0
