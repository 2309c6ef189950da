"""Tensors past 2**31 elements on the C++ CPU kernels, one test per op family.

Offsets past 2**31 overflow 32-bit indexing: a kernel that computed one in 32 bits would
read or write the wrong elements (or crash). Each input is bfloat16 (4 GiB) and built so
that reading the wrong element shows: its content repeats with a period (rows, samples or
elements) that 2**31 is not a multiple of. Outputs are checked where their offsets are past
2**31 (and at the start), against torch on those rows / samples, or against closed forms
for BatchNorm's whole-batch statistics. Backward runs the backward ops with dy = x, so no
third 4 GiB tensor is live: about 8 GiB peak per test.

Marked `large` (several GiB and tens of seconds each): run with `pytest -m large`.
"""

import math

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg import _reference, _rng
from fastreg import functional as F
from tests.conftest import skip_unless_runs

pytestmark = pytest.mark.large

DTYPE = torch.bfloat16
TWO31 = 2**31
# bfloat16 outputs against a float32 / float64 reference: a few bfloat16 ulps
TOL = dict(atol=3e-2, rtol=2e-2)


@pytest.fixture
def cpu_backend():
    skip_unless_runs("cpu")
    with fastreg.use_backend("cpu"):
        yield


def _periodic(shape, period, generator, dtype=DTYPE):
    """A tensor of `shape` whose dim-0 slices repeat with `period` (random values)."""
    out = torch.empty(shape, dtype=dtype)
    bases = torch.randn((period,) + tuple(shape[1:]), generator=generator).to(dtype)
    whole = shape[0] - shape[0] % period
    if whole:
        out[:whole].view((whole // period, period) + tuple(shape[1:])).copy_(bases)
    out[whole:].copy_(bases[: shape[0] - whole])
    return out


def test_dropout_past_2_31(cpu_backend):
    """In-place dropout (one draw per element) and dropout2d (one per channel) over
    2**31 + 2000 elements: the tail's mask is the Philox stream's at those positions."""
    generator = torch.Generator().manual_seed(0)
    x = _periodic((TWO31 // 1000 + 3, 1000), 7, generator).view(-1)
    assert x.numel() > TWO31
    tail_start = x.numel() - 4096
    head, tail = x[:4096].clone(), x[tail_start:].clone()
    with torch.no_grad():
        torch.manual_seed(1)
        F.dropout(x, 0.3, training=True, inplace=True)
    torch.manual_seed(1)
    seed = _rng.new_seed(x.device)
    torch.testing.assert_close(x[tail_start:], _reference.dropout(tail, seed, 0.3, offset=tail_start), atol=0, rtol=0)
    torch.testing.assert_close(x[:4096], _reference.dropout(head, seed, 0.3), atol=0, rtol=0)

    channels = x.view(1, -1, 8, 125)  # one draw per 1000 elements
    tail_channels = channels[0, -5:].clone()
    with torch.no_grad():
        torch.manual_seed(2)
        F.dropout2d(channels, 0.5, training=True, inplace=True)
    torch.manual_seed(2)
    seed = _rng.new_seed(x.device)
    first_channel = channels.shape[1] - 5
    expected = _reference.dropout(tail_channels, seed, 0.5, offset=first_channel, inner=1000)
    torch.testing.assert_close(channels[0, -5:], expected, atol=0, rtol=0)


def test_layer_norm_past_2_31(cpu_backend):
    """norm_fwd / norm_bwd over (2**19 + 1, 4096) rows: rows past 2**31 elements match
    torch's LayerNorm of those rows, dx too (dy = x)."""
    generator = torch.Generator().manual_seed(0)
    rows, n = TWO31 // 4096 + 1, 4096
    x = _periodic((rows, n), 7, generator)
    weight, bias = torch.rand(n, generator=generator) + 0.5, torch.randn(n, generator=generator)
    y, _, mean, rstd = torch.ops.fastreg.norm_fwd(x, weight, bias, 1e-5, False)
    check = [0, 1, rows - 3, rows - 2, rows - 1]
    torch.testing.assert_close(y[check], torch_F.layer_norm(x[check].float(), (n,), weight, bias).to(DTYPE), **TOL)
    del y
    dx, dweight, dbias, _ = torch.ops.fastreg.norm_bwd(x, x, weight, mean, rstd, False, True)
    rows_x = x[check].float().requires_grad_()
    expected = torch.autograd.grad(torch_F.layer_norm(rows_x, (n,), weight, bias), rows_x, x[check].float())[0]
    torch.testing.assert_close(dx[check].float(), expected, **TOL)
    assert dweight.isfinite().all() and dbias.isfinite().all()


def test_batch_norm_past_2_31(cpu_backend):
    """BatchNorm over (1025, 2, 1024, 1024): the last sample sits past 2**31 elements and
    carries the only values that differ from a per-channel constant a[c], as a[c] +- d
    pairs (bfloat16-exact), so the batch mean is a[c] exactly and the statistics, the
    running statistics, y and dx (dy = x) have closed forms."""
    generator = torch.Generator().manual_seed(0)
    n, c, h, w = 1025, 2, 1024, 1024
    s = h * w
    constant = torch.tensor([0.5, -1.25], dtype=torch.float64)
    half = torch.randint(-15, 16, (c, s // 2), generator=generator).double() / 64
    offsets = torch.cat([half, -half], 1)[:, torch.randperm(s, generator=generator)]  # sums to 0 per channel
    x = torch.empty(n, c, h, w, dtype=DTYPE)
    x[:-1].copy_(constant.to(DTYPE)[None, :, None, None].expand(n - 1, c, h, w))
    x[-1].copy_((constant[:, None] + offsets).view(c, h, w).to(DTYPE))
    assert x.numel() > TWO31 and torch.equal(x[-1].double().view(c, s), constant[:, None] + offsets)
    count = n * s
    mean, var = constant, (offsets**2).sum(1) / count
    weight, bias = torch.tensor([1.5, 0.75]), torch.tensor([0.25, -0.5])
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    eps = 1e-5
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, eps)
    rstd = (var + eps).rsqrt()
    scale = rstd * weight.double()

    def bf16(t):
        return t.to(DTYPE).double()

    torch.testing.assert_close(y[-1].view(c, s).double(), bf16(offsets * scale[:, None] + bias.double()[:, None]),
                               **TOL)
    torch.testing.assert_close(y[0, :, 0, 0].double(), bf16(bias.double()), **TOL)
    torch.testing.assert_close(running_mean.double(), 0.1 * mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(running_var.double(), 0.9 + 0.1 * var * count / (count - 1), atol=1e-6, rtol=1e-5)
    del y
    x3 = x.view(n, c, s)
    sum_dy, sum_dy_xhat = torch.ops.fastreg.bn_bwd_reduce(x3, x3, mean.float(), var.float(), eps)
    # sum dy = count * a; sum dy * xhat = rstd * sum (a + d) d = rstd * count * var
    torch.testing.assert_close(sum_dy.double(), mean * count, atol=0, rtol=1e-5)
    # rtol 2e-2: the CPU kernel sums a row of S = 2**20 products sequentially in float32,
    # whose rounding reaches about 6e-3 here (a wrong element read would be off by O(1))
    torch.testing.assert_close(sum_dy_xhat.double(), rstd * var * count, atol=0, rtol=2e-2)
    dx = torch.ops.fastreg.bn_bwd_apply(x3, x3, mean.float(), var.float(), weight, eps, sum_dy, sum_dy_xhat, count)
    # dy = x: dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * w * rstd = (d - d * rstd^2 var) * w * rstd
    torch.testing.assert_close(dx[-1].double(), bf16(offsets * (1 - rstd**2 * var)[:, None] * scale[:, None]), **TOL)
    torch.testing.assert_close(dx[0].double(), torch.zeros(c, s, dtype=torch.float64), **TOL)


def test_group_norm_past_2_31(cpu_backend):
    """gn_fwd / gn_bwd over (1025, 4, 2**19) in 2 groups: samples past 2**31 elements match
    torch's GroupNorm of those samples, dx too (dy = x)."""
    generator = torch.Generator().manual_seed(0)
    n, c, s = 1025, 4, 2**19
    x = _periodic((n, c, s), 3, generator)
    assert x.numel() > TWO31
    weight, bias = torch.rand(c, generator=generator) + 0.5, torch.randn(c, generator=generator)
    y, mean, rstd = torch.ops.fastreg.gn_fwd(x, weight, bias, 2, 1e-5, False)
    check = [0, n - 2, n - 1]
    torch.testing.assert_close(y[check], torch_F.group_norm(x[check].float(), 2, weight, bias).to(DTYPE), **TOL)
    del y
    dx, _, _ = torch.ops.fastreg.gn_bwd(x, x, weight, bias, mean, rstd, 2, False)
    samples = x[check].float().requires_grad_()
    expected = torch.autograd.grad(torch_F.group_norm(samples, 2, weight, bias), samples, x[check].float())[0]
    torch.testing.assert_close(dx[check].float(), expected, **TOL)


def test_optimizer_step_past_2_31(cpu_backend):
    """One SGD step of a bfloat16 param of 2**31 + 352 elements: w - lr * g at the tail."""
    generator = torch.Generator().manual_seed(0)
    numel = 1000 * math.ceil(TWO31 / 1000)
    param = torch.nn.Parameter(_periodic((numel // 1000, 1000), 7, generator).view(-1))
    param.grad = _periodic((numel // 1000, 1000), 11, generator).view(-1)
    head, tail = slice(0, 4096), slice(numel - 4096, numel)
    expected = [(param[i].float() - 0.5 * param.grad[i].float()).to(DTYPE) for i in (head, tail)]
    fastreg.optim.SGD([param], lr=0.5).step()
    for i, e in zip((head, tail), expected):  # one bfloat16 rounding apart at most (an FMA or not)
        torch.testing.assert_close(param.detach()[i], e, atol=1e-6, rtol=2**-8)
