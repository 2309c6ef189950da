"""fastreg.convert on two ordinary models, then a few training steps under torch.compile.

A small CNN (Conv, BatchNorm2d, GroupNorm, Dropout2d) and a pre-norm transformer block
(LayerNorm, RMSNorm, Dropout) are written with torch.nn only; `fastreg.convert` swaps
their normalization and dropout modules for fastreg's in place, `torch.compile` traces
them (fastreg's ops have fake kernels and registered autograd: no graph breaks), and the
loss goes down.

    python examples/convert_example.py [--steps 30] [--compile-backend inductor]
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import fastreg


class SmallCNN(torch.nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(),
            torch.nn.Dropout2d(0.1),
        )
        # pooled to 2x2, not 1x1: the quadrant must survive the pooling
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 32, classes))

    def forward(self, x):
        return self.head(self.features(x))


class TransformerBlock(torch.nn.Module):
    """Pre-norm: x + attention(LayerNorm(x)), then x + MLP(RMSNorm(x)), dropout on both branches."""

    def __init__(self, dim=32, heads=4, p=0.1):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.RMSNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.drop1, self.drop2 = torch.nn.Dropout(p), torch.nn.Dropout(p)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attention = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.drop1(self.proj(attention.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.drop2(self.mlp(self.norm2(x)))


def cnn_task(generator, device):
    """Which quadrant of a 16x16 image holds a bright square."""
    labels = torch.randint(0, 4, (64,), generator=generator)
    images = torch.randn(64, 3, 16, 16, generator=generator) * 0.3
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * 8 + 2:row * 8 + 6, col * 8 + 2:col * 8 + 6] += 2.0
    return images.to(device), labels.to(device)


def transformer_task(generator, device):
    """Predict each token's running mean over the sequence (a task attention can solve)."""
    x = torch.randn(16, 12, 32, generator=generator)
    target = x.cumsum(1) / torch.arange(1, 13).view(1, 12, 1)
    return x.to(device), target.to(device)


def train(name, model, loss_fn, data, steps, compile_backend):
    fastreg.convert(model)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_fn(compiled(data[0]), data[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} compiled steps")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    results = {
        "cnn": train("small CNN", SmallCNN().to(device), F.cross_entropy, cnn_task(generator, device), args.steps,
                     args.compile_backend),
        "transformer": train("transformer block", TransformerBlock().to(device), F.mse_loss,
                             transformer_task(generator, device), args.steps, args.compile_backend),
    }
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
