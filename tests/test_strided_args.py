"""The layout contract of every launcher: any strides for every tensor argument.

Each op of the C++ backends (torch.ops.fastreg.*) and each launcher of triton_kernels/
(called directly, as a vendored copy would be) runs once with contiguous arguments and
once with every tensor argument replaced, one at a time, by a non-contiguous view of the
same values (every dim strided, or starting past the beginning of its storage). The
results must be the same. In-place ops (dropout_, the optimizer steps) are compared by
what they leave in their arguments.
"""

import importlib

import pytest
import torch

from tests.conftest import skip_unless_runs

SEED = torch.tensor(0x5EED_1234_ABCD, dtype=torch.int64)


def strided(t):
    """t's values in a view whose every dim has twice the contiguous stride (not dense)."""
    holder = torch.zeros(t.shape + (2,), dtype=t.dtype, device=t.device)
    view = holder[..., 0]
    return view.copy_(t)


def offset(t):
    """t's values in a view starting 5 elements into its storage (contiguous strides)."""
    storage = torch.zeros(t.numel() + 5, dtype=t.dtype, device=t.device)
    return storage[5:].view(t.shape).copy_(t)


RESTRIDE = {"strided": strided, "offset": offset}


def _randn(*shape, scale=1.0, shift=0.0):
    return torch.randn(shape) * scale + shift


def _norm_stats(x):
    mean = x.mean(1)
    rstd = torch.rsqrt(x.var(1, unbiased=False) + 1e-5)
    return mean, rstd


def _cases():
    """(name, op name in torch.ops.fastreg / launcher, module, function, args builder, outputs to compare)"""
    torch.manual_seed(0)
    x2 = _randn(5, 12)
    mean, rstd = _norm_stats(x2)
    x3 = _randn(3, 6, 7, scale=2.0, shift=1.0)
    channel = torch.rand(6) + 0.5
    gn_mean, gn_rstd = torch.randn(3, 2), torch.rand(3, 2) + 0.5
    return {
        "dropout": ("dropout", "dropout", "dropout",
                    lambda: dict(x=_randn(4, 10), seed=SEED, p=0.3, offset=0, inner=1, bias=_randn(10),
                                 residual=_randn(4, 10))),
        "dropout_grouped": ("dropout", "dropout", "dropout",
                            lambda: dict(x=_randn(4, 3, 5), seed=SEED, p=0.5, offset=4, inner=5)),
        "norm_fwd": ("norm_fwd", "layer_norm", "norm_fwd",
                     lambda: dict(x=x2.clone(), weight=torch.rand(12) + 0.5, bias=_randn(12), eps=1e-5, is_rms=False,
                                  residual=_randn(5, 12), seed=SEED, p=0.25, residual_in_fp32=False, store_h=True)),
        "rms_norm_fwd": ("norm_fwd", "layer_norm", "norm_fwd",
                         lambda: dict(x=x2.clone(), weight=torch.rand(12) + 0.5, bias=None, eps=1e-5, is_rms=True)),
        "norm_bwd": ("norm_bwd", "layer_norm", "norm_bwd",
                     lambda: dict(dy=_randn(5, 12), x=x2.clone(), weight=torch.rand(12) + 0.5, mean=mean.clone(),
                                  rstd=rstd.clone(), is_rms=False, has_bias=True, dh=_randn(5, 12), seed=SEED,
                                  p=0.25)),
        "bn_stats": ("bn_stats", "batch_norm", "bn_stats", lambda: dict(x=x3.clone())),
        "bn_apply": ("bn_apply", "batch_norm", "bn_apply",
                     lambda: dict(x=x3.clone(), mean=_randn(6), var=channel.clone(), weight=torch.rand(6) + 0.5,
                                  bias=_randn(6), eps=1e-5)),
        "bn_bwd_reduce": ("bn_bwd_reduce", "batch_norm", "bn_bwd_reduce",
                          lambda: dict(dy=_randn(3, 6, 7), x=x3.clone(), mean=_randn(6), var=channel.clone(),
                                       eps=1e-5)),
        "bn_bwd_apply": ("bn_bwd_apply", "batch_norm", "bn_bwd_apply",
                         lambda: dict(dy=_randn(3, 6, 7), x=x3.clone(), mean=_randn(6), var=channel.clone(),
                                      weight=torch.rand(6) + 0.5, eps=1e-5, sum_dy=_randn(6), sum_dy_xhat=_randn(6),
                                      count=21)),
        "gn_fwd": ("gn_fwd", "group_norm", "gn_fwd",
                   lambda: dict(x=x3.clone(), weight=torch.rand(6) + 0.5, bias=_randn(6), groups=2, eps=1e-5,
                                silu=True)),
        "gn_bwd": ("gn_bwd", "group_norm", "gn_bwd",
                   lambda: dict(dy=_randn(3, 6, 7), x=x3.clone(), weight=torch.rand(6) + 0.5, bias=_randn(6),
                                mean=gn_mean.clone(), rstd=gn_rstd.clone(), groups=2, silu=True)),
    }


CASES = _cases()
# in place: the arguments they update
IN_PLACE = {
    "dropout_": ("dropout_", "dropout", None,
                 lambda: dict(x=_randn(4, 10), seed=SEED, p=0.3, offset=0, inner=1)),
    "sgd_step_": ("sgd_step_", "optim", "sgd_step_",
                  lambda: dict(params=[_randn(4, 6), _randn(7)], grads=[_randn(4, 6), _randn(7)],
                               momentum_buffers=[_randn(4, 6), _randn(7)], masters=[], lr=0.1, momentum=0.9,
                               dampening=0.0, weight_decay=0.01, l1=0.001, max_norm=2.0, nesterov=True,
                               maximize=False, first_step=False, grad_scale=torch.tensor(2.0))),
    "adam_step_": ("adam_step_", "optim", "adam_step_",
                   lambda: dict(params=[_randn(4, 6), _randn(7)], grads=[_randn(4, 6), _randn(7)],
                                exp_avgs=[_randn(4, 6), _randn(7)], exp_avg_sqs=[torch.rand(4, 6), torch.rand(7)],
                                max_exp_avg_sqs=[torch.rand(4, 6) + 1, torch.rand(7) + 1], masters=[],
                                steps=[torch.tensor(1.0), torch.tensor(1.0)], lr=0.01, beta1=0.9, beta2=0.99,
                                eps=1e-8, weight_decay=0.1, decoupled=True, l1=0.0, max_norm=0.0, maximize=False,
                                grad_scale=torch.tensor(1.0))),
}


def _tensor_arguments(args):
    """(name, index or None) of every tensor argument, list elements included."""
    found = []
    for name, value in args.items():
        if torch.is_tensor(value):
            found.append((name, None))
        elif isinstance(value, list):
            found += [(name, i) for i, t in enumerate(value) if torch.is_tensor(t)]
    return found


def _replaced(args, name, index, restride):
    args = {k: (list(v) if isinstance(v, list) else v) for k, v in args.items()}
    if index is None:
        args[name] = restride(args[name])
    else:
        args[name][index] = restride(args[name][index])
    return args


def _build(builder, device):
    """The builder's arguments, the same values on every call, on `device`."""
    torch.manual_seed(1)
    return _to(builder(), device)


def _to(args, device):
    def move(v):
        return v.to(device) if torch.is_tensor(v) else v
    return {k: ([move(t) for t in v] if isinstance(v, list) else move(v)) for k, v in args.items()}


def _callable(backend, op_name, module_name, function_name):
    if backend == "cpu":
        return getattr(torch.ops.fastreg, op_name).default
    if function_name is None:  # the Triton in-place dropout: the launcher with out=x
        launcher = importlib.import_module("fastreg.triton_kernels.dropout").dropout
        return lambda x, **kw: launcher(x, out=x, **kw)
    return getattr(importlib.import_module(f"fastreg.triton_kernels.{module_name}"), function_name)


def _outputs(result):
    if result is None:
        return []
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _assert_same(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("restride", sorted(RESTRIDE))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_any_strides_give_the_same_result(backend, case, restride):
    device = skip_unless_runs(backend)
    op_name, module_name, function_name, build = CASES[case]
    fn = _callable(backend, op_name, module_name, function_name)
    args = _build(build, device)
    expected = _outputs(fn(**args))
    for name, index in _tensor_arguments(args):
        got = _outputs(fn(**_replaced(args, name, index, RESTRIDE[restride])))
        _assert_same(got, expected, f"{case} with {restride} {name}{'' if index is None else f'[{index}]'}")


@pytest.mark.parametrize("restride", sorted(RESTRIDE))
@pytest.mark.parametrize("case", sorted(IN_PLACE))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_in_place_ops_take_any_strides(backend, case, restride):
    device = skip_unless_runs(backend)
    op_name, module_name, function_name, build = IN_PLACE[case]
    fn = _callable(backend, op_name, module_name, function_name)
    reference = _build(build, device)
    fn(**reference)
    for name, index in _tensor_arguments(reference):
        args = _replaced(_build(build, device), name, index, RESTRIDE[restride])
        fn(**args)
        got = [t for n, i in _tensor_arguments(args) for t in [args[n] if i is None else args[n][i]]]
        expected = [t for n, i in _tensor_arguments(reference) for t in [reference[n] if i is None else reference[n][i]]]
        _assert_same(got, expected, f"{case} with {restride} {name}{'' if index is None else f'[{index}]'}")
