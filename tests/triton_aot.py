"""Ahead-of-time compiles of the Triton kernels for an NVIDIA GPU (sm_90), with no GPU.

The Triton interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code a GPU compile
rejects: non-constexpr globals, float64 where only float32 is allowed, types that only
the code generator checks. `compile_ptx` runs the real compiler (Triton source -> TTIR ->
TTGIR -> LLVM -> PTX -> cubin) for `GPUTarget("cuda", 90, 32)` in a subprocess without
TRITON_INTERPRET (the interpreter is chosen when triton is first imported, so this test
process cannot switch it off), all cases of one call in that one process, and returns
each case's PTX or its compile error.

A case gives what a launch would: the argument types the launcher passes (pointers
`*fp32`, `*bf16`, `*i64`, ...; integers `i32` / `i64`; floats `fp32`), its constexprs
(a triton.language dtype as `dtype("bf16")`, so that collecting tests imports no triton)
and num_warps. Like a launch of fresh torch tensors, every pointer is 16-byte aligned;
`div16` names the integer arguments a typical launch passes divisible by 16 (a launch
specializes those the same way, and masked accesses vectorize only with it). An integer
a launch passes as 1 (a unit stride) it specializes to the constexpr 1: give it among
the constexprs.
"""

import dataclasses
import os
import pickle
import re
import subprocess
import sys
import tempfile

import pytest

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size


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
    options: tuple = ()  # more compile options as (name, value) pairs, e.g. (("enable_fp_fusion", False),)

    def __str__(self):
        return self.id


def dtype(name):
    """The constexpr value triton.language.dtype(name) ("fp32", "bf16", ...), built in the
    compiling process."""
    return ("__tl_dtype__", name)


_COMPILE = r"""
import pickle, sys, traceback
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

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
        results[case["id"]] = ("ptx", compiled.asm["ptx"])
    except Exception:
        results[case["id"]] = ("error", traceback.format_exc()[-6000:])
with open(results_path, "wb") as f:
    pickle.dump(results, f)
"""


def require_nvidia_backend():
    """Skip the calling test where triton, or its NVIDIA backend, is not installed."""
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA (CUDA) backend here")


def compile_ptx(cases, timeout=600):
    """{case id: ("ptx", text) or ("error", traceback)} of every case, compiled in one
    subprocess; skips the calling test where triton has no NVIDIA backend."""
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
    kind, text = results[case.id]
    if kind != "ptx":
        pytest.fail(f"{case.module}.{case.kernel} [{case.id}] does not compile for sm_90:\n{text}", pytrace=False)
    return text


def global_accesses(ptx, kind="ld", width=None, sixteen_bytes=False):
    """The `kind` ("ld" or "st") .global instructions of the PTX; only the vector ones of
    `width` lanes if given, only the 16-byte ones (v4 x 32 bits, v2 x 64 bits) if asked."""
    lines = [line.strip() for line in ptx.splitlines() if f"{kind}.global" in line]
    if width is not None:
        lines = [line for line in lines if f".v{width}." in line]
    if sixteen_bytes:
        lines = [line for line in lines if re.search(r"\.(v4\.[bfsu]32|v2\.[bfsu]64) ", line)]
    return lines
