"""Ahead-of-time compiles of the Triton kernels for an NVIDIA GPU (sm_90), with no GPU,
of the launches the launchers make.

The Triton interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code a GPU compile
rejects: non-constexpr globals, float64 where only float32 is allowed, types that only
the code generator checks. `compile_ptx` runs the real compiler (Triton source -> TTIR ->
TTGIR -> LLVM -> PTX -> cubin) for `GPUTarget("cuda", 90, 32)` in a subprocess without
TRITON_INTERPRET (the interpreter is chosen when triton is first imported, so this test
process cannot switch it off), all cases of one call in that one process, and returns
each case's PTX and the cubin's resource usage (registers, stack bytes: spills) or its
compile error.

A case is what a launch compiles: the argument types (pointers `*fp32`, `*bf16`, ...;
integers `i32` / `i64`; floats `fp32`), the constexprs and num_warps. `record_launches`
takes them from the launchers themselves: it runs a launcher on fake CUDA tensors
(FakeTensorMode: no memory, so GPU-sized shapes cost nothing) under a fake CUDA runtime
(device count, current device, SM count), with each kernel's launch intercepted, and
`case_of` types each recorded argument as Triton's own launch does (its specialization:
an integer 1 becomes the constexpr 1, integers divisible by 16 are marked so, pointers
of fresh tensors are 16-byte aligned).
"""

import contextlib
import dataclasses
import importlib
import inspect
import os
import pickle
import re
import subprocess
import sys
import tempfile
import types

import pytest
import torch

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size
H100_SMS = 132  # an H100 SXM or H200: what the launchers size their grids for here
KERNEL_MODULES = ("dropout", "layer_norm", "group_norm", "batch_norm")  # of fastreg.triton_kernels


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: `module`.`kernel` (a @triton.jit function) with these arguments."""

    id: str
    module: str  # e.g. "fastreg.triton_kernels.dropout"
    kernel: str
    signature: dict  # non-constexpr argument -> type ("*fp32", "i32", "fp32", ...)
    constexprs: dict  # constexpr argument -> value
    num_warps: int = 4
    div16: tuple = ()  # integer arguments marked divisible by 16 (every pointer is)
    grid: tuple = ()  # the launch's grid, where recorded
    options: tuple = ()  # more compile options as (name, value) pairs, e.g. (("enable_fp_fusion", False),)

    def __str__(self):
        return self.id

    @property
    def programs(self):
        """Programs in the launch's grid."""
        count = 1
        for size in self.grid:
            count *= size
        return count


def dtype(name):
    """The constexpr value triton.language.dtype(name) ("fp32", "bf16", ...), built in the
    compiling process."""
    return ("__tl_dtype__", name)


# ----------------------------------------------------------------- recorded launches


@dataclasses.dataclass
class Launch:
    """One kernel launch a launcher made: its arguments by name, grid and options, and
    the CUDA device that was current when it was made."""

    module: str
    kernel: str
    args: dict  # every kernel argument by name (constexprs included)
    constexpr_names: tuple
    grid: tuple
    options: dict  # num_warps, ...
    current_device: int


class FakeCuda:
    """Stands in for torch.cuda's device functions: `devices` devices of `sms` SMs each,
    `current` the current one; counts the device contexts entered."""

    def __init__(self, current=0, devices=2, sms=H100_SMS):
        self.current, self.devices, self.sms = current, devices, sms
        self.contexts_entered = 0

    def current_device(self):
        return self.current

    def device_count(self):
        return self.devices

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(multi_processor_count=self.sms, name="fake sm_90 device", major=9, minor=0)

    def device(self, device):
        index = device.index if isinstance(device, torch.device) else int(device)
        fake = self

        class _Device:
            def __enter__(self):
                fake.contexts_entered += 1
                self.previous, fake.current = fake.current, index

            def __exit__(self, *exc):
                fake.current = self.previous
                return False

        return _Device()


def _kernels(module):
    """The @triton.jit kernels of a module (JITFunction, or InterpretedFunction under
    TRITON_INTERPRET): the objects a launch goes through."""
    return {name: obj for name, obj in vars(module).items()
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and name.endswith("_kernel")}


def _constexpr_names(kernel):
    import triton.language as tl

    return tuple(name for name, param in inspect.signature(kernel.fn).parameters.items()
                 if param.annotation is tl.constexpr or param.annotation in ("tl.constexpr", "constexpr"))


@contextlib.contextmanager
def record_launches(current_device=0, sms=H100_SMS):
    """Inside: tensors made on "cuda:<i>" are fake (FakeTensorMode), torch.cuda's device
    functions are those of a FakeCuda, and every kernel launch of the kernel modules is
    recorded instead of run. Yields (launches, fake_cuda): launches fills as launchers run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_cuda = FakeCuda(current=current_device, sms=sms)
    launches = []
    patches = [(torch.cuda, name, getattr(fake_cuda, name))
               for name in ("current_device", "device_count", "get_device_properties", "device")]
    for short in KERNEL_MODULES:
        module = importlib.import_module(f"fastreg.triton_kernels.{short}")
        for name, kernel in _kernels(module).items():
            constexprs = _constexpr_names(kernel)

            def run(*args, grid, warmup, _module=module.__name__, _name=name, _kernel=kernel,
                    _constexprs=constexprs, **kwargs):
                arg_names = inspect.signature(_kernel.fn).parameters
                bound = dict(zip(arg_names, args))
                options = {key: value for key, value in kwargs.items() if key not in arg_names}
                bound.update({key: value for key, value in kwargs.items() if key in arg_names})
                launches.append(Launch(_module, _name, bound, _constexprs, tuple(grid), options,
                                       fake_cuda.current))

            patches.append((kernel, "run", run))
    saved = [(target, name, target.__dict__.get(name, _MISSING) if not isinstance(target, types.ModuleType)
              else getattr(target, name)) for target, name, _ in patches]
    try:
        for target, name, value in patches:
            setattr(target, name, value)
        with FakeTensorMode(allow_non_fake_inputs=False):
            yield launches, fake_cuda
    finally:
        for target, name, value in saved:
            if value is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, value)


_MISSING = object()


def _specialize(value):
    """(type, key) as Triton's launch specializes `value`: a tensor by its dtype (every
    pointer taken as 16-byte aligned, as fresh allocations are), an int by its value."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import MockTensor

    if isinstance(value, torch.Tensor):
        value = MockTensor(value.dtype)
    return native_specialize_impl(BaseBackend, value, False, True, True)


def _picklable_constexpr(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return dtype(str(value).removeprefix("tl."))
    if isinstance(value, tl.constexpr):
        return _picklable_constexpr(value.value)
    return value


def case_of(launch, case_id):
    """The Case that compiles what `launch` ran, typed as Triton's launch would."""
    signature, constexprs, div16 = {}, {}, []
    for name, value in launch.args.items():
        if name in launch.constexpr_names:
            constexprs[name] = _picklable_constexpr(value)
            continue
        kind, key = _specialize(value)
        if kind == "constexpr":  # an int equal to 1 (or None)
            constexprs[name] = value
            continue
        signature[name] = kind
        if key == "D" and not kind.startswith("*"):
            div16.append(name)
    return Case(case_id, launch.module, launch.kernel, signature, constexprs,
                num_warps=launch.options.get("num_warps", 4), div16=tuple(div16), grid=launch.grid)


def recorded_cases(calls, device="cuda:0"):
    """The Cases of every launch of `calls` ({name: call(device)}), each once: the first
    call that launches a variant names it "<call name>:<kernel>" (with "#2", ... for a
    kernel a call launches again in another variant)."""
    cases, seen = [], set()
    with record_launches() as (launches, _):
        for name, call in calls.items():
            start = len(launches)
            call(device)
            counts = {}
            for launch in launches[start:]:
                counts[launch.kernel] = counts.get(launch.kernel, 0) + 1
                suffix = f"#{counts[launch.kernel]}" if counts[launch.kernel] > 1 else ""
                case = case_of(launch, f"{name}:{launch.kernel}{suffix}")
                key = (case.module, case.kernel, tuple(case.signature.items()), repr(sorted(case.constexprs.items())),
                       case.num_warps, case.div16)
                if key not in seen:
                    seen.add(key)
                    cases.append(case)
    return cases


# ----------------------------------------------------------------- compiling


_COMPILE = r"""
import os, pickle, subprocess, sys, tempfile, traceback
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib


def resource_usage(cubin):
    # cuobjdump -res-usage of the cubin: "REG:40 STACK:0 SHARED:0 LOCAL:0 ..."; a Triton
    # kernel has no local arrays, so its stack bytes are register spills
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (item.split(":") for item in line.split()) if value.isdigit()}


cases_path, results_path = sys.argv[1], sys.argv[2]
with open(cases_path, "rb") as f:
    target, cases = pickle.load(f)
results = {}
for case in cases:
    try:
        fn = getattr(importlib.import_module(case["module"]), case["kernel"])
        constexprs = {name: tl.dtype(value[1]) if isinstance(value, tuple) and value[:1] == ("__tl_dtype__",)
                      else value for name, value in case["constexprs"].items()}
        signature = dict(case["signature"])
        signature.update({name: "constexpr" for name in constexprs})
        missing = set(fn.arg_names) - set(signature)
        if missing:
            raise TypeError(f"no type or value given for {sorted(missing)}")
        aligned = [name for name, ty in case["signature"].items() if ty.startswith("*")] + list(case["div16"])
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": case["num_warps"], **dict(case["options"])}
        compiled = triton.compile(source, target=GPUTarget(*target), options=options)
        results[case["id"]] = ("ptx", compiled.asm["ptx"], resource_usage(compiled.asm["cubin"]))
    except Exception:
        results[case["id"]] = ("error", traceback.format_exc()[-6000:], None)
with open(results_path, "wb") as f:
    pickle.dump(results, f)
"""


def require_nvidia_backend():
    """Skip the calling test where triton, or its NVIDIA backend, is not installed."""
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA (CUDA) backend here")


def compile_ptx(cases, timeout=1800):
    """{case id: ("ptx", text, usage) or ("error", traceback, None)} of every case,
    compiled in one subprocess; usage is the cubin's resource usage ({"REG": registers
    per thread, "STACK": stack bytes per thread, ...}). Skips the calling test where
    triton has no NVIDIA backend."""
    require_nvidia_backend()
    ids = [case.id for case in cases]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    payload = [dataclasses.asdict(case) for case in cases]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        cases_path, results_path = os.path.join(tmp, "cases.pkl"), os.path.join(tmp, "results.pkl")
        with open(cases_path, "wb") as f:
            pickle.dump((TARGET, payload), f)
        result = subprocess.run([sys.executable, "-c", _COMPILE, cases_path, results_path], capture_output=True,
                                text=True, env=env, timeout=timeout)
        assert result.returncode == 0 and os.path.exists(results_path), \
            f"the compiling process failed:\n{result.stderr[-4000:]}"
        with open(results_path, "rb") as f:
            return pickle.load(f)


def ptx_of(results, case):
    """The PTX of `case` from compile_ptx's results; fails the test with the compile error."""
    kind, text, _ = results[case.id]
    if kind != "ptx":
        pytest.fail(f"{case.module}.{case.kernel} [{case.id}] does not compile for sm_90:\n{text}", pytrace=False)
    return text


def usage_of(results, case):
    """The cubin's resource usage of `case` ({"REG": ..., "STACK": ...}); fails the test
    with the compile error."""
    ptx_of(results, case)
    return results[case.id][2]


def global_accesses(ptx, kind="ld", width=None, sixteen_bytes=False):
    """The `kind` ("ld" or "st") .global instructions of the PTX; only the vector ones of
    `width` lanes if given, only the 16-byte ones (v4 x 32 bits, v2 x 64 bits) if asked."""
    lines = [line.strip() for line in ptx.splitlines() if f"{kind}.global" in line]
    if width is not None:
        lines = [line for line in lines if f".v{width}." in line]
    if sixteen_bytes:
        lines = [line for line in lines if re.search(r"\.(v4\.[bfsu]32|v2\.[bfsu]64) ", line)]
    return lines
