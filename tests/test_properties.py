"""Generated cases against torch, on every backend (hypothesis).

Per op family, hypothesis draws shapes (0, 1 and odd sizes included), dtypes, the memory
layout of every tensor argument (tests/strategies.py: contiguous, channels-last,
transposed, sliced with steps, expanded, offset storage; parameters, residuals, running
statistics and the output gradient too), training or eval, affine or not, and compares
fastreg's values and gradients with torch's ops by the relative rule
(strategies.assert_relative_rule). Dropout is compared with torch's for p = 0 and p = 1,
and for 0 < p < 1 with fastreg's torch backend under the same seed (the same Philox mask).

The default profile ("ci", tests/conftest.py) is derandomized and small, with fewer
examples for the interpreted triton backend; `pytest --hypothesis-profile=long` draws many
more. A failure prints the falsifying case and a `@reproduce_failure` blob.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as torch_F
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastreg
from fastreg import functional as F
from tests.strategies import (
    FLOAT_DTYPES,
    as_reference,
    assert_relative_rule,
    examples,
    grads,
    layouts,
    make,
    seeds,
)


def run_cases(backend, strategy, check, cost=1):
    """check(case, device) for `examples(backend)` cases drawn from `strategy`, on `backend`
    (already forced by the fixture)."""
    name, device = backend

    @settings(max_examples=examples(name, cost))
    @given(case=strategy)
    def generated(case):
        note(f"backend={name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's and fastreg's rank deprecation warnings
            check(case, device)

    generated()


def sizes(min_size=0, max_size=7):
    """A dim size; 0, where allowed, is one choice among max_size + 1 (hypothesis would
    otherwise favour the boundary, and an empty tensor needs only one empty dim)."""
    if min_size > 0:
        return st.integers(min_size, max_size)
    return st.sampled_from(list(range(1, max_size + 1)) + [0])


def shapes(rank, min_size=0, max_size=7):
    """A shape of `rank` dims; with min_size 0, one of them is 0 in about one draw of eight."""
    if min_size > 0 or rank == 0:
        return st.lists(st.integers(max(min_size, 1), max_size), min_size=rank, max_size=rank).map(tuple)
    return st.tuples(st.lists(st.integers(1, max_size), min_size=rank, max_size=rank),
                     st.sampled_from([None] * (7 * rank) + list(range(rank)))).map(
        lambda drawn: tuple(0 if d == drawn[1] else size for d, size in enumerate(drawn[0])))


def requiring_grad(t, wanted=True):
    """t as a leaf of the graph the gradients are taken in (a view keeps its strides)."""
    if t is None or not wanted:
        return t
    return t.detach().requires_grad_()


def torch_backend_with_seed(fn, seed):
    """fn() on fastreg's torch backend after torch.manual_seed(seed): the mask the kernels draw."""
    torch.manual_seed(seed)
    with fastreg.use_backend("torch"):
        return fn()


# ------------------------------------------------------------------------ dropout family

_FEATURE_RANKS = {"dropout": (0, 1, 2, 3, 4), "dropout1d": (2, 3), "dropout2d": (2, 3, 4, 5),
                  "dropout3d": (4, 5), "drop_path": (1, 2, 3, 4), "dropout_add": (1, 2, 3)}


@st.composite
def dropout_cases(draw):
    # dropout_add, with the most tensor arguments (bias, residual), in three draws of eight
    op = draw(st.sampled_from(sorted(_FEATURE_RANKS) + ["dropout_add"] * 2))
    rank = draw(st.sampled_from(_FEATURE_RANKS[op]))
    shape = draw(shapes(rank))
    case = dict(op=op, shape=shape, dtype=draw(st.sampled_from(FLOAT_DTYPES)), layout=draw(layouts(rank)),
                p=draw(st.sampled_from([0.0, 1.0, 0.5, 0.125, 0.9])), training=draw(st.booleans()),
                seed=draw(seeds()), grad_layout=draw(layouts(rank)))
    if op == "dropout_add":
        case.update(bias_layout=draw(st.none() | layouts(1)), residual_layout=draw(layouts(rank)))
    return case


def _dropout_fn(case, module):
    """The call of `case` on fastreg.functional (module=F) or torch.nn.functional (module=torch_F)."""
    op, p, training = case["op"], case["p"], case["training"]
    if op == "dropout_add":
        def fn(x, bias, residual):
            if module is F:
                return F.dropout_add(x, residual, p, training, bias)
            return residual + torch_F.dropout(x + bias if bias is not None else x, p, training)
    elif op == "drop_path":
        def fn(x, bias, residual):
            if module is F:
                return F.drop_path(x, p, training)
            return x * 0.0 if training and p == 1.0 else x  # torch has no drop path: its only two exact cases
    else:
        def fn(x, bias, residual):
            return getattr(module, op)(x, p, training)
    return fn


def check_dropout(case, device):
    dtype, shape = case["dtype"], case["shape"]
    x = requiring_grad(make(shape, dtype, case["layout"], case["seed"], device))
    bias = residual = None
    if case["op"] == "dropout_add":
        if case["bias_layout"] is not None:
            bias = requiring_grad(make(shape[-1:], dtype, case["bias_layout"], case["seed"] + 1, device))
        residual = requiring_grad(make(shape, dtype, case["residual_layout"], case["seed"] + 2, device))
    dy = make(shape, dtype, case["grad_layout"], case["seed"] + 3, device)
    inputs = (x, bias, residual)
    ours_fn = _dropout_fn(case, F)
    torch.manual_seed(case["seed"])
    y = ours_fn(*inputs)
    ours_grads = grads(y, inputs, dy)
    rows = max(1, x.numel() // max(1, shape[-1])) if shape else 1  # the bias gradient sums over rows
    if case["p"] in (0.0, 1.0) or not case["training"]:
        theirs_fn = _dropout_fn(case, torch_F)
        reference_inputs = [as_reference(t) for t in inputs]
        y_theirs, y_reference = theirs_fn(*inputs), theirs_fn(*reference_inputs)
        assert_relative_rule(y, y_theirs, y_reference, dtype, "y")
        for name, g, g_theirs, g_reference in zip(("x", "bias", "residual"), ours_grads, grads(y_theirs, inputs, dy),
                                                  grads(y_reference, reference_inputs, dy.double())):
            if g_theirs is not None:
                assert_relative_rule(g, g_theirs, g_reference, dtype, f"grad {name}", factor=rows**0.5)
    else:  # the same mask as fastreg's torch backend under the same seed, to an ulp
        y_reference = torch_backend_with_seed(lambda: ours_fn(*inputs), case["seed"])
        torch.testing.assert_close(y, y_reference, atol=0, rtol=torch.finfo(dtype).eps)
        for g, g_reference in zip(ours_grads, grads(y_reference, inputs, dy)):
            if g_reference is not None:
                torch.testing.assert_close(g, g_reference, atol=torch.finfo(dtype).eps * rows, rtol=4 * torch.finfo(dtype).eps)


def test_dropout_family(backend):
    run_cases(backend, dropout_cases(), check_dropout)


# ------------------------------------------------------- LayerNorm, RMSNorm, fused block


@st.composite
def norm_cases(draw):
    op = draw(st.sampled_from(["layer_norm", "rms_norm", "dropout_add_layer_norm", "dropout_add_rms_norm"]))
    fused = op.startswith("dropout_add")
    normalized_rank = 1 if fused else draw(st.sampled_from([1, 1, 2]))
    rank = normalized_rank + draw(st.integers(0 if not fused else 1, 2))
    shape = draw(shapes(rank, max_size=9))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    low_precision = dtype in (torch.float16, torch.bfloat16)
    param_dtype = draw(st.sampled_from([dtype, torch.float32])) if low_precision else dtype
    case = dict(op=op, shape=shape, normalized_rank=normalized_rank, dtype=dtype, param_dtype=param_dtype,
                layout=draw(layouts(rank)), weight_layout=draw(st.none() | layouts(normalized_rank)),
                bias_layout=None if "rms" in op else draw(st.none() | layouts(normalized_rank)),
                eps=draw(st.sampled_from([1e-5, 1e-2] + ([None] if "rms" in op else []))),
                grad_layout=draw(layouts(rank)), seed=draw(seeds()))
    if fused:
        case.update(residual_layout=draw(st.none() | layouts(rank)), p=draw(st.sampled_from([0.0, 1.0, 0.25])),
                    training=draw(st.booleans()), prenorm=draw(st.booleans()),
                    residual_in_fp32=draw(st.booleans()))
    return case


def _norm_fn(case, module):
    """(x, residual, weight, bias) -> y, or (y, h) for prenorm, on fastreg (module=F) or torch."""
    op, eps = case["op"], case["eps"]
    if eps is None and module is torch_F:  # fastreg's default, and torch's for inputs of the case's dtype
        eps = torch.finfo(case["dtype"]).eps
    normalized_shape = case["shape"][len(case["shape"]) - case["normalized_rank"]:]
    if op == "layer_norm":
        return lambda x, r, w, b: module.layer_norm(x, normalized_shape, w, b, eps)
    if op == "rms_norm":
        return lambda x, r, w, b: module.rms_norm(x, normalized_shape, w, eps)
    p, training, prenorm = case["p"], case["training"], case["prenorm"]
    is_rms = op == "dropout_add_rms_norm"
    if module is F:
        if is_rms:
            return lambda x, r, w, b: F.dropout_add_rms_norm(x, r, w, p, eps, training, prenorm,
                                                             case["residual_in_fp32"])
        return lambda x, r, w, b: F.dropout_add_layer_norm(x, r, w, b, p, eps, training, prenorm,
                                                           case["residual_in_fp32"])

    def composed(x, r, w, b):  # torch: norm(residual + dropout(x)), h rounded to its dtype first
        h_dtype = torch.promote_types(x.dtype, torch.float32) if case["residual_in_fp32"] else x.dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        h = torch_F.dropout(x.to(acc), p, training)
        if r is not None:
            h = r.to(acc) + h
        h = h.to(h_dtype)
        hn = h.to(x.dtype) if not case["residual_in_fp32"] else h
        if is_rms:
            y = torch_F.rms_norm(hn, normalized_shape, w.to(hn.dtype) if w is not None else None, eps)
        else:
            y = torch_F.layer_norm(hn, normalized_shape, w.to(hn.dtype) if w is not None else None,
                                   b.to(hn.dtype) if b is not None else None, eps)
        y = y.to(x.dtype)
        return (y, h) if prenorm else y

    return composed


def _norm_conditioning(case, x, residual, weight):
    """(max |h| * max rstd * max(1, max |w|), max rstd) of the norm input h in float64: a
    rounding of a row's statistics (an ulp of |h|) grows by the first in y, and by both in
    dx. A row of equal values (an expanded layout) has rstd = 1 / sqrt(eps): torch's
    Welford mean is exact there, a two-pass sum / N may be an ulp off."""
    fused = case["op"].startswith("dropout_add")
    h = x.detach().double()
    if fused and case["training"] and case["p"] == 1.0:
        h = torch.zeros_like(h)
    if fused and residual is not None:
        h = h + residual.detach().double()
    n = math.prod(case["shape"][len(case["shape"]) - case["normalized_rank"]:])
    if h.numel() == 0 or n == 0:
        return 1.0, 1.0
    rows = h.reshape(-1, n)
    eps = case["eps"] if case["eps"] is not None else torch.finfo(case["dtype"]).eps
    spread = rows.pow(2).mean(1) if "rms" in case["op"] else rows.var(1, unbiased=False)
    rstd = (spread + eps).rsqrt().max().item()
    w = weight.detach().double().abs().max().item() if weight is not None and weight.numel() else 1.0
    return max(1.0, rows.abs().max().item() * rstd * max(1.0, w)), max(1.0, rstd)


def check_norm(case, device):
    dtype, param_dtype, shape = case["dtype"], case["param_dtype"], case["shape"]
    normalized_shape = shape[len(shape) - case["normalized_rank"]:]
    fused = case["op"].startswith("dropout_add")
    x = requiring_grad(make(shape, dtype, case["layout"], case["seed"], device, mean=0.5, scale=2.0))
    residual = None
    if fused and case["residual_layout"] is not None:
        residual = requiring_grad(make(shape, dtype, case["residual_layout"], case["seed"] + 1, device))
    weight = bias = None
    if case["weight_layout"] is not None:
        weight = requiring_grad(make(normalized_shape, param_dtype, case["weight_layout"], case["seed"] + 2, device))
    if case["bias_layout"] is not None:
        bias = requiring_grad(make(normalized_shape, param_dtype, case["bias_layout"], case["seed"] + 3, device))
    dy = make(shape, dtype, case["grad_layout"], case["seed"] + 4, device)
    inputs = (x, residual, weight, bias)
    names = ("x", "residual", "weight", "bias")
    ours_fn = _norm_fn(case, F)
    torch.manual_seed(case["seed"])
    out = ours_fn(*inputs)
    y = out[0] if isinstance(out, tuple) else out
    ours_grads = grads(y, inputs, dy)
    rows = max(1, x.numel() // max(1, math.prod(normalized_shape)))
    if fused and case["training"] and 0.0 < case["p"] < 1.0:  # the torch backend's mask, same seed
        out_reference = torch_backend_with_seed(lambda: ours_fn(*inputs), case["seed"])
        y_reference = out_reference[0] if isinstance(out_reference, tuple) else out_reference
        tol = dict(atol=8 * torch.finfo(dtype).eps, rtol=8 * torch.finfo(dtype).eps)
        torch.testing.assert_close(y, y_reference, **tol)
        if case["prenorm"]:
            torch.testing.assert_close(out[1], out_reference[1], **tol)
        for name, g, g_reference in zip(names, ours_grads, grads(y_reference, inputs, dy)):
            if g_reference is not None:
                assert_relative_rule(g, g_reference, g_reference, dtype, f"grad {name}", factor=16 * rows**0.5)
        return
    theirs_fn = _norm_fn(case, torch_F)
    reference_inputs = [as_reference(t) for t in inputs]
    out_theirs, out_reference = theirs_fn(*inputs), theirs_fn(*reference_inputs)
    y_theirs = out_theirs[0] if isinstance(out_theirs, tuple) else out_theirs
    y_reference = out_reference[0] if isinstance(out_reference, tuple) else out_reference
    condition, rstd = _norm_conditioning(case, x, residual, weight)
    assert_relative_rule(y, y_theirs, y_reference, dtype, "y", factor=condition)
    if fused and case["prenorm"]:
        assert_relative_rule(out[1], out_theirs[1], out_reference[1], out[1].dtype, "h")
    reference_grads = grads(y_reference, reference_inputs, dy.double())
    try:
        theirs_grads = grads(y_theirs, inputs, dy)
    except RuntimeError:  # torch's own backward fails on some mixed dtypes (fp16 x, fp32 bias, no weight)
        theirs_grads = [g.to(t.dtype) if g is not None else None for g, t in zip(reference_grads, inputs)]
    for name, g, g_theirs, g_reference in zip(names, ours_grads, theirs_grads, reference_grads):
        if g_theirs is not None:
            factor = 8 * condition * (rows**0.5 if name in ("weight", "bias") else rstd)
            assert_relative_rule(g, g_theirs, g_reference, g_theirs.dtype, f"grad {name}", factor=factor)


def test_norms(backend):
    run_cases(backend, norm_cases(), check_norm)


# ----------------------------------------------------------------------------- BatchNorm


@st.composite
def batch_norm_cases(draw):
    spatial = draw(st.sampled_from([0, 1, 2, 3]))  # BatchNorm1d (N, C) / (N, C, L), 2d, 3d
    training = draw(st.booleans())
    n = draw(sizes(0, 4))
    shape = (n, draw(sizes(1, 5))) + draw(shapes(spatial, 1, 5))
    if training and n * torch.Size(shape[2:]).numel() == 1:  # torch needs more than 1 value per channel
        shape = (2,) + shape[1:]
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    low_precision = dtype in (torch.float16, torch.bfloat16)
    return dict(shape=shape, dtype=dtype, layout=draw(layouts(len(shape))), training=training,
                param_dtype=torch.float32 if low_precision else dtype,
                affine_layout=draw(st.none() | layouts(1)), stats_layout=draw(st.none() | layouts(1)),
                momentum=draw(st.sampled_from([0.1, 0.5, 1.0])), eps=draw(st.sampled_from([1e-5, 1e-3])),
                grad_layout=draw(layouts(len(shape))), seed=draw(seeds()))


def check_batch_norm(case, device):
    dtype, param_dtype, shape, training = case["dtype"], case["param_dtype"], case["shape"], case["training"]
    channels = shape[1]
    x = requiring_grad(make(shape, dtype, case["layout"], case["seed"], device, mean=1.0, scale=2.0))
    weight = bias = None
    if case["affine_layout"] is not None:
        weight = requiring_grad(make((channels,), param_dtype, case["affine_layout"], case["seed"] + 1, device,
                                     low=0.5, high=1.5))
        bias = requiring_grad(make((channels,), param_dtype, case["affine_layout"], case["seed"] + 2, device))
    stats = None
    if case["stats_layout"] is not None or not training:
        layout = case["stats_layout"] or "contiguous"
        stats = (make((channels,), param_dtype, layout, case["seed"] + 3, device),
                 make((channels,), param_dtype, layout, case["seed"] + 4, device, low=0.5, high=2.0))
    dy = make(shape, dtype, case["grad_layout"], case["seed"] + 5, device)

    def run(fn, x, weight, bias, stats):
        running = tuple(s.clone() for s in stats) if stats is not None else (None, None)
        y = fn(x, running[0], running[1], weight, bias, training, case["momentum"], case["eps"])
        return y, running

    inputs = (x, weight, bias)
    y, running = run(F.batch_norm, x, weight, bias, stats)
    y_theirs, running_theirs = run(torch_F.batch_norm, x, weight, bias, stats)
    reference_inputs = [as_reference(t) for t in inputs]
    reference_stats = tuple(s.double() for s in stats) if stats is not None else None
    y_reference, running_reference = run(torch_F.batch_norm, *reference_inputs, reference_stats)
    assert_relative_rule(y, y_theirs, y_reference, dtype, "y")
    for name, ours, theirs, reference in zip(("running_mean", "running_var"), running, running_theirs,
                                             running_reference):
        if theirs is not None:
            assert_relative_rule(ours, theirs, reference, param_dtype, name, factor=4)
    count = max(1, x.numel() // max(1, channels))
    for name, g, g_theirs, g_reference in zip(("x", "weight", "bias"), grads(y, inputs, dy),
                                              grads(y_theirs, inputs, dy),
                                              grads(y_reference, reference_inputs, dy.double())):
        if g_theirs is not None:
            factor = 8 * (count**0.5 if name != "x" else 1)
            assert_relative_rule(g, g_theirs, g_reference, g_theirs.dtype, f"grad {name}", factor=factor)


def test_batch_norm(backend):
    run_cases(backend, batch_norm_cases(), check_batch_norm)


# ----------------------------------------------------------------- GroupNorm, InstanceNorm


@st.composite
def group_norm_cases(draw):
    op = draw(st.sampled_from(["group_norm", "group_norm_silu", "instance_norm"]))
    groups = 1 if op == "instance_norm" else draw(sizes(1, 4))
    channels = draw(sizes(1, 4)) * groups
    spatial = draw(st.sampled_from([0, 1, 2, 3] if op != "instance_norm" else [1, 2, 3]))
    # instance_norm: N >= 1 (torch's own fails on some empty batches: an IndexError in select)
    shape = (draw(sizes(0 if op != "instance_norm" else 1, 3)), channels) + draw(shapes(spatial, 1, 5))
    if op == "instance_norm":
        groups = channels
    elif shape[0] * (channels // groups) * torch.Size(shape[2:]).numel() == 1:  # torch: more than 1 value
        shape = (2,) + shape[1:]
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    case = dict(op=op, shape=shape, groups=groups, dtype=dtype, layout=draw(layouts(len(shape))),
                weight_layout=draw(st.none() | layouts(1)), bias_layout=draw(st.none() | layouts(1)),
                eps=draw(st.sampled_from([1e-5, 1e-3])), grad_layout=draw(layouts(len(shape))), seed=draw(seeds()))
    if op == "instance_norm":
        case.update(use_input_stats=draw(st.booleans()), stats_layout=draw(st.none() | layouts(1)),
                    momentum=draw(st.sampled_from([0.1, 0.7])))
        if not case["use_input_stats"] and case["stats_layout"] is None:
            case["stats_layout"] = "contiguous"
        spatial_numel = torch.Size(shape[2:]).numel()
        if case["use_input_stats"] and spatial_numel <= 1:  # torch: more than one spatial element
            case["shape"] = shape[:2] + (2,) + shape[3:]
    return case


def _torch_group_norm_bias_only_backward() -> bool:
    """Whether torch's group_norm differentiates a bias given without a weight (torch 2.11
    raises "tensor does not have a device" there)."""
    x, bias = torch.ones(1, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    try:
        torch_F.group_norm(x, 1, None, bias).sum().backward()
    except RuntimeError:
        return False
    return True


TORCH_GROUP_NORM_BIAS_ONLY_BACKWARD = _torch_group_norm_bias_only_backward()


def check_group_norm(case, device):
    dtype, shape, op = case["dtype"], case["shape"], case["op"]
    channels = shape[1]
    x = requiring_grad(make(shape, dtype, case["layout"], case["seed"], device, mean=1.0, scale=2.0))
    weight = bias = None
    if case["weight_layout"] is not None:
        weight = requiring_grad(make((channels,), dtype, case["weight_layout"], case["seed"] + 1, device, low=0.5,
                                     high=1.5))
    if case["bias_layout"] is not None:
        bias = requiring_grad(make((channels,), dtype, case["bias_layout"], case["seed"] + 2, device))
    dy = make(shape, dtype, case["grad_layout"], case["seed"] + 3, device)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    stats = None
    if op == "instance_norm" and case["stats_layout"] is not None:
        stats = (make((channels,), stats_dtype, case["stats_layout"], case["seed"] + 4, device),
                 make((channels,), stats_dtype, case["stats_layout"], case["seed"] + 5, device, low=0.5, high=2.0))

    def run(module, x, weight, bias, stats):
        running = tuple(s.clone() for s in stats) if stats is not None else (None, None)
        if op == "instance_norm":
            return module.instance_norm(x, running[0], running[1], weight, bias, case["use_input_stats"],
                                        case["momentum"], case["eps"]), running
        if module is F:
            return F.group_norm(x, case["groups"], weight, bias, case["eps"],
                                activation="silu" if op == "group_norm_silu" else None), running
        if weight is None and bias is not None and not TORCH_GROUP_NORM_BIAS_ONLY_BACKWARD:
            weight = torch.ones(channels, dtype=x.dtype, device=x.device)  # the same function
        y = torch_F.group_norm(x, case["groups"], weight, bias, case["eps"])
        return (torch_F.silu(y) if op == "group_norm_silu" else y), running

    inputs = (x, weight, bias)
    (y, running), (y_theirs, running_theirs) = run(F, *inputs, stats), run(torch_F, *inputs, stats)
    reference_inputs = [as_reference(t) for t in inputs]
    reference_stats = tuple(s.double() for s in stats) if stats is not None else None
    y_reference, running_reference = run(torch_F, *reference_inputs, reference_stats)
    assert_relative_rule(y, y_theirs, y_reference, dtype, "y")
    for name, ours, theirs, reference in zip(("running_mean", "running_var"), running, running_theirs,
                                             running_reference):
        if theirs is not None:
            assert_relative_rule(ours, theirs, reference, stats_dtype, name, factor=4)
    count = max(1, shape[0] * torch.Size(shape[2:]).numel())
    # torch's instance_norm backward (2.14) permutes a non-contiguous grad_output's values:
    # torch gets the same values contiguous
    dy_torch = dy.contiguous() if op == "instance_norm" else dy
    for name, g, g_theirs, g_reference in zip(("x", "weight", "bias"), grads(y, inputs, dy),
                                              grads(y_theirs, inputs, dy_torch),
                                              grads(y_reference, reference_inputs, dy_torch.double())):
        if g_theirs is not None:
            factor = 8 * (count**0.5 if name != "x" else 1)
            assert_relative_rule(g, g_theirs, g_reference, dtype, f"grad {name}", factor=factor)


def test_group_norm(backend):
    run_cases(backend, group_norm_cases(), check_group_norm)


# ------------------------------------------------------------------------- optimizer step

_OPTIMIZERS = {"SGD": (torch.optim.SGD, fastreg.optim.SGD), "Adam": (torch.optim.Adam, fastreg.optim.Adam),
               "AdamW": (torch.optim.AdamW, fastreg.optim.AdamW)}


# Not "expanded": fastreg.optim writes its contiguous copies back into every non-contiguous
# tensor it was given, grads included, and a stride-0 grad cannot be written
# (test_optimizer_expanded_grad, a known bug of fastreg/optim).
_GRAD_LAYOUTS = ["contiguous", "transposed", "sliced", "offset"]


@st.composite
def optimizer_cases(draw):
    name = draw(st.sampled_from(sorted(_OPTIMIZERS)))
    if name == "SGD":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        options = dict(lr=draw(st.sampled_from([0.1, 0.01])), momentum=momentum, nesterov=nesterov,
                       dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
                       weight_decay=draw(st.sampled_from([0.0, 0.05])), maximize=draw(st.booleans()))
    else:
        options = dict(lr=draw(st.sampled_from([1e-2, 1e-3])), betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.9)])),
                       eps=draw(st.sampled_from([1e-8, 1e-6])), weight_decay=draw(st.sampled_from([0.0, 0.1])),
                       amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
    params = draw(st.lists(st.tuples(st.integers(0, 3).flatmap(shapes), st.sampled_from(["contiguous", "transposed",
                                                                                          "sliced", "offset"]),
                                     st.sampled_from(_GRAD_LAYOUTS)),
                           min_size=1, max_size=3))
    return dict(optimizer=name, options=options, dtype=draw(st.sampled_from([torch.float32, torch.float64,
                                                                            torch.bfloat16])),
                params=params, steps=draw(st.integers(1, 3)), seed=draw(seeds()))


def check_optimizer(case, device):
    dtype = case["dtype"]
    torch_cls, fastreg_cls = _OPTIMIZERS[case["optimizer"]]
    ours_params, theirs_params, reference_params = [], [], []
    for i, (shape, layout, _) in enumerate(case["params"]):
        value = make(shape, dtype, layout, case["seed"] + i, device)
        ours_params.append(torch.nn.Parameter(value))  # keeps the view's strides
        theirs_params.append(torch.nn.Parameter(value.clone()))
        reference_params.append(torch.nn.Parameter(value.double()))
    ours = fastreg_cls(ours_params, **case["options"])
    theirs = torch_cls(theirs_params, **case["options"])
    reference = torch_cls(reference_params, **case["options"])
    for step in range(case["steps"]):
        for i, (shape, _, grad_layout) in enumerate(case["params"]):
            grad = make(shape, dtype, grad_layout, case["seed"] + 100 * (step + 1) + i, device)
            ours_params[i].grad = grad
            theirs_params[i].grad = grad.clone()
            reference_params[i].grad = grad.double()
        ours.step()
        theirs.step()
        reference.step()
        for i, (p, p_theirs, p_reference) in enumerate(zip(ours_params, theirs_params, reference_params)):
            assert_relative_rule(p.detach(), p_theirs.detach(), p_reference.detach(), dtype,
                                 f"param {i} after step {step + 1}", factor=step + 1)


def test_optimizer_step(backend):
    run_cases(backend, optimizer_cases(), check_optimizer)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="fastreg.optim copies a non-contiguous grad and writes the copy back into it")
def test_optimizer_expanded_grad(backend):
    """A grad with a stride-0 dim (expanded) is read-only input: torch.optim steps with it."""
    name, device = backend
    param = torch.nn.Parameter(torch.ones(3, 2, device=device))
    param.grad = torch.full((1, 2), 0.5, device=device).expand(3, 2)
    fastreg.optim.Adam([param], lr=0.1).step()
    expected = torch.nn.Parameter(torch.ones(3, 2, device=device))
    expected.grad = param.grad
    torch.optim.Adam([expected], lr=0.1).step()
    torch.testing.assert_close(param, expected)
