"""NaN and Inf inputs on every backend: a NaN or an Inf in one row of a LayerNorm, one
channel of a BatchNorm, one group of a GroupNorm reaches the outputs and gradients that
torch's reach, and no others: fastreg's results are NaN, +Inf and -Inf exactly where
torch's are, and close to torch's elsewhere (other rows, channels and groups, and the
weight / bias gradients torch keeps finite). The optimizers on NaN / Inf gradients do what
torch.optim does, with and without a GradScaler (which skips the step).
"""

import math

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg import functional as F

NONFINITE = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def assert_same_nonfinite(ours, theirs, what, atol=1e-5, rtol=1e-4):
    """NaN, +Inf and -Inf at the same places as torch's; the finite values close to torch's."""
    assert ours.shape == theirs.shape, what
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        mismatch = mask(ours) != mask(theirs)
        assert not mismatch.any(), (f"{what}: {name} at {mismatch.nonzero()[:8].tolist()} "
                                    f"(fastreg {ours[mismatch][:8].tolist()}, torch {theirs[mismatch][:8].tolist()})")
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


def _with_value(x, index, value):
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_row(backend, op, value):
    """One non-finite element in row 2 of 5: row 2's outputs and dx, and the weight gradient
    (summed over rows) are what torch gives; the other rows are untouched."""
    name, device = backend
    torch.manual_seed(0)
    x = _with_value(torch.randn(5, 12, device=device), (2, 7), NONFINITE[value]).requires_grad_()
    weight = (torch.rand(12, device=device) + 0.5).requires_grad_()
    bias = torch.randn(12, device=device).requires_grad_()
    dy = torch.randn(5, 12, device=device)

    def run(module):
        if op == "layer_norm":
            y = module.layer_norm(x, (12,), weight, bias)
            return y, _grads(y, (x, weight, bias), dy)
        y = module.rms_norm(x, (12,), weight, 1e-5)
        return y, _grads(y, (x, weight), dy)

    (y, grads), (y_torch, grads_torch) = run(F), run(torch_F)
    assert y_torch[[0, 1, 3, 4]].isfinite().all() and not y_torch[2].isfinite().all()
    assert_same_nonfinite(y, y_torch, "y")
    for what, g, g_torch in zip(("dx", "dweight", "dbias"), grads, grads_torch):
        assert_same_nonfinite(g, g_torch, what, atol=1e-4)


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_channel(backend, layout, value, training):
    """One non-finite element in channel 1 of 3: in training that channel's outputs, dx,
    running statistics and dweight are torch's (dbias stays finite); in eval one element."""
    name, device = backend
    torch.manual_seed(0)
    x = _with_value(torch.randn(2, 3, 4, 3, device=device) * 2 + 1, (1, 1, 2, 0), NONFINITE[value])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(3, device=device) + 0.5).requires_grad_()
    bias = torch.randn(3, device=device).requires_grad_()
    dy = torch.randn(2, 3, 4, 3, device=device)

    def run(module):
        running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
        y = module.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
        return y, _grads(y, (x, weight, bias), dy), (running_mean, running_var)

    (y, grads, stats), (y_torch, grads_torch, stats_torch) = run(F), run(torch_F)
    assert_same_nonfinite(y, y_torch, "y")
    for what, g, g_torch in zip(("dx", "dweight", "dbias"), grads, grads_torch):
        assert_same_nonfinite(g, g_torch, what, atol=1e-4)
    for what, s, s_torch in zip(("running_mean", "running_var"), stats, stats_torch):
        assert_same_nonfinite(s, s_torch, what)
    assert grads_torch[2].isfinite().all()


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True], ids=["", "silu"])
def test_group_norm_group(backend, layout, value, silu):
    """One non-finite element in group 1 of sample 0 (of 2 samples, 3 groups of 2 channels):
    that group's outputs and dx, and dweight over its channels, are torch's; the other
    groups, the other sample and dbias are not touched (or as far as torch's are)."""
    name, device = backend
    torch.manual_seed(0)
    x = _with_value(torch.randn(2, 6, 3, 3, device=device), (0, 3, 1, 1), NONFINITE[value])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(6, device=device) + 0.5).requires_grad_()
    bias = torch.randn(6, device=device).requires_grad_()
    dy = torch.randn(2, 6, 3, 3, device=device)

    def run(module):
        if module is F:
            y = F.group_norm(x, 3, weight, bias, activation="silu" if silu else None)
        else:
            y = torch_F.group_norm(x, 3, weight, bias)
            y = torch_F.silu(y) if silu else y
        return y, _grads(y, (x, weight, bias), dy)

    (y, grads), (y_torch, grads_torch) = run(F), run(torch_F)
    assert y_torch[1].isfinite().all() and y_torch[0, [0, 1, 4, 5]].isfinite().all()
    assert_same_nonfinite(y, y_torch, "y")
    for what, g, g_torch in zip(("dx", "dweight", "dbias"), grads, grads_torch):
        assert_same_nonfinite(g, g_torch, what, atol=1e-4)


def test_instance_norm_channel(backend):
    """InstanceNorm (GroupNorm with one group per channel): a NaN in one (sample, channel)."""
    name, device = backend
    torch.manual_seed(0)
    x = _with_value(torch.randn(2, 3, 5, device=device), (1, 2, 3), math.nan).requires_grad_()
    dy = torch.randn(2, 3, 5, device=device)

    def run(module):
        running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
        y = module.instance_norm(x, running_mean, running_var, use_input_stats=True)
        return y, _grads(y, (x,), dy), (running_mean, running_var)

    (y, grads, stats), (y_torch, grads_torch, stats_torch) = run(F), run(torch_F)
    assert_same_nonfinite(y, y_torch, "y")
    assert_same_nonfinite(grads[0], grads_torch[0], "dx", atol=1e-4)
    for what, s, s_torch in zip(("running_mean", "running_var"), stats, stats_torch):
        assert_same_nonfinite(s, s_torch, what)


# --------------------------------------------------------------------------- optimizers

OPTIMIZERS = {
    "SGD": (torch.optim.SGD, fastreg.optim.SGD, dict(lr=0.1)),
    "SGD-momentum-decay": (torch.optim.SGD, fastreg.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "SGD-nesterov": (torch.optim.SGD, fastreg.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "Adam": (torch.optim.Adam, fastreg.optim.Adam, dict(lr=0.01)),
    "Adam-amsgrad-decay": (torch.optim.Adam, fastreg.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "AdamW": (torch.optim.AdamW, fastreg.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "AdamW-amsgrad-maximize": (torch.optim.AdamW, fastreg.optim.AdamW, dict(lr=0.01, amsgrad=True, maximize=True)),
}


def _grad_with_nonfinite(step, device):
    """Step 0: NaN, +Inf and -Inf in three elements of a (4, 3) gradient; later steps finite."""
    generator = torch.Generator().manual_seed(step)
    grad = torch.randn(4, 3, generator=generator).to(device)
    if step == 0:
        grad[0, 1], grad[2, 0], grad[3, 2] = math.nan, math.inf, -math.inf
    return grad


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_optimizer_nonfinite_grads(backend, optimizer):
    """Without a GradScaler, a non-finite gradient reaches the params and states torch's
    does (elementwise: the other elements keep training)."""
    name, device = backend
    torch_cls, fastreg_cls, kwargs = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    start = torch.randn(4, 3, device=device)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    our_opt, torch_opt = fastreg_cls([ours], **kwargs), torch_cls([theirs], **kwargs)
    for step in range(3):
        for param, opt in ((ours, our_opt), (theirs, torch_opt)):
            param.grad = _grad_with_nonfinite(step, device)
            opt.step()
        assert_same_nonfinite(ours.detach(), theirs.detach(), f"param after step {step + 1}")
        for key, value in torch_opt.state[theirs].items():
            if key != "step":
                assert_same_nonfinite(our_opt.state[ours][key], value, f"{key} after step {step + 1}")


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("optimizer", ["SGD-momentum-decay", "Adam", "AdamW-amsgrad-maximize"])
def test_optimizer_with_grad_scaler_skips_nonfinite_steps(backend, optimizer, value):
    """With torch.amp.GradScaler, a step whose scaled gradients hold a NaN or an Inf is
    skipped (params, states and step counts untouched) and the scale backs off, as with
    torch.optim; the finite steps around it match torch's."""
    name, device = backend
    torch_cls, fastreg_cls, kwargs = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(device)
    ours, theirs = [torch.nn.Linear(3, 2).to(device) for _ in range(2)]
    ours.load_state_dict(model.state_dict())
    theirs.load_state_dict(model.state_dict())
    our_opt, torch_opt = fastreg_cls(ours.parameters(), **kwargs), torch_cls(theirs.parameters(), **kwargs)
    our_scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    torch_scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    inputs = torch.randn(4, 3, device=device)
    for step in range(3):
        for module, opt, scaler in ((ours, our_opt, our_scaler), (theirs, torch_opt, torch_scaler)):
            opt.zero_grad()
            scaler.scale(module(inputs).pow(2).mean()).backward()
            if step == 1:
                module.weight.grad[0, 1] = NONFINITE[value]
            scaler.step(opt)
            scaler.update()
        assert our_scaler.get_scale() == torch_scaler.get_scale()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert a.isfinite().all()
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"after step {step + 1}: {m}")
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert set(our_opt.state[a]) == set(torch_opt.state[b])  # no state before a step was taken
            for key, v in torch_opt.state[b].items():
                if key == "step":  # the skipped step is not counted
                    assert float(our_opt.state[a][key]) == float(v)
                else:
                    torch.testing.assert_close(our_opt.state[a][key], v, atol=1e-6, rtol=1e-5)
