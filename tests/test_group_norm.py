"""GroupNorm (+ SiLU) and InstanceNorm 1d/2d/3d against torch on every backend: outputs and
all gradients over shapes and layouts, dtypes, determinism, a large mean, errors, opcheck,
gradcheck, torch.compile, the modules as drop-ins, InstanceNorm training steps then eval,
and every Triton kernel variant compiled ahead of time for sm_90 (no GPU needed)."""

import warnings

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg import _group_norm
from fastreg import functional as F
from tests import triton_aot
from tests.conftest import GPU, skip_unless_runs

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
        wide = torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale + mean
        return wide[..., ::2].to(dtype)
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
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
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


def _low_precision_close(ours_all, torch_all, ref_all, dtype, names=("y", "dx", "dweight", "dbias")):
    """fp16 / bf16: each error against the float64 reference at most twice torch's, plus
    LOW_PRECISION_ATOL of the reference's scale."""
    for what, ours, theirs, ref in zip(names, ours_all, torch_all, ref_all):
        ours_error = (ours.double() - ref).abs().max().item()
        torch_error = (theirs.double() - ref).abs().max().item()
        assert ours_error <= 2 * torch_error + LOW_PRECISION_ATOL[dtype] * max(1.0, ref.abs().max().item()), (
            f"{what}: error {ours_error:.3g} vs torch's {torch_error:.3g}")


# (shape, groups): channels-last chunks of whole groups in Triton (D a power of two):
# D = 8 with odd S (fp32: 2 chunks of 4 groups, bf16: 1 of 8), and D = 1 (32 groups a chunk)
CHUNK_SHAPES = {"C=64,G=8,7x5": ((2, 64, 7, 5), 8), "C=32,G=32,3x3": ((2, 32, 3, 3), 32)}


@pytest.mark.parametrize("shape", list(CHUNK_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last_chunks(backend, shape, dtype):
    """Channels-last inputs whose groups the Triton kernels take in chunks of whole groups
    (rows read unmasked): every affine variant, with and without SiLU, against torch."""
    name, device = backend
    shape, groups = CHUNK_SHAPES[shape]
    if name == "triton":  # the shapes do exercise the chunk kernels
        from fastreg.triton_kernels.group_norm import _blocks
        D, S = shape[1] // groups, shape[2] * shape[3]
        assert _blocks(shape[1], D, S, 1, dtype.itemsize, torch.device(device))[0] == "chunk"
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
        y, mean, rstd = _group_norm.group_norm(layout, 2, None, None, 1e-5)
        exact = x.double().reshape(2, 2, -1)
        torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=1e-7, atol=0)
        torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(-1, unbiased=False) + 1e-5), rtol=1e-4, atol=0)
        torch.testing.assert_close(y.double(), torch_F.group_norm(x.double(), 2), atol=1e-4, rtol=0)


# ------------------------------------------------- Triton: S split into pieces (interpreter)
# gn_fwd / gn_bwd split S into SPLITS pieces where a launch has too few programs for a GPU
# (_plan); splits=k forces k. S = 7 x 5 is no multiple of SPLITS * BLOCK_S. family ->
# (shape, groups, memory format): per group (contiguous, D = 2) and per chunk of whole
# groups (channels-last, D = 8).
SPLIT_SHAPES = {"group": ((2, 6, 7, 5), 3, torch.contiguous_format), "chunk": ((2, 64, 7, 5), 8, torch.channels_last)}


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
    return gn._plan(N, C, C // groups, x3.shape[2], x3.stride(1), x.element_size(), x.device, splits=splits)


@pytest.mark.parametrize("family", list(SPLIT_SHAPES))
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_split_launches_match_torch(family, splits, dtype):
    """Forward and backward with S in 1, 2 or 3 pieces: every piece's partials merged (a
    dropped one fails), with and without weight / bias and SiLU, against torch."""
    gn = _triton_gn()
    shape, groups, memory_format = SPLIT_SHAPES[family]
    x = _input(shape, memory_format, dtype=dtype)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    assert _split_plan(gn, x, groups, splits)[0] == family and _split_plan(gn, x, groups, splits)[3] == splits
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


@pytest.mark.parametrize("family", list(SPLIT_SHAPES))
def test_triton_split_statistics_stable_for_large_means(family):
    """Mean 1e3, unit variance, float32, S in 3 pieces: the merged mean and rstd stay those
    of float64 on the same input (per-piece mean and M2, Chan's merge)."""
    gn = _triton_gn()
    shape, groups, memory_format = SPLIT_SHAPES[family]
    x = (torch.randn(shape, dtype=torch.float64) + 1e3).float().contiguous(memory_format=memory_format)
    assert _split_plan(gn, x, groups, 3)[3] == 3
    y, mean, rstd = gn.gn_fwd(x.flatten(2), None, None, groups, 1e-5, False, splits=3)
    exact = x.double().reshape(shape[0], groups, -1)
    torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(-1, unbiased=False) + 1e-5), rtol=1e-4, atol=0)
    torch.testing.assert_close(y.view_as(x).double(), torch_F.group_norm(x.double(), groups), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(SPLIT_SHAPES))
def test_triton_split_launches_are_deterministic(family):
    """Two runs with S in 3 pieces: bitwise the same outputs, statistics and gradients."""
    gn = _triton_gn()
    shape, groups, memory_format = SPLIT_SHAPES[family]
    x = _input(shape, memory_format)
    w, b = _params(shape[1], True, True, "cpu")
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    runs = [_split_run(gn, x, groups, w, b, True, dy, 3) for _ in range(2)]
    assert all(torch.equal(first, second) for first, second in zip(*runs))


def test_triton_interpreter_splits_the_small_test_shapes():
    """_plan's interpreter targets split the small shapes the other tests run, in both
    families: test_matches_torch and test_channels_last_chunks go through the split kernels."""
    gn = _triton_gn()
    for case, family in (("wide", "group"), ("chunks-channels_last", "chunk")):
        shape, groups, memory_format, _ = CASES[case]
        plan = _split_plan(gn, _input(shape, memory_format), groups, None)
        assert plan[0] == family and plan[3] > 1, (case, plan)
    shape, groups = CHUNK_SHAPES["C=64,G=8,7x5"]
    plan = _split_plan(gn, _input(shape, torch.channels_last, dtype=torch.bfloat16), groups, None)
    assert plan[0] == "chunk" and plan[3] > 1, plan


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error), str(error)
    return None


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
        assert expected is not None and _raised(lambda: F.group_norm(*args)) == expected, args
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


def test_modules_are_drop_ins():
    for options in (dict(), dict(affine=False), dict(eps=1e-3, bias=False)):
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
    if GPU or name != "triton":
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
    # the interpreter runs a launch in ~0.2 s: triton takes a smaller input and fast mode
    shape, fast = ((1, 4, 2), True) if name == "triton" else ((2, 4, 3), False)
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


# ------------------------------------------------------ ahead-of-time compile for a GPU
# The kernels of triton_kernels/group_norm.py in every variant gn_fwd / gn_bwd launch:
# SILU, HAS_WEIGHT, HAS_BIAS (bias without weight too: torch allows it), x / y / dy / dx in
# fp32, bf16, fp16 or fp64; W, B, MEAN, RSTD, the partials and the sums in the accumulate
# dtype (fp64 for fp64 inputs, else fp32: the launcher converts the parameters, and passes
# MEAN in place of an absent one); sizes and strides i32, specialized as a launch does:
# an integer equal to 1 (a unit stride, D of InstanceNorm, TILES_PER_SPLIT 1) becomes the
# constexpr 1, one divisible by 16 is marked so. The kernels, tiles and splits are those
# `_plan` gives on an H100 (132 SMs: a target of 4 * 132 = 528 programs; tile of 2048) for
# these shapes (N, C, G, S); a split launch is two kernels each way (stats + apply
# forward, grad sums + dx backward), an unsplit one the one-kernel path:
#   "sd":        N=2,  C=320, G=32 (D=10) at 64 x 64: per group in both layouts (D not a power of two)
#   "d16-8x8":   N=2,  C=512, G=32 (D=16) at 8 x 8: small, unsplit
#   "instance":  N=2,  C=64,  G=64 (D=1)  at 64 x 64
#   "cl-d8":     N=16, C=256, G=32 (D=8)  at 32 x 32, channels-last only (an issue shape)
#   "d16-64x64": N=2,  C=512, G=32 (D=16) at 64 x 64, both layouts (issue shapes)

GN_AOT_SHAPES = {  # name -> (N, C, G, S)
    "sd": (2, 320, 32, 4096),
    "d16-8x8": (2, 512, 32, 64),
    "instance": (2, 64, 64, 4096),
    "cl-d8": (16, 256, 32, 1024),
    "d16-64x64": (2, 512, 32, 4096),
}
GN_AOT_CHANNELS_LAST_ONLY = ("cl-d8",)
GN_AOT_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
GN_H100_PROGRAMS = 4 * 132  # _split_targets on an H100: 4 programs per SM
# (shape, layout) -> the plan for every dtype, or {dtype: plan}; a plan is `_plan`'s
# (family, BLOCK_D or BLOCK_C, BLOCK_S, SPLITS, TILES_PER_SPLIT). Per group the tile does
# not depend on the dtype; a chunk is 128 bytes of each row (fp64 fewer: 16 channels).
GN_AOT_PLANS = {
    ("sd", "contiguous"): ("group", 8, 256, 16, 1),
    ("sd", "channels_last"): ("group", 8, 256, 16, 1),
    ("d16-8x8", "contiguous"): ("group", 16, 64, 1, 1),
    ("d16-8x8", "channels_last"): {"fp32": ("chunk", 32, 64, 1, 1), "bf16": ("chunk", 64, 32, 1, 2),
                                   "fp16": ("chunk", 64, 32, 1, 2), "fp64": ("chunk", 16, 64, 1, 1)},
    ("instance", "contiguous"): ("group", 1, 512, 8, 1),
    ("instance", "channels_last"): {"fp32": ("chunk", 32, 16, 256, 1), "bf16": ("chunk", 64, 8, 512, 1),
                                    "fp16": ("chunk", 64, 8, 512, 1), "fp64": ("chunk", 16, 32, 128, 1)},
    ("cl-d8", "channels_last"): {"fp32": ("chunk", 32, 64, 6, 3), "bf16": ("chunk", 64, 32, 11, 3),
                                 "fp16": ("chunk", 64, 32, 11, 3), "fp64": ("chunk", 16, 128, 4, 2)},
    ("d16-64x64", "contiguous"): ("group", 8, 256, 16, 1),
    ("d16-64x64", "channels_last"): {"fp32": ("chunk", 32, 64, 22, 3), "bf16": ("chunk", 64, 32, 43, 3),
                                     "fp16": ("chunk", 64, 32, 43, 3), "fp64": ("chunk", 16, 128, 11, 3)},
}
# The issue's bf16 shapes, (shape, layout) -> programs per launch before (one per unit)
# and after the split (units x SPLITS); 528 = 4 programs on each of an H100's 132 SMs:
#   (2, 512, 64x64) channels-last: 2 x 8 chunks of 64 channels = 16; 4096 / 32 = 128 tiles,
#       128 // ceil(528 / 16) = 3 a split: 43 splits, 16 x 43 = 688
#   (16, 256, 32x32) channels-last: 16 x 4 chunks = 64; 1024 / 32 = 32 tiles, 32 // 9 = 3 a
#       split: 11 splits, 64 x 11 = 704
#   (2, 512, 64x64) contiguous: 2 x 32 groups = 64; tiles of 8 channels x 256 positions
#       (was 1 x 2048): 4096 / 256 = 16 tiles, 1 a split: 16 splits, 64 x 16 = 1024
GN_ISSUE_PROGRAMS = {
    ("d16-64x64", "channels_last"): (16, 688),
    ("cl-d8", "channels_last"): (64, 704),
    ("d16-64x64", "contiguous"): (64, 1024),
}


def _gn_aot_layouts(shape):
    return ("channels_last",) if shape in GN_AOT_CHANNELS_LAST_ONLY else ("contiguous", "channels_last")


def _gn_aot_plan(shape, layout, x):
    plan = GN_AOT_PLANS[shape, layout]
    return plan[x] if isinstance(plan, dict) else plan


def test_triton_aot_plans_are_the_launchers():
    """The cases compile the kernel family, tiles and splits gn_fwd / gn_bwd launch on an
    H100 for those shapes (_plan: the one place that picks them), and the issue's shapes
    get at least 4 programs per SM of its 132 (the one-kernel path gave them 16 to 64)."""
    from fastreg.triton_kernels.group_norm import _blocks, _plan

    cuda = torch.device("cuda")
    for name, (N, C, G, S) in GN_AOT_SHAPES.items():
        for layout in _gn_aot_layouts(name):
            stride_c = 1 if layout == "channels_last" else S
            for x, itemsize in GN_AOT_ITEMSIZE.items():
                plan = _plan(N, C, C // G, S, stride_c, itemsize, cuda, target_programs=GN_H100_PROGRAMS)
                assert plan == _gn_aot_plan(name, layout, x), (name, layout, x)
                family, block, _, splits, _ = plan
                units = N * (C // block if family == "chunk" else G)
                if splits > 1:  # enough programs, else S has too few tiles
                    assert units * splits >= GN_H100_PROGRAMS, (name, layout, x)
                if (name, layout) in GN_ISSUE_PROGRAMS and x == "bf16":
                    kind, block, _ = _blocks(C, C // G, S, stride_c, itemsize, cuda)
                    before = N * (C // block if kind == "chunk" else G)
                    assert (before, units * splits) == GN_ISSUE_PROGRAMS[name, layout], (name, layout)
                    assert units * splits >= GN_H100_PROGRAMS


# kernel -> (pointers in x's dtype, pointers in the accumulate dtype, scalars): the
# arguments besides the constexprs, in order
GN_AOT_KERNELS = {
    "_gn_fwd_kernel": ("X Y", "W B MEAN RSTD", "S D G eps stride_n stride_c stride_s"),
    "_gn_bwd_kernel": ("X DY DX", "W B MEAN RSTD SUM_G SUM_GXHAT", "C S D G stride_n stride_c stride_s"),
    "_gn_stats_kernel": ("X", "PART_MEAN PART_M2", "S D G TILES_PER_SPLIT stride_n stride_c stride_s"),
    "_gn_apply_kernel": ("X Y", "W B MEAN RSTD PART_MEAN PART_M2",
                         "S D G SPLITS TILES_PER_SPLIT eps stride_n stride_c stride_s"),
    "_gn_grad_sums_kernel": ("X DY", "W B MEAN RSTD PART_G PART_GX",
                             "C S D G TILES_PER_SPLIT stride_n stride_c stride_s"),
    "_gn_dx_kernel": ("X DY DX", "W B MEAN RSTD PART_G PART_GX SUM_G SUM_GXHAT",
                      "C S D G SPLITS TILES_PER_SPLIT stride_n stride_c stride_s"),
    "_gn_chunk_fwd_kernel": ("X Y", "W B MEAN RSTD", "C S eps stride_n stride_s"),
    "_gn_chunk_bwd_kernel": ("X DY DX", "W B MEAN RSTD SUM_G SUM_GXHAT", "C S stride_n stride_s"),
    "_gn_chunk_stats_kernel": ("X", "PART_MEAN PART_M2", "C S TILES_PER_SPLIT stride_n stride_s"),
    "_gn_chunk_apply_kernel": ("X Y", "W B MEAN RSTD PART_MEAN PART_M2",
                               "C S SPLITS TILES_PER_SPLIT eps stride_n stride_s"),
    "_gn_chunk_grad_sums_kernel": ("X DY", "W B MEAN RSTD PART_G PART_GX", "C S TILES_PER_SPLIT stride_n stride_s"),
    "_gn_chunk_dx_kernel": ("X DY DX", "W B MEAN RSTD PART_G PART_GX SUM_G SUM_GXHAT",
                            "C S SPLITS TILES_PER_SPLIT stride_n stride_s"),
}
# (direction, split) -> the kernels launched, by family prefix ("_gn_" or "_gn_chunk_")
GN_AOT_LAUNCHES = {("fwd", False): ("fwd",), ("bwd", False): ("bwd",), ("fwd", True): ("stats", "apply"),
                   ("bwd", True): ("grad_sums", "dx")}


def _gn_aot_case(step, x, *, layout="contiguous", shape="sd", silu=True, weight=True, bias=True):
    """The compile of kernel `step` ("fwd", "stats", "dx", ...) of the family `_plan` picks."""
    acc = "fp64" if x == "fp64" else "fp32"
    N, C, G, S = GN_AOT_SHAPES[shape]
    family, block, block_s, splits, per_split = _gn_aot_plan(shape, layout, x)
    kernel = f"_gn_chunk_{step}_kernel" if family == "chunk" else f"_gn_{step}_kernel"
    x_pointers, acc_pointers, scalars = (names.split() for names in GN_AOT_KERNELS[kernel])
    signature = {name: f"*{x}" for name in x_pointers} | {name: f"*{acc}" for name in acc_pointers}
    strides = dict(stride_n=C * S, stride_c=S, stride_s=1) if layout == "contiguous" else \
        dict(stride_n=C * S, stride_c=1, stride_s=C)
    values = dict(C=C, S=S, D=C // G, G=G, SPLITS=splits, TILES_PER_SPLIT=per_split, **strides)
    ones = {name: 1 for name in scalars if values.get(name) == 1}  # a launch specializes them
    signature.update({name: "fp32" if name == "eps" else "i32" for name in scalars if name not in ones})
    flags = dict(HAS_WEIGHT=weight, HAS_BIAS=bias, SILU=silu) if step != "stats" else {}
    tile = dict(D=C // G, BLOCK_C=block) if family == "chunk" else dict(BLOCK_D=block)
    constexprs = dict(flags, **tile, BLOCK_S=block_s, **ones)
    div16 = tuple(name for name in scalars if name not in ones and name != "eps" and values[name] % 16 == 0)
    affine = {(True, True): "weight+bias", (True, False): "weight", (False, True): "bias", (False, False): "none"}
    variant = ("silu" if silu else "plain", affine[weight, bias]) if step != "stats" else ()
    case_id = "-".join((step, x, layout, shape, *variant))
    return triton_aot.Case(case_id, "fastreg.triton_kernels.group_norm", kernel, signature, constexprs,
                           num_warps=4, div16=div16)


GN_AOT_CASES = [
    *(_gn_aot_case(step, x, layout=layout, shape=shape, silu=silu, weight=weight, bias=bias)
      for direction in ("fwd", "bwd")
      for x in ("fp32", "bf16", "fp16", "fp64")
      for shape in GN_AOT_SHAPES
      for layout in _gn_aot_layouts(shape)
      for step in GN_AOT_LAUNCHES[direction, _gn_aot_plan(shape, layout, x)[3] > 1]
      for silu in (True, False)
      for weight, bias in ((True, True), (True, False), (False, True), (False, False))
      # every flag combination in fp32; the other dtypes with the default module's flags;
      # the stats kernels take no flags
      if (x == "fp32" or (weight and bias))
      and (step != "stats" or (silu and weight and bias))),
]


def _gn_vector_access(case):
    """Whether the tile's fast axis is contiguous in memory and 16-byte aligned, so that
    x (and dy) load, and y (dx) store, 16 bytes at a time: along S in a contiguous input
    (per-group kernels); along C in a channels-last one, in the chunk kernels wherever a
    chunk row is 16 bytes or more and C and the strides are divisible by 16 (rows read
    unmasked), and in the per-group kernels only where a tile spans 16 channels of a group
    whose first channel is aligned (D divisible by 16)."""
    if case.kernel.startswith("_gn_chunk_"):
        itemsize = GN_AOT_ITEMSIZE[case.signature["X"].lstrip("*")]
        aligned = {"C", "stride_n", "stride_s"} <= set(case.div16)
        return aligned and case.constexprs["BLOCK_C"] * itemsize >= 16
    if "stride_s" in case.constexprs:
        return True
    return case.constexprs["BLOCK_D"] >= 16 and "D" in case.div16


# kernel step -> (tile loads, tile stores): x read in 3 passes and y written once by the
# one-kernel forward, x and dy read twice and dx written once by the one-kernel backward;
# split: x read twice (stats), x read and y written (apply), x and dy read (grad sums), x
# and dy read and dx written (dx)
GN_TILE_PASSES = {"fwd": (3, 1), "bwd": (4, 1), "stats": (2, 0), "apply": (1, 1), "grad_sums": (2, 0), "dx": (2, 1)}


def _gn_tile_vector_accesses(case):
    """(loads, stores): the 16-byte accesses a kernel has at least where all its tile
    accesses are 16 bytes: each tile spread over the 32 * num_warps threads, times the
    kernel's passes (GN_TILE_PASSES). A count, not "any": the parameters' loads and the
    sums' stores may be 16 bytes too."""
    c = case.constexprs
    tile_bytes = c["BLOCK_S"] * c.get("BLOCK_C", c.get("BLOCK_D")) * GN_AOT_ITEMSIZE[case.signature["X"].lstrip("*")]
    per_thread = tile_bytes // (16 * 32 * case.num_warps)
    step = case.kernel.removeprefix("_gn_").removeprefix("chunk_").removesuffix("_kernel")
    loads, stores = GN_TILE_PASSES[step]
    if step == "stats" and c.get("TILES_PER_SPLIT") == 1:
        loads = 1  # a piece of one tile: the second pass reuses the first's loads
    return loads * per_thread, stores * per_thread


@pytest.fixture(scope="module")
def gn_aot_ptx():
    return triton_aot.compile_ptx(GN_AOT_CASES)


@pytest.mark.parametrize("case", GN_AOT_CASES, ids=str)
def test_triton_kernel_compiles_for_a_gpu(gn_aot_ptx, case):
    """The interpreter accepts code a GPU compile rejects: every variant compiles for sm_90,
    no GPU needed (tests/triton_aot.py), and reads x (and dy) and writes y (dx) 16 bytes at
    a time where the tile's fast axis is contiguous."""
    ptx = triton_aot.ptx_of(gn_aot_ptx, case)
    if _gn_vector_access(case):
        loads, stores = _gn_tile_vector_accesses(case)
        found = len(triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True))
        assert found >= loads, f"{found} 16-byte loads, fewer than the {loads} of x (and dy) 16 bytes at a time"
        found = len(triton_aot.global_accesses(ptx, "st", sixteen_bytes=True))
        assert found >= stores, f"{found} 16-byte stores, fewer than the {stores} of the output 16 bytes at a time"
