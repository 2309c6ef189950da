"""python -m fastreg.bench [OPS...] [--device cuda|cpu] [--dtype ...] [--quick] [--out DIR]
python -m fastreg.bench --host [--device cuda|cpu]   (host time and launches per call)"""

import argparse
import json
import os
import re
import sys

import torch

import fastreg
from fastreg.bench import host, runner
from fastreg.bench.ops import OP_GROUPS, OPS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastreg.bench", description=__doc__)
    parser.add_argument("ops", nargs="*", choices=[[]] + sorted(OPS) + sorted(OP_GROUPS),
                        help="ops to run, or a group of them (optim: the optimizer steps); default: all")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes only")
    parser.add_argument("--out", help="output folder (default: bench/results/<device>)")
    parser.add_argument("--backends", nargs="+", help="fastreg backends to time (default: those that run natively)")
    parser.add_argument("--modes", nargs="+", choices=runner.MODES, help="default: each op's own modes")
    parser.add_argument("--shapes", nargs="+", type=runner.parse_shape,
                        help="shapes of the main input (4096, 8192x1024), replacing the op's own")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per CPU measurement")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds over the providers of a case (default: 5 on cpu, 1 on cuda)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="on cpu, leave glibc's malloc settings alone (default: keep freed memory in the heap, "
                             "so that page faults of fresh outputs do not swamp the kernels' times)")
    parser.add_argument("--host", action="store_true",
                        help="time the host path of tiny calls against torch and count kernel launches per call "
                             "(fastreg/bench/host.py) instead of the ops' bandwidth")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out of the providers (its compiles take most of a short run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.host:
        return _host(args)

    ops = [name for arg in args.ops or sorted(OPS) for name in OP_GROUPS.get(arg, [arg])]
    dtypes = [DTYPES[d] for d in args.dtype or (["bfloat16"] if args.device == "cuda" else ["float32"])]
    heap_kept = args.device == "cpu" and not args.default_malloc and runner.keep_heap()
    rows, copy_gbps = runner.run(ops, args.device, dtypes, args.quick, args.backends, args.shapes,
                                 args.modes, args.min_time, args.rounds, compile=not args.no_compile)
    env = runner.environment(args.device, heap_kept)
    out = args.out or _results_folder(env)
    name = "-".join(args.ops or ops) + ("-quick" if args.quick else "")
    paths = runner.write(rows, copy_gbps, env, vars(args), out, name)
    print(runner.markdown(rows, copy_gbps, env))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0


def _results_folder(env) -> str:
    """bench/results/<device model>: results are kept per GPU or CPU model."""
    return "bench/results/" + re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def _host(args) -> int:
    backend = args.backends[0] if args.backends else None
    count_backend = "triton" if fastreg.backend_supports("triton", args.device) else None
    if count_backend is None:
        print("note: launches are counted on the triton backend, which cannot run here", file=sys.stderr)
    rows = host.run(args.device, backend, args.min_time, args.rounds or 5, count_backend)
    env = runner.environment(args.device)
    env["threads"] = 1 if args.device == "cpu" else env["threads"]
    out = args.out or _results_folder(env)
    os.makedirs(out, exist_ok=True)
    table = host.markdown(rows, env, backend, count_backend)
    with open(os.path.join(out, "host.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "host.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    print(table)
    print(f"wrote {out}/host.md, {out}/host.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
