"""fastreg in one minute: swap nn.Dropout for fastreg.nn.Dropout and train as usual.

Trains the same small MLP twice on a synthetic task, once with torch's Dropout and
once with fastreg's, and shows that both learn and that fastreg's backward needs no
stored mask.
"""

import time

import torch

import fastreg


def make_mlp(dropout_cls, p=0.2):
    return torch.nn.Sequential(
        torch.nn.Linear(2, 128), torch.nn.ReLU(), dropout_cls(p),
        torch.nn.Linear(128, 128), torch.nn.ReLU(), dropout_cls(p),
        torch.nn.Linear(128, 2),
    )


def train(model, x, y, steps=300):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return loss.item(), accuracy, time.perf_counter() - start


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; fastreg backends here: {fastreg.available_backends()}")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4096, 2, generator=generator) * 4 - 2  # points in [-2, 2]^2
    y = (x.norm(dim=1) < 1.2).long()  # inside or outside a circle
    x, y = x.to(device), y.to(device)
    for label, dropout_cls in (("torch.nn.Dropout", torch.nn.Dropout), ("fastreg.nn.Dropout", fastreg.nn.Dropout)):
        torch.manual_seed(0)
        model = make_mlp(dropout_cls).to(device)
        loss, accuracy, seconds = train(model, x, y)
        print(f"{label:20s} final loss {loss:.3f}  train accuracy {accuracy:.3f}  {seconds:.2f} s")


if __name__ == "__main__":
    main()
