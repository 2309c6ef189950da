"""Hypothesis strategies for the generated cases: shapes, dtypes, memory layouts, and
tensors built in a drawn layout; and the comparison against torch (the relative rule).

A case is a plain dict of what was drawn (shapes, dtypes, layout names, a seed for the
values), so a falsifying example prints as something one can paste into a script.
"""

import math

import torch
from hypothesis import settings
from hypothesis import strategies as st

from tests.conftest import interpreted

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Per dtype, the tolerance of the relative rule, relative to 1 + max |reference|:
# fastreg's error against a float64 reference of the same rounded inputs may be at most
# twice torch's own error (torch in the input dtype) plus this. About 2 ulps of the
# dtype, 4 for bfloat16 (the Triton interpreter rounds float32 -> bfloat16 toward zero).
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 3.2e-2}

# Layouts of a tensor of a given logical shape, all holding the same values:
#   contiguous     row-major
#   channels_last  channels_last (4-D) / channels_last_3d (5-D)
#   transposed     column-major (every dim reversed): dense, not contiguous
#   sliced         every dim taken with step 2 from a larger tensor: not dense
#   expanded       one dim of size 1 expanded (stride 0): values repeat along it
#   offset         a view starting 3 elements into its storage
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded", "offset")


def layouts_for(rank: int) -> tuple[str, ...]:
    names = ["contiguous", "offset"]
    if rank >= 1:
        names += ["sliced", "expanded"]
    if rank >= 2:
        names.append("transposed")
    if rank in (4, 5):
        names.append("channels_last")
    return tuple(names)


def layouts(rank: int):
    return st.sampled_from(layouts_for(rank))


def seeds():
    return st.integers(0, 2**31 - 1)


def examples(backend: str, cost: int = 1) -> int:
    """Examples per test for `backend` under the loaded profile: the interpreted triton
    backend (0.1 to 0.5 s per kernel launch) gets a third, and `cost` (launches per example
    beyond the usual few) divides further."""
    n = settings.default.max_examples
    if interpreted(backend):
        n = max(3, n // 3)
    return max(2, n // cost)


def make(shape, dtype, layout, seed, device="cpu", mean=0.0, scale=1.0, low=None, high=None):
    """A tensor of `shape` and `dtype` in `layout` (see LAYOUTS), its values drawn from
    `seed`: normal(mean, scale), or uniform(low, high) when both are given."""
    shape = tuple(shape)
    generator = torch.Generator().manual_seed(seed)
    rank = len(shape)
    expand_dim = seed % rank if layout == "expanded" and rank > 0 else None
    value_shape = tuple(1 if d == expand_dim else size for d, size in enumerate(shape))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    if low is not None:
        values = torch.rand(value_shape, generator=generator, dtype=wide) * (high - low) + low
    else:
        values = torch.randn(value_shape, generator=generator, dtype=wide) * scale + mean
    values = values.to(device=device, dtype=dtype)
    if layout == "contiguous":
        return values
    if layout == "expanded":
        return values.expand(shape)
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    if layout == "transposed":
        reverse = tuple(reversed(range(rank)))
        return values.permute(reverse).contiguous().permute(reverse)
    if layout == "sliced":
        big = torch.zeros(tuple(2 * size for size in shape), dtype=dtype, device=device)
        view = big[tuple(slice(None, None, 2) for _ in shape)]
        return view.copy_(values)
    if layout == "offset":
        storage = torch.zeros(math.prod(shape) + 3, dtype=dtype, device=device)
        return storage[3:].view(shape).copy_(values)
    raise ValueError(f"unknown layout {layout!r}")


def as_reference(t):
    """float64 copy of t (None stays None), a leaf that requires grad where t is floating."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def max_error(a, b) -> float:
    """max |a - b| over the elements (0 for empty tensors); NaN where the NaN patterns differ."""
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    if not torch.equal(a.isnan(), b.isnan()):
        return math.nan
    both = ~(a.isnan() | b.isnan())
    same_inf = torch.isinf(a) & (a == b)
    diff = torch.where(both & ~same_inf, (a - b).abs(), torch.zeros_like(a))
    return diff.max().item()


def assert_relative_rule(ours, torch_own, reference, dtype, what, factor=1.0):
    """|ours - reference| <= 2 |torch_own - reference| + TOL[dtype] * factor * (1 + max |reference|),
    ours with torch_own's shape and dtype, and NaN exactly where the reference has NaN."""
    assert ours.shape == torch_own.shape, f"{what}: shape {tuple(ours.shape)}, torch {tuple(torch_own.shape)}"
    assert ours.dtype == torch_own.dtype, f"{what}: dtype {ours.dtype}, torch {torch_own.dtype}"
    if ours.numel() == 0:
        return
    finite = reference.detach()[reference.detach().isfinite()]
    scale = 1.0 + (finite.double().abs().max().item() if finite.numel() else 0.0)
    ours_error, torch_error = max_error(ours, reference), max_error(torch_own, reference)
    if math.isnan(torch_error):  # torch's own low-precision result is not a yardstick here
        torch_error = 0.0
    bound = 2 * torch_error + TOL[dtype] * factor * scale
    assert ours_error <= bound, f"{what}: max error {ours_error:.3g} > {bound:.3g} (torch's own {torch_error:.3g})"


def grads(output, inputs, grad_output):
    """d(output)/d(inputs) for the inputs that require grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(output, wanted, grad_output, allow_unused=True)) if wanted else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]
