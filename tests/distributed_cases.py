"""What tests/test_distributed.py runs on every rank of a process group (tests/distributed.py).

Each case trains a copy of a small model on the ranks (FSDP2, tensor parallelism, both on a
2-D mesh, or DDP) and, on each rank alone, the same model on one process over the whole
batch; it returns numbers (errors, counts) for the test to judge, so a failing check never
leaves the other ranks waiting in a collective.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fastreg
from tests.distributed import device_of_rank

BATCH = 8


def _mlp(dtype=torch.float32, device="cpu"):
    """Linear(16, 32) -> LayerNorm -> ReLU -> Linear(32, 7) -> ReLU -> Linear(7, 1): under FSDP2
    on 2 ranks, 7 rows split 4 + 3 and 1 row 1 + 0 (uneven shards, an empty one)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 7), torch.nn.ReLU(),
        torch.nn.Linear(7, 1),
    ).to(device, dtype)


def _tp_mlp(dtype=torch.float32, device="cpu"):
    """Linear(16, 32) -> ReLU -> Linear(32, 8): ColwiseParallel then RowwiseParallel shard the
    first weight by rows (Shard(0)) and the second by columns (Shard(1), rows split across
    ranks); the second bias stays replicated."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(device, dtype)


def _batches(steps, device, dtype):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 16, generator=generator).to(device, dtype) for _ in range(steps)]


def _make_optimizer(name, params, kwargs):
    module, cls = name.split(".")
    return getattr({"fastreg": fastreg.optim, "torch": torch.optim}[module], cls)(params, **kwargs)


def _train(model, optimizer, batches):
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _relative_errors(model, reference):
    """{name: max |a - b| / max |b|} over the parameters (gathered whole: a collective)."""
    errors = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        full = _full(p).double().cpu()
        expected = _full(q).double().cpu()
        errors[name] = ((full - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    return errors


def _rows_at_bound(model, max_norm):
    """How many rows of >= 2-D params have a norm within 1e-5 of max_norm (projected rows)."""
    count = 0
    for p in model.parameters():
        if p.dim() >= 2:
            norms = p.detach().float().reshape(p.shape[0], -1).norm(dim=1)
            count += int(((norms - max_norm).abs() <= 1e-5 * max_norm).sum())
    return count


def _shard(layout, model, backend):
    """The model laid out over the ranks; the batch share of this rank (start, stop)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    device_type = "cuda" if backend == "nccl" else "cpu"
    if layout == "fsdp":
        for layer in model:
            if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
                fully_shard(layer)
        fully_shard(model)
        share = BATCH // world
        return share * rank, share * (rank + 1)
    if layout == "tp":
        mesh = init_device_mesh(device_type, (world,))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return 0, BATCH
    if layout == "fsdp_tp":  # 2-D: data parallel over mesh dim 0, tensor parallel over dim 1
        mesh = init_device_mesh(device_type, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp_rank, share = mesh["dp"].get_local_rank(), BATCH // (world // 2)
        return share * dp_rank, share * (dp_rank + 1)
    if layout == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), (BATCH // world * rank, BATCH // world * (rank + 1))
    raise ValueError(layout)


def optimizer_matches_one_process(backend, layout, optimizer, kwargs, steps=3, dtype="float32"):
    """The optimizer over the sharded model, against the same optimizer on one process over
    the whole batch. Returns (relative errors per param, projected rows of the one-process
    model, placements seen, master/param mismatches)."""
    dtype = getattr(torch, dtype)
    device = device_of_rank(backend)
    build = _tp_mlp if layout in ("tp", "fsdp_tp") else _mlp
    reference, model = build(dtype, device), build(dtype, device)
    batches = _batches(steps, device, dtype)
    reference_opt = _make_optimizer(optimizer, reference.parameters(), kwargs)
    _train(reference, reference_opt, batches)

    sharded = _shard(layout, model, backend)
    if layout == "ddp":
        model, (start, stop) = sharded
    else:
        start, stop = sharded
    opt = _make_optimizer(optimizer, model.parameters(), kwargs)
    _train(model, opt, [x[start:stop] for x in batches])
    module = model.module if layout == "ddp" else model
    placements = sorted({str(p.placements) for p in module.parameters() if isinstance(p, DTensor)})
    mismatches = 0
    for p in module.parameters():  # masters rounded into their params
        master = opt.state[p].get("master_param")
        if master is not None:
            mismatches += int(not torch.equal(_full(master).to(p.dtype), _full(p)))
    max_norm = kwargs.get("max_norm")
    projected = _rows_at_bound(reference, max_norm) if max_norm else 0
    if kwargs.get("master_weights"):  # the float32 masters are the values compared
        errors = _relative_errors(_Masters(module, opt), _Masters(reference, reference_opt))
    else:
        errors = _relative_errors(module, reference)
    return errors, projected, placements, mismatches


class _Masters(torch.nn.Module):
    """The float32 masters of a model's params, in their order, as a module's params."""

    def __init__(self, model, opt):
        super().__init__()
        self.values = [(name, opt.state[p]["master_param"]) for name, p in model.named_parameters()]

    def named_parameters(self, *args, **kwargs):
        return iter(self.values)

    def parameters(self, *args, **kwargs):
        return (value for _, value in self.values)


def all_reduces_per_step(backend, layout, kwargs):
    """How many torch.distributed.all_reduce calls one fastreg.optim.AdamW step makes."""
    device = device_of_rank(backend)
    model = (_tp_mlp if layout == "tp" else _mlp)(device=device)
    start, stop = _shard(layout, model, backend)
    opt = fastreg.optim.AdamW(model.parameters(), **kwargs)
    model(_batches(1, device, torch.float32)[0][start:stop]).pow(2).mean().backward()
    calls = []
    original = dist.all_reduce

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    dist.all_reduce = counting
    try:
        opt.step()
    finally:
        dist.all_reduce = original
    return len(calls)


# ---------------------------------------------------------------- checkpoints


def checkpoint_round_trip(backend, first, second, first_kwargs, second_kwargs, path, steps=2):
    """`first` trains an FSDP2 model, saves model and optimizer with torch.distributed.checkpoint;
    a fresh model with `second` loads both; both continue over the same batches. Returns the
    relative errors between them, and whether the loaded state equals the saved one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    device = device_of_rank(backend)
    batches = _batches(2 * steps, device, torch.float32)
    models, optimizers = [], []
    for name, kwargs in ((first, first_kwargs), (second, second_kwargs)):
        model = _mlp(device=device)
        start, stop = _shard("fsdp", model, backend)
        models.append(model)
        optimizers.append(_make_optimizer(name, model.parameters(), kwargs))
    batches = [x[start:stop] for x in batches]
    _train(models[0], optimizers[0], batches[:steps])
    dcp.save({"model": get_model_state_dict(models[0]), "optim": get_optimizer_state_dict(models[0], optimizers[0])},
             checkpoint_id=path)

    state = {"model": get_model_state_dict(models[1]), "optim": get_optimizer_state_dict(models[1], optimizers[1])}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(models[1], state["model"])
    set_optimizer_state_dict(models[1], optimizers[1], state["optim"])
    saved = get_optimizer_state_dict(models[0], optimizers[0])
    loaded = get_optimizer_state_dict(models[1], optimizers[1])
    same_state = all(
        torch.equal(_full(value).float().cpu(), _full(loaded["state"][key][entry]).float().cpu())
        for key, entries in saved["state"].items() for entry, value in entries.items())

    for model, opt in zip(models, optimizers):
        _train(model, opt, batches[steps:])
    return _relative_errors(models[1], models[0]), same_state


# ---------------------------------------------------------------- modules


def _block(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Dropout(0.0),
        torch.nn.Linear(32, 16), torch.nn.RMSNorm(16), torch.nn.Linear(16, 4),
    ).to(device, dtype)


def modules_match_one_process(backend, layout, steps=3):
    """fastreg's modules (fastreg.convert) under FSDP2 or DDP, against torch's modules on one
    process over the whole batch, both stepped by torch.optim.AdamW. Returns (relative
    errors, the fastreg classes the model ran with, the (input, weight) types the norms
    received in forward)."""
    device = device_of_rank(backend)
    reference, model = _block(device=device), _block(device=device)
    fastreg.convert(model, verbose=False)
    classes = sorted({type(m).__module__ + "." + type(m).__name__ for m in model if "fastreg" in type(m).__module__})
    arrived = set()  # what the norms see in forward: FSDP2 all-gathers their params first
    for norm in (model[1], model[5]):
        norm.register_forward_pre_hook(
            lambda module, args: arrived.add((type(args[0]).__name__, type(module.weight).__name__)))
    batches = _batches(steps, device, torch.float32)
    _train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), batches)
    if layout == "fsdp":
        for layer in model:
            if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.RMSNorm)):
                fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    share, rank = BATCH // dist.get_world_size(), dist.get_rank()
    _train(wrapped, torch.optim.AdamW(model.parameters(), lr=1e-2),
           [x[share * rank:share * (rank + 1)] for x in batches])
    return _relative_errors(model, reference), classes, sorted(arrived)


__all__ = ["all_reduces_per_step", "checkpoint_round_trip", "modules_match_one_process",
           "optimizer_matches_one_process"]
