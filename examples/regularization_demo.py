"""The classic regularization comparison, on fastreg's modules and optimizers.

A small MLP learns a circle in [-2, 2]^2 from few, noisy labels, once per regularizer:
none, L2 added to the gradient (Adam), decoupled L2 (AdamW), L1 (proximal, exact zeros),
the elastic net (both), max-norm rows, dropout, BatchNorm, and early stopping on the
validation split. It prints a table (accuracy and loss on train and validation, weight
sparsity, the largest row norm, epochs run, time), writes a PNG of the validation loss
curves, then runs `python -m fastreg.bench --quick --min-time 0.2` on the device at hand.

    python examples/regularization_demo.py [--quick] [--no-bench] [--out DIR]
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch

import fastreg

HIDDEN = 64
LR = 3e-3
BATCH = 64


@dataclass
class Config:
    name: str
    optimizer: str = "Adam"  # "Adam" (weight_decay = L2 on the gradient) or "AdamW" (decoupled)
    weight_decay: float = 0.0
    l1: float = 0.0
    max_norm: float | None = None
    dropout: float = 0.0
    batch_norm: bool = False
    patience: int | None = None  # early stopping: epochs without a better validation loss


CONFIGS = [
    Config("none"),
    Config("L2 (Adam, coupled)", weight_decay=1e-2),
    Config("L2 (AdamW, decoupled)", optimizer="AdamW", weight_decay=0.5),
    Config("L1 (proximal)", l1=0.2),
    Config("elastic net", weight_decay=5e-3, l1=2e-2),
    Config("max-norm (r=0.5)", max_norm=0.5),
    Config("dropout (p=0.3)", dropout=0.3),
    Config("BatchNorm", batch_norm=True),
    Config("early stopping", patience=10),
]


@dataclass
class Result:
    config: Config
    train_acc: float
    val_acc: float
    train_loss: float
    val_loss: float
    sparsity: float  # share of weights exactly zero
    max_row_norm: float  # over the rows of the weight matrices
    epochs: int
    seconds: float
    val_curve: list[float] = field(default_factory=list)


def make_data(n_train=256, n_val=2048, noise=0.1, seed=0):
    """Points uniform in [-2, 2]^2, label 1 inside the circle of radius 1.2; a share
    `noise` of the training labels flipped, so an unregularized net overfits."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_val, 2, generator=generator) * 4 - 2
    y = (x.norm(dim=1) < 1.2).long()
    flip = torch.rand(n_train, generator=generator) < noise
    y[:n_train] = torch.where(flip, 1 - y[:n_train], y[:n_train])
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def make_model(config: Config) -> torch.nn.Sequential:
    layers = []
    for fan_in in (2, HIDDEN, HIDDEN):
        layers.append(torch.nn.Linear(fan_in, HIDDEN))
        if config.batch_norm:
            layers.append(fastreg.nn.BatchNorm1d(HIDDEN))
        layers.append(torch.nn.ReLU())
        if config.dropout:
            layers.append(fastreg.nn.Dropout(config.dropout))
    layers.append(torch.nn.Linear(HIDDEN, 2))
    return torch.nn.Sequential(*layers)


def make_optimizer(model, config: Config):
    # biases and BatchNorm parameters get no decay, no L1 and no max-norm
    groups = fastreg.optim.param_groups(model, weight_decay=config.weight_decay, l1=config.l1,
                                        max_norm=config.max_norm)
    optimizer_cls = fastreg.optim.AdamW if config.optimizer == "AdamW" else fastreg.optim.Adam
    return optimizer_cls(groups, lr=LR)


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def weight_stats(model):
    weights = [m.weight.detach() for m in model if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return zeros / total, max(float(w.norm(dim=1).max()) for w in weights)


def train(config: Config, data, epochs: int, device: str, progress=None) -> Result:
    (x_train, y_train), (x_val, y_val) = ((t.to(device) for t in pair) for pair in data)
    torch.manual_seed(0)
    model = make_model(config).to(device)
    optimizer = make_optimizer(model, config)
    best_loss, best_state, since_best = float("inf"), None, 0
    curve = []
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train), device=device)
        for first in range(0, len(order), BATCH):
            batch = order[first:first + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_loss, _ = evaluate(model, x_val, y_val)
        curve.append(val_loss)
        if progress is not None:
            progress(config, epoch, epochs, val_loss)
        if config.patience is not None:
            if val_loss < best_loss:
                best_loss, since_best = val_loss, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
                if since_best >= config.patience:
                    break
    if best_state is not None:  # early stopping keeps the best epoch's weights
        model.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    train_loss, train_acc = evaluate(model, x_train, y_train)
    val_loss, val_acc = evaluate(model, x_val, y_val)
    sparsity, max_row_norm = weight_stats(model)
    return Result(config, train_acc, val_acc, train_loss, val_loss, sparsity, max_row_norm, epoch, seconds, curve)


def table(results: list[Result]) -> str:
    lines = ["| regularization | train acc | val acc | train loss | val loss | zero weights | max row norm | epochs "
             "| time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.config.name} | {r.train_acc:.3f} | {r.val_acc:.3f} | {r.train_loss:.3f} | "
                     f"{r.val_loss:.3f} | {r.sparsity:.1%} | {r.max_row_norm:.2f} | {r.epochs} | {r.seconds:.1f} |")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for r in results:
        axes.plot(range(1, len(r.val_curve) + 1), r.val_curve, label=r.config.name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation cross-entropy")
    axes.set_title("fastreg: regularizers on a noisy circle (MLP 2-64-64-64-2)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _print_progress(config, epoch, epochs, val_loss):
    end = "\n" if epoch == epochs else ""
    print(f"\r  {config.name:24s} epoch {epoch:3d}/{epochs}  val loss {val_loss:.3f}", end=end, flush=True)


def run(epochs: int = 80, device: str | None = None, out: str = ".", progress=_print_progress) -> list[Result]:
    """Train every configuration; print the table and write the PNG into `out`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = make_data()
    print(f"device: {device}; fastreg backends here: {fastreg.available_backends()}")
    results = []
    threads = torch.get_num_threads()
    # a tiny model: its ops are too small to split, and one thread does not wait at a
    # barrier for a sibling the OS has descheduled (which made runs on a busy machine 20x slower)
    torch.set_num_threads(1)
    try:
        for config in CONFIGS:
            result = train(config, data, epochs, device, progress)
            if progress is not None and result.epochs < epochs:
                print(f"  (stopped early at epoch {result.epochs})")
            results.append(result)
    finally:
        torch.set_num_threads(threads)
    print(table(results))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "regularization_demo.png")
    plot(results, path)
    print(f"wrote {path}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs (a smoke test)")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    parser.add_argument("--out", default="examples/output", help="folder for the PNG")
    args = parser.parse_args(argv)
    run(epochs=5 if args.quick else 80, out=args.out)
    if not args.no_bench:
        from fastreg.bench.__main__ import main as bench

        print("\npython -m fastreg.bench --quick --min-time 0.2", flush=True)
        return bench(["--quick", "--min-time", "0.2", "--out", os.path.join(args.out, "bench")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
