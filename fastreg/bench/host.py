"""What it costs to reach a kernel: host time per call and kernel launches per call.

    python -m fastreg.bench --host [--device cpu|cuda] [--backends cpu] [--min-time 1]

Tiny inputs, so that the host path (argument checks, the backend choice, the dispatcher,
autograd) and not the kernel decides the time; one thread on a CPU. Each call is timed as
the mean of a block of calls after a warm-up, fastreg and torch in interleaved rounds, and
the median block reported.

Launches are counted on the triton backend (interpreted on a CPU): every Triton kernel
launch, plus every torch op that runs a kernel (views and allocations are not launches),
including the seed draw of dropout and what autograd runs; forward and backward apart.
"""

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as torch_F
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg
from fastreg import functional as F
from fastreg.ops._table import TRITON_LAUNCHERS

Call = Callable[[], object]


@dataclass(frozen=True)
class HostCase:
    """`make(library, device)` returns (forward, backward): forward() runs the call (and
    returns what backward needs), backward(out) its backward, or None for a forward-only
    case. library is "fastreg" or "torch"."""

    name: str
    make: Callable[[str, str], tuple[Callable, Callable | None]]


def _layer(fastreg_fn, torch_fn, shape, needs_grad: bool):
    def make(library, device):
        fn = fastreg_fn if library == "fastreg" else torch_fn
        x = torch.randn(shape, device=device, requires_grad=needs_grad)
        forward = lambda: fn(x)  # noqa: E731
        if not needs_grad:
            return forward, None
        params = [x] + [p for p in getattr(fn, "parameters", lambda: [])() if p.requires_grad]
        grad = torch.randn(shape, device=device)
        return forward, lambda y: torch.autograd.grad(y, params, grad)

    return make


def _module_pair(fastreg_cls, torch_cls, *args):
    def make_pair():
        ours, theirs = fastreg_cls(*args), torch_cls(*args)
        theirs.load_state_dict(ours.state_dict())
        return ours, theirs

    return make_pair


def _module_case(name, pair, shape):
    def make(library, device):
        ours, theirs = pair()
        module = (ours if library == "fastreg" else theirs).to(device).train()
        return _layer(module, module, shape, True)(library, device)

    return HostCase(name, make)


def _adamw_step(library, device):
    params = [torch.randn(64, 64, device=device, requires_grad=True) for _ in range(10)]
    for p in params:
        p.grad = torch.randn_like(p)
    if library == "fastreg":
        optimizer = fastreg.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    optimizer.step()  # the state exists before timing
    return optimizer.step, None


def _ln_fastreg(x):
    return F.layer_norm(x, (64,), _ln_fastreg.weight, _ln_fastreg.bias)


def _ln_torch(x):
    return torch_F.layer_norm(x, (64,), _ln_fastreg.weight, _ln_fastreg.bias)


def _layer_norm_case(name, needs_grad):
    def make(library, device):
        _ln_fastreg.weight = torch.randn(64, device=device, requires_grad=needs_grad)
        _ln_fastreg.bias = torch.randn(64, device=device, requires_grad=needs_grad)
        fn = _ln_fastreg if library == "fastreg" else _ln_torch
        x = torch.randn(4, 64, device=device, requires_grad=needs_grad)
        forward = lambda: fn(x)  # noqa: E731
        if not needs_grad:
            return forward, None
        grad = torch.randn(4, 64, device=device)
        return forward, lambda y: torch.autograd.grad(y, [x, _ln_fastreg.weight, _ln_fastreg.bias], grad)

    return HostCase(name, make)


CASES = [
    HostCase("dropout fwd (4, 64), no grad", _layer(lambda x: F.dropout(x, 0.1), lambda x: torch_F.dropout(x, 0.1),
                                                    (4, 64), False)),
    HostCase("dropout fwd+bwd (4, 64)", _layer(lambda x: F.dropout(x, 0.1), lambda x: torch_F.dropout(x, 0.1),
                                               (4, 64), True)),
    _layer_norm_case("layer_norm fwd (4, 64), no grad", False),
    _layer_norm_case("layer_norm fwd+bwd (4, 64)", True),
    _module_case("BatchNorm1d(64) fwd+bwd (4, 64)", _module_pair(fastreg.nn.BatchNorm1d, torch.nn.BatchNorm1d, 64),
                 (4, 64)),
    _module_case("GroupNorm(8, 32) fwd+bwd (2, 32, 4, 4)",
                 _module_pair(fastreg.nn.GroupNorm, torch.nn.GroupNorm, 8, 32), (2, 32, 4, 4)),
    HostCase("AdamW step, 10 tensors (64, 64) [torch: fused]", _adamw_step),
]


def _timed_call(forward, backward) -> Call:
    if backward is None:
        return forward
    return lambda: backward(forward())


def _block_us(call: Call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def host_times(case: HostCase, device: str, min_time: float, rounds: int) -> dict[str, float]:
    """Median microseconds per call of fastreg and torch, timed in interleaved rounds."""
    calls = {library: _timed_call(*case.make(library, device)) for library in ("fastreg", "torch")}
    for call in calls.values():  # warm-up, and the size of a block of about min_time / rounds / 4
        for _ in range(20):
            call()
    block = {lib: max(10, int(min_time / rounds / 4 / (_block_us(c, 20) * 1e-6))) for lib, c in calls.items()}
    blocks = {library: [] for library in calls}
    for _ in range(rounds):
        for library, call in calls.items():
            for _ in range(4):
                blocks[library].append(_block_us(call, block[library]))
                if device == "cuda":
                    torch.cuda.synchronize()
    return {library: statistics.median(times) for library, times in blocks.items()}


_ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
                torch.ops.aten.new_empty_strided.default, torch.ops.aten.lift_fresh.default,
                torch.ops.aten.detach_.default}


def _runs_a_kernel(func) -> bool:
    """Not a view, an allocation, a metadata change (detach_) or a scalar query (promote_types)."""
    returns_tensor = any(isinstance(r.type, torch.TensorType) for r in func._schema.returns)
    return (returns_tensor and not func.is_view or func._schema.is_mutable) and func not in _ALLOCATIONS


class LaunchCounter(TorchDispatchMode):
    """Counts torch ops that run a kernel (not views or allocations) and Triton launches,
    including what a Triton twin's launcher runs (called directly, under the mode)."""

    def __init__(self):
        super().__init__()
        self.torch_ops: list[str] = []
        self.triton_launches: list[str] = []
        self.in_triton = 0  # > 0 inside a Triton launch: the interpreter's own tensor ops are not launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        launcher = TRITON_LAUNCHERS.get(func._schema.name)
        if launcher is not None:  # a Triton twin: count what its launcher runs
            with self:
                return launcher(*args, **kwargs)
        # a C++ fastreg op counts as one launch (it may run more inside)
        if not self.in_triton and _runs_a_kernel(func):
            self.torch_ops.append(str(func))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return len(self.torch_ops) + len(self.triton_launches)


@contextlib.contextmanager
def _counting_triton_launches(counter: LaunchCounter):
    """Records the kernel name of every Triton launch (compiled or interpreted)."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            counter.triton_launches.append(getattr(self, "__name__", None) or self.fn.__name__)
            counter.in_triton += 1
            try:
                return __original(self, *args, **kwargs)
            finally:
                counter.in_triton -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def launches(case: HostCase, device: str) -> tuple[int, int | None, LaunchCounter, LaunchCounter | None]:
    """(launches of one forward, of one backward, and the counters) on the current backend."""
    forward, backward = case.make("fastreg", device)
    out = forward()  # warm-up outside the count (compiles, creates optimizer state)
    if backward is not None:
        backward(out)
    fwd = LaunchCounter()
    with _counting_triton_launches(fwd), fwd:
        out = forward()
    if backward is None:
        return fwd.total, None, fwd, None
    bwd = LaunchCounter()
    with _counting_triton_launches(bwd), bwd:
        backward(out)
    return fwd.total, bwd.total, fwd, bwd


def run(device: str, backend: str | None, min_time: float, rounds: int, count_backend: str | None) -> list[dict]:
    """One row per case: microseconds per call of fastreg (on `backend`, default auto) and
    torch, and launches per forward / backward on `count_backend` (None: not counted)."""
    rows = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        for case in CASES:
            with fastreg.use_backend(backend or "auto"):
                times = host_times(case, device, min_time, rounds)
            row = {"case": case.name, "fastreg_us": times["fastreg"], "torch_us": times["torch"],
                   "ratio": times["fastreg"] / times["torch"]}
            if count_backend is not None:
                with fastreg.use_backend(count_backend):
                    fwd, bwd, fwd_counter, bwd_counter = launches(case, device)
                row.update(launches_fwd=fwd, launches_bwd=bwd,
                           launched_fwd=fwd_counter.triton_launches + fwd_counter.torch_ops,
                           launched_bwd=(bwd_counter.triton_launches + bwd_counter.torch_ops) if bwd_counter else None)
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def markdown(rows: list[dict], env: dict, backend: str | None, count_backend: str | None) -> str:
    lines = [f"Host time per call: {env['device']}, torch {env['torch']}, fastreg backend {backend or 'auto'}, "
             f"commit {(env['git_commit'] or '?')[:7]}{' (dirty)' if env['git_dirty'] else ''}, "
             f"{'1 thread' if env['device_type'] == 'cpu' else 'GPU'}", ""]
    counted = count_backend is not None
    header = "| call | fastreg (us) | torch (us) | fastreg / torch |"
    rule = "|---|---|---|---|"
    if counted:
        header += f" launches fwd / bwd ({count_backend}) |"
        rule += "---|"
    lines += [header, rule]
    for row in rows:
        line = f"| {row['case']} | {row['fastreg_us']:.1f} | {row['torch_us']:.1f} | {row['ratio']:.2f} |"
        if counted:
            bwd = "-" if row["launches_bwd"] is None else row["launches_bwd"]
            line += f" {row['launches_fwd']} / {bwd} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
