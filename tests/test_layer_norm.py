"""LayerNorm, RMSNorm and the fused dropout + add + norm against PyTorch on every backend."""

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg import _reference, _rng
from fastreg.ops.norm import NORM_FWD
from fastreg import functional as F
from tests import triton_aot
from tests.conftest import GPU

# The relative rule: against a float32 reference computed from the same rounded input,
# fastreg's error may be at most twice PyTorch's own error in the input dtype, plus an
# atol. For float32 there is no "own error" to speak of, so a plain tolerance.
# Backward is looser than forward: dx sums N products per element, and dweight/dbias
# sum over the rows (their atol grows with sqrt(rows)).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}
BACKWARD_ATOL_FACTOR = 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 7, 1023, 4097]


def _interpreter_slack(backend_name, reference, dtype):
    # The Triton interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to
    # nearest): allow it one more bfloat16 ulp of the largest value.
    if backend_name == "triton" and not GPU and dtype == torch.bfloat16:
        return torch.finfo(dtype).eps * reference.abs().max().item()
    return 0.0


def _assert_relative_rule(ours, torch_own, reference, atol, slack=0.0):
    """|ours - reference| <= 2 * |torch_own - reference| + atol, elementwise (max)."""
    ours_error = (ours.double() - reference.double()).abs().max().item()
    torch_error = (torch_own.double() - reference.double()).abs().max().item()
    assert ours_error <= 2 * torch_error + atol + slack, (ours_error, torch_error, atol, slack)


def _layer_norm_grads(fn, x, weight, bias, grad):
    inputs = [t for t in (x, weight, bias) if t is not None]
    return torch.autograd.grad(fn(x, weight, bias), inputs, grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_matches_torch(backend, dtype, hidden, is_rms):
    name, device = backend
    rows = 3
    x = (torch.randn(rows, hidden, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    weight = torch.randn(hidden, device=device).to(dtype).requires_grad_()
    bias = None if is_rms else torch.randn(hidden, device=device).to(dtype).requires_grad_()
    grad = torch.randn(rows, hidden, device=device).to(dtype)

    def ours(x, w, b):
        return F.rms_norm(x, (hidden,), w, 1e-5) if is_rms else F.layer_norm(x, (hidden,), w, b)

    def theirs(x, w, b):
        return torch_F.rms_norm(x, (hidden,), w, 1e-5) if is_rms else torch_F.layer_norm(x, (hidden,), w, b)

    def as_float64(t):  # the reference: float64 from the same rounded inputs
        return t.detach().double().requires_grad_() if t is not None else None

    reference_inputs = [as_float64(t) for t in (x, weight, bias)]
    y, y_torch, y_reference = ours(x, weight, bias), theirs(x, weight, bias), theirs(*reference_inputs)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_relative_rule(y, y_torch, y_reference, ATOL[dtype], _interpreter_slack(name, y_reference, dtype))

    grads = _layer_norm_grads(ours, x, weight, bias, grad)
    grads_torch = _layer_norm_grads(theirs, x, weight, bias, grad)
    grads_reference = _layer_norm_grads(theirs, *reference_inputs, grad.double())
    for g, g_torch, g_reference in zip(grads, grads_torch, grads_reference):
        assert g.dtype == dtype
        atol = BACKWARD_ATOL_FACTOR * ATOL[dtype] * rows**0.5
        _assert_relative_rule(g, g_torch, g_reference, atol, _interpreter_slack(name, g_reference, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_weights(backend, dtype):
    name, device = backend
    x = torch.randn(5, 96, device=device).to(dtype).requires_grad_()
    weight = torch.randn(96, device=device, requires_grad=True)
    bias = torch.randn(96, device=device, requires_grad=True)
    y = F.layer_norm(x, (96,), weight, bias)
    assert y.dtype == dtype
    reference = torch_F.layer_norm(x.detach().float(), (96,), weight, bias)
    torch.testing.assert_close(y.float(), reference, atol=ATOL[dtype] * 4, rtol=0.02)
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == dtype


@pytest.mark.parametrize("hidden", [65537, 262144])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_rows_longer_than_the_chip_holds(backend, hidden, is_rms):
    """Past 64 KiB per row the kernels loop over the row (several passes), not error out."""
    name, device = backend
    x = (torch.randn(2, hidden, device=device) + 3).requires_grad_()
    weight = torch.randn(hidden, device=device, requires_grad=True)
    bias = None if is_rms else torch.randn(hidden, device=device, requires_grad=True)
    if is_rms:
        y, reference = F.rms_norm(x, (hidden,), weight, 1e-6), torch_F.rms_norm(x, (hidden,), weight, 1e-6)
    else:
        y, reference = F.layer_norm(x, (hidden,), weight, bias), torch_F.layer_norm(x, (hidden,), weight, bias)
    torch.testing.assert_close(y, reference, atol=2e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    inputs = [t for t in (x, weight, bias) if t is not None]
    for ours, theirs in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_statistics_stable_for_large_means(backend):
    """Rows with mean 1e4 and unit variance normalize correctly in float32."""
    name, device = backend
    x = (torch.randn(4, 4096, device=device, dtype=torch.float64) + 1e4).float()
    reference = torch_F.layer_norm(x.double(), (4096,))  # exact statistics of the rounded input
    # atol: half an ulp of float32 at 1e4 (2**-11), the resolution of a float32 mean there,
    # which every float32 LayerNorm (torch's included) subtracts; with unit variance it
    # shows as is in y. A one-pass E[x^2] - E[x]^2 would be off by ~1 instead.
    _assert_relative_rule(F.layer_norm(x, (4096,)), torch_F.layer_norm(x, (4096,)), reference, atol=2**-11)


def test_multi_dim_normalized_shape_zero_rows_and_non_contiguous(backend):
    name, device = backend
    x = torch.randn(2, 5, 3, 4, device=device)
    weight, bias = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    torch.testing.assert_close(F.layer_norm(x, (3, 4), weight, bias), torch_F.layer_norm(x, (3, 4), weight, bias))
    empty = torch.randn(0, 7, device=device, requires_grad=True)
    weight7 = torch.randn(7, device=device, requires_grad=True)
    out = F.layer_norm(empty, (7,), weight7)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert torch.equal(weight7.grad, torch.zeros(7, device=device))
    strided = torch.randn(6, 40, device=device)[:, ::2].t()  # (20, 6), no row is contiguous
    torch.testing.assert_close(F.rms_norm(strided, (6,)), torch_F.rms_norm(strided, (6,)))


def test_deterministic_weight_gradients(backend):
    name, device = backend
    x = torch.randn(300, 129, device=device, requires_grad=True)
    weight = torch.randn(129, device=device, requires_grad=True)
    bias = torch.randn(129, device=device, requires_grad=True)
    grad = torch.randn(300, 129, device=device)
    first = torch.autograd.grad(F.layer_norm(x, (129,), weight, bias), (weight, bias), grad)
    second = torch.autograd.grad(F.layer_norm(x, (129,), weight, bias), (weight, bias), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_arguments_raise_what_torch_raises(backend):
    name, device = backend
    x = torch.randn(2, 3, 4, device=device)
    cases = [
        (torch_F.layer_norm, F.layer_norm, (x, (5,))),
        (torch_F.layer_norm, F.layer_norm, (x, (3, 4, 5))),
        (torch_F.layer_norm, F.layer_norm, (x, (4,), torch.ones(3, device=device))),
        (torch_F.layer_norm, F.layer_norm, (x, (4,), torch.ones(4, device=device), torch.ones(3, device=device))),
        (torch_F.rms_norm, F.rms_norm, (x, (5,))),
        (torch_F.rms_norm, F.rms_norm, (x, (4,), torch.ones(3, device=device))),
    ]
    for theirs, ours, args in cases:
        with pytest.raises(RuntimeError) as expected:
            theirs(*args)
        with pytest.raises(RuntimeError) as got:
            ours(*args)
        assert str(got.value) == str(expected.value)


def test_modules_are_drop_ins():
    pairs = [
        (fastreg.nn.LayerNorm(8), torch.nn.LayerNorm(8)),
        (fastreg.nn.LayerNorm((2, 8), elementwise_affine=False), torch.nn.LayerNorm((2, 8), elementwise_affine=False)),
        (fastreg.nn.LayerNorm(8, bias=False), torch.nn.LayerNorm(8, bias=False)),
        (fastreg.nn.RMSNorm(8), torch.nn.RMSNorm(8)),
        (fastreg.nn.RMSNorm(8, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6)),
    ]
    x = torch.randn(3, 2, 8)
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs) and isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))
    fused = fastreg.nn.DropoutAddLayerNorm(8, p=0.1)
    assert fused.state_dict().keys() == torch.nn.LayerNorm(8).state_dict().keys()
    assert "p=0.1" in repr(fused)
    fused.eval()
    residual = torch.randn(3, 2, 8)
    torch.testing.assert_close(fused(x, residual), torch_F.layer_norm(x + residual, (8,), fused.weight, fused.bias))


# --------------------------------------------------------------------- fused block


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_dropout_add_norm_matches_unfused_sequence(backend, dtype, is_rms, residual_in_fp32):
    name, device = backend
    shape, p = (4, 3, 67), 0.25
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    residual = torch.randn(shape, device=device).to(dtype).requires_grad_()
    weight = torch.randn(67, device=device).to(dtype).requires_grad_()
    bias = None if is_rms else torch.randn(67, device=device).to(dtype).requires_grad_()
    torch.manual_seed(11)
    if is_rms:
        out, h = F.dropout_add_rms_norm(x, residual, weight, p, 1e-5, prenorm=True, residual_in_fp32=residual_in_fp32)
    else:
        out, h = F.dropout_add_layer_norm(x, residual, weight, bias, p, prenorm=True, residual_in_fp32=residual_in_fp32)
    torch.manual_seed(11)
    keep = _reference.keep_mask(shape, _rng.new_seed(torch.device(device)), p)
    assert h.dtype == (torch.float32 if residual_in_fp32 else dtype)

    # the unfused sequence in float32 with the same mask
    xr, rr = x.detach().float().requires_grad_(), residual.detach().float().requires_grad_()
    wr = weight.detach().float().requires_grad_()
    br = bias.detach().float().requires_grad_() if bias is not None else None
    hr = rr + xr * keep / (1 - p)
    hr_rounded = hr if residual_in_fp32 else hr.to(dtype).float()
    if is_rms:
        out_reference = torch_F.rms_norm(hr_rounded, (67,), wr, 1e-5)
    else:
        out_reference = torch_F.layer_norm(hr_rounded, (67,), wr, br)
    atol = ATOL[dtype]
    slack = _interpreter_slack(name, hr, dtype) if not residual_in_fp32 else 0.0
    torch.testing.assert_close(h.float(), hr.to(h.dtype).float(), atol=atol + slack, rtol=0)
    torch.testing.assert_close(out.float(), out_reference, atol=4 * atol, rtol=0.02)

    # backward through both outputs
    grad_out, grad_h = torch.randn_like(out), torch.randn_like(h)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    reference_inputs = [t for t in (xr, rr, wr, br) if t is not None]
    ours = torch.autograd.grad((out, h), inputs, (grad_out, grad_h))
    theirs = torch.autograd.grad((out_reference, hr_rounded), reference_inputs, (grad_out.float(), grad_h.float()))
    for g, expected in zip(ours, theirs):
        torch.testing.assert_close(g.float(), expected, atol=BACKWARD_ATOL_FACTOR * atol * 12**0.5, rtol=0.03)


def test_gradient_through_h_alone(backend):
    """prenorm with only h used: dx = mask / (1 - p), dresidual = 1 (no zeros for the unused output)."""
    name, device = backend
    x, residual = (torch.randn(6, 36, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(36, device=device)
    torch.manual_seed(4)
    _, h = F.dropout_add_rms_norm(x, residual, weight, 0.25, prenorm=True)
    h.sum().backward()
    torch.manual_seed(4)
    keep = _reference.keep_mask(x.shape, _rng.new_seed(torch.device(device)), 0.25)
    torch.testing.assert_close(x.grad, keep.float() / 0.75)
    assert torch.equal(residual.grad, torch.ones_like(residual))


def test_dropout_add_norm_without_residual_and_in_eval(backend):
    name, device = backend
    x = torch.randn(6, 32, device=device, requires_grad=True)
    weight, bias = torch.randn(32, device=device), torch.randn(32, device=device)
    out = F.dropout_add_layer_norm(x, None, weight, bias, 0.5)
    assert out.shape == x.shape
    out.sum().backward()
    evaluated = F.dropout_add_layer_norm(x, x, weight, bias, 0.5, training=False)
    torch.testing.assert_close(evaluated, torch_F.layer_norm(2 * x, (32,), weight, bias))
    with pytest.raises(RuntimeError, match="'residual' must match x"):
        F.dropout_add_layer_norm(x, x[:, :3], weight, bias, 0.5)
    with pytest.raises(ValueError, match="dropout probability"):
        F.dropout_add_rms_norm(x, x, weight, 1.5)


# --------------------------------------------------- opcheck, gradcheck, torch.compile

NORM_OPS = {"cpu": ("norm_fwd", "norm_bwd"), "cuda": ("norm_fwd", "norm_bwd"),
            "triton": ("norm_fwd_triton", "norm_bwd_triton")}


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if GPU or name != "triton":  # AOT tracing runs the launcher on fake tensors: not in the interpreter
        utils += ("test_aot_dispatch_dynamic",)
    fwd, bwd = (getattr(torch.ops.fastreg, n).default for n in NORM_OPS[name])
    x = torch.randn(5, 24, device=device, requires_grad=True)
    w, b = torch.randn(24, device=device, requires_grad=True), torch.randn(24, device=device, requires_grad=True)
    residual = torch.randn(5, 24, device=device, requires_grad=True)
    seed = torch.tensor(3, device=device)
    for args in ((x, w, b, 1e-5, False), (x, w, None, 1e-5, True), (x, None, None, 1e-5, False, residual, seed, 0.3),
                 (x, w, b, 1e-5, False, residual, None, 0.0, True), (x, w, b, 1e-5, False, residual, seed, 0.3, False, False)):
        # (the last: inference, h not stored; autograd registration is still checked)
        torch.library.opcheck(fwd, args, test_utils=utils)
    y, h, mean, rstd = fwd(x.detach(), w.detach(), b.detach(), 1e-5, False)
    dy, xd, wd = torch.randn_like(y), x.detach(), w.detach()
    torch.library.opcheck(bwd, (dy, xd, wd, mean, rstd, False, True), test_utils=utils)
    torch.library.opcheck(bwd, (dy, xd, wd, mean, rstd, False, True, torch.randn_like(y), seed, 0.3), test_utils=utils)


def test_fused_inference_skips_h_and_matches_training_output(backend):
    """Without grad and prenorm, h is not written; the output is that of the training path."""
    name, device = backend
    x, residual = torch.randn(5, 40, device=device), torch.randn(5, 40, device=device)
    weight, bias = torch.randn(40, device=device), torch.randn(40, device=device)
    fwd = NORM_FWD[name]
    seed = torch.tensor(5, device=device)
    y_stored, h, _, _ = fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, True)
    y_inference, h_skipped, _, _ = fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, False)
    assert h.shape == (5, 40) and h_skipped.numel() == 0
    assert torch.equal(y_stored, y_inference)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = F.dropout_add_layer_norm(x, residual, weight, bias, 0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(F.dropout_add_layer_norm(x, residual, weight, bias, 0.2), expected, rtol=0, atol=0)
    # differentiated anyway, it recomputes h: the same gradients
    x.requires_grad_()
    grad = torch.randn_like(x)
    stored = torch.autograd.grad(fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, True)[0], x, grad)
    recomputed = torch.autograd.grad(fwd(x, weight, bias, 1e-5, False, residual, seed, 0.2, False, False)[0], x, grad)
    assert torch.equal(stored[0], recomputed[0])


def test_gradcheck_fp64(backend):
    name, device = backend
    fwd = NORM_FWD[name]
    seed = torch.tensor(21, device=device)
    x, residual = (torch.randn(3, 10, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(10, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, w, b: fwd(x, w, b, 1e-5, False)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: fwd(x, w, None, 1e-5, True)[0], (x, w))
    # fused, through both outputs (the seed fixes the mask)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: fwd(x, w, b, 1e-5, False, r, seed, 0.3)[:2], (x, residual, w, b)
    )


class _PreNormBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = fastreg.nn.DropoutAddLayerNorm(16, p=0.1, prenorm=True)
        self.linear = torch.nn.Linear(16, 16)
        self.norm2 = fastreg.nn.RMSNorm(16)
        self.norm3 = fastreg.nn.LayerNorm(16)

    def forward(self, x, residual):
        y, h = self.norm1(x, residual)
        return self.norm3(self.norm2(self.linear(y)) + h)


def test_torch_compile_fullgraph(backend):
    name, device = backend
    block = _PreNormBlock().to(device)
    x, residual = (torch.randn(4, 5, 16, device=device, requires_grad=True) for _ in range(2))
    out = torch.compile(block, fullgraph=True)(x, residual)
    out.sum().backward()
    assert torch.isfinite(out).all() and x.grad is not None and block.norm1.weight.grad is not None
    block.eval()
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, residual), block(x, residual))
    explanation = torch._dynamo.explain(block)(x, residual)
    assert explanation.graph_break_count == 0


# ------------------------------------------------------ ahead-of-time compile for a GPU
# Every constexpr variant the launchers (triton_kernels/layer_norm.py: norm_fwd, norm_bwd)
# use, with the pointer types they pass: statistics (MEAN, RSTD, the partial sums) in the
# accumulate dtype (fp64 for fp64 inputs, else fp32), weights in their own dtype (fp32
# with low-precision x is allowed), h in residual's dtype or fp32 (residual_in_fp32), an
# unused pointer in the dtype of the tensor passed in its place. BLOCK_N and num_warps as
# _block_n chooses them: rows held on chip, and the looped path of long rows.

_MAX_FUSED_BYTES = 65536  # triton_kernels/layer_norm.py
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def _norm_blocks(n, dtype):
    """(BLOCK_N, SINGLE_PASS, num_warps) as layer_norm._block_n chooses them."""
    block = 1 << (n - 1).bit_length()
    if block <= _MAX_FUSED_BYTES // _BYTES[dtype]:
        return block, True, min(max(block // 256, 1), 16)
    return 4096, False, 8


def _norm_fwd_aot_case(case_id, x, n, *, is_rms=False, w=None, b=None, res=None, dropout=False, h=None,
                       store_h=True):
    acc = "fp64" if x == "fp64" else "fp32"
    fused = res is not None or dropout
    h = h or res or x
    block, single, warps = _norm_blocks(n, x)
    signature = {"X": f"*{x}", "RES": f"*{res or x}", "W": f"*{w or x}", "B": f"*{b or x}", "Y": f"*{x}",
                 "H": f"*{h}", "MEAN": f"*{acc}", "RSTD": f"*{acc}", "SEED": "*i64" if dropout else f"*{acc}",
                 "N": "i32", "eps": "fp32", "threshold": "i32", "scale_bits": "i64"}
    constexprs = dict(IS_RMS=is_rms, HAS_W=w is not None, HAS_B=b is not None, HAS_RES=res is not None,
                      HAS_DROPOUT=dropout, FUSED=fused, STORE_H=fused and (store_h or not single),
                      SINGLE_PASS=single, BLOCK_N=block)
    return triton_aot.Case(case_id, "fastreg.triton_kernels.layer_norm", "_norm_fwd_kernel", signature, constexprs,
                           num_warps=warps, div16=("N",))


def _norm_bwd_aot_case(case_id, x, n, *, is_rms=False, w=None, has_b=False, dh=False, dropout=False, dy=None):
    acc = "fp64" if x == "fp64" else "fp32"
    block, single, warps = _norm_blocks(n, x)
    dy = dy or x  # dy is like y (x's dtype); the norm input x may be h, of another dtype
    signature = {"DY": f"*{dy}", "X": f"*{x}", "W": f"*{w or x}", "MEAN": f"*{acc}", "RSTD": f"*{acc}",
                 "DH": f"*{x if dh else dy}", "DX": f"*{x}", "DX_DROPOUT": f"*{x}",
                 "SEED": "*i64" if dropout else f"*{acc}", "DW_PARTIAL": f"*{acc}", "DB_PARTIAL": f"*{acc}",
                 "M": "i32", "N": "i32", "rows_per_program": "i32", "threshold": "i32", "scale_bits": "i64"}
    constexprs = dict(IS_RMS=is_rms, HAS_W=w is not None, HAS_B=has_b, HAS_DH=dh, HAS_DROPOUT=dropout,
                      SINGLE_PASS=single, BLOCK_N=block)
    return triton_aot.Case(case_id, "fastreg.triton_kernels.layer_norm", "_norm_bwd_kernel", signature, constexprs,
                           num_warps=warps, div16=("N",))


def _norm_bwd_weight_aot_case(case_id, x, *, is_rms=False, has_w=True, has_b=False, dy=None):
    acc = "fp64" if x == "fp64" else "fp32"
    signature = {"DY": f"*{dy or x}", "X": f"*{x}", "MEAN": f"*{acc}", "RSTD": f"*{acc}", "DW_PARTIAL": f"*{acc}",
                 "DB_PARTIAL": f"*{acc}", "M": "i32", "N": "i32", "rows_per_program": "i32"}
    constexprs = dict(IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_b, BLOCK_N=1024)
    return triton_aot.Case(case_id, "fastreg.triton_kernels.layer_norm", "_norm_bwd_weight_kernel", signature,
                           constexprs, num_warps=4, div16=("N",))


NORM_AOT_CASES = [
    # forward, rows on chip
    _norm_fwd_aot_case("fwd-layer_norm-fp32", "fp32", 4096, w="fp32", b="fp32"),
    _norm_fwd_aot_case("fwd-layer_norm-fp64", "fp64", 1024, w="fp64", b="fp64"),
    _norm_fwd_aot_case("fwd-layer_norm-fp16-no_affine", "fp16", 768),
    _norm_fwd_aot_case("fwd-rms_norm-bf16-fp32_weight", "bf16", 4096, is_rms=True, w="fp32"),
    _norm_fwd_aot_case("fwd-prenorm-layer_norm-bf16", "bf16", 4096, w="bf16", b="bf16", res="bf16", dropout=True),
    _norm_fwd_aot_case("fwd-prenorm-rms_norm-fp16-residual_in_fp32", "fp16", 2048, is_rms=True, w="fp16",
                       res="fp16", dropout=True, h="fp32"),
    _norm_fwd_aot_case("fwd-dropout_norm-rms_norm-bf16", "bf16", 1024, is_rms=True, w="bf16", dropout=True),
    _norm_fwd_aot_case("fwd-add_norm-layer_norm-fp32-inference", "fp32", 1024, w="fp32", b="fp32", res="fp32",
                       store_h=False),
    # forward, looped (rows longer than the chip holds)
    _norm_fwd_aot_case("fwd-looped-layer_norm-fp32", "fp32", 65536, w="fp32", b="fp32"),
    _norm_fwd_aot_case("fwd-looped-prenorm-rms_norm-bf16", "bf16", 65536, is_rms=True, w="bf16", res="bf16",
                       dropout=True, store_h=False),
    _norm_fwd_aot_case("fwd-looped-prenorm-layer_norm-fp64", "fp64", 16384, w="fp64", b="fp64", res="fp64"),
    # backward, rows on chip
    _norm_bwd_aot_case("bwd-layer_norm-fp32", "fp32", 4096, w="fp32", has_b=True),
    _norm_bwd_aot_case("bwd-layer_norm-fp64", "fp64", 1024, w="fp64", has_b=True),
    _norm_bwd_aot_case("bwd-layer_norm-fp16-no_affine", "fp16", 768),
    _norm_bwd_aot_case("bwd-rms_norm-bf16-fp32_weight", "bf16", 4096, is_rms=True, w="fp32"),
    _norm_bwd_aot_case("bwd-prenorm-layer_norm-bf16", "bf16", 4096, w="bf16", has_b=True, dh=True, dropout=True),
    _norm_bwd_aot_case("bwd-prenorm-rms_norm-residual_in_fp32", "fp32", 2048, is_rms=True, w="fp16", dh=True,
                       dropout=True, dy="fp16"),
    # backward, looped
    _norm_bwd_aot_case("bwd-looped-layer_norm-fp32", "fp32", 65536, w="fp32", has_b=True, dh=True, dropout=True),
    _norm_bwd_aot_case("bwd-looped-rms_norm-bf16", "bf16", 65536, is_rms=True, w="bf16"),
    _norm_bwd_weight_aot_case("bwd_weight-layer_norm-fp32", "fp32", has_b=True),
    _norm_bwd_weight_aot_case("bwd_weight-layer_norm-fp64", "fp64", has_b=True),
    _norm_bwd_weight_aot_case("bwd_weight-rms_norm-bf16", "bf16", is_rms=True),
    _norm_bwd_weight_aot_case("bwd_weight-layer_norm-fp16-bias_only", "fp16", has_w=False, has_b=True),
]


@pytest.fixture(scope="module")
def norm_aot_ptx():
    return triton_aot.compile_ptx(NORM_AOT_CASES)


@pytest.mark.parametrize("case", NORM_AOT_CASES, ids=str)
def test_triton_kernel_compiles_for_a_gpu(norm_aot_ptx, case):
    """The interpreter accepts code a GPU compile rejects (the Philox constants were module
    globals): every variant compiles for sm_90, no GPU needed (tests/triton_aot.py), and
    reads and writes its rows 16 bytes at a time."""
    ptx = triton_aot.ptx_of(norm_aot_ptx, case)
    assert triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True), "no 16-byte row loads"
    assert triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), "no 16-byte row stores"
