"""SyncBatchNorm over torch.distributed (gloo, 2 processes on CPU) against one BatchNorm
over the concatenated global batch: outputs, input and weight gradients, running
statistics, over uneven per-rank batches and several steps."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastreg

WORLD = 2
ROWS = (3, 5)  # uneven batches per rank
STEPS = 2


def _batches(step):
    """The global batch of a step (channels-last 4-D), and its gradient."""
    generator = torch.Generator().manual_seed(100 + step)
    x = (torch.randn(sum(ROWS), 6, 4, 3, generator=generator) * 2 + 5).to(memory_format=torch.channels_last)
    return x, torch.randn(x.shape, generator=generator)


def _worker(rank, store_path, out_dir, backend, momentum):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = fastreg.nn.SyncBatchNorm.convert_sync_batchnorm(
            torch.nn.Sequential(torch.nn.BatchNorm2d(6, momentum=momentum)))
        results = []
        start = sum(ROWS[:rank])
        with fastreg.use_backend(backend):
            for step in range(STEPS):
                x, grad = _batches(step)
                x = x[start:start + ROWS[rank]].clone().requires_grad_()
                y = model(x)
                y.backward(grad[start:start + ROWS[rank]])
                bn = model[0]
                weight_grad, bias_grad = bn.weight.grad.clone(), bn.bias.grad.clone()
                dist.all_reduce(weight_grad)  # what data parallelism does with parameter gradients
                dist.all_reduce(bias_grad)
                results.append(dict(y=y.detach(), dx=x.grad, dweight=weight_grad, dbias=bias_grad,
                                    running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
                                    channels_last=y.is_contiguous(memory_format=torch.channels_last)))
                bn.weight.grad = bn.bias.grad = None
        torch.save(dict(results=results, type=type(model[0]).__name__), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batch_norm_matches_batch_norm_over_the_global_batch(tmp_path, backend, momentum):
    if not fastreg.backend_supports(backend, "cpu"):
        pytest.skip(f"backend {backend!r} cannot run CPU tensors here")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), backend, momentum), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert all(r["type"] == "SyncBatchNorm" for r in ranks)

    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(6, momentum=momentum)
    for step in range(STEPS):
        x, grad = _batches(step)
        x.requires_grad_()
        y = reference(x)
        y.backward(grad)
        got = [r["results"][step] for r in ranks]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad, atol=1e-5, rtol=1e-5)
        for g in got:
            assert g["channels_last"]
            torch.testing.assert_close(g["dweight"], reference.weight.grad, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(g["dbias"], reference.bias.grad, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(g["running_mean"], reference.running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g["running_var"], reference.running_var, atol=1e-5, rtol=1e-5)
        reference.weight.grad = reference.bias.grad = None


def test_without_a_process_group_it_is_batch_norm():
    torch.manual_seed(0)
    ours, theirs = fastreg.nn.SyncBatchNorm(4), torch.nn.BatchNorm1d(4)
    assert repr(ours) == repr(torch.nn.SyncBatchNorm(4))
    x = torch.randn(8, 4, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    converted = fastreg.nn.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), fastreg.nn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.BatchNorm1d(4))))
    assert isinstance(converted[1], fastreg.nn.SyncBatchNorm) and isinstance(converted[2][0], fastreg.nn.SyncBatchNorm)
    assert list(converted.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                            "1.running_var", "1.num_batches_tracked", "2.0.weight", "2.0.bias",
                                            "2.0.running_mean", "2.0.running_var", "2.0.num_batches_tracked"]


def _compiled_worker(rank, store_path, out_dir, ddp):
    """Conv + SyncBatchNorm compiled with fullgraph=True (a graph break raises), under DDP
    (NCCL, one GPU per rank: torch's DDP refuses SyncBatchNorm in CPU modules) or alone
    (gloo, CPU; the parameter gradients then all-reduced by hand, as DDP would)."""
    device = f"cuda:{rank}" if ddp else "cpu"
    if ddp:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if ddp else "gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = fastreg.nn.SyncBatchNorm.convert_sync_batchnorm(
            torch.nn.Sequential(torch.nn.Conv2d(6, 6, 1), torch.nn.BatchNorm2d(6))).to(device)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank]) if ddp else model
        # aot_eager: dynamo and AOTAutograd trace forward and backward (the collectives
        # included) as inductor would, without its code generation time
        compiled = torch.compile(wrapped, fullgraph=True, backend="aot_eager")
        results = []
        start = sum(ROWS[:rank])
        for step in range(STEPS):
            x, grad = _batches(step)
            x = x[start:start + ROWS[rank]].to(device).requires_grad_()
            y = compiled(x)
            y.backward(grad[start:start + ROWS[rank]].to(device))
            bn = model[1]
            weight_grad = bn.weight.grad.clone()
            if not ddp:
                dist.all_reduce(weight_grad)
                weight_grad /= WORLD  # DDP's average
            results.append({k: v.cpu() for k, v in dict(
                y=y.detach(), dx=x.grad, dweight=weight_grad, running_mean=bn.running_mean.clone(),
                running_var=bn.running_var.clone()).items()})
            model.zero_grad()
        torch.save(dict(results=results), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ddp", [False, True], ids=["gloo", "ddp-nccl"])
def test_sync_batch_norm_compiles_fullgraph(tmp_path, ddp):
    """torch.compile(fullgraph=True) over Conv + SyncBatchNorm: no graph break (torch's
    SyncBatchNorm breaks it), and the results of one BatchNorm over the global batch."""
    if ddp and not (torch.cuda.device_count() >= WORLD and dist.is_nccl_available()):
        pytest.skip(f"DDP with SyncBatchNorm needs {WORLD} GPUs and NCCL (torch's DDP refuses it in CPU modules)")
    mp.spawn(_compiled_worker, args=(str(tmp_path / "store"), str(tmp_path), ddp), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 1), torch.nn.BatchNorm2d(6))
    for step in range(STEPS):
        x, grad = _batches(step)
        x.requires_grad_()
        y = reference(x)
        y.backward(grad)
        got = [r["results"][step] for r in ranks]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad, atol=1e-5, rtol=1e-5)
        for g in got:
            torch.testing.assert_close(g["dweight"] * WORLD, reference[1].weight.grad, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(g["running_mean"], reference[1].running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g["running_var"], reference[1].running_var, atol=1e-5, rtol=1e-5)
        reference.zero_grad()
