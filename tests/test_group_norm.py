"""GroupNorm (+ SiLU) and InstanceNorm 1d/2d/3d against torch on every backend: outputs and
all gradients over shapes and layouts, dtypes, determinism, a large mean, errors, opcheck,
gradcheck, torch.compile, the modules as drop-ins, InstanceNorm training steps then eval,
and the Triton launchers' splits of S. The kernels' sm_90 compile: tests/test_triton_aot.py."""

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg.ops.group_norm import GN_FWD
from fastreg import functional as F
from tests.conftest import interpreted, skip_unless_runs

# Per-dtype tolerances against torch (same dtype). dweight / dbias sum N * S values per
# channel: their atol grows with the square root of that count.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}
# fp16 / bf16, the relative rule: our error against a float64 reference of the same
# rounded input may be at most twice torch's own low-precision error, plus this atol.
LOW_PRECISION_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}

# name -> (input shape, groups, memory format, slice): the interpreter (triton without a GPU)
# is slow, so the shapes are small; CPU vector widths (8 floats) get tails too.
CASES = {
    "3d": ((2, 6, 7), 3, None, False),
    "4d-odd-spatial": ((2, 6, 5, 3), 3, None, False),
    "4d-channels_last": ((2, 6, 5, 3), 3, torch.channels_last, False),
    "C=G": ((2, 4, 3, 3), 4, None, False),
    "G=1": ((2, 6, 3, 2), 1, torch.channels_last, False),
    "NC-no-spatial": ((3, 8), 2, None, False),
    "5d-channels_last_3d": ((2, 6, 2, 3, 3), 2, torch.channels_last_3d, False),
    "sliced": ((2, 6, 4, 5), 2, None, True),
    "wide": ((2, 32, 9, 7), 4, None, False),
    "wide-channels_last": ((2, 32, 9, 7), 4, torch.channels_last, False),
    # D = 8: channels-last chunks of whole groups (fp32: 2 chunks of 4 groups), odd S
    "chunks-channels_last": ((2, 64, 7, 5), 8, torch.channels_last, False),
}
AFFINE = {"weight+bias": (True, True), "weight": (True, False), "none": (False, False)}


def _input(shape, memory_format=None, sliced=False, device="cpu", dtype=torch.float32, mean=1.0, scale=2.0):
    if sliced:  # every other position of a wider tensor: not dense
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale + mean).to(dtype)
        return wide[..., ::2]
    x = (torch.randn(shape, device=device) * scale + mean).to(dtype)
    return x.contiguous(memory_format=memory_format) if memory_format is not None else x


def _params(channels, weight, bias, device, dtype=torch.float32):
    w = (torch.rand(channels, device=device) + 0.5).to(dtype) if weight else None
    b = (torch.randn(channels, device=device) * 0.5).to(dtype) if bias else None
    return w, b


def _torch_group_norm(x, groups, w, b, silu, eps=1e-5):
    y = torch_F.group_norm(x, groups, w, b, eps)
    return torch_F.silu(y) if silu else y


def _outputs_and_grads(fn, x, w, b, grad):
    # detach, not clone: a clone of a view that is not dense is dense
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(grad)
    return y.detach(), [t.grad for t in leaves if t is not None]


def _close(ours, theirs, dtype, count=1):
    tol = TOL[dtype]
    torch.testing.assert_close(ours, theirs, atol=tol["atol"] * count**0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_matches_torch(backend, case, silu):
    name, device = backend
    shape, groups, memory_format, sliced = CASES[case]
    x = _input(shape, memory_format, sliced, device)
    for affine in (["weight+bias"] if name == "triton" and case not in ("3d", "C=G") else list(AFFINE)):
        w, b = _params(shape[1], *AFFINE[affine], device)
        grad = torch.randn(shape, device=device)
        if memory_format is not None:
            grad = grad.contiguous(memory_format=memory_format)
        y, grads = _outputs_and_grads(
            lambda x, w, b: F.group_norm(x, groups, w, b, activation="silu" if silu else None), x, w, b, grad)
        y_ref, grads_ref = _outputs_and_grads(lambda x, w, b: _torch_group_norm(x, groups, w, b, silu), x, w, b, grad)
        _close(y, y_ref, torch.float32)
        _close(grads[0], grads_ref[0], torch.float32)
        count = shape[0] * torch.Size(shape[2:]).numel()
        for ours, theirs in zip(grads[1:], grads_ref[1:]):
            _close(ours, theirs, torch.float32, count)
        if memory_format is not None:  # the output and dx keep the input's layout
            assert y.is_contiguous(memory_format=memory_format) and grads[0].is_contiguous(memory_format=memory_format)


def test_silu_of_large_pre_activations(backend):
    """Pre-activations out to +-150, past where exp(-z) over- or underflows in float32."""
    name, device = backend
    x = _input((2, 4, 16), device=device)
    w = torch.full((4,), 40.0, device=device)
    b = torch.tensor([-60.0, 0.0, 60.0, 5.0], device=device)
    grad = torch.randn(2, 4, 16, device=device)
    for layout in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
        y, grads = _outputs_and_grads(lambda x, w, b: F.group_norm(x, 2, w, b, activation="silu"), layout, w, b, grad)
        ref_y, ref_grads = _outputs_and_grads(lambda x, w, b: _torch_group_norm(x, 2, w, b, True),
                                              layout.double(), w.double(), b.double(), grad.double())
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
        # weight 40 amplifies the statistics' rounding: a few float32 ulps of each tensor's scale
        for ours, ref in zip([y, *grads], [ref_y, *ref_grads]):
            torch.testing.assert_close(ours.double(), ref, atol=2e-6 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    name, device = backend
    shape, groups = (2, 8, 4, 5), 4
    x = _input(shape, torch.channels_last, device=device, dtype=dtype)
    w, b = _params(8, True, True, device, dtype)
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    y, grads = _outputs_and_grads(lambda x, w, b: F.group_norm(x, groups, w, b, activation="silu"), x, w, b, grad)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch_y, torch_grads = _outputs_and_grads(lambda x, w, b: _torch_group_norm(x, groups, w, b, True), x, w, b, grad)
    if dtype == torch.float64:
        _close(y, torch_y, dtype)
        for ours, theirs in zip(grads, torch_grads):
            _close(ours, theirs, dtype, count=shape[0] * 20)
        return
    # the float64 reference of the same rounded inputs
    ref_y, ref_grads = _outputs_and_grads(lambda x, w, b: _torch_group_norm(x, groups, w, b, True),
                                          x.double(), w.double(), b.double(), grad.double())
    _low_precision_close([y, *grads], [torch_y, *torch_grads], [ref_y, *ref_grads], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_cpu_channels_last_16_bit_rows(dtype, silu):
    """The CPU kernel's channels-last forward on 16-bit rows converts in registers, 16
    channels at a time and the rest one at a time (map_half_rows, csrc/cpu/convert.h): C = 40
    takes both. Against torch and a float64 reference of the same rounded values."""
    skip_unless_runs("cpu")
    shape, groups = (2, 40, 6, 5), 4
    x = _input(shape, torch.channels_last, dtype=dtype)
    w, b = _params(shape[1], True, True, "cpu", dtype)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)

    def torch_fn(x, w, b):
        return _torch_group_norm(x, groups, w, b, silu)

    def ours_fn(x, w, b):
        return F.group_norm(x, groups, w, b, activation="silu" if silu else None)

    with fastreg.use_backend("cpu"):
        y, grads = _outputs_and_grads(ours_fn, x, w, b, grad)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch_y, torch_grads = _outputs_and_grads(torch_fn, x, w, b, grad)
    ref_y, ref_grads = _outputs_and_grads(torch_fn, x.double(), w.double(), b.double(), grad.double())
    _low_precision_close([y, *grads], [torch_y, *torch_grads], [ref_y, *ref_grads], dtype)


def _low_precision_close(ours_all, torch_all, ref_all, dtype, names=("y", "dx", "dweight", "dbias")):
    """fp16 / bf16: each error against the float64 reference at most twice torch's, plus
    LOW_PRECISION_ATOL of the reference's scale."""
    for what, ours, theirs, ref in zip(names, ours_all, torch_all, ref_all):
        ours_error = (ours.double() - ref).abs().max().item()
        torch_error = (theirs.double() - ref).abs().max().item()
        assert ours_error <= 2 * torch_error + LOW_PRECISION_ATOL[dtype] * max(1.0, ref.abs().max().item()), (
            f"{what}: error {ours_error:.3g} vs torch's {torch_error:.3g}")


# (shape, groups): channels-last chunks of whole groups in Triton: D = 8 with odd S (fp32:
# 2 chunks of 4 groups, bf16: 1 of 8), D = 1 (32 groups a chunk), and D = 10 (the lanes
# past a chunk's 4 or 8 groups masked)
CHUNK_SHAPES = {"C=64,G=8,7x5": ((2, 64, 7, 5), 8), "C=32,G=32,3x3": ((2, 32, 3, 3), 32),
                "C=80,G=8,3x5": ((2, 80, 3, 5), 8)}


@pytest.mark.parametrize("shape", list(CHUNK_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last_chunks(backend, shape, dtype):
    """Channels-last inputs whose groups the Triton kernels take in chunks of whole groups
    (rows read unmasked): every affine variant, with and without SiLU, against torch."""
    name, device = backend
    shape, groups = CHUNK_SHAPES[shape]
    if name == "triton":  # the shapes do exercise the chunk kernels
        from fastreg.triton_kernels.group_norm import _tiles
        assert _tiles(shape[1], groups, shape[2] * shape[3], 1, dtype.itemsize, torch.device(device))[0] == "chunk"
    x = _input(shape, torch.channels_last, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    for affine in ("weight+bias", "none"):
        w, b = _params(shape[1], *AFFINE[affine], device, dtype)
        for silu in (False, True):
            def ours_fn(x, w, b):
                return F.group_norm(x, groups, w, b, activation="silu" if silu else None)

            def torch_fn(x, w, b):
                return _torch_group_norm(x, groups, w, b, silu)

            y, grads = _outputs_and_grads(ours_fn, x, w, b, grad)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert grads[0].is_contiguous(memory_format=torch.channels_last)
            torch_y, torch_grads = _outputs_and_grads(torch_fn, x, w, b, grad)
            if dtype == torch.float32:
                _close(y, torch_y, dtype)
                _close(grads[0], torch_grads[0], dtype)
                for ours, theirs in zip(grads[1:], torch_grads[1:]):
                    _close(ours, theirs, dtype, count=shape[0] * shape[2] * shape[3])
                continue
            ref_y, ref_grads = _outputs_and_grads(torch_fn, x.double(), *(p.double() if p is not None else None
                                                                          for p in (w, b)), grad.double())
            _low_precision_close([y, *grads], [torch_y, *torch_grads], [ref_y, *ref_grads], dtype)


def test_deterministic_gradients(backend):
    name, device = backend
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = _input((4, 8, 5, 6), memory_format, device=device).requires_grad_()
        w, b = (p.requires_grad_() for p in _params(8, True, True, device))
        grad = torch.randn_like(x)
        runs = [torch.autograd.grad(F.group_norm(x, 2, w, b, activation="silu"), (x, w, b), grad) for _ in range(2)]
        assert all(torch.equal(first, second) for first, second in zip(*runs))


def test_statistics_stable_for_large_means(backend):
    """Mean 1e3, unit variance, float32: mean, rstd and y stay those of float64 on the same input."""
    name, device = backend
    x = (torch.randn(2, 8, 64, device=device, dtype=torch.float64) + 1e3).float()
    for layout in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):  # contiguous, channels-last
        y, mean, rstd = GN_FWD[name](layout, None, None, 2, 1e-5, False)
        exact = x.double().reshape(2, 2, -1)
        torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=1e-7, atol=0)
        torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(-1, unbiased=False) + 1e-5), rtol=1e-4, atol=0)
        torch.testing.assert_close(y.double(), torch_F.group_norm(x.double(), 2), atol=1e-4, rtol=0)


# ------------------------------------------------- Triton: S in splits (interpreter)
# gn_fwd / gn_bwd split S into SPLITS ranges where a launch has too few programs for a GPU
# (_plan); splits=k forces k. S = 7 x 5 is no multiple of SPLITS * BLOCK_S. name ->
# (shape, groups, memory format, family): per group (contiguous, D = 2) and per chunk of
# whole groups (channels-last, D = 8, and D = 10 with masked lanes).
SPLIT_SHAPES = {"group": ((2, 6, 7, 5), 3, torch.contiguous_format, "group"),
                "chunk": ((2, 64, 7, 5), 8, torch.channels_last, "chunk"),
                "chunk-D=10": ((2, 40, 7, 5), 4, torch.channels_last, "chunk")}


def _triton_gn():
    skip_unless_runs("triton")
    from fastreg.triton_kernels import group_norm
    return group_norm


def _split_run(gn, x, groups, w, b, silu, dy, splits):
    """(y, mean, rstd, dx, dweight, dbias) of the Triton launchers with S in `splits` pieces."""
    x3, dy3 = x.flatten(2), dy.flatten(2)
    y, mean, rstd = gn.gn_fwd(x3, w, b, groups, 1e-5, silu, splits=splits)
    dx, dweight, dbias = gn.gn_bwd(dy3, x3, w, b, mean, rstd, groups, silu, splits=splits)
    return y.view_as(x), mean, rstd, dx.view_as(x), dweight, dbias


def _split_plan(gn, x, groups, splits):
    N, C = x.shape[:2]
    x3 = x.flatten(2)
    return gn._plan(N, C, groups, x3.shape[2], x3.stride(1), x.element_size(), x.device, splits=splits)


@pytest.mark.parametrize("case", list(SPLIT_SHAPES))
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_split_launches_match_torch(case, splits, dtype):
    """Forward and backward with S in 1, 2 or 3 splits: every split's partials merged (a
    dropped one fails), with and without weight / bias and SiLU, against torch."""
    gn = _triton_gn()
    shape, groups, memory_format, family = SPLIT_SHAPES[case]
    x = _input(shape, memory_format, dtype=dtype)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    plan = _split_plan(gn, x, groups, splits)
    assert plan.family == family and plan.splits == splits
    for affine in ("weight+bias", "none"):
        w, b = _params(shape[1], *AFFINE[affine], "cpu", dtype)
        for silu in (False, True):
            ours = _split_run(gn, x, groups, w, b, silu, dy, splits)
            y, dx, dweight, dbias = ours[0], ours[3], ours[4], ours[5]
            grads = [dx] + ([dweight, dbias] if w is not None else [])
            fn = lambda x, w, b: _torch_group_norm(x, groups, w, b, silu)  # noqa: E731
            torch_y, torch_grads = _outputs_and_grads(fn, x, w, b, dy)
            assert y.is_contiguous(memory_format=memory_format) and dx.is_contiguous(memory_format=memory_format)
            if dtype == torch.float32:
                _close(y, torch_y, dtype)
                _close(dx, torch_grads[0], dtype)
                for mine, theirs in zip(grads[1:], torch_grads[1:]):
                    _close(mine, theirs, dtype, count=shape[0] * shape[2] * shape[3])
                continue
            ref_y, ref_grads = _outputs_and_grads(fn, x.double(), *(p.double() if p is not None else None
                                                                    for p in (w, b)), dy.double())
            _low_precision_close([y, *grads], [torch_y, *torch_grads], [ref_y, *ref_grads], dtype)


@pytest.mark.parametrize("case", list(SPLIT_SHAPES))
def test_triton_split_statistics_stable_for_large_means(case):
    """Mean 1e3, unit variance, float32, S in 3 splits: the merged mean and rstd stay those
    of float64 on the same input (per-split mean and M2, merged shifted by split 0's mean)."""
    gn = _triton_gn()
    shape, groups, memory_format, _ = SPLIT_SHAPES[case]
    x = (torch.randn(shape, dtype=torch.float64) + 1e3).float().contiguous(memory_format=memory_format)
    assert _split_plan(gn, x, groups, 3).splits == 3
    y, mean, rstd = gn.gn_fwd(x.flatten(2), None, None, groups, 1e-5, False, splits=3)
    exact = x.double().reshape(shape[0], groups, -1)
    torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(-1, unbiased=False) + 1e-5), rtol=1e-4, atol=0)
    torch.testing.assert_close(y.view_as(x).double(), torch_F.group_norm(x.double(), groups), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(SPLIT_SHAPES))
def test_triton_split_launches_are_deterministic(case):
    """Two runs with S in 3 splits: bitwise the same outputs, statistics and gradients."""
    gn = _triton_gn()
    shape, groups, memory_format, _ = SPLIT_SHAPES[case]
    x = _input(shape, memory_format)
    w, b = _params(shape[1], True, True, "cpu")
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    runs = [_split_run(gn, x, groups, w, b, True, dy, 3) for _ in range(2)]
    assert all(torch.equal(first, second) for first, second in zip(*runs))


@pytest.mark.parametrize("family", ["group", "chunk"])
def test_triton_group_value_counts_are_64_bit(family):
    """A group of D = 2 channels x S = 2^30 positions holds 2^31 values, past int32: the
    apply kernel divides the merged M2 by the count D * S taken in 64 bits (in 32 bits it
    wraps to -2^31 and rstd is NaN). x is one value broadcast (strides 0): no memory is
    spent, and the kernel walks one tile of one split, the partials given."""
    gn = _triton_gn()
    D, S = 2, 2**30
    if family == "group":
        x = torch.zeros(1).expand(1, D, S)
        kernel, tile = gn._gn_apply_kernel, dict(BLOCK_D=2, stride_c=x.stride(1))
    else:  # channels adjacent: strides (0, 1, 0)
        x = torch.zeros(D).expand(1, S, D).transpose(1, 2)
        kernel, tile = gn._gn_chunk_apply_kernel, dict(GROUPS=1, BLOCK_C=2)
    y = torch.zeros(D).expand(1, S, D).transpose(1, 2) if family == "chunk" else torch.zeros(1).expand(1, D, S)
    mean, rstd = torch.zeros(1, 1), torch.zeros(1, 1)
    part_mean, part_m2 = torch.zeros(1), torch.full((1,), 2.0**31)  # M2 = 2^31: the variance is 1
    args = dict(X=x, Y=y, W=mean, B=mean, MEAN=mean, RSTD=rstd, PART_MEAN=part_mean, PART_M2=part_m2, S=S, D=D, G=1,
                SPLITS=1, TILES_PER_SPLIT=1, eps=0.0, stride_n=x.stride(0), stride_s=x.stride(2), HAS_WEIGHT=False,
                HAS_BIAS=False, SILU=False, BLOCK_S=16, SPLIT_BLOCK=1, **tile)
    kernel[(1, 1)](**{name: args[name] for name in kernel.arg_names})
    assert rstd.item() == 1.0


def test_triton_interpreter_splits_the_small_test_shapes():
    """_plan's interpreter targets split the small shapes the other tests run, in both
    families: test_matches_torch and test_channels_last_chunks go through the split kernels."""
    gn = _triton_gn()
    for case, family in (("wide", "group"), ("chunks-channels_last", "chunk")):
        shape, groups, memory_format, _ = CASES[case]
        plan = _split_plan(gn, _input(shape, memory_format), groups, None)
        assert plan.family == family and plan.splits > 1, (case, plan)
    shape, groups = CHUNK_SHAPES["C=64,G=8,7x5"]
    plan = _split_plan(gn, _input(shape, torch.channels_last, dtype=torch.bfloat16), groups, None)
    assert plan.family == "chunk" and plan.splits > 1, plan


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error), str(error)
    return None


def _torch_misreports_bias_shape() -> bool:
    """Whether the installed torch names another shape than the bias's in its message about
    a bias of the wrong size (torch 2.11 says "bias of shape [0]" when weight is None)."""
    error = _raised(lambda: torch_F.group_norm(torch.randn(2, 6, 3), 2, None, torch.ones(5)))
    return error is not None and "bias of shape [5]" not in error[1]


def _comparable(raised):
    """An error as compared with torch's: its type and message, the misreported shape of the
    installed torch's bias message (if it has that quirk) left out on both sides."""
    if raised is None or not _torch_misreports_bias_shape():
        return raised
    kind, message = raised
    return kind, re.sub(r"bias of shape \[[^\]]*\]", "bias of shape [...]", message)


def test_bad_input_raises_what_torch_raises(backend):
    name, device = backend
    x = torch.randn(2, 6, 3, device=device)
    cases = [
        (torch.randn(6, device=device), 2, None, None),  # fewer than 2 dims
        (x, 4, None, None),  # C not divisible by the groups
        (x, 0, None, None),  # no groups
        (x, 2, torch.ones(5, device=device), None),
        (x, 2, None, torch.ones(5, device=device)),
        (x, 2, torch.ones(2, 3, device=device), None),
        (torch.randn(1, 2, device=device), 2, None, None),  # one value per group
    ]
    for args in cases:
        expected = _raised(lambda: torch_F.group_norm(*args))
        assert expected is not None and _comparable(_raised(lambda: F.group_norm(*args))) == _comparable(expected), args
    with pytest.raises(ValueError, match="activation"):
        F.group_norm(x, 2, activation="relu")
    for module in (lambda cls: cls(4, 6), lambda cls: cls(2, 6)(torch.randn(2, 4, 3, device=device))):
        assert _raised(lambda: module(fastreg.nn.GroupNorm)) == _raised(lambda: module(torch.nn.GroupNorm))
        assert _raised(lambda: module(fastreg.nn.GroupNormSiLU)) == _raised(lambda: module(torch.nn.GroupNorm))
    instance_cases = [
        (2, dict(), torch.randn(2, 3, device=device)),  # 2-D into InstanceNorm2d
        (1, dict(affine=True), torch.randn(2, 4, 5, device=device)),  # wrong C with affine
        (1, dict(), torch.randn(2, 3, 1, device=device)),  # one spatial value in training
        (3, dict(), torch.randn(2, 3, 4, device=device)),
    ]
    for rank, options, x in instance_cases:
        ours, theirs = INSTANCE_OURS[rank](3, **options).to(device), INSTANCE_THEIRS[rank](3, **options).to(device)
        expected = _raised(lambda: theirs(x))
        assert expected is not None and _raised(lambda: ours(x)) == expected
    x = torch.randn(2, 3, 4, device=device)
    for args in [dict(use_input_stats=False), dict(running_mean=torch.zeros(4, device=device),
                                                     running_var=torch.ones(4, device=device))]:
        assert _raised(lambda: F.instance_norm(x, **args)) == _raised(lambda: torch_F.instance_norm(x, **args))


# torch.nn.GroupNorm's `bias` argument is newer than torch 2.11 (there: TypeError)
GROUP_NORM_TAKES_BIAS = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


def test_modules_are_drop_ins():
    if not GROUP_NORM_TAKES_BIAS:  # this torch has no `bias=`: neither have the drop-ins
        for cls in (fastreg.nn.GroupNorm, fastreg.nn.GroupNormSiLU):
            assert _raised(lambda: cls(4, 8, bias=False)) == _raised(lambda: torch.nn.GroupNorm(4, 8, bias=False))
    no_bias = dict(bias=False) if GROUP_NORM_TAKES_BIAS else dict(affine=False)
    for options in (dict(), dict(affine=False), dict(eps=1e-3, **no_bias)):
        theirs = torch.nn.GroupNorm(4, 8, **options)
        for cls in (fastreg.nn.GroupNorm, fastreg.nn.GroupNormSiLU):
            ours = cls(4, 8, **options)
            assert isinstance(ours, torch.nn.GroupNorm) and ours.extra_repr() == theirs.extra_repr()
            assert ours.state_dict().keys() == theirs.state_dict().keys()
            ours.load_state_dict(theirs.state_dict())
        assert repr(fastreg.nn.GroupNorm(4, 8, **options)) == repr(theirs)
    for rank in (1, 2, 3):
        for options in (dict(), dict(affine=True, track_running_stats=True), dict(momentum=None)):
            ours, theirs = INSTANCE_OURS[rank](6, **options), INSTANCE_THEIRS[rank](6, **options)
            assert repr(ours) == repr(theirs) and isinstance(ours, INSTANCE_THEIRS[rank])
            assert ours.state_dict().keys() == theirs.state_dict().keys()


# ------------------------------------------------------------------------ InstanceNorm

INSTANCE_OURS = {1: fastreg.nn.InstanceNorm1d, 2: fastreg.nn.InstanceNorm2d, 3: fastreg.nn.InstanceNorm3d}
INSTANCE_THEIRS = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}
INSTANCE_SHAPES = {1: (3, 5, 7), 2: (2, 5, 4, 3), 3: (2, 5, 2, 3, 2)}
INSTANCE_OPTIONS = {
    "default": dict(),
    "affine": dict(affine=True),
    "running-stats": dict(track_running_stats=True),
    "affine-running-stats-cumulative": dict(affine=True, track_running_stats=True, momentum=None),
}


def _instance_pair(rank, device, **options):
    ours, theirs = INSTANCE_OURS[rank](5, **options), INSTANCE_THEIRS[rank](5, **options)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours.to(device), theirs.to(device)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("options", list(INSTANCE_OPTIONS))
def test_instance_norm_steps_then_eval(backend, rank, options):
    name, device = backend
    if name == "triton" and rank != 2 and options != "affine-running-stats-cumulative":
        pytest.skip("interpreter time: triton covers rank 2 in every option and every rank in one")
    ours, theirs = _instance_pair(rank, device, **INSTANCE_OPTIONS[options])
    shape = INSTANCE_SHAPES[rank]
    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}.get(rank)
    for step in range(2):
        x = _input(shape, memory_format, device=device)
        if step == 1 and rank < 3:  # an unbatched input
            x = x[0]
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        _close(y_ours, y_theirs, torch.float32)
        grad = torch.randn_like(y_theirs)
        y_ours.backward(grad)
        y_theirs.backward(grad)
        _close(x_ours.grad, x_theirs.grad, torch.float32)
        if theirs.weight is not None:
            _close(ours.weight.grad, theirs.weight.grad, torch.float32, count=x.numel() // 5)
            _close(ours.bias.grad, theirs.bias.grad, torch.float32, count=x.numel() // 5)
        if theirs.running_mean is not None:
            _close(ours.running_mean, theirs.running_mean, torch.float32)
            _close(ours.running_var, theirs.running_var, torch.float32)
    ours.eval()
    theirs.eval()
    x = _input(shape, memory_format, device=device)
    _close(ours(x), theirs(x), torch.float32)


def test_instance_norm_warns_as_torch_does():
    x = torch.randn(2, 4, 6)
    for cls in (fastreg.nn.InstanceNorm1d, torch.nn.InstanceNorm1d):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls(3)(x)
        assert [str(w.message) for w in caught] == [
            "input's size at dim=1 does not match num_features. You can silence this warning by not passing in "
            "num_features, which is not used because affine=False"]


# --------------------------------------------------- opcheck, gradcheck, torch.compile


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not interpreted(name):
        utils += ("test_aot_dispatch_dynamic",)
    suffix = "_triton" if name == "triton" else ""
    fwd, bwd = getattr(torch.ops.fastreg, "gn_fwd" + suffix).default, getattr(torch.ops.fastreg, "gn_bwd" + suffix).default
    layouts = [torch.randn(2, 6, 5, device=device), torch.randn(2, 5, 6, device=device).transpose(1, 2)]
    for x in layouts:
        w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
        for weight, bias, silu in ((w, b, True), (None, None, False)):
            torch.library.opcheck(fwd, (x, weight, bias, 3, 1e-5, silu), test_utils=utils)
            _, mean, rstd = fwd(x, weight, bias, 3, 1e-5, silu)
            dy = torch.randn_like(x)
            torch.library.opcheck(bwd, (dy, x, weight, bias, mean, rstd, 3, silu), test_utils=utils)


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_gradcheck_fp64(backend, silu):
    name, device = backend
    fast = interpreted(name)
    shape = (1, 4, 2) if fast else (2, 4, 3)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, w, b):
        return F.group_norm(x, 2, w, b, activation="silu" if silu else None)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=fast)


class _UNetBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm_act = fastreg.nn.GroupNormSiLU(4, 8)
        self.norm = fastreg.nn.GroupNorm(2, 8)
        self.instance = fastreg.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)

    def forward(self, x):
        return self.instance(self.norm(self.norm_act(self.conv(x))))


def test_torch_compile_fullgraph(backend):
    name, device = backend
    block = _UNetBlock().to(device).to(memory_format=torch.channels_last)
    reference = _UNetBlock().to(device).to(memory_format=torch.channels_last)
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 3, 6, 6, device=device).to(memory_format=torch.channels_last)
        compiled(x).sum().backward()
        reference(x).sum().backward()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(block.state_dict()[key], value, atol=1e-5, rtol=1e-4)
    for (key, param), ref in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-4, rtol=1e-4, msg=key)
    block.eval()
    reference.eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), reference(x), atol=1e-5, rtol=1e-4)
