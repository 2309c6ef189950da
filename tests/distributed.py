"""Processes joined in a torch.distributed process group, started once and given work.

Starting a process that imports torch costs seconds; a collective test that spawned its
own group per case would spend most of its time there. `ProcessGroup(world_size,
backend)` starts the ranks once (a fixture keeps it for a test module) and `run(fn, ...)`
calls the module-level function `fn(...)` on every rank at once, returning the ranks'
results in rank order. A rank that raises fails the call with its traceback; a call that
does not finish within `timeout` seconds (a rank stuck in a collective) kills the group,
and the next call starts a new one.
"""

import importlib
import multiprocessing
import queue
import socket
import traceback
from datetime import timedelta


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, backend, port, tasks, results, timeout):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            module, name, args, kwargs = task
            try:
                value = getattr(importlib.import_module(module), name)(*args, **kwargs)
                results.put((rank, True, value))
            except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class ProcessGroup:
    def __init__(self, world_size: int, backend: str, timeout: float = 120.0):
        self.world_size, self.backend, self.timeout = world_size, backend, timeout
        self._processes = None

    def _start(self):
        context = multiprocessing.get_context("spawn")
        port = _free_port()
        self._tasks = [context.Queue() for _ in range(self.world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, self.world_size, self.backend, port, self._tasks[rank], self._results,
                                  self.timeout))
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, fn, *args, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; the ranks' return values (picklable), in rank order."""
        if self._processes is None:
            self._start()
        for tasks in self._tasks:
            tasks.put((fn.__module__, fn.__name__, args, kwargs))
        values, failures = [None] * self.world_size, {}
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                self.close(kill=True)
                raise TimeoutError(f"{fn.__name__}: no result from every rank within {self.timeout} s; the "
                                   f"process group was stopped") from None
            if ok:
                values[rank] = value
            else:
                failures[rank] = value
        if failures:
            raise AssertionError("\n".join(f"rank {rank} failed:\n{text}" for rank, text in sorted(failures.items())))
        return values

    def close(self, kill=False):
        if self._processes is None:
            return
        if not kill:
            for tasks in self._tasks:
                tasks.put(None)
        for process in self._processes:
            process.join(timeout=0 if kill else 30)
            if process.is_alive():
                process.kill()
                process.join()
        self._processes = None


def can_run(backend: str, world_size: int):
    """None if `world_size` ranks can run on `backend` here, else why not."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return "this build of torch has no NCCL"
        if torch.cuda.device_count() < world_size:
            return f"NCCL runs one rank per GPU: needs {world_size} GPUs, found {torch.cuda.device_count()}"
    if backend == "gloo" and not dist.is_gloo_available():
        return "this build of torch has no gloo"
    return None


def device_of_rank(backend: str) -> str:
    """The device a rank of `backend` computes on."""
    import torch.distributed as dist

    return f"cuda:{dist.get_rank()}" if backend == "nccl" else "cpu"


__all__ = ["ProcessGroup", "can_run", "device_of_rank"]
