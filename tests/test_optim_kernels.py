"""The multi-tensor optimizer-step kernels (fastreg::sgd_step_ / adam_step_) against the
reference of fastreg/_reference.py, step by step, on lists of tensors of odd sizes.

Triton runs here through the interpreter on CPU tensors (slow: few, small tensors, one call
per case); the CUDA kernels run only on a GPU. One list holds a tensor longer than the
Triton block (a full block and a tail) and, for max-norm, 2-D/3-D tensors whose rows lie
above and below the bound, rows longer than a row block, and more rows than one program
owns.
"""

import os

import pytest
import torch

from fastreg import _ext, _reference
from fastreg.ops.optim import ADAM_STEP, SGD_STEP
from tests import triton_aot
from tests.conftest import GPU, skip_unless_runs

# {value dtype: (atol, rtol)}: float32/64 agree to rounding (the kernels follow the
# reference's order of operations); bfloat16/float16 values and states are rounded at every
# store, and a max-norm row of a low-precision param without masters is rounded twice
# (stored, then rescaled), so one or two units in the last place.
TOLERANCE = {
    torch.float32: (1e-6, 1e-6),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 2e-3),
}

OPTIM_BACKENDS = ("triton", "cuda")
ELEMENTWISE_SHAPES = [(1,), (7,), (33,), (1000,), (4096 + 33,)]  # the last: a full Triton block and a tail
# rows (dim 0) of these are set to norms on both sides of MAX_NORM
ROW_SHAPES = [(4, 33), (3, 4, 5), (2, 1500), (125, 33)]
MAX_NORM = 1.0


def _device_for(backend):
    if backend == "cuda" and not GPU:
        pytest.skip("needs a CUDA GPU")
    return skip_unless_runs(backend)


def _random(shape, dtype, device, generator, positive=False):
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (values.abs() if positive else values).to(device=device, dtype=dtype)


def _make_step_inputs(optimizer, param_dtype, with_masters, device, max_norm, amsgrad=False, momentum=True):
    """params, grads, masters and the optimizer's state lists, reproducibly random."""
    generator = torch.Generator().manual_seed(1234)
    shapes = ELEMENTWISE_SHAPES + (ROW_SHAPES if max_norm > 0 else [])
    value_dtype = torch.float32 if with_masters else param_dtype
    values = []
    for shape in shapes:
        value = _random(shape, torch.float64, "cpu", generator)
        if len(shape) >= 2:  # row norms from 0.2 to 3 times the bound
            rows = value.reshape(shape[0], -1)
            order = torch.randperm(shape[0], generator=generator)
            target = torch.linspace(0.2, 3.0, shape[0], dtype=torch.float64)[order]
            rows *= (target * max_norm / rows.norm(dim=1)).unsqueeze(1)
        values.append(value.to(device=device, dtype=value_dtype))
    masters = values if with_masters else []
    params = [value.to(param_dtype) for value in values]
    grads = [_random(p.shape, param_dtype, device, generator) for p in params]
    if optimizer == "sgd":
        states = {"momentum_buffers": [_random(p.shape, value_dtype, device, generator) for p in params]
                  if momentum else []}
    else:
        states = {
            "exp_avgs": [_random(p.shape, value_dtype, device, generator) for p in params],
            "exp_avg_sqs": [_random(p.shape, value_dtype, device, generator, positive=True) for p in params],
            "max_exp_avg_sqs": [_random(p.shape, value_dtype, device, generator, positive=True) for p in params]
            if amsgrad else [],
        }
    return params, grads, states, masters


def _clone(tensors):
    return [t.clone() for t in tensors]


def _run_both(op, backend, optimizer, param_dtype, with_masters, options, device):
    """Run the kernel and the reference on the same inputs; return (kernel's, reference's) tensors."""
    params, grads, states, masters = _make_step_inputs(
        optimizer, param_dtype, with_masters, device, options.get("max_norm", 0.0),
        amsgrad=options.pop("amsgrad", False), momentum=options.get("momentum", 0.0) != 0,
    )
    ref_params, ref_states, ref_masters = _clone(params), {k: _clone(v) for k, v in states.items()}, _clone(masters)
    grad_scale = options.pop("grad_scale", None)
    if grad_scale is not None:
        options["grad_scale"] = torch.tensor(grad_scale, device=device)
    if optimizer == "sgd":
        args = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, l1=0.0, max_norm=0.0, nesterov=False,
                    maximize=False, first_step=False)
        args.update(options)
        op(params, grads, states["momentum_buffers"], masters, **args)
        _reference.sgd_step_(ref_params, grads, ref_states["momentum_buffers"], ref_masters, **args)
    else:
        args = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, l1=0.0,
                    max_norm=0.0, maximize=False)
        args.update(options)
        # counts 2 (bias corrections of step 3) and up: each tensor its own
        states["steps"] = [torch.tensor(2.0 + i, device=device) for i in range(len(params))]
        ref_states["steps"] = _clone(states["steps"])
        op(params, grads, states["exp_avgs"], states["exp_avg_sqs"], states["max_exp_avg_sqs"], masters,
           states["steps"], **args)
        _reference.adam_step_(ref_params, grads, ref_states["exp_avgs"], ref_states["exp_avg_sqs"],
                              ref_states["max_exp_avg_sqs"], ref_masters, ref_states["steps"], **args)
    got = {"params": params, "masters": masters, **states}
    want = {"params": ref_params, "masters": ref_masters, **ref_states}
    return got, want


def _assert_match(got, want):
    for name in want:
        assert len(got[name]) == len(want[name])
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            atol, rtol = TOLERANCE[g.dtype]
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}[{i}] {tuple(g.shape)}: {m}")


def _assert_masters_rounded_into_params(got):
    for param, master in zip(got["params"], got["masters"]):
        assert torch.equal(param, master.to(param.dtype)), "params must receive their masters rounded"


def _op(name, backend):
    return {"sgd_step_": SGD_STEP, "adam_step_": ADAM_STEP}[name][backend]


SGD_OPTIONS = {
    "plain": dict(),
    "momentum_dampening_l2": dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    "momentum_first_step": dict(momentum=0.9, dampening=0.5, first_step=True),
    "nesterov_maximize_scaled": dict(momentum=0.8, nesterov=True, maximize=True, grad_scale=4.0),
    "l1": dict(l1=0.5),
    "max_norm": dict(max_norm=MAX_NORM),
}
ADAM_OPTIONS = {
    "adam_l2": dict(weight_decay=0.01),
    "adamw": dict(weight_decay=0.1, decoupled=True),
    "amsgrad_maximize_scaled": dict(amsgrad=True, maximize=True, grad_scale=2.0),
    "l1_max_norm": dict(l1=0.05, max_norm=MAX_NORM),
}
# every regularization at once, for the dtype cases
SGD_ALL = dict(momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.01, l1=0.02, max_norm=MAX_NORM,
               grad_scale=2.0)
ADAM_ALL = dict(amsgrad=True, weight_decay=0.05, decoupled=True, l1=0.002, max_norm=MAX_NORM, grad_scale=2.0)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("case", list(SGD_OPTIONS))
def test_sgd_step_options_float32(backend, case):
    device = _device_for(backend)
    got, want = _run_both(_op("sgd_step_", backend), backend, "sgd", torch.float32, False, dict(SGD_OPTIONS[case]),
                          device)
    _assert_match(got, want)
    if case == "l1":  # the proximal step leaves exact zeros, where the reference does
        zeros = sum(int((p == 0).sum()) for p in want["params"])
        assert zeros > 100
        for g, w in zip(got["params"], want["params"]):
            assert torch.equal(g == 0, w == 0)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("case", list(ADAM_OPTIONS))
def test_adam_step_options_float32(backend, case):
    device = _device_for(backend)
    got, want = _run_both(_op("adam_step_", backend), backend, "adam", torch.float32, False,
                          dict(ADAM_OPTIONS[case]), device)
    _assert_match(got, want)


def test_max_norm_projects_the_rows_above_the_bound():
    """The reference's projection itself (what the kernels are held to): rows over the bound
    end on it, rows under it keep their norm."""
    got, want = _run_both(_reference.sgd_step_, "torch", "sgd", torch.float64, False, dict(max_norm=MAX_NORM, lr=0.0),
                          "cpu")
    for param in want["params"]:
        if param.dim() >= 2:
            norms = param.reshape(param.shape[0], -1).norm(dim=1)
            assert (norms <= MAX_NORM * (1 + 1e-12)).all() and (norms > 0.99 * MAX_NORM).any()
            assert (norms < 0.9 * MAX_NORM).any()


# (param dtype, with fp32 masters)
DTYPE_CASES = [(torch.float64, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("param_dtype, with_masters", DTYPE_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_step_dtypes_with_every_option(backend, optimizer, param_dtype, with_masters):
    device = _device_for(backend)
    options = dict(SGD_ALL if optimizer == "sgd" else ADAM_ALL)
    got, want = _run_both(_op(f"{optimizer}_step_", backend), backend, optimizer, param_dtype, with_masters, options,
                          device)
    _assert_match(got, want)
    if with_masters:
        _assert_masters_rounded_into_params(got)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_one_call_over_mixed_dtypes(backend):
    """float32 and float64 params in one list: each group runs in its own precision."""
    device = _device_for(backend)
    generator = torch.Generator().manual_seed(7)
    params = [_random((33,), torch.float32, device, generator), _random((7,), torch.float64, device, generator)]
    grads = [_random(p.shape, p.dtype, device, generator) for p in params]
    buffers = [_random(p.shape, p.dtype, device, generator) for p in params]
    ref_params, ref_buffers = _clone(params), _clone(buffers)
    args = (0.1, 0.9, 0.0, 0.01, 0.0, 0.0, False, False, False)
    _op("sgd_step_", backend)(params, grads, buffers, [], *args)
    _reference.sgd_step_(ref_params, grads, ref_buffers, [], *args)
    _assert_match({"params": params, "buffers": buffers}, {"params": ref_params, "buffers": ref_buffers})


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_empty_lists_and_empty_tensors_are_no_ops(backend):
    device = _device_for(backend)
    if backend == "triton":  # the launcher itself (an op given no tensor has no device to dispatch on)
        from fastreg.triton_kernels import optim

        optim.sgd_step_([], [], [], [], 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, False, False, False)
        optim.adam_step_([], [], [], [], [], [], [], 0.1, 0.9, 0.999, 1e-8, 0.0, False, 0.0, 0.0, False)
    empty = torch.empty(0, device=device)
    step = torch.tensor(0.0, device=device)
    _op("adam_step_", backend)([empty], [empty.clone()], [empty.clone()], [empty.clone()], [], [], [step], 0.1, 0.9,
                               0.999, 1e-8, 0.0, False, 0.0, 0.0, False)
    assert step.item() == 1  # counted as torch counts a param without elements


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_bad_arguments_raise_clear_errors(backend):
    device = _device_for(backend)
    error = ValueError if backend == "triton" else RuntimeError
    sgd = _op("sgd_step_", backend)
    p = torch.zeros(8, device=device)
    scalars = (0.1, 0.9, 0.0, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(error, match="grads"):
        sgd([p], [], [p.clone()], [], *scalars)
    with pytest.raises(error, match="momentum_buffers"):
        sgd([p], [p.clone()], [], [], *scalars)
    # a non-contiguous tensor is not an error: tests/test_strided_args.py
    with pytest.raises(error, match="momentum_buffers\\[0\\].*float64|momentum_buffers\\[0\\].*Double"):
        sgd([p], [p.clone()], [p.double()], [], *scalars)
    with pytest.raises(error, match="masters\\[0\\]"):
        sgd([p.half()], [p.half()], [p.clone()], [p.double()], *scalars)
    with pytest.raises(error, match="shape|elements"):
        sgd([p], [torch.zeros(9, device=device)], [p.clone()], [], *scalars)
    with pytest.raises(error, match="grad_scale"):
        sgd([p], [p.clone()], [p.clone()], [], *scalars, torch.ones(2, device=device))


@pytest.mark.skipif(os.environ.get("FASTREG_EXPECT_BUILD") != "cuda",
                    reason="FASTREG_EXPECT_BUILD is not 'cuda': the build was not asked for CUDA kernels")
def test_cuda_optimizer_kernels_are_built():
    """They compile and register wherever nvcc is, even where no GPU can run them."""
    assert _ext.has_kernel("sgd_step_", "CUDA") and _ext.has_kernel("adam_step_", "CUDA")


def test_triton_ops_are_registered():
    assert SGD_STEP["triton"] is torch.ops.fastreg.sgd_step_triton_.default
    assert ADAM_STEP["triton"] is torch.ops.fastreg.adam_step_triton_.default


_FLOAT_ARGS = ("lr", "weight_decay", "l1_threshold", "max_norm", "momentum", "one_minus_dampening", "one_minus_beta1",
               "beta2", "one_minus_beta2", "log_beta1", "log_beta2", "eps", "decay_factor")


def _optim_case(case_id, **options):
    from fastreg.triton_kernels import optim

    fp32 = triton_aot.dtype("fp32")
    constexprs = dict(PARAM_DTYPE=fp32, VALUE_DTYPE=fp32, ACC=fp32, FP64=False, IS_ADAM=True,
                      HAS_MASTER=False, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, MAXIMIZE=False,
                      HAS_WEIGHT_DECAY=False, DECOUPLED=False, HAS_MOMENTUM=False, NESTEROV=False, FIRST_STEP=False,
                      AMSGRAD=False, HAS_L1=False, PROJECT_ROWS=False, ALIGNED=True, BLOCK=optim.BLOCK_SIZE)
    constexprs.update(options)
    signature = {"table_ptr": "*i64", "items_ptr": "*i64", "grads_ptr": "*i64", "grad_scale_ptr": "*fp32",
                 "found_inf_ptr": "*fp32"}
    signature.update({name: "fp64" for name in _FLOAT_ARGS})
    return triton_aot.Case(case_id, "fastreg.triton_kernels.optim", "_optimizer_step_kernel", signature, constexprs,
                           num_warps=optim.NUM_WARPS)


def test_triton_kernel_compiles_for_a_gpu():
    """The interpreter accepts code a GPU compile rejects (non-constexpr globals, float64
    where only float32 is allowed): compile for sm_90 ahead of time, no GPU needed, in a
    process without TRITON_INTERPRET, and check the full blocks use 16-byte loads and the
    bias corrections call the float64 exp and log (no fast float32 approximation)."""
    triton_aot.require_nvidia_backend()
    from fastreg.triton_kernels import optim

    bf16, fp64 = triton_aot.dtype("bf16"), triton_aot.dtype("fp64")

    # every option of the elementwise path, bfloat16 params with float32 masters: 16-byte accesses
    elementwise = _optim_case("elementwise", PARAM_DTYPE=bf16, HAS_MASTER=True, HAS_WEIGHT_DECAY=True,
                              DECOUPLED=True, AMSGRAD=True, HAS_L1=True, MAXIMIZE=True)
    # the max-norm path in float64, SGD with Nesterov momentum, no GradScaler
    rows = _optim_case("max_norm_rows_fp64", PARAM_DTYPE=fp64, VALUE_DTYPE=fp64, ACC=fp64,
                       FP64=True, IS_ADAM=False, HAS_MOMENTUM=True, NESTEROV=True, HAS_WEIGHT_DECAY=True,
                       HAS_L1=True, PROJECT_ROWS=True, ALIGNED=False, BLOCK=optim.ROW_BLOCK_SIZE,
                       HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, grad_scale_ptr=None, found_inf_ptr=None)
    steps = triton_aot.Case("increment_steps", "fastreg.triton_kernels.optim", "_increment_steps_kernel",
                            {"steps_ptr": "*i64", "count": "i32", "found_inf_ptr": "*fp32"},
                            dict(HAS_FOUND_INF=True, BLOCK=optim.STEPS_BLOCK_SIZE))
    results = triton_aot.compile_ptx([elementwise, rows, steps])
    ptx = triton_aot.ptx_of(results, elementwise)
    assert len(triton_aot.global_accesses(ptx, "ld", width=4)) >= 16, "the full blocks lost their vector loads"
    assert "ex2.approx" not in ptx and "lg2.approx" not in ptx, "float64 bias corrections through float32 math"
    triton_aot.ptx_of(results, rows)
    triton_aot.ptx_of(results, steps)
