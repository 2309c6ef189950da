"""The optimizers' steps on DTensor parameters (FSDP2's `fully_shard`, tensor parallelism's
`parallelize_module`, their 2-D meshes).

Every term of a step is elementwise except max-norm, so the step runs the same kernels on
each rank's local shard (`to_local()`; states, masters and grads are DTensors laid out as
their param, and their local shards line up element for element). max-norm needs the norm
of whole rows (dim 0): where a placement shards a dim >= 1 (`Shard(1)`, as RowwiseParallel
shards a Linear's weight) a row is split across the ranks of that mesh dimension, and the
kernels cannot see it whole. Such tensors take the step without the projection; then the
squared norms of their local row pieces are summed over those mesh dimensions
(all_reduce) and every rank rescales its pieces by the whole row's norm. Where rows are
whole (`Shard(0)`, FSDP2, `Replicate`) the kernels project them locally, with no
communication, as on one process. Nothing gathers a full parameter.
"""

import sys

import torch


def dtensor_type():
    """torch's DTensor class, or None when torch.distributed.tensor was never imported (then
    no DTensor exists, and the step checks nothing per param)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def row_splitting_mesh_dims(param) -> tuple:
    """The mesh dimensions over which the rows (dim 0) of a DTensor of >= 2 dims are split:
    those whose placement shards a dim >= 1 (`_StridedShard` included)."""
    if param.dim() < 2:
        return ()
    dims = []
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise NotImplementedError(f"fastreg.optim: a parameter with a Partial placement ({param.placements}) "
                                      "has no local value to update")
        if placement.is_shard() and placement.dim >= 1:
            dims.append(mesh_dim)
    return tuple(dims)


def local_grad(param, grad):
    """The local shard of `grad` laid out as `param` (a Partial or otherwise placed gradient,
    as tensor parallelism leaves on replicated norm weights, is redistributed first, which is
    what torch.optim's ops on DTensors do implicitly)."""
    if grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


class SplitRows:
    """The tensors of one step whose rows are split across ranks, projected after the
    kernels ran without projection (see the module docstring)."""

    def __init__(self):
        self.entries = []  # (value: local tensor updated, param: local tensor to round into or None, mesh, dims)

    def add(self, value, param, mesh, mesh_dims):
        self.entries.append((value, param, mesh, mesh_dims))

    def project(self, max_norm: float, found_inf) -> None:
        """Rows rescaled to norm max_norm where their whole norm is above it. One all_reduce
        per (mesh, mesh dimension) for all tensors of the step that share it; found_inf != 0
        (a skipped step) scales by 1, read on the device."""
        by_split = {}
        for entry in self.entries:
            by_split.setdefault((id(entry[2]), entry[3]), []).append(entry)
        for entries in by_split.values():
            mesh, mesh_dims = entries[0][2], entries[0][3]
            by_acc = {}
            for entry in entries:
                value = entry[0]
                acc = torch.float64 if value.dtype == torch.float64 else torch.float32
                by_acc.setdefault(acc, []).append(entry)
            for acc, group in by_acc.items():
                # squared norms of the local row pieces, in the kernels' accumulate dtype
                sums = [e[0].to(acc).reshape(e[0].shape[0], -1).square().sum(dim=1) for e in group]
                total = torch.cat(sums) if len(sums) > 1 else sums[0]
                for mesh_dim in mesh_dims:
                    torch.distributed.all_reduce(total, group=mesh.get_group(mesh_dim))
                norms = total.sqrt()
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                if found_inf is not None:
                    scale = torch.where(found_inf.to(scale.device) != 0, torch.ones_like(scale), scale)
                offset = 0
                for value, param, _, _ in group:
                    rows = value.shape[0]
                    row_scale = scale[offset:offset + rows].reshape((rows,) + (1,) * (value.dim() - 1))
                    offset += rows
                    if value.dtype == acc:
                        value.mul_(row_scale)
                    else:  # low-precision value without master: rescaled, rounded again
                        value.copy_(value.to(acc) * row_scale)
                    if param is not None:
                        param.copy_(value)  # the master, rounded into the param
