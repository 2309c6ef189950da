"""fastreg.optim (SGD, Adam, AdamW) against torch.optim, and the step ops against the reference.

Tolerances: float32 training runs follow torch.optim step by step to 1e-6 relative (the
kernels keep torch's order of operations; what differs is an ulp here and there, e.g.
lerp). The ops against fastreg/_reference.py: a few float32 ulps, except max-norm, whose
row norm sums in another order. bfloat16 follows the relative rule of the norm tests:
against a float32 run, fastreg's error may be at most twice torch's own bfloat16 error.
"""

import copy

import pytest
import torch

import fastreg
from fastreg import _reference
from fastreg.ops.optim import ADAM_STEP, SGD_STEP

STEP_OPS = {"sgd": SGD_STEP, "adam": ADAM_STEP}
from tests.conftest import needs_gpu

# relative to the tensor's largest element: elementwise relative errors of elements near
# zero are meaningless after 25 steps of ulp differences (lerp, fused multiply-adds in torch)
RTOL = 1e-6
STEPS = 25


def _skip_without_step_kernel(backend):
    if backend == "triton" and not hasattr(torch.ops.fastreg, "adam_step_triton_"):
        pytest.skip("no Triton optimizer kernels on this branch (fastreg::adam_step_triton_ is not defined)")


@pytest.fixture
def step_backend(backend):
    _skip_without_step_kernel(backend[0])
    return backend


def _mlp(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.LayerNorm(24), torch.nn.ReLU(), torch.nn.Linear(24, 6)
    ).to(device, dtype)


def _train(model, opt, steps, seed=1, after_step=None):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=generator).to(next(model.parameters()))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if after_step is not None:
            after_step()


def _assert_close(ours, theirs, rtol=RTOL, what=""):
    """max |ours - theirs| <= rtol * max |theirs|."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    error = (ours.detach().double() - theirs.detach().double()).abs().max().item()
    scale = theirs.detach().double().abs().max().item()
    assert error <= rtol * scale + 1e-30, f"{what}: max error {error:.3g}, {error / max(scale, 1e-30):.3g} relative"


def _assert_models_close(ours, theirs, rtol=RTOL):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        _assert_close(a, b, rtol, name)


def _run_in_lockstep(torch_cls, fastreg_cls, kwargs, device, steps=STEPS):
    """Both optimizers over the same batches; params compared after every step."""
    theirs, ours = _mlp(device), _mlp(device)
    torch_opt, our_opt = torch_cls(theirs.parameters(), **kwargs), fastreg_cls(ours.parameters(), **kwargs)
    sign = -1 if kwargs.get("maximize") else 1  # maximize a bounded objective, not a diverging one
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=generator).to(device)
        for model, opt in ((theirs, torch_opt), (ours, our_opt)):
            opt.zero_grad()
            (sign * model(x).pow(2).mean()).backward()
            opt.step()
        _assert_models_close(ours, theirs)
    return torch_opt, our_opt


SGD_CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=0.05),
    dict(lr=0.05, momentum=0.9, weight_decay=0.05, maximize=True),
]
ADAM_CONFIGS = [
    (torch.optim.Adam, fastreg.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, fastreg.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    (torch.optim.Adam, fastreg.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (torch.optim.AdamW, fastreg.optim.AdamW, dict(lr=1e-2)),
    (torch.optim.AdamW, fastreg.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (torch.optim.AdamW, fastreg.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
]


@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=str)
def test_sgd_follows_torch_step_by_step(step_backend, kwargs):
    torch_opt, our_opt = _run_in_lockstep(torch.optim.SGD, fastreg.optim.SGD, kwargs, step_backend[1])
    if kwargs.get("momentum"):
        for a, b in zip(our_opt.state.values(), torch_opt.state.values()):
            _assert_close(a["momentum_buffer"], b["momentum_buffer"], what="momentum_buffer")
    else:
        assert len(our_opt.state) == len(torch_opt.state) == 0


@pytest.mark.parametrize("torch_cls, fastreg_cls, kwargs", ADAM_CONFIGS, ids=lambda c: getattr(c, "__name__", str(c)))
def test_adam_follows_torch_step_by_step(step_backend, torch_cls, fastreg_cls, kwargs):
    torch_opt, our_opt = _run_in_lockstep(torch_cls, fastreg_cls, kwargs, step_backend[1])
    for ours, theirs in zip(our_opt.state.values(), torch_opt.state.values()):
        assert set(ours) == set(theirs)
        assert ours["step"].dtype == torch.float32 and ours["step"].device.type == "cpu"
        for key in theirs:
            _assert_close(ours[key], theirs[key], what=key)


# ---------------------------------------------------------------- low precision


def _run_synthetic(params, opt, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        opt.step()


def _synthetic_grads(shapes, steps=20):
    generator = torch.Generator().manual_seed(3)
    return [[torch.randn(s, generator=generator).bfloat16().float() for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("master_weights", [False, True])
def test_bfloat16_params_against_a_float32_run(step_backend, master_weights):
    device = step_backend[1]
    torch.manual_seed(0)
    shapes = [(64, 33), (33,), (1023,)]
    start = [torch.randn(s).bfloat16().float().to(device) for s in shapes]
    grads = [[g.to(device) for g in step] for step in _synthetic_grads(shapes)]
    kwargs = dict(lr=1e-2, weight_decay=0.1)

    reference = [w.clone().requires_grad_() for w in start]  # float32, same start and grads
    _run_synthetic(reference, torch.optim.AdamW(reference, **kwargs), grads)
    torch_bf16 = [w.bfloat16().requires_grad_() for w in start]
    _run_synthetic(torch_bf16, torch.optim.AdamW(torch_bf16, **kwargs), grads)
    ours = [w.bfloat16().requires_grad_() for w in start]
    opt = fastreg.optim.AdamW(ours, master_weights=master_weights, **kwargs)
    _run_synthetic(ours, opt, grads)

    for p, ref, torch_own in zip(ours, reference, torch_bf16):
        assert p.dtype == torch.bfloat16
        state = opt.state[p]
        if master_weights:
            # the float32 master follows the float32 run; the param is its rounding
            master = state["master_param"]
            assert master.dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(master, ref.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(p.detach(), master.bfloat16())
        else:
            assert "master_param" not in state and state["exp_avg"].dtype == torch.bfloat16
            ours_error = (p.detach().double() - ref.detach().double()).abs().max().item()
            torch_error = (torch_own.detach().double() - ref.detach().double()).abs().max().item()
            assert ours_error <= 2 * torch_error + 1e-3, (ours_error, torch_error)


# ---------------------------------------------------------------- state_dict


def _torch_and_fastreg_pairs():
    return [
        (lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True), lambda p: fastreg.optim.AdamW(p, lr=1e-2, amsgrad=True)),
        (lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), lambda p: fastreg.optim.AdamW(p, lr=1e-2)),
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
         lambda p: fastreg.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ]


@pytest.mark.parametrize("pair", range(3), ids=["AdamW-amsgrad", "AdamW-from-fused", "SGD-momentum"])
@pytest.mark.parametrize("direction", ["torch->fastreg->torch", "fastreg->torch->fastreg"])
def test_state_dict_loads_both_ways_and_training_continues_identically(pair, direction):
    make_torch, make_fastreg = _torch_and_fastreg_pairs()[pair]
    first, second = (make_torch, make_fastreg) if direction.startswith("torch") else (make_fastreg, make_torch)
    model = _mlp()
    opt = first(model.parameters())
    _train(model, opt, 5)

    # the same model and optimizer continued, against a copy handed to the other class
    twin = copy.deepcopy(model)
    other = second(twin.parameters())
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved: no shared tensors
    for state in other.state.values():
        if "step" in state:  # kept as torch's non-fused default: a float32 CPU scalar
            assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32
    _train(model, opt, 5, seed=2)
    _train(twin, other, 5, seed=2)
    _assert_models_close(twin, model)

    # and back into the first class
    back_model = copy.deepcopy(twin)
    back = first(back_model.parameters())
    back.load_state_dict(copy.deepcopy(other.state_dict()))
    _train(model, opt, 5, seed=3)
    _train(back_model, back, 5, seed=3)
    _assert_models_close(back_model, model)


@needs_gpu
def test_step_counts_live_on_the_params_device():
    """As torch's fused and capturable optimizers keep them: a CPU count saved by torch's
    default AdamW moves to the GPU, and torch's default loads ours back."""
    model = _mlp("cuda")
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, torch_opt, 2)
    assert next(iter(torch_opt.state.values()))["step"].device.type == "cpu"
    ours = fastreg.optim.AdamW(model.parameters(), lr=1e-2)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for state in ours.state.values():
        assert state["step"].device.type == "cuda" and state["step"].item() == 2
    _train(model, ours, 1)
    torch_opt.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(model, torch_opt, 1)
    assert next(iter(torch_opt.state.values()))["step"].item() == 4


def test_master_weights_survive_a_state_dict_round_trip():
    params = [torch.randn(8, 8).bfloat16().requires_grad_()]
    opt = fastreg.optim.AdamW(params, lr=1e-2, master_weights=True)
    _run_synthetic(params, opt, _synthetic_grads([(8, 8)], steps=3))
    saved = copy.deepcopy(opt.state_dict())
    fresh = fastreg.optim.AdamW([params[0].detach().clone().requires_grad_()], lr=1e-2, master_weights=True)
    fresh.load_state_dict(saved)
    state = next(iter(fresh.state.values()))
    for key in ("master_param", "exp_avg", "exp_avg_sq"):
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], saved["state"][0][key])


# ---------------------------------------------------------------- regularizers


def _prox(w, threshold):
    return torch.sign(w) * torch.clamp(w.abs() - threshold, min=0)


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
def test_l1_is_a_proximal_step_with_exact_zeros(step_backend, opt_name):
    device = step_backend[1]
    lr, l1 = 0.05, 0.2
    kwargs = dict(lr=lr, momentum=0.9) if opt_name == "SGD" else dict(lr=lr, weight_decay=0.0)
    torch.manual_seed(0)
    w0 = (torch.randn(40, 30) * 0.05).to(device)
    theirs, ours = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    torch_opt = getattr(torch.optim, opt_name)([theirs], **kwargs)
    our_opt = getattr(fastreg.optim, opt_name)([ours], l1=l1, **kwargs)
    for step in range(5):
        g = torch.randn(40, 30, generator=torch.Generator().manual_seed(step)).to(device)
        theirs.grad, ours.grad = g.clone(), g.clone()
        torch_opt.step()
        updated = theirs.detach().clone()
        with torch.no_grad():
            theirs.copy_(_prox(theirs, lr * l1))
        our_opt.step()
        _assert_close(ours, theirs)
        shrunk_to_zero = updated.abs() <= lr * l1 * (1 - 1e-5)
        assert shrunk_to_zero.any() and (ours.detach()[shrunk_to_zero] == 0).all()


def test_l1_leaves_a_nan_visible(step_backend):
    p = torch.nn.Parameter(torch.tensor([1.0, float("nan"), -2.0, 0.01] * 4, device=step_backend[1]))
    p.grad = torch.zeros_like(p)
    fastreg.optim.SGD([p], lr=0.1, l1=0.5).step()
    expected = torch.tensor([0.95, float("nan"), -1.95, 0.0] * 4, device=step_backend[1])
    torch.testing.assert_close(p.detach(), expected, equal_nan=True)


def test_elastic_net_is_decay_then_update_then_prox(step_backend):
    lr, weight_decay, l1 = 1e-2, 0.1, 0.05
    ours, theirs = _mlp(step_backend[1]), _mlp(step_backend[1])
    our_opt = fastreg.optim.AdamW(ours.parameters(), lr=lr, weight_decay=weight_decay, l1=l1)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=weight_decay)

    def prox_theirs():
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(_prox(p, lr * l1))

    _train(ours, our_opt, 10)
    _train(theirs, torch_opt, 10, after_step=prox_theirs)
    _assert_models_close(ours, theirs)
    assert sum((p == 0).sum().item() for p in ours.parameters()) > 0


def test_max_norm_bounds_rows_and_leaves_short_rows_alone(step_backend):
    device = step_backend[1]
    radius = 1.0
    torch.manual_seed(0)
    w0 = torch.randn(64, 50).to(device) * 0.1
    w0[::2] *= 30  # every other row far beyond the radius
    theirs, ours = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    bias = torch.randn(64).to(device).mul(10).requires_grad_()  # 1-D: not projected
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2)
    our_opt = fastreg.optim.AdamW([ours, bias], lr=1e-2, max_norm=radius)
    bias_before = bias.detach().clone()
    g = torch.randn(64, 50, generator=torch.Generator().manual_seed(5)).to(device)
    theirs.grad, ours.grad, bias.grad = g.clone(), g.clone(), torch.zeros_like(bias)
    torch_opt.step()
    our_opt.step()
    norms = ours.detach().norm(dim=1)
    assert (norms <= radius * (1 + 1e-6)).all()
    long_rows = theirs.detach().norm(dim=1) > radius
    assert long_rows[::2].all() and not long_rows[1::2].any()
    torch.testing.assert_close(norms[long_rows], torch.full_like(norms[long_rows], radius), rtol=1e-6, atol=0)
    _assert_close(ours.detach()[~long_rows], theirs.detach()[~long_rows])
    expected_bias = bias_before * (1 - 1e-2 * 1e-2)  # decay only (zero grad): no projection
    _assert_close(bias, expected_bias)


def test_param_groups_keep_their_own_settings(step_backend):
    device = step_backend[1]
    ours, theirs = _mlp(device), _mlp(device)
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 1e-2, "weight_decay": 0.2},
        {"params": m[1].parameters(), "lr": 3e-3, "betas": (0.5, 0.9), "weight_decay": 0.0, "amsgrad": True},
        {"params": m[3].parameters()},
    ]
    our_opt = fastreg.optim.AdamW(groups(ours), lr=5e-3)
    torch_opt = torch.optim.AdamW(groups(theirs), lr=5e-3)
    _train(ours, our_opt, 10)
    _train(theirs, torch_opt, 10)
    _assert_models_close(ours, theirs)
    assert [g["l1"] for g in our_opt.param_groups] == [0.0] * 3
    assert our_opt.param_groups[2]["lr"] == 5e-3 and our_opt.param_groups[2]["weight_decay"] == 1e-2


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
def test_non_contiguous_params_are_updated_in_place(step_backend, opt_name):
    device = step_backend[1]
    kwargs = dict(lr=1e-2, momentum=0.9) if opt_name == "SGD" else dict(lr=1e-2, amsgrad=True)
    start = torch.randn(6, 8, device=device)
    theirs = torch.nn.Parameter(start.t().contiguous().t())  # transposed strides
    ours = torch.nn.Parameter(start.t().contiguous().t())
    assert not ours.is_contiguous()
    torch_opt = getattr(torch.optim, opt_name)([theirs], **kwargs)
    our_opt = getattr(fastreg.optim, opt_name)([ours], **kwargs)
    for step in range(3):
        g = torch.randn(6, 8, generator=torch.Generator().manual_seed(step)).to(device)
        theirs.grad, ours.grad = g.clone(), g.clone()
        torch_opt.step()
        our_opt.step()
    assert ours.stride() == theirs.stride()
    _assert_close(ours, theirs)


def test_empty_groups_and_params_without_grads():
    model = _mlp()
    frozen = torch.nn.Parameter(torch.randn(5))
    opt = fastreg.optim.Adam([{"params": []}, {"params": list(model.parameters()) + [frozen]}], lr=1e-2)
    before = frozen.detach().clone()
    opt.step()  # no grads at all yet
    assert len(opt.state) == 0
    _train(model, opt, 2)
    assert torch.equal(frozen.detach(), before) and frozen not in opt.state
    assert len(opt.state) == len(list(model.parameters()))


def test_sparse_grads_raise_torch_s_error():
    p = torch.nn.Parameter(torch.randn(4, 3))
    for opt_cls in (torch.optim.Adam, fastreg.optim.Adam):
        p.grad = torch.randn(4, 3).to_sparse()
        with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
            opt_cls([p]).step()


# ---------------------------------------------------------------- GradScaler


def _scaled_steps(opt_cls, unscale_first, poison_step=None, steps=4):
    """A model trained with torch.amp.GradScaler('cpu'); grads of step `poison_step` get an inf."""
    model = _mlp()
    opt = opt_cls(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    generator = torch.Generator().manual_seed(1)
    snapshots = []
    for step in range(steps):
        x = torch.randn(16, 12, generator=generator)
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if step == poison_step:
            model[0].weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        snapshots.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), scaler.get_scale()))
    return model, snapshots


@pytest.mark.parametrize("unscale_first", [True, False], ids=["unscale_-then-step", "scale-passed-to-kernel"])
@pytest.mark.parametrize("opt_name", ["AdamW", "SGD"])
def test_grad_scaler_steps_equal_unscaled_steps(opt_name, unscale_first):
    opt_cls = getattr(fastreg.optim, opt_name)
    scaled, _ = _scaled_steps(opt_cls, unscale_first)
    plain = _mlp()
    _train(plain, opt_cls(plain.parameters(), lr=1e-2), 4)
    _assert_models_close(scaled, plain)


@pytest.mark.parametrize("unscale_first", [True, False], ids=["unscale_-then-step", "scale-passed-to-kernel"])
def test_grad_scaler_skips_a_step_with_inf_grads(unscale_first):
    _, snapshots = _scaled_steps(fastreg.optim.AdamW, unscale_first, poison_step=2)
    (params_before, state_before, scale_before), (params_after, state_after, scale_after) = snapshots[1:3]
    assert scale_after == scale_before / 2  # the scaler saw the inf
    for key in params_before:
        assert torch.equal(params_before[key], params_after[key]), key
    for index, before in state_before["state"].items():
        for key, value in before.items():
            assert torch.equal(value, state_after["state"][index][key]), (index, key)
    assert state_after["state"][0]["step"].item() == 2
    assert snapshots[3][1]["state"][0]["step"].item() == 3  # and the next step runs


# ---------------------------------------------------------------- validation and param_groups()

INVALID = [
    (torch.optim.Adam, fastreg.optim.Adam, dict(lr=-1)),
    (torch.optim.Adam, fastreg.optim.Adam, dict(eps=-1e-8)),
    (torch.optim.Adam, fastreg.optim.Adam, dict(betas=(1.0, 0.999))),
    (torch.optim.AdamW, fastreg.optim.AdamW, dict(betas=(0.9, -0.1))),
    (torch.optim.AdamW, fastreg.optim.AdamW, dict(weight_decay=-0.1)),
    (torch.optim.AdamW, fastreg.optim.AdamW, dict(fused=True, foreach=True)),
    (torch.optim.SGD, fastreg.optim.SGD, dict(lr=-0.5)),
    (torch.optim.SGD, fastreg.optim.SGD, dict(momentum=-0.9)),
    (torch.optim.SGD, fastreg.optim.SGD, dict(weight_decay=-1.0)),
    (torch.optim.SGD, fastreg.optim.SGD, dict(nesterov=True)),
    (torch.optim.SGD, fastreg.optim.SGD, dict(momentum=0.9, dampening=0.1, nesterov=True)),
]


@pytest.mark.parametrize("torch_cls, fastreg_cls, kwargs", INVALID, ids=str)
def test_validation_errors_are_torch_s(torch_cls, fastreg_cls, kwargs):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(Exception) as theirs:
        torch_cls(params, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        fastreg_cls(params, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_defaults_are_torch_s():
    params = [torch.nn.Parameter(torch.randn(3))]
    for name in ("SGD", "Adam", "AdamW"):
        theirs, ours = getattr(torch.optim, name)(params).defaults, getattr(fastreg.optim, name)(params).defaults
        assert {k: v for k, v in ours.items() if k not in ("l1", "max_norm", "master_weights")} == theirs
        assert isinstance(getattr(fastreg.optim, name)(params), getattr(torch.optim, name))
    assert fastreg.optim.AdamW(params).defaults["weight_decay"] == 1e-2


def test_fastreg_options_are_validated():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"Invalid l1 value: -0.1"):
        fastreg.optim.AdamW(params, l1=-0.1)
    with pytest.raises(ValueError, match=r"Invalid max_norm value: -1"):
        fastreg.optim.SGD(params, max_norm=-1)
    with pytest.raises(ValueError, match=r"Invalid l1 value: -1"):
        fastreg.optim.Adam([{"params": params, "l1": -1}])
    with pytest.raises(RuntimeError, match="differentiable=True"):
        fastreg.optim.SGD(params, differentiable=True)
    fastreg.optim.Adam(params, foreach=True)  # accepted and ignored
    fastreg.optim.Adam(params, fused=True)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.norm = fastreg.nn.LayerNorm(8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.rms = torch.nn.RMSNorm(8)
        self.gain = torch.nn.Parameter(torch.ones(8))
        self.head = torch.nn.Linear(8, 3, bias=False)
        self.tied = self.head  # shared: listed once


def test_param_groups_helper_splits_decayed_and_excluded():
    net = _Net()
    decayed, excluded = fastreg.optim.param_groups(net, weight_decay=0.1, l1=1e-4, max_norm=2.0)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["embed.weight", "fc.weight", "head.weight"]
    assert sorted(names[id(p)] for p in excluded["params"]) == [
        "bn.bias", "bn.weight", "fc.bias", "gain", "norm.bias", "norm.weight", "rms.weight"]
    assert (decayed["weight_decay"], decayed["l1"], decayed["max_norm"]) == (0.1, 1e-4, 2.0)
    assert (excluded["weight_decay"], excluded["l1"], excluded["max_norm"]) == (0.0, 0.0, None)
    fastreg.optim.AdamW([decayed, excluded]).step()  # usable as is

    decayed, excluded = fastreg.optim.param_groups(net, no_decay=["embed.weight"])
    assert [names[id(p)] for p in excluded["params"]] == ["embed.weight"]
    decayed, excluded = fastreg.optim.param_groups(net, no_decay=lambda module, name, p: module is net.fc)
    assert sorted(names[id(p)] for p in excluded["params"]) == ["fc.bias", "fc.weight"]
    with pytest.raises(ValueError, match="fc.wieght"):
        fastreg.optim.param_groups(net, no_decay=["fc.wieght"])


# ---------------------------------------------------------------- the ops against the reference

SIZES = [(1,), (7,), (1023,), (4097,), (33, 65), (5, 3, 7)]
OP_DTYPES = [
    (torch.float32, False), (torch.float64, False), (torch.bfloat16, False), (torch.bfloat16, True),
    (torch.float16, True),
]
# float32 math: a few ulps of the value (max-norm's row sum runs in another order)
OP_TOL = {torch.float32: (2e-6, 1e-6), torch.float64: (1e-13, 1e-13)}


def _op_inputs(kind, dtype, masters, amsgrad_or_momentum, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value_dtype = torch.float32 if masters else dtype

    def rand(shape, dtype, positive=False):
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        return (t.abs() if positive else t).to(device, dtype)

    values = [rand(s, value_dtype) for s in SIZES]
    inputs = {
        "params": [v.to(dtype) for v in values],
        "grads": [rand(s, dtype) for s in SIZES],
        "masters": values if masters else [],
    }
    if kind == "sgd":
        inputs["momentum_buffers"] = [rand(s, value_dtype) for s in SIZES] if amsgrad_or_momentum else []
    else:
        inputs["exp_avgs"] = [rand(s, value_dtype) for s in SIZES]
        inputs["exp_avg_sqs"] = [rand(s, value_dtype, positive=True) for s in SIZES]
        inputs["max_exp_avg_sqs"] = [rand(s, value_dtype, positive=True) for s in SIZES] if amsgrad_or_momentum else []
        inputs["steps"] = [torch.tensor(float(k), device=device) for k in range(len(SIZES))]  # counts differ per tensor
    return inputs


def _call(fn, kind, inputs, **scalars):
    grad_scale = torch.tensor(scalars["grad_scale"], device=inputs["params"][0].device)
    if kind == "sgd":
        fn(inputs["params"], inputs["grads"], inputs["momentum_buffers"], inputs["masters"], scalars["lr"],
           scalars["momentum"], scalars["dampening"], scalars["weight_decay"], scalars["l1"], scalars["max_norm"],
           scalars["nesterov"], scalars["maximize"], scalars["first_step"], grad_scale)
    else:
        fn(inputs["params"], inputs["grads"], inputs["exp_avgs"], inputs["exp_avg_sqs"], inputs["max_exp_avg_sqs"],
           inputs["masters"], inputs["steps"], scalars["lr"], scalars["beta1"], scalars["beta2"], scalars["eps"],
           scalars["weight_decay"], scalars["decoupled"], scalars["l1"], scalars["max_norm"], scalars["maximize"],
           grad_scale)


OP_CASES = [
    ("sgd", True, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, l1=0.3, max_norm=4.0, nesterov=False,
                       maximize=False, first_step=False, grad_scale=2.0)),
    ("sgd", True, dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, l1=0.0, max_norm=0.0, nesterov=True,
                       maximize=True, first_step=True, grad_scale=1.0)),
    ("sgd", False, dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01, l1=0.0, max_norm=2.0, nesterov=False,
                        maximize=False, first_step=False, grad_scale=1.0)),
    ("adam", True, dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, l1=0.05,
                        max_norm=3.0, maximize=False, grad_scale=4.0)),
    ("adam", False, dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=False, l1=0.0,
                         max_norm=0.0, maximize=True, grad_scale=1.0)),
]


@pytest.mark.parametrize("dtype, masters", OP_DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind, with_state, scalars", OP_CASES, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_step_ops_match_the_reference(kernel_backend, kind, with_state, scalars, dtype, masters):
    name, device = kernel_backend
    _skip_without_step_kernel(name)
    ours = _op_inputs(kind, dtype, masters, with_state, device)
    expected = _op_inputs(kind, dtype, masters, with_state, device)
    _call(STEP_OPS[kind][name], kind, ours, **scalars)
    _call(getattr(_reference, f"{kind}_step_"), kind, expected, **scalars)
    value_dtype = torch.float32 if masters else dtype
    for key in ours:
        for i, (a, b) in enumerate(zip(ours[key], expected[key])):
            if a.dtype in OP_TOL:
                atol, rtol = OP_TOL[a.dtype]
            else:  # rounded from values a few float32 ulps apart: at most one ulp of the dtype apart
                atol, rtol = 0.0, torch.finfo(a.dtype).eps
            if value_dtype in (torch.bfloat16, torch.float16) and key != "grads":
                atol, rtol = 0.0, 2 * torch.finfo(a.dtype).eps  # states re-read after rounding
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{key}[{i}] {SIZES[i]}: {m}")
    if scalars["l1"] > 0:
        assert any((p == 0).any() for p in ours["params"])


def test_step_op_checks_its_arguments():
    if not fastreg._ext.has_kernel("adam_step_", "CPU"):
        pytest.skip(f"fastreg._C is not built: {fastreg._ext.load_error()}")
    op = torch.ops.fastreg.adam_step_
    p, g, steps = [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)]
    args = (0.1, 0.9, 0.999, 1e-8, 0.0, True, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"'exp_avgs' has 0 tensors but 'params' has 1"):
        op(p, g, [], [torch.zeros(4)], [], [], steps, *args)
    # a non-contiguous tensor is not an error: tests/test_strided_args.py
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype BFloat16, expected Float"):
        op(p, [torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4)], [torch.zeros(4)], [], [], steps, *args)
    with pytest.raises(RuntimeError, match="'masters' are float32 copies of bfloat16 or float16 params"):
        op(p, g, [torch.zeros(4)], [torch.zeros(4)], [], [torch.zeros(4)], steps, *args)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has 3 elements but params\[0\] has 4"):
        op(p, g, [torch.zeros(3)], [torch.zeros(4)], [], [], steps, *args)
    with pytest.raises(RuntimeError, match=r"'steps' has 0 tensors but 'params' has 1"):
        op(p, g, [torch.zeros(4)], [torch.zeros(4)], [], [], [], *args)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a float32 scalar on the params' device \(cpu\), "
                                           r"got Double"):
        op(p, g, [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.tensor(0.0, dtype=torch.float64)], *args)
    with pytest.raises(RuntimeError, match=r"'found_inf' must be a float32 CPU scalar, got Float on cpu with 2"):
        op(p, g, [torch.zeros(4)], [torch.zeros(4)], [], [], steps, *args, found_inf=torch.zeros(2))


def test_step_ops_pass_opcheck():
    if not fastreg._ext.has_kernel("adam_step_", "CPU"):
        pytest.skip(f"fastreg._C is not built: {fastreg._ext.load_error()}")
    adam = _op_inputs("adam", torch.float32, False, True, "cpu")
    scale, found_inf = torch.tensor(2.0), torch.tensor(0.0)
    torch.library.opcheck(torch.ops.fastreg.adam_step_.default, (
        adam["params"], adam["grads"], adam["exp_avgs"], adam["exp_avg_sqs"], adam["max_exp_avg_sqs"], [],
        adam["steps"], 0.1, 0.9, 0.999, 1e-8, 0.1, True, 0.0, 1.0, False, scale, found_inf))
    sgd = _op_inputs("sgd", torch.bfloat16, True, True, "cpu")
    torch.library.opcheck(torch.ops.fastreg.sgd_step_.default, (
        sgd["params"], sgd["grads"], sgd["momentum_buffers"], sgd["masters"],
        0.1, 0.9, 0.0, 0.0, 0.1, 1.0, False, False, False, None, None))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_step_ops_count_steps_and_skip_on_found_inf(kernel_backend, kind):
    """adam_step_ increments the step counts; with found_inf != 0 neither op changes anything."""
    name, device = kernel_backend
    _skip_without_step_kernel(name)
    inputs = _op_inputs(kind, torch.float32, False, True, device)
    before = {key: [t.clone() for t in tensors] for key, tensors in inputs.items()}
    scalars = dict(OP_CASES[0 if kind == "sgd" else 3][2])
    op = STEP_OPS[kind][name]
    found_inf = torch.tensor(1.0, device=device)
    if kind == "sgd":
        op(inputs["params"], inputs["grads"], inputs["momentum_buffers"], [], 0.1, 0.9, 0.1, 0.01, 0.3, 4.0, False,
           False, True, torch.tensor(2.0, device=device), found_inf)
    else:
        op(inputs["params"], inputs["grads"], inputs["exp_avgs"], inputs["exp_avg_sqs"], inputs["max_exp_avg_sqs"],
           [], inputs["steps"], 0.1, 0.9, 0.999, 1e-8, 0.1, True, 0.05, 3.0, False, None, found_inf)
    for key in inputs:
        for a, b in zip(inputs[key], before[key]):
            assert torch.equal(a, b), key
    if kind == "adam":
        _call(op, kind, inputs, **scalars)
        assert [s.item() for s in inputs["steps"]] == [s.item() + 1 for s in before["steps"]]


def test_optimizer_pickles_and_deep_copies():
    import pickle

    model = _mlp()
    opt = fastreg.optim.AdamW(model.parameters(), lr=1e-2, l1=1e-3, max_norm=5.0)
    _train(model, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups[0]["l1"] == 1e-3 and clone.defaults["max_norm"] == 5.0
        clone.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
        assert clone.param_groups[-1]["l1"] == 1e-3


# ---------------------------------------------------------------- state_dict options, capturable, host work


def test_state_dict_states_only_active_fastreg_options():
    """Without l1 / max_norm / master_weights the state_dict is torch's, key for key (so
    torch.distributed.checkpoint loads either class into the other); a state_dict that does
    not state an option leaves this optimizer's own value for that group."""
    model = _mlp()
    plain = fastreg.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, plain, 1)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert plain.state_dict()["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys()

    groups = [{"params": model[0].parameters(), "l1": 1e-3, "max_norm": 2.0}, {"params": model[3].parameters()}]
    ours = fastreg.optim.AdamW(groups, lr=1e-2)
    saved = ours.state_dict()["param_groups"]
    assert (saved[0]["l1"], saved[0]["max_norm"]) == (1e-3, 2.0) and "l1" not in saved[1]
    torch_opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[3].parameters()}], lr=5e-3)
    ours.load_state_dict(torch_opt.state_dict())
    assert [(g["lr"], g["l1"], g["max_norm"]) for g in ours.param_groups] == [(5e-3, 1e-3, 2.0), (5e-3, 0.0, None)]


def _torch_capturable_on_cpu(monkeypatch):
    """torch.optim's capturable path (step counts and bias corrections as tensors on the
    params' device) asserts a GPU-like device; let it run on CPU tensors."""
    import importlib

    adam_module = importlib.import_module("torch.optim.adam")  # torch.optim.adam is the function
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices", lambda supports_xla=True: ["cpu"])


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scale-passed-to-kernel", "unscale_-then-step"])
def test_capturable_follows_torch_s_capturable_with_a_skipped_step(step_backend, monkeypatch, unscale_first):
    """capturable=True against torch.optim.AdamW(capturable=True) on the same CPU tensors,
    with a GradScaler whose third step sees an inf: that step changes nothing (params,
    states, step counts), and the others follow torch's (its bias corrections are float32
    tensors, ours float64 scalars: float32 round-off)."""
    _torch_capturable_on_cpu(monkeypatch)
    device = step_backend[1]
    results = []
    for cls in (torch.optim.AdamW, fastreg.optim.AdamW):
        model = _mlp(device)
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, capturable=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        generator = torch.Generator().manual_seed(1)
        steps = []
        for step in range(4):
            x = torch.randn(16, 12, generator=generator).to(device)
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            if step == 2:
                model[0].weight.grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            steps.append([s["step"].item() for s in opt.state.values()])
        results.append((model, opt, steps))
    (theirs, torch_opt, torch_steps), (ours, our_opt, our_steps) = results
    n = len(list(ours.parameters()))
    assert our_steps == torch_steps == [[1.0] * n, [2.0] * n, [2.0] * n, [3.0] * n]
    _assert_models_close(ours, theirs, rtol=1e-5)
    for a, b in zip(our_opt.state.values(), torch_opt.state.values()):
        assert a["step"].device == b["step"].device
        _assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, what="exp_avg_sq")


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (item(), bool(), float(),
    and copies to the CPU of tensors on another device)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_device = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if dst_device is not None and torch.device(dst_device).type == "cpu" and src.device.type != "cpu":
                self.reads.append(func)
        return func(*args, **kwargs)


@pytest.mark.parametrize("opt_name", ["AdamW", "SGD"])
def test_a_step_reads_nothing_back_to_the_host(step_backend, monkeypatch, opt_name):
    """With GradScaler's scale and inf flag set as it sets them, a step (after the first,
    which creates the state) reads no tensor value on the host: no item(), bool(), tolist()
    or copy to the CPU, so nothing waits for the device."""
    device = step_backend[1]
    model = _mlp(device)
    kwargs = dict(lr=1e-2, momentum=0.9) if opt_name == "SGD" else dict(lr=1e-2, weight_decay=0.1, capturable=True)
    opt = getattr(fastreg.optim, opt_name)(model.parameters(), max_norm=1.0, l1=1e-4, **kwargs)
    tolists = []
    original_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolists.append(1) or original_tolist(self))
    for step in range(3):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step)).to(device)
        opt.zero_grad()
        (model(x).pow(2).mean() * 1024).backward()
        opt.grad_scale = torch.tensor(1024.0, device=device)
        opt.found_inf = torch.tensor(0.0, device=device)
        if step == 0:
            opt.step()
            continue
        tolists.clear()
        with _HostReads() as mode:
            opt.step()
        assert mode.reads == [] and tolists == [], (mode.reads, len(tolists))


@needs_gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_a_gpu_step_does_not_synchronize(backend_name):
    model = _mlp("cuda")
    opt = fastreg.optim.AdamW(model.parameters(), lr=1e-2, max_norm=1.0, capturable=True)
    with fastreg.use_backend(backend_name):
        for step in range(3):
            opt.zero_grad()
            (model(torch.randn(16, 12, device="cuda")).pow(2).mean() * 1024).backward()
            opt.grad_scale = torch.tensor(1024.0, device="cuda")
            opt.found_inf = torch.zeros((), device="cuda")
            torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")  # the first step creates states
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_triton_plans_are_kept_per_tensor_set(monkeypatch):
    """The Triton launcher builds its device table once per set of tensors: a second step
    over the same tensors builds nothing; a param moved to new storage builds a new one
    (and the step stays right)."""
    if not hasattr(torch.ops.fastreg, "adam_step_triton_"):
        pytest.skip("no Triton optimizer kernels")
    skip_reason = fastreg._backend._why_not("triton", "cpu" if not torch.cuda.is_available() else "cuda")
    if skip_reason:
        pytest.skip(skip_reason)
    from fastreg.triton_kernels import optim as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    builds = []
    original = kernels._build_plan
    monkeypatch.setattr(kernels, "_build_plan", lambda *a: builds.append(1) or original(*a))
    start = torch.randn(40, device=device)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    our_opt = fastreg.optim.AdamW([ours], lr=1e-2)
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2)
    grad = torch.randn(40, device=device)
    with fastreg.use_backend("triton"):
        for step in range(3):
            ours.grad, theirs.grad = grad, grad.clone()
            if step == 2:
                ours.data = ours.data.clone()  # new storage: the cached table is stale
            our_opt.step()
            torch_opt.step()
            _assert_close(ours, theirs)
    assert len(builds) == 2


@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("poison_step", [0, 1])
def test_sgd_momentum_with_a_skipped_first_step_follows_torch(dampening, poison_step):
    """A GradScaler step with inf grads skipped as the very first step: the momentum buffers
    start with the next step, as in torch (whose GradScaler never calls the step)."""
    results = []
    for cls in (torch.optim.SGD, fastreg.optim.SGD):
        model = _mlp()
        opt = cls(model.parameters(), lr=0.05, momentum=0.9, dampening=dampening)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        generator = torch.Generator().manual_seed(1)
        for step in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.randn(16, 12, generator=generator)).pow(2).mean()).backward()
            if step == poison_step:
                model[0].weight.grad[0, 0] = float("nan")
            scaler.step(opt)
            scaler.update()
        results.append((model, opt))
    (theirs, torch_opt), (ours, our_opt) = results
    _assert_models_close(ours, theirs)
    for a, b in zip(our_opt.state.values(), torch_opt.state.values()):
        _assert_close(a["momentum_buffer"], b["momentum_buffer"], what="momentum_buffer")
