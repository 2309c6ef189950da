"""FSDP2 over a small transformer with fastreg's modules and fastreg.optim.AdamW (max-norm rows),
saved and resumed with torch.distributed.checkpoint.

The model is written with torch.nn; `fastreg.convert` swaps its LayerNorms, RMSNorms and
Dropouts for fastreg's, `fully_shard` shards every block and the whole model over the
ranks (FSDP2: each parameter becomes a DTensor sharded by rows), and fastreg's AdamW steps
the local shards with its fused kernel (decoupled decay and the max-norm projection of
weight rows in one pass; rows are whole under FSDP2, so no communication). Halfway, model
and optimizer are saved as a distributed checkpoint (each rank writes its shards); a fresh
model and optimizer load it and training continues from there.

    torchrun --standalone --nproc-per-node 2 examples/distributed_example.py                # CPU (gloo)
    torchrun --standalone --nproc-per-node 2 examples/distributed_example.py --device cuda  # GPUs (NCCL)
"""

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import fastreg

VOCAB, SEQ, DIM = 32, 16, 64


class Block(torch.nn.Module):
    """Pre-norm: x + attention(LayerNorm(x)), then x + MLP(RMSNorm(x)), dropout on both branches."""

    def __init__(self, dim, heads=4, p=0.1):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.RMSNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyTransformer(torch.nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.position = torch.nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(DIM) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        mask = torch.triu(torch.full((SEQ, SEQ), float("-inf"), device=tokens.device), diagonal=1)
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x).flatten(0, 1))  # (batch * SEQ, VOCAB)


def build(device):
    """The model (fastreg's modules, FSDP2) and its optimizer; the same on every rank."""
    torch.manual_seed(0)
    model = fastreg.convert(TinyTransformer(), verbose=dist.get_rank() == 0).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    # decay and max-norm on weight matrices; none on norms, biases, positions
    groups = fastreg.optim.param_groups(model, weight_decay=0.1, max_norm=2.0)
    return model, fastreg.optim.AdamW(groups, lr=3e-3)


def batch(step, device, size=16):
    """Sequences that count up from a random start (mod VOCAB): each token predicts the next."""
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    tokens = (start + torch.arange(SEQ + 1)) % VOCAB
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def train(model, optimizer, steps, device):
    loss = None
    for step in steps:
        inputs, targets = batch(step, device)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets.flatten())
        loss.backward()
        optimizer.step()
    average = loss.detach().clone()
    dist.all_reduce(average)
    return average.item() / dist.get_world_size()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    temporary = args.checkpoint_dir is None
    checkpoint = tempfile.mkdtemp() if temporary and rank == 0 else args.checkpoint_dir
    shared = [checkpoint]
    dist.broadcast_object_list(shared)  # one directory for every rank
    checkpoint = os.path.join(shared[0], "step")

    model, optimizer = build(device)
    half = args.steps // 2
    loss = train(model, optimizer, range(half), device)
    if rank == 0:
        print(f"step {half}: loss {loss:.3f}; saving a distributed checkpoint to {checkpoint}")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=checkpoint)

    # a fresh model and optimizer, loaded from the checkpoint (each rank reads its shards)
    resumed, resumed_optimizer = build(device)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])

    loss = train(resumed, resumed_optimizer, range(half, args.steps), device)
    largest_row = max(p.full_tensor().reshape(p.shape[0], -1).norm(dim=1).max().item()
                      for p in resumed.parameters() if p.dim() >= 2)
    if rank == 0:
        print(f"resumed from the checkpoint; step {args.steps}: loss {loss:.3f}, "
              f"largest weight-row norm {largest_row:.3f} (max_norm 2.0)")
    dist.barrier()
    if temporary and rank == 0:
        shutil.rmtree(shared[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
