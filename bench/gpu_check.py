#!/usr/bin/env python3
"""`make gpu-check`: what a lent GPU machine should tell about fastreg, in one command that
ends by a deadline of its own.

    python bench/gpu_check.py [--device cuda|cpu] [--deadline SECONDS] [--phases env,build,...]
                              [--budget PHASE=SECONDS ...] [--out DIR] [--tests-args "..."]
                              [--bench-ops OP ...] [--bench-args "..."] [--compile-ops OP ...]

Phases, in order (`PHASES`; adding one is one row there):
    env       GPU, driver, torch, triton, CUDA, Python, cores, commit
    build     `pip install --no-build-isolation --no-deps --no-index -e .` against the torch
              of this Python, for the present GPU's architecture only, on every core
    tests     the suite's GPU cases (-k "triton or cuda": every op on the triton and cuda
              backends against the torch reference), in parallel with pytest-xdist if present
    gpu-only  tests/test_gpu_only.py: inputs past 2**31 elements, CUDA graphs, a second
              device, torch.compile(fullgraph=True) of a block on the triton backend
    host      host time per call against torch's (`python -m fastreg.bench --host`), if the
              bench has that mode
    bench     `python -m fastreg.bench OP --quick` for every op the bench knows, bfloat16 and
              float32, one process per op (torch.compile timed for the ops of `--compile-ops`)
then the summary: which GPU targets of the README are met (`TARGETS`).

The deadline (default 510 s, so that the whole command ends within 9 minutes) holds each
phase: a phase starts only with its minimum time left, runs in a subprocess whose timeout
is its budget or the time left, whichever is shorter, and pytest stops starting tests at the
phase's end. Logs stream to the results folder as they are written; status.json and
summary.md are rewritten after every phase, so a run cut short keeps what it finished.

Results: bench/results/<gpu>/ (the bench's tables) and bench/results/<gpu>/gpu-check/ (this
script's summary, status and logs); in the CPU mode build/gpu-check/<cpu>/, so that a
rehearsal never overwrites committed results. With $OUT set (a lent machine's output
folder), summary.md, the console log and a tarball of everything are copied there too.

The CPU mode (`--device cpu`, `make gpu-check DEVICE=cpu`) runs the same phases on the
cpu, torch and interpreted-Triton backends, so every step but the GPU's own is shown to
work before a GPU is lent; tests/test_gpu_check.py runs it with a short deadline in CI.

This file is also the pytest plugin (`-p gpu_check`) the tests phases load: it skips tests
once the phase's deadline has passed and writes each test's outcome as a JSON line.
"""

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEADLINE_S = 510
SUMMARY_RESERVE_S = 10  # kept back from every phase for the summary and the copies to $OUT
PYTEST_GRACE_S = 20  # after the phase's test deadline: time for running tests and the report

# The suite's cases for the tests phase, per device: on a GPU those of the GPU backends
# (the ahead-of-time sm_90 compiles left out: they are the same everywhere, and the GPU
# compiles every kernel it runs); on a CPU what runs there.
TESTS_K = {"cuda": "(triton or cuda or test_build) and not compiles_for_a_gpu",
           "cpu": "triton or cpu or torch or test_build"}
# The ops whose target compares with torch.compile: timed with it (see TARGETS).
COMPILE_OPS = ("group_norm_channels_last",)
# Ops timed first, in this order (the README's GPU targets); every other op the bench knows
# follows in its own order.
BENCH_FIRST = ("dropout", "layer_norm", "rms_norm", "dropout_add_layer_norm", "batch_norm_channels_last",
               "batch_norm", "batch_norm_eval", "group_norm_channels_last", "adamw")


# ---------------------------------------------------------------------------- the run's state


@dataclasses.dataclass
class Outcome:
    status: str  # ok | failed | timed out | skipped
    detail: str = ""
    seconds: float = 0.0
    data: dict = dataclasses.field(default_factory=dict)


class Check:
    """The run: arguments, folders, deadline, and each phase's outcome so far."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.start = time.monotonic()
        self.wall_start = time.time()  # bench files older than this are an earlier run's
        self.deadline = self.start + args.deadline
        self.python = sys.executable
        self.env_info: dict = {}
        self.outcomes: dict[str, Outcome] = {}
        # known once the env phase has the device's name; until then a scratch folder
        self.results_dir = args.out or os.path.join(ROOT, "build", "gpu-check", "starting")
        shutil.rmtree(os.path.join(self.check_dir, "logs"), ignore_errors=True)  # a rerun's logs start afresh
        self.console = []  # lines printed, copied to $OUT
        self._bench_help = None

    def left(self) -> float:
        """Seconds left for phases (the summary's reserve excluded)."""
        return self.deadline - time.monotonic() - SUMMARY_RESERVE_S

    @property
    def check_dir(self) -> str:
        return os.path.join(self.results_dir, "gpu-check")

    def log_path(self, name: str) -> str:
        os.makedirs(os.path.join(self.check_dir, "logs"), exist_ok=True)
        return os.path.join(self.check_dir, "logs", f"{name}.log")

    def say(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.start:5.0f}s]"
        line = f"{stamp} {text}"
        print(line, flush=True)
        self.console.append(line)

    def run(self, name: str, command: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, float]:
        """Runs `command` in the repository root, its output streamed to logs/<name>.log;
        returns (exit status or None if it was stopped at `timeout`, seconds)."""
        began = time.monotonic()
        with open(self.log_path(name), "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            # a pytest of our own (this script may itself run under pytest-xdist, whose worker
            # variables would make the inner run's report plugin take itself for a worker)
            inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**inherited, **(env or {})}, start_new_session=True)
            try:
                code = process.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGTERM)  # its own session: pytest workers, ninja, nvcc
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                log.write(f"\n[gpu-check: stopped after {timeout:.0f} s, the phase's time]\n")
                code = None
        return code, time.monotonic() - began


# ---------------------------------------------------------------------------- phases


def phase_env(check: Check, timeout: float) -> Outcome:
    code, _ = check.run("env", [check.python, __file__, "--print-env", "--device", check.device], timeout)
    with open(check.log_path("env")) as log:
        text = log.read()
    found = re.search(r"^GPU_CHECK_ENV (.*)$", text, re.MULTILINE)
    if code != 0 or not found:
        return Outcome("failed", f"exit {code}; see logs/env.log")
    check.env_info = json.loads(found.group(1))
    info = check.env_info
    return Outcome("ok", f"{info['device']} | torch {info['torch']} | triton {info['triton']} | "
                         f"CUDA {info['cuda']} | driver {info.get('driver')} | {info['commit']}", data=info)


def environment(device: str) -> dict:
    """What this machine is (run in a subprocess: the env phase)."""
    import platform

    import torch

    def command(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device_type": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": len(os.sched_getaffinity(0)),
        "commit": command("git", "rev-parse", "--short=10", "HEAD"),
        "dirty": bool(command("git", "status", "--porcelain", "--untracked-files=no")),
        "nvcc": (command("nvcc", "--version") or command("/usr/local/cuda/bin/nvcc", "--version") or "").splitlines()[-1:],
        "pytest_xdist": _importable("xdist"),
        "setuptools": _version_of("setuptools"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        smi = command("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader")
        info.update(device=props.name, gpus=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), nvidia_smi=smi,
                    driver=smi.split(",")[1].strip() if smi and "," in smi else None)
    else:
        names = re.findall(r"^model name\s*:\s*(.+)$", open("/proc/cpuinfo").read(), re.MULTILINE)
        info.update(device=names[0].strip() if names else platform.processor() or "cpu", gpus=0, driver=None)
    return info


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _version_of(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def phase_build(check: Check, timeout: float) -> Outcome:
    """The documented offline build into this Python's environment; setup.py targets the
    visible GPU's architecture and uses every core (FASTREG_CUDA_ARCHS / MAX_JOBS override)."""
    command = [check.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    code, seconds = check.run("build", command, timeout)
    if code is None:
        return Outcome("timed out", f"build stopped after {seconds:.0f} s (logs/build.log)")
    with open(check.log_path("build")) as log:
        archs = re.findall(r"fastreg: CUDA kernels for (\S+), (\d+) jobs", log.read())
    if code != 0:
        return Outcome("failed", f"pip exit {code} (logs/build.log)")
    probe = ("from fastreg import _ext; assert _ext.loaded(), _ext.load_error(); "
             "print('CUDA kernels' if _ext.has_kernel('dropout', 'CUDA') else 'CPU kernels only')")
    result = subprocess.run([check.python, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return Outcome("failed", "built, but fastreg._C does not load: " + result.stderr.strip().splitlines()[-1])
    kernels = result.stdout.strip()
    if check.device == "cuda" and kernels != "CUDA kernels":
        return Outcome("failed", "built without CUDA kernels (no nvcc or a CPU-only torch?)")
    where = f" for sm {archs[-1][0]} on {archs[-1][1]} jobs" if archs else ""
    return Outcome("ok", f"{kernels}{where}, {seconds:.0f} s", data={"archs": archs[-1][0] if archs else None})


def _pytest(check: Check, name: str, timeout: float, arguments: list[str], parallel: bool) -> Outcome:
    report = os.path.join(check.check_dir, f"{name}.jsonl")
    if os.path.exists(report):
        os.remove(report)
    command = [check.python, "-m", "pytest", "-p", "gpu_check", "-q", "-rfE", "-p", "no:cacheprovider", *arguments]
    if _importable("pytest_benchmark"):
        command.append("--benchmark-disable")
    if parallel and _importable("xdist"):
        command += ["-n", "auto"]
    built = check.outcomes.get("build")
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                     os.environ.get("PYTHONPATH")])),
        "GPU_CHECK_REPORT": report,
        "GPU_CHECK_TEST_DEADLINE": str(time.time() + timeout - PYTEST_GRACE_S),
    }
    if built is not None and built.status == "ok":  # test_build then holds the build to what it said
        env["FASTREG_EXPECT_BUILD"] = "cuda" if built.detail.startswith("CUDA") else "cpu"
    code, seconds = check.run(name, command, timeout, env)
    counts = _count_outcomes(report)
    detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no test ran"
    data = {"counts": counts, "failures": _failures(report), "report": report}
    if code is None:
        return Outcome("timed out", f"stopped after {seconds:.0f} s: {detail}", seconds, data)
    # exit 5: nothing selected (a device where no test of this phase applies)
    status = "ok" if code in (0, 5) and not counts["failed"] and not counts["error"] else "failed"
    if status == "ok" and counts["not reached"]:
        status = "timed out"
    return Outcome(status, detail, seconds, data)


def _count_outcomes(report: str) -> dict[str, int]:
    counts = dict.fromkeys(["passed", "failed", "error", "skipped", "xfailed", "xpassed", "not reached"], 0)
    if not os.path.exists(report):
        return counts
    with open(report) as f:
        for line in f:
            entry = json.loads(line)
            counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    return counts


def _failures(report: str, limit: int = 30) -> list[str]:
    if not os.path.exists(report):
        return []
    with open(report) as f:
        entries = [json.loads(line) for line in f]
    return [f"{e['nodeid']}: {e['message']}" for e in entries if e["outcome"] in ("failed", "error")][:limit]


def phase_tests(check: Check, timeout: float) -> Outcome:
    arguments = shlex.split(check.args.tests_args) if check.args.tests_args is not None else [
        "tests", "bench", "-k", TESTS_K[check.device], "--ignore", "tests/test_gpu_only.py"]
    return _pytest(check, "tests", timeout, arguments, parallel=True)


def phase_gpu_only(check: Check, timeout: float) -> Outcome:
    # one process: the large-input checks each need a good part of the GPU's memory
    return _pytest(check, "gpu-only", timeout, ["tests/test_gpu_only.py", "-rxXs"], parallel=False)


def _bench_help(check: Check) -> str:
    """The bench's --help: which modes (--host) and flags (--no-compile) it has."""
    if check._bench_help is None:
        result = subprocess.run([check.python, "-m", "fastreg.bench", "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        check._bench_help = result.stdout
    return check._bench_help


def phase_host(check: Check, timeout: float) -> Outcome:
    if "--host" not in _bench_help(check):
        return Outcome("skipped", "this bench has no --host mode")
    command = [check.python, "-m", "fastreg.bench", "--host", "--device", check.device, "--out", check.results_dir]
    command += shlex.split(check.args.host_args)
    code, seconds = check.run("host", command, timeout)
    if code is None:
        return Outcome("timed out", f"stopped after {seconds:.0f} s")
    return Outcome("ok" if code == 0 else "failed", f"{check.results_dir}/host.md" if code == 0 else f"exit {code}",
                   seconds)


def bench_ops(check: Check) -> list[str]:
    """Every op the bench knows, the targets' ops first."""
    if check.args.bench_ops:
        return check.args.bench_ops
    result = subprocess.run([check.python, "-c", "from fastreg.bench.ops import OPS; print(' '.join(OPS))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    known = result.stdout.split()
    return [op for op in BENCH_FIRST if op in known] + [op for op in known if op not in BENCH_FIRST]


def phase_bench(check: Check, timeout: float) -> Outcome:
    """One process per op, so that the deadline costs at most the op in flight."""
    phase_end = time.monotonic() + timeout
    ops = bench_ops(check)
    compile_flag = "--no-compile" in _bench_help(check)
    done, failed, not_reached = [], [], []
    for op in ops:
        left = phase_end - time.monotonic()
        if left < check.args.bench_op_min_s:
            not_reached.append(op)
            continue
        command = [check.python, "-m", "fastreg.bench", op, "--device", check.device,
                   "--dtype", "bfloat16", "float32", "--quick", "--out", check.results_dir]
        if compile_flag and op not in check.args.compile_ops:
            command.append("--no-compile")
        command += shlex.split(check.args.bench_args)
        code, seconds = check.run("bench", command, left)
        check.say(f"  bench {op}: {'ok' if code == 0 else 'stopped' if code is None else f'exit {code}'} "
                  f"({seconds:.0f} s)")
        (done if code == 0 else failed).append(op)
        write_results(check)
    parts = [f"{len(done)} of {len(ops)} ops timed"]
    if failed:
        parts.append("failed or stopped: " + ", ".join(failed))
    if not_reached:
        parts.append("not reached in time: " + ", ".join(not_reached))
    status = "ok" if not failed and not not_reached else ("timed out" if not_reached else "failed")
    return Outcome(status, "; ".join(parts), data={"done": done, "failed": failed, "not_reached": not_reached})


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[Check, float], Outcome]
    budget_s: dict  # device -> longest it may take (None: whatever is left)
    min_s: float  # not started with less time left than this
    needs: tuple[str, ...] = ()  # phases that must have succeeded first


PHASES = [
    Phase("env", phase_env, {"cuda": 60, "cpu": 60}, 5),
    Phase("build", phase_build, {"cuda": 240, "cpu": 900}, 30, needs=("env",)),
    Phase("tests", phase_tests, {"cuda": 150, "cpu": 300}, 30, needs=("env",)),
    Phase("gpu-only", phase_gpu_only, {"cuda": 90, "cpu": 90}, 20, needs=("env",)),
    Phase("host", phase_host, {"cuda": 45, "cpu": 60}, 15, needs=("env",)),
    Phase("bench", phase_bench, {"cuda": None, "cpu": None}, 20, needs=("env",)),
]


# ---------------------------------------------------------------------------- targets and summary


@dataclasses.dataclass(frozen=True)
class Target:
    """One GPU target of the README: `metric` of a bench row of op/mode at least `minimum`.
    metric: "copy" (share of the copy bandwidth of the same run), "eager" (x torch eager),
    or a provider's name (that provider's time / fastreg's: >= 1 is faster)."""

    text: str
    op: str
    mode: str
    metric: str
    minimum: float
    rank: int | None = None  # only shapes of this many dims (BatchNorm1d: 2)
    dtype: str | None = None  # only this dtype (None: every dtype timed)


TARGETS = [
    Target("dropout fwd >= 90% of copy", "dropout", "fwd", "copy", 0.90),
    Target("dropout bwd >= 90% of copy", "dropout", "bwd", "copy", 0.90),
    Target("LayerNorm fwd >= 90% of copy", "layer_norm", "fwd", "copy", 0.90),
    Target("LayerNorm bwd >= 80% of copy", "layer_norm", "bwd", "copy", 0.80),
    Target("LayerNorm bwd >= 1.5x torch eager", "layer_norm", "bwd", "eager", 1.5),
    Target("RMSNorm fwd >= 90% of copy", "rms_norm", "fwd", "copy", 0.90),
    Target("RMSNorm bwd >= 80% of copy", "rms_norm", "bwd", "copy", 0.80),
    Target("RMSNorm bwd >= 1.5x torch eager", "rms_norm", "bwd", "eager", 1.5),
    Target("dropout+add+LayerNorm step >= 2x the eager sequence", "dropout_add_layer_norm", "fwd+bwd", "eager", 2.0),
    Target("BatchNorm2d channels-last training step >= 1.3x eager", "batch_norm_channels_last", "fwd+bwd", "eager", 1.3),
    Target("BatchNorm2d channels-last training step >= 75% of copy", "batch_norm_channels_last", "fwd+bwd", "copy", 0.75),
    Target("BatchNorm1d training step >= 80% of copy", "batch_norm", "fwd+bwd", "copy", 0.80, rank=2),
    Target("BatchNorm eval fwd >= 90% of copy", "batch_norm_eval", "fwd", "copy", 0.90),
    Target("GroupNorm channels-last step >= 85% of copy", "group_norm_channels_last", "fwd+bwd", "copy", 0.85),
    Target("GroupNorm channels-last step >= torch.compile", "group_norm_channels_last", "fwd+bwd", "torch.compile", 1.0),
    Target("AdamW step >= 90% of copy (28 B/param)", "adamw", "step", "copy", 0.90, dtype="float32"),
    Target("AdamW step faster than torch fused=True", "adamw", "step", "torch-fused", 1.0, dtype="float32"),
]


def load_bench_rows(results_dir: str, since: float) -> list[dict]:
    """The rows of the bench's JSON files in `results_dir` written after `since` (this run's)."""
    rows = []
    if not os.path.isdir(results_dir):
        return rows
    for name in sorted(os.listdir(results_dir)):
        path = os.path.join(results_dir, name)
        if name.endswith(".json") and name != "host.json" and os.path.getmtime(path) >= since:
            with open(path) as f:
                try:
                    rows += json.load(f).get("results", [])
                except (json.JSONDecodeError, AttributeError):
                    continue
    return rows


def evaluate(target: Target, rows: list[dict], backend: str) -> tuple[bool | None, str]:
    """(met?, the values) of `target` for one fastreg backend, at the op's largest shape
    timed, over every dtype timed. None: not measured."""
    mine = [r for r in rows if r["op"] == target.op and r["mode"] == target.mode and r["timing"]
            and r["provider"] == f"fastreg-{backend}" and (target.rank is None or len(r["shape"]) == target.rank)
            and (target.dtype is None or r["dtype"] == target.dtype)]
    if not mine:
        return None, "not measured"
    largest = max(r["numel"] for r in mine)
    values = []
    for row in (r for r in mine if r["numel"] == largest):
        if target.metric == "copy":
            value = row["copy_share"]
        elif target.metric == "eager":
            value = row["vs_eager"]
        else:
            other = [r for r in rows if r["provider"] == target.metric and r["timing"] and
                     (r["op"], r["mode"], r["shape"], r["dtype"]) == (row["op"], row["mode"], row["shape"], row["dtype"])]
            value = other[0]["timing"]["median_ms"] / row["timing"]["median_ms"] if other else None
        values.append((row["dtype"], value))
    measured = [v for _, v in values if v is not None]
    if not measured:
        return None, f"no {target.metric} to compare with"
    shown = ", ".join(f"{dtype} {_format(target, v)}" for dtype, v in values)
    return min(measured) >= target.minimum and len(measured) == len(values), shown


def _format(target: Target, value) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if target.metric == "copy" else f"{value:.2f}x"


def targets_table(check: Check) -> tuple[str, list[dict]]:
    rows = load_bench_rows(check.results_dir, check.wall_start)
    backends = ("triton", "cuda") if check.device == "cuda" else ("cpu",)
    lines = ["| target | mode | " + " | ".join(backends) + " |", "|---|---|" + "---|" * len(backends)]
    records = []
    for target in TARGETS:
        cells = []
        for backend in backends:
            met, shown = evaluate(target, rows, backend)
            mark = {True: "met", False: "NOT met", None: "-"}[met]
            cells.append(f"{mark}: {shown}" if met is not None else shown)
            records.append({"target": target.text, "backend": backend, "met": met, "values": shown})
        lines.append(f"| {target.text} | {target.mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines), records


def summary_markdown(check: Check) -> str:
    info = check.env_info
    elapsed = time.monotonic() - check.start
    lines = [f"# gpu-check: {info.get('device', '?')} ({check.device} mode)", "",
             f"torch {info.get('torch')} | triton {info.get('triton')} | CUDA {info.get('cuda')} | "
             f"driver {info.get('driver')} | Python {info.get('python')} | {info.get('cores')} cores | "
             f"commit {info.get('commit')}{' (dirty)' if info.get('dirty') else ''}", "",
             f"{elapsed:.0f} s of a {check.args.deadline:.0f} s deadline.", "",
             "| phase | status | seconds | detail |", "|---|---|---|---|"]
    for name, outcome in check.outcomes.items():
        lines.append(f"| {name} | {outcome.status} | {outcome.seconds:.0f} | {outcome.detail} |")
    for name in ("tests", "gpu-only"):
        failures = check.outcomes.get(name, Outcome("")).data.get("failures")
        if failures:
            lines += ["", f"Failures of {name}:", ""] + [f"- {f}" for f in failures]
    gpu_only = check.outcomes.get("gpu-only")
    if gpu_only and gpu_only.data.get("report") and os.path.exists(gpu_only.data["report"]):
        lines += ["", "GPU-only checks (cases of each test by outcome and message):", "",
                  "| check | cases | outcome | message |", "|---|---|---|---|"]
        grouped = {}  # (test, outcome, message) -> cases
        with open(gpu_only.data["report"]) as f:
            for line in f:
                entry = json.loads(line)
                test, _, case = entry["nodeid"].split("::")[-1].partition("[")
                grouped.setdefault((test, entry["outcome"], entry["message"][:160]), []).append(case.rstrip("]"))
        for (test, outcome, message), cases in grouped.items():
            lines.append(f"| {test} | {', '.join(c for c in cases if c) or '-'} | {outcome} | {message} |")
    table, _ = targets_table(check)
    note = "" if check.device == "cuda" else " (CPU mode: the GPU targets do not apply; shown to check the table)"
    lines += ["", f"GPU targets of the README, at each op's largest shape timed{note}:", "", table, ""]
    return "\n".join(lines)


def write_results(check: Check) -> None:
    """status.json and summary.md now, and their copies in $OUT: a run stopped later keeps them."""
    os.makedirs(check.check_dir, exist_ok=True)
    _, records = targets_table(check)
    status = {"device": check.device, "deadline_s": check.args.deadline, "environment": check.env_info,
              "elapsed_s": round(time.monotonic() - check.start, 1),
              "phases": {name: dataclasses.asdict(o) for name, o in check.outcomes.items()}, "targets": records}
    with open(os.path.join(check.check_dir, "status.json"), "w") as f:
        json.dump(status, f, indent=1, default=str)
    with open(os.path.join(check.check_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(check))
    with open(os.path.join(check.check_dir, "console.log"), "w") as f:
        f.write("\n".join(check.console) + "\n")
    out = os.environ.get("OUT")
    if out and os.path.isdir(out):  # a few files: a lent machine returns at most 8
        shutil.copy(os.path.join(check.check_dir, "summary.md"), os.path.join(out, "gpu-check-summary.md"))
        shutil.copy(os.path.join(check.check_dir, "console.log"), os.path.join(out, "gpu-check-console.log"))
        with tarfile.open(os.path.join(out, "gpu-check-results.tar.gz"), "w:gz") as tar:
            tar.add(check.results_dir, arcname=os.path.basename(check.results_dir.rstrip("/")))


def default_results_dir(device: str, info: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(info.get("device", "unknown")).lower()).strip("-") or "unknown"
    if device == "cuda":
        return os.path.join(ROOT, "bench", "results", slug)
    return os.path.join(ROOT, "build", "gpu-check", slug)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="seconds for everything")
    parser.add_argument("--phases", help="comma-separated subset of: " + ",".join(p.name for p in PHASES))
    parser.add_argument("--budget", nargs="+", action="extend", default=[], metavar="PHASE=SECONDS",
                        help="a phase's longest time, replacing the table's")
    parser.add_argument("--out", help="results folder (default: bench/results/<gpu>, build/gpu-check/<cpu>)")
    parser.add_argument("--tests-args", help="pytest arguments of the tests phase (default: tests bench -k ...)")
    parser.add_argument("--bench-ops", nargs="*", help="ops to time (default: every op of fastreg.bench)")
    parser.add_argument("--bench-args", default="", help="more arguments of each bench run")
    parser.add_argument("--bench-op-min-s", type=float, default=15, help="no bench op is started with less left")
    parser.add_argument("--compile-ops", nargs="*", default=list(COMPILE_OPS),
                        help="ops timed with torch.compile too (the bench's --no-compile for the others)")
    parser.add_argument("--host-args", default="", help="more arguments of the host-overhead run")
    parser.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budgets = {name: float(seconds) for name, seconds in (item.split("=", 1) for item in args.budget)}
    args.selected = args.phases.split(",") if args.phases else [p.name for p in PHASES]
    unknown = (set(args.selected) | set(args.budgets)) - {p.name for p in PHASES}
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    return args


def run_phases(check: Check, phases: list[Phase]) -> None:
    """Each selected phase in turn, if the phases it needs succeeded and its minimum time is
    left, with a timeout of its budget or the time left; the results rewritten after each."""
    for phase in phases:
        if phase.name not in check.args.selected:
            continue
        left = check.left()
        missing = [n for n in phase.needs
                   if n in check.args.selected and check.outcomes.get(n, Outcome("")).status != "ok"]
        if missing:
            outcome = Outcome("skipped", f"needs {', '.join(missing)}")
        elif left < phase.min_s:
            outcome = Outcome("skipped", f"{max(left, 0):.0f} s left, needs {phase.min_s:.0f} s")
        else:
            budget = check.args.budgets.get(phase.name, phase.budget_s[check.device])
            timeout = left if budget is None else min(budget, left)
            check.say(f"{phase.name}: up to {timeout:.0f} s")
            began = time.monotonic()
            try:
                outcome = phase.run(check, timeout)
            except Exception as error:  # a broken phase is reported; the others still run
                outcome = Outcome("failed", f"{type(error).__name__}: {error}")
            outcome.seconds = outcome.seconds or time.monotonic() - began
        check.outcomes[phase.name] = outcome
        check.say(f"{phase.name}: {outcome.status} ({outcome.seconds:.0f} s) {outcome.detail}")
        if phase.name == "env" and check.args.out is None:
            _move_results(check, default_results_dir(check.device, check.env_info))
        write_results(check)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_env:
        print("GPU_CHECK_ENV " + json.dumps(environment(args.device)))
        return 0
    check = Check(args)
    check.say(f"gpu-check ({args.device} mode): phases {', '.join(args.selected)}; deadline {args.deadline:.0f} s")
    run_phases(check, PHASES)
    write_results(check)
    print()
    print(summary_markdown(check))
    print(f"results: {check.results_dir} (gpu-check/summary.md, status.json, logs/)")
    return 0 if all(o.status in ("ok", "skipped") for o in check.outcomes.values()) else 1


def _move_results(check: Check, results_dir: str) -> None:
    """Into the device's results folder, with the env phase's log written before its name was known."""
    scratch_logs = os.path.join(check.check_dir, "logs")
    check.results_dir = results_dir
    logs = os.path.join(check.check_dir, "logs")
    shutil.rmtree(logs, ignore_errors=True)  # a rerun's logs start afresh
    os.makedirs(check.check_dir, exist_ok=True)
    if os.path.isdir(scratch_logs):
        shutil.move(scratch_logs, logs)


# ---------------------------------------------------------------------------- the pytest plugin (-p gpu_check)


def pytest_runtest_setup(item):
    deadline = os.environ.get("GPU_CHECK_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        import pytest

        pytest.skip("gpu-check: the phase's time was up before this test started")


def pytest_runtest_logreport(report):
    path = os.environ.get("GPU_CHECK_REPORT")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # with xdist the controller writes
        return
    if report.when != "call" and report.passed:
        return  # a passing setup or teardown: the call's report follows
    if report.when == "teardown" and report.skipped:
        return
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2]
    elif report.failed:
        message = (report.longreprtext.strip().splitlines() or [""])[-1]
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
        message = message or report.wasxfail
    elif report.failed and report.when != "call":
        outcome = "error"
    elif report.skipped and "the phase's time was up" in message:
        outcome = "not reached"
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                            "seconds": round(report.duration, 3), "message": message}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
