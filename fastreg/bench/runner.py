"""The one benchmark runner: times every (op, mode, size, dtype, provider), measures a plain
copy in the same run, and writes a markdown table, a JSON file and a plot.

Timing: on a GPU `triton.testing.do_bench` (which flushes L2 between runs; median and
20/80% quantiles); on a CPU `torch.utils.benchmark` with blocked_autorange (median and
interquartile range) on all the threads torch uses.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

import fastreg
from fastreg.bench.ops import LAYER_MODES, OPS, STEP_MODES, make_callable

MODES = LAYER_MODES + STEP_MODES


@dataclass
class Timing:
    median_ms: float
    low_ms: float  # 20% quantile (GPU) or first quartile (CPU)
    high_ms: float  # 80% quantile (GPU) or third quartile (CPU)
    raw_ms: list[float] = field(default_factory=list)


@dataclass
class Row:
    op: str
    mode: str
    shape: list[int]  # of the main input
    numel: int
    dtype: str
    provider: str
    min_bytes: float
    timing: Timing | None
    error: str | None = None
    gbps: float | None = None
    copy_share: float | None = None  # of the copy bandwidth measured in this run
    vs_eager: float | None = None  # torch eager time / this time
    peak_mib: float | None = None  # peak memory above the inputs during one call (ops that measure it)
    extra_mib: float | None = None  # the same above inputs and outputs (what the call holds besides its results)


def time_fn(fn, device: str, min_time: float) -> Timing:
    if device == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return Timing(median, low, high, [median, low, high])
    from torch.utils import benchmark

    measurement = benchmark.Timer(
        "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_time)
    return cpu_timing([t * 1e3 for t in measurement.times])


def cpu_timing(times_ms: list[float]) -> Timing:
    """Median and quartiles of CPU block times."""
    times = torch.tensor(times_ms, dtype=torch.float64)
    low, median, high = times.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return Timing(median, low, high, list(times_ms))


def keep_heap() -> bool:
    """Keeps freed memory in glibc's heap (no mmap for large blocks, no trimming), so that
    a timed loop reuses its outputs' pages instead of faulting fresh ones in.

    With glibc's defaults a 16 MB output is mapped or trimmed away again depending on the
    heap's history, and zeroing its fresh pages on first touch (~4000 faults) costs more
    than a norm kernel over it: timings of the same code then vary 2x from run to run,
    whichever provider it is. Returns False where the C library is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def peak_memory(fn, device: str) -> tuple[float, float]:
    """(peak bytes allocated above what was allocated before, that peak less what the call
    still holds when it returns: its outputs) of one call of fn. CUDA: the caching
    allocator's statistics; CPU: the allocations and frees the profiler records, replayed
    in order (memory torch's allocator hands out; a BLAS library's own scratch is not seen)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak, end = torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
        del out
        return peak, peak - end
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak, peak - level


def copy_bandwidth(numel: int, dtype: torch.dtype, device: str, min_time: float) -> float:
    """GB/s of dst.copy_(src): reads and writes numel elements."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, min_time)
    return 2 * numel * dtype.itemsize / timing.median_ms / 1e6


def providers(op, device: str, backends: list[str] | None, compile: bool = True) -> list[str]:
    """fastreg backends that run on `device` (triton through the interpreter only if asked), then torch's:
    eager, the op's variants, and torch.compile for layer ops (unless `compile` is False)."""
    if backends is None:
        backends = [
            b for b in fastreg.available_backends()
            if fastreg.backend_supports(b, device) and b != "torch" and not (b == "triton" and device == "cpu")
        ]
    compiled = ["torch.compile"] if op.modes != STEP_MODES and compile else []
    return [f"fastreg-{b}" for b in backends] + ["torch", *op.torch_variants] + compiled


def _provider_fn(op, provider: str):
    if provider == "torch":
        return op.torch_fn
    if provider in op.torch_variants:
        return op.torch_variants[provider]
    if provider == "torch.compile":
        return torch.compile(op.torch_fn)
    backend = provider.removeprefix("fastreg-")

    def run(*inputs):
        with fastreg.use_backend(backend):
            return op.fastreg_fn(*inputs)

    return run


def format_shape(shape) -> str:
    """4,194,304 for one dim, 8192x1024 for more."""
    return f"{shape[0]:,}" if len(shape) == 1 else "x".join(map(str, shape))


def parse_shape(text: str) -> tuple[int, ...]:
    """'4096' -> (4096,), '8192x1024' -> (8192, 1024)."""
    return tuple(int(d) for d in text.lower().split("x"))


def run(ops, device, dtypes, quick, backends=None, shapes=None, modes=None, min_time=0.5, rounds=None,
        log=sys.stderr, compile=True):
    """Measure everything; returns (rows, copy GB/s per (numel, dtype)). `modes`: those of
    each op's own modes to run (None: all of them).

    On a CPU the providers of one case are timed in `rounds` interleaved rounds (default 5),
    min_time / rounds each, and each gets the median of all its blocks: on a shared machine
    the memory bandwidth left to us drifts over seconds, and the heap's state (which decides
    how many fresh pages a large output faults in) changes with every allocation, so timing
    one provider after the other compares different machines."""
    # "bwd" runs backward over one graph again and again (retain_graph), which compiled
    # graphs that donate their saved buffers refuse
    torch._functorch.config.donated_buffer = False
    rounds = rounds or (5 if device == "cpu" else 1)
    cases = []  # (op, mode, shape, dtype, [providers])
    for name in ops:
        op = OPS[name]
        full, quick_shapes = op.shapes[device]
        for shape in shapes or (quick_shapes if quick else full):
            for dtype in dtypes:
                for mode in (m for m in op.modes if modes is None or m in modes):
                    cases.append((op, mode, tuple(shape), dtype, providers(op, device, backends, compile)))
    if backends is None and device == "cpu":
        print("note: triton on CPU runs in the interpreter; skipped (ask with --backends triton)", file=log)

    copy_gbps, rows, compiled = {}, [], {}
    total, done = sum(len(case[-1]) for case in cases), 0
    for op, mode, shape, dtype, case_providers in cases:
        numel = op.numel(shape)
        if (numel, dtype) not in copy_gbps:
            copy_gbps[(numel, dtype)] = copy_bandwidth(numel, dtype, device, min_time)
        timed = []  # (row, callable, block times)
        for provider in case_providers:
            key = (op.name, provider)
            if key not in compiled:
                compiled[key] = _provider_fn(op, provider)
            row = Row(op.name, mode, list(shape), numel, str(dtype).removeprefix("torch."), provider,
                      op.min_bytes(mode, numel, dtype, shape), None)
            try:
                fn = make_callable(op, compiled[key], mode, shape, dtype, device)
                fn()  # warm up (compiles)
                timed.append((row, fn, []))
            except Exception as error:  # a provider that cannot run this case is reported, not fatal
                row.error = _error_text(error)
            rows.append(row)
        for _ in range(rounds):
            for row, fn, times in timed:
                if row.error:
                    continue
                try:
                    times.extend(time_fn(fn, device, min_time / rounds).raw_ms)
                except Exception as error:
                    row.error = _error_text(error)
        for row, fn, times in timed:
            if op.measure_memory and not row.error:
                peak, extra = peak_memory(fn, device)
                row.peak_mib, row.extra_mib = peak / 2**20, extra / 2**20
            if not row.error:
                row.timing = cpu_timing(times) if device == "cpu" else _gpu_timing(times)
                row.gbps = row.min_bytes / row.timing.median_ms / 1e6
                row.copy_share = row.gbps / copy_gbps[(numel, dtype)]
        for row in rows[-len(case_providers):]:
            done += 1
            result = f"{row.gbps:8.1f} GB/s" if row.timing else f"n/a ({row.error})"
            print(f"[{done}/{total}] {op.name} {mode} {format_shape(shape)} {row.dtype} {row.provider}: {result}",
                  file=log, flush=True)

    eager = {(r.op, r.mode, tuple(r.shape), r.dtype): r for r in rows if r.provider == "torch" and r.timing}
    for row in rows:
        reference = eager.get((row.op, row.mode, tuple(row.shape), row.dtype))
        if row.timing and reference:
            row.vs_eager = reference.timing.median_ms / row.timing.median_ms
    return rows, copy_gbps


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def _gpu_timing(raw: list[float]) -> Timing:
    """do_bench's (median, 20%, 80%) of one round, or the medians of several rounds."""
    if len(raw) == 3:
        return Timing(raw[0], raw[1], raw[2], raw)
    medians = sorted(raw[0::3])
    return Timing(medians[len(medians) // 2], min(raw[1::3]), max(raw[2::3]), raw)


def environment(device: str, heap_kept: bool = False) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "device_type": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fastreg": fastreg.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        # results written by earlier runs do not make the code dirty
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "malloc": "glibc heap kept (M_MMAP_MAX=0, no trimming)" if heap_kept else "default",
    }


def _cpu_name() -> str:
    """The CPU's model name and widest vector extension: "AMD EPYC (AVX-512)". Virtual machines often report
    a bare family name for CPUs of different generations, and the extension is what picks the kernels' paths."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "cpu"
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name} ({vector})" if vector else name


def markdown(rows, copy_gbps, env) -> str:
    lines = [
        f"Device: {env['device']} ({env['threads']} threads) | torch {env['torch']} | triton {env['triton']} | "
        f"CUDA {env['cuda']} | commit {(env['git_commit'] or '?')[:10]}{' (dirty)' if env['git_dirty'] else ''} | {env['date']}"
        + (f" | malloc: {env['malloc']}" if env.get("malloc", "default") != "default" else ""),
        "",
        "| op | mode | shape | dtype | provider | time (ms) | GB/s | % of copy | x torch eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.timing is None:
            cells = ["n/a", r.error or "", "", ""]
        else:
            cells = [f"{r.timing.median_ms:.4f}", f"{r.gbps:.1f}", f"{100 * r.copy_share:.0f}%",
                     f"{r.vs_eager:.2f}" if r.vs_eager else ""]
        lines.append(f"| {r.op} | {r.mode} | {format_shape(r.shape)} | {r.dtype} | {r.provider} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Copy bandwidth in this run: " + ", ".join(
        f"{numel:,} {str(dtype).removeprefix('torch.')}: {gbps:.1f} GB/s" for (numel, dtype), gbps in copy_gbps.items()))
    lines += memory_table(rows)
    return "\n".join(lines) + "\n"


def memory_bound_met(row) -> bool | None:
    """Whether a fastreg row stays within its op's memory bound (None: no bound applies)."""
    op = OPS.get(row.op)
    if op is None or op.memory_bound is None or row.extra_mib is None or not row.provider.startswith("fastreg"):
        return None
    dtype = getattr(torch, row.dtype)
    return row.extra_mib * 2**20 <= op.memory_bound(tuple(row.shape), dtype)


def memory_table(rows) -> list[str]:
    measured = [r for r in rows if r.peak_mib is not None]
    if not measured:
        return []
    lines = ["", "Peak memory of one call, MiB (torch's allocator; CPU: replayed from the profiler's records):", "",
             "| op | mode | shape | dtype | provider | above inputs | above inputs and outputs | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in measured:
        met = memory_bound_met(r)
        bound = "" if met is None else (
            f"{'within' if met else 'EXCEEDS'} {OPS[r.op].memory_bound(tuple(r.shape), getattr(torch, r.dtype)) / 2**20:.0f}")
        lines.append(f"| {r.op} | {r.mode} | {format_shape(r.shape)} | {r.dtype} | {r.provider} | {r.peak_mib:.1f} | "
                     f"{r.extra_mib:.1f} | {bound} |")
    return lines


def plot(rows, copy_gbps, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r.op, r.mode, tuple(r.shape), r.dtype) for r in rows))
    names = list(dict.fromkeys(r.provider for r in rows))
    by_key = {(r.op, r.mode, tuple(r.shape), r.dtype, r.provider): r for r in rows}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    for k, provider in enumerate(names):
        values = [getattr(by_key.get((*case, provider)), "gbps", None) or 0 for case in cases]
        ax.bar([i + k * width for i in range(len(cases))], values, width, label=provider)
    copies = {(n, str(d).removeprefix("torch.")): g for (n, d), g in copy_gbps.items()}
    numels = {(r.op, r.mode, tuple(r.shape), r.dtype): r.numel for r in rows}
    for i, case in enumerate(cases):
        ax.hlines(copies[(numels[case], case[3])], i - width / 2, i + 0.8 - width / 2, colors="black",
                  label="copy" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{op} {mode}\n{format_shape(shape)} {dtype}" for op, mode, shape, dtype in cases],
                       fontsize=8)
    ax.set_ylabel("GB/s (minimum-bytes model)")
    ax.set_title(f"fastreg on {env['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, copy_gbps, env, args: dict, out_dir: str, name: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "json", "png")}
    table = markdown(rows, copy_gbps, env)
    with open(paths["md"], "w") as f:
        f.write(table)
    with open(paths["json"], "w") as f:
        json.dump({
            "environment": env,
            "args": args,
            "copy_gbps": [{"numel": n, "dtype": str(d).removeprefix("torch."), "gbps": g} for (n, d), g in copy_gbps.items()],
            "results": [asdict(r) for r in rows],
        }, f, indent=1)
    plot(rows, copy_gbps, env, paths["png"])
    return paths
