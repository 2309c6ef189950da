"""DropBlock on every backend: drop_block2d / drop_block3d and their modules, against
torchvision (its own code fed fastreg's seeds when torchvision is importable, else its
formula written here in torch ops), the expected drop rate, and each other."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as torch_F

import fastreg
from fastreg import _reference, _rng
from fastreg import functional as F
from fastreg.ops.drop_block import DROP_BLOCK, DROP_BLOCK_APPLY
from tests import triton_aot
from tests.conftest import interpreted

try:
    import torchvision.ops as torchvision_ops
except Exception:  # not installed, or built against another torch
    torchvision_ops = None

# (atol, rtol) against torchvision's expression in float64 from the same input and mask.
# The kernels round x * scale once; the Triton interpreter (CPU runs) truncates float32 ->
# bfloat16, one bf16 ulp, which the rtol covers.
TOL = {
    torch.float32: (1e-6, 3e-7),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float64: (1e-12, 1e-15),
}
DTYPES = list(TOL)
EPS = 1e-6
# (shape, block_size, layout): odd sizes, block sizes clipped to the smallest spatial size,
# rows whose bits end inside a byte
CASES = [
    ((2, 3, 9, 11), 3, torch.contiguous_format),
    ((2, 3, 9, 11), 5, torch.channels_last),
    ((3, 2, 5, 6), 7, torch.contiguous_format),  # block_size clipped to 5
    ((1, 5, 7, 6), 5, torch.channels_last),
    ((2, 3, 4, 5, 6), 3, torch.contiguous_format),
    ((2, 3, 5, 4, 7), 3, torch.channels_last_3d),
]


def _seeded(value, device):
    return torch.tensor(value, dtype=torch.int64, device=device)


def _drawn_seed(device):
    """The seed a fastreg call right after torch.manual_seed(7) draws."""
    torch.manual_seed(7)
    return _rng.new_seed(torch.device(device))


def _gamma(shape, p, block_size):
    spatial = shape[2:]
    block_size = min(block_size, *spatial)
    grid = math.prod(size - block_size + 1 for size in spatial)
    return p * math.prod(spatial) / (block_size ** len(spatial) * grid), block_size


def _seeds(shape, seed, gamma, block_size, shared=False):
    """The reference's seed grid (planes, 1, *grid) as float 0/1."""
    n, c, *spatial = shape
    grid = [size - block_size + 1 for size in spatial]
    planes = n if shared else n * c
    words = _reference.philox_words(planes * math.prod(grid), seed)
    return (words < _rng.drop_threshold(gamma)).reshape(n, 1 if shared else c, *grid)


def _torchvision_formula(x, seeds, block_size, eps=EPS):
    """torchvision's drop_block2d/3d from the bernoulli draw on, in torch ops, in x's dtype."""
    dims = x.dim() - 2
    noise = torch_F.pad(seeds.to(x.dtype), [block_size // 2] * 2 * dims, value=0)
    pool = torch_F.max_pool2d if dims == 2 else torch_F.max_pool3d
    noise = pool(noise, stride=1, kernel_size=block_size, padding=block_size // 2)
    noise = 1 - noise.expand_as(x)
    return x * noise * (noise.numel() / (eps + noise.sum()))


def _torchvision_with_seeds(x, p, block_size, seeds, inplace=False, eps=EPS):
    """torchvision's own drop_block, its bernoulli_ draw replaced by `seeds`."""
    def bernoulli_(noise, gamma):
        return noise.copy_(seeds.to(noise.dtype))

    fn = torchvision_ops.drop_block2d if x.dim() == 4 else torchvision_ops.drop_block3d
    with mock.patch.object(torch.Tensor, "bernoulli_", bernoulli_):
        return fn(x, p, block_size, inplace=inplace, eps=eps)


def _input(shape, dtype, device, layout=torch.contiguous_format, requires_grad=False):
    x = torch.randn(shape, device=device)
    x = torch.where(x >= 0, x + 0.5, x - 0.5)  # nonzero: a zero output means a dropped element
    return x.to(dtype).contiguous(memory_format=layout).requires_grad_(requires_grad)


def _assert_close(actual, expected):
    atol, rtol = TOL[actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ placement, stream


@pytest.mark.parametrize("shape, block_size", [((2, 3, 9, 11), 3), ((1, 2, 8, 8), 5), ((2, 1, 7, 5), 5),
                                               ((1, 2, 5, 6, 7), 3), ((1, 1, 4, 4, 4), 3)])
def test_placement_is_torchvisions(shape, block_size):
    """The reference's blocks (seeds widened by a max-pool over the top-left padded grid) are
    torchvision's (its symmetric padding and pooling), for the same seeds."""
    seed = _seeded(12345, "cpu")
    keep = _reference.drop_block_keep(shape, seed, 0.08, block_size)
    seeds = _seeds(shape, seed, 0.08, block_size)
    dims = len(shape) - 2
    noise = torch_F.pad(seeds.float(), [block_size // 2] * 2 * dims, value=0)
    pool = torch_F.max_pool2d if dims == 2 else torch_F.max_pool3d
    noise = pool(noise, stride=1, kernel_size=block_size, padding=block_size // 2)
    assert torch.equal(keep, noise == 0)
    assert 0 < (~keep).sum() < keep.numel()


@pytest.mark.parametrize("shape, block_size, layout", CASES, ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_kernels_bitwise_identical_to_reference(kernel_backend, shape, block_size, layout, shared):
    """Same seed: y, the bit-packed mask and the scale of every kernel equal the torch
    reference's bit for bit (float32 and float64; bf16 through the interpreter: 1 ulp)."""
    name, device = kernel_backend
    gamma, block_size = _gamma(shape, 0.3, block_size)
    seed = _seeded(-0x123456789ABCDEF, device)
    for dtype in (torch.float32, torch.float64):
        x = _input(shape, dtype, device, layout)
        y, mask, scale = DROP_BLOCK[name](x, seed, gamma, block_size, EPS, shared)
        y_ref, mask_ref, scale_ref = DROP_BLOCK["torch"](x, seed, gamma, block_size, EPS, shared)
        assert torch.equal(mask, mask_ref) and torch.equal(scale, scale_ref) and torch.equal(y, y_ref)
        assert y.stride() == x.stride() and mask.dtype == torch.uint8
        assert torch.equal(DROP_BLOCK_APPLY[name](x, mask, scale), y)


# ----------------------------------------------------------------- against torchvision


@pytest.mark.parametrize("shape, block_size, layout", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torchvision(backend, shape, block_size, layout, dtype):
    """fastreg's output and gradient against torchvision's for the same seeds: torchvision's
    own function with its bernoulli_ draw replaced by fastreg's seeds when it is importable,
    its formula in torch ops otherwise; both in float64 from the same rounded input."""
    name, device = backend
    p = 0.25
    x = _input(shape, dtype, device, layout, requires_grad=True)
    op = F.drop_block2d if len(shape) == 4 else F.drop_block3d
    torch.manual_seed(7)
    y = op(x, p, block_size)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=layout)  # channels-last kept
    gamma, clipped = _gamma(shape, p, block_size)
    seeds = _seeds(shape, _drawn_seed(device), gamma, clipped)
    x64 = x.detach().double().requires_grad_()
    if torchvision_ops is not None:
        expected = _torchvision_with_seeds(x64, p, block_size, seeds)
        torch.testing.assert_close(expected, _torchvision_formula(x64, seeds, clipped), rtol=1e-15, atol=0)
    else:
        expected = _torchvision_formula(x64, seeds, clipped)
    _assert_close(y, expected)
    grad = torch.randn(shape, device=device).to(dtype)
    y.backward(grad)
    expected.backward(grad.double())
    _assert_close(x.grad, x64.grad)


def test_drop_rate_and_normalization(backend):
    """Over many planes, the kept fraction is the expected one: element (h, w) is kept when none
    of the c(h) c(w) seed points whose block covers it is a seed (c: how many grid points of an
    axis cover a position), so E[kept] = mean over positions of (1 - gamma)^(c(h) c(w)); the
    output's mean magnitude is the input's (the normalization)."""
    name, device = backend
    shape = (4, 4, 20, 20) if interpreted(name) else (16, 16, 20, 20)
    p, block_size = 0.2, 5
    gamma, _ = _gamma(shape, p, block_size)
    grid = shape[-1] - block_size + 1
    covering = torch.tensor([min(h, block_size - 1, grid - 1, shape[-1] - 1 - h) + 1 for h in range(shape[-1])],
                            dtype=torch.float64)
    expected_kept = ((1 - gamma) ** (covering[:, None] * covering[None, :])).mean().item()
    x = torch.ones(shape, device=device, dtype=torch.float64)
    y = F.drop_block2d(x, p, block_size)
    kept = (y != 0).double().mean().item()
    planes = shape[0] * shape[1]
    assert abs(kept - expected_kept) < 5 * math.sqrt(expected_kept * (1 - expected_kept) / planes)
    assert y.mean().item() == pytest.approx(1.0, rel=1e-9)  # numel / kept * kept / numel


def test_shared_mask_drops_the_same_blocks_in_every_channel(backend):
    name, device = backend
    for shape, layout in (((3, 4, 9, 9), torch.channels_last), ((2, 3, 5, 6, 7), torch.contiguous_format)):
        x = _input(shape, torch.float32, device, layout)
        op = F.drop_block2d if len(shape) == 4 else F.drop_block3d
        torch.manual_seed(7)
        y = op(x, 0.3, 3, shared_mask=True)
        keep = y != 0
        assert torch.equal(keep, keep[:, :1].expand_as(keep))
        assert 0 < (~keep).sum() < keep.numel()
        gamma, _ = _gamma(shape, 0.3, 3)
        expected = _reference.drop_block_keep(shape, _drawn_seed(device), gamma, 3, shared_mask=True)
        assert torch.equal(keep, expected)


def test_channels_last_draws_the_contiguous_mask(backend):
    """The mask depends on (sample, channel, position), not on the memory layout."""
    name, device = backend
    x = _input((2, 5, 8, 7), torch.float32, device)
    torch.manual_seed(7)
    contiguous = F.drop_block2d(x, 0.3, 3)
    torch.manual_seed(7)
    channels_last = F.drop_block2d(x.contiguous(memory_format=torch.channels_last), 0.3, 3)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(contiguous, channels_last)


def test_gradient_of_any_layout(backend):
    """Backward lays the incoming gradient out as forward's output before applying the mask."""
    name, device = backend
    x = _input((2, 3, 7, 9), torch.float32, device, torch.channels_last, requires_grad=True)
    y = F.drop_block2d(x, 0.3, 3)
    grad = torch.randn(2, 3, 9, 7, device=device).transpose(2, 3)  # strided, neither layout
    y.backward(grad)
    multiplier = y.detach() / x.detach()
    torch.testing.assert_close(x.grad, grad * multiplier)
    # a non-contiguous input: y (and the mask) contiguous
    base = _input((2, 3, 9, 14), torch.float32, device, requires_grad=True)
    strided = base[..., ::2]
    y = F.drop_block2d(strided, 0.3, 3)
    assert y.is_contiguous()
    y.sum().backward()
    expected = torch.zeros_like(base)
    expected[..., ::2] = y.detach() / strided.detach()
    torch.testing.assert_close(base.grad, expected)


def test_rng_follows_torch(backend):
    name, device = backend
    x = torch.ones(4, 3, 10, 10, device=device)
    torch.manual_seed(123)
    first, second = F.drop_block2d(x, 0.3, 3), F.drop_block2d(x, 0.3, 3)
    torch.manual_seed(123)
    assert torch.equal(first, F.drop_block2d(x, 0.3, 3))
    assert not torch.equal(first, second)


def test_identity_cases_and_empty_like_torchvision(backend):
    name, device = backend
    x = _input((2, 3, 6, 6), torch.float32, device)
    assert F.drop_block2d(x, 0.5, 3, training=False) is x
    assert F.drop_block2d(x, 0.0, 3) is x
    assert fastreg.nn.DropBlock2d(0.5, 3).eval()(x) is x
    empty = torch.empty(0, 3, 6, 6, device=device)
    assert F.drop_block2d(empty, 0.5, 3).shape == empty.shape
    if torchvision_ops is not None:
        assert torchvision_ops.drop_block2d(x, 0.5, 3, training=False) is x


def test_bad_arguments_raise_like_torchvision(backend):
    name, device = backend
    x4, x5 = torch.ones(2, 3, 8, 8, device=device), torch.ones(1, 2, 6, 7, 8, device=device)
    calls = [
        (F.drop_block2d, (x4, 1.5, 3), ValueError, "drop probability has to be between 0 and 1, but got 1.5."),
        (F.drop_block2d, (x4, -0.1, 3), ValueError, "drop probability has to be between 0 and 1, but got -0.1."),
        (F.drop_block2d, (x5, 0.1, 3), ValueError, "input should be 4 dimensional. Got 5 dimensions."),
        (F.drop_block3d, (x4, 0.1, 3), ValueError, "input should be 5 dimensional. Got 4 dimensions."),
        (F.drop_block2d, (x4, 0.1, 4), ValueError, "block size should be odd. Got 4 which is even."),
        (F.drop_block2d, (x4, 0.1, 9), ValueError, "block size should be odd. Got 8 which is even."),
        (F.drop_block3d, (x5, 0.1, 7), ValueError, "block size should be odd. Got 6 which is even."),
        (F.drop_block2d, (x4, 0.1, 0), ValueError, "block size should be odd. Got 0 which is even."),
        (F.drop_block2d, (x4, 0.1, -3), RuntimeError, "pad must be non-negative, but got pad: -2"),
    ]
    for fn, args, error, message in calls:
        with pytest.raises(error) as ours:
            fn(*args)
        assert str(ours.value) == message
        if torchvision_ops is not None:
            theirs_fn = getattr(torchvision_ops, fn.__name__)
            with pytest.raises(error) as theirs:
                theirs_fn(*args)
            assert str(theirs.value) == message
    with pytest.raises(RuntimeError, match="floating-point 'input'"):
        F.drop_block2d(torch.ones(2, 3, 8, 8, dtype=torch.int64, device=device), 0.1, 3)


def test_inplace(backend):
    name, device = backend
    x = _input((2, 3, 8, 8), torch.float32, device, torch.channels_last)
    torch.manual_seed(7)
    out_of_place = F.drop_block2d(x, 0.3, 3)
    torch.manual_seed(7)
    y = F.drop_block2d(x, 0.3, 3, inplace=True)
    assert y is x and torch.equal(x, out_of_place)
    leaf = _input((2, 3, 8, 8), torch.float32, device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.drop_block2d(leaf, 0.3, 3, inplace=True)
    hidden = leaf * 1.0
    out = F.drop_block3d(hidden.unsqueeze(2), 0.3, 1, inplace=True)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, (out.detach() / leaf.detach().unsqueeze(2)).squeeze(2))


# --------------------------------------------------------------------------- modules


def test_modules_match_torchvision_signature_and_repr():
    for cls, name in ((fastreg.nn.DropBlock2d, "DropBlock2d"), (fastreg.nn.DropBlock3d, "DropBlock3d")):
        module = cls(0.1, 7)
        assert (module.p, module.block_size, module.inplace, module.eps, module.shared_mask) == (0.1, 7, False, 1e-6, False)
        assert repr(module) == f"{name}(p=0.1, block_size=7, inplace=False)"
        assert repr(cls(0.2, 3, True, shared_mask=True)) == f"{name}(p=0.2, block_size=3, inplace=True, shared_mask=True)"
        if torchvision_ops is not None:
            assert repr(module) == repr(getattr(torchvision_ops, name)(0.1, 7))
    assert issubclass(fastreg.nn.DropBlock3d, fastreg.nn.DropBlock2d)
    x = _input((2, 3, 4, 6, 6), torch.float32, "cpu")
    torch.manual_seed(7)
    y = fastreg.nn.DropBlock3d(0.3, 3)(x)
    torch.manual_seed(7)
    assert torch.equal(y, F.drop_block3d(x, 0.3, 3))


# ---------------------------------------------------------------- what is stored


def test_saves_a_bit_packed_mask(kernel_backend):
    """Saved for backward: the keep bits (1 bit per element) and the float64 scale."""
    name, device = kernel_backend
    x = torch.randn(4, 8, 16, 16, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = F.drop_block2d(x, 0.3, 5)
    assert sorted(saved, key=str) == sorted([(torch.uint8, x.numel() // 8), (torch.float64, 1)], key=str)
    y.sum().backward()


# --------------------------------------------------- opcheck, gradcheck, torch.compile

OP_NAMES = {"cpu": ("drop_block", "drop_block_", "drop_block_apply"),
            "cuda": ("drop_block", "drop_block_", "drop_block_apply"),
            "triton": ("drop_block_triton", "drop_block_triton_", "drop_block_apply_triton")}


def _opcheck_utils(name):
    # Under the interpreter, AOT tracing would run the Triton launcher on fake tensors
    if interpreted(name):
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck(kernel_backend):
    name, device = kernel_backend
    fwd, inplace, apply = (getattr(torch.ops.fastreg, n).default for n in OP_NAMES[name])
    seed = _seeded(11, device)
    for shape, layout, shared in (((2, 3, 6, 7), torch.contiguous_format, False),
                                  ((2, 3, 6, 7), torch.channels_last, True),
                                  ((1, 2, 4, 5, 6), torch.channels_last_3d, False)):
        x = _input(shape, torch.float32, device, layout, requires_grad=True)
        torch.library.opcheck(fwd, (x, seed, 0.1, 3, EPS, shared), test_utils=_opcheck_utils(name))
        torch.library.opcheck(inplace, (x.detach().clone(), seed, 0.1, 3, EPS, shared),
                              test_utils=_opcheck_utils(name))
        _, mask, scale = fwd(x.detach(), seed, 0.1, 3, EPS, shared)
        torch.library.opcheck(apply, (x, mask, scale), test_utils=_opcheck_utils(name))


def test_gradcheck_fp64(backend):
    name, device = backend
    seed = _seeded(5, device)  # a fixed seed makes the op a deterministic function
    fast = interpreted(name)  # five launches per call
    for layout, shape in ((torch.contiguous_format, (2, 3, 6, 7)), (torch.channels_last, (2, 3, 6, 7)),
                          (torch.contiguous_format, (1, 2, 4, 5, 4))):
        x = torch.randn(shape, dtype=torch.float64, device=device).contiguous(memory_format=layout).requires_grad_()

        def fn(t):
            return DROP_BLOCK[name](t, seed, 0.1, 3, EPS, False)[0]

        assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=fast)


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = fastreg.nn.DropBlock2d(0.2, 3)
        self.block3d = fastreg.nn.DropBlock3d(0.2, 3, shared_mask=True)

    def forward(self, x):
        h = self.block(self.conv(x))
        return self.block3d(h.unsqueeze(2).expand(-1, -1, 4, -1, -1))


def test_torch_compile_fullgraph(backend):
    name, device = backend
    x = _input((2, 3, 8, 8), torch.float64, device, torch.channels_last, requires_grad=True)
    y = torch.compile(lambda t: F.drop_block2d(t, 0.3, 3), fullgraph=True)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / x.detach())
    assert 0 < (y == 0).sum() < y.numel()
    model = _ConvNet().to(device)
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and x.grad is not None
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    targets = [str(node.target) for g in explanation.graphs for node in g.graph.nodes]
    if name != "torch":
        assert sum("fastreg" in t for t in targets) == 2, targets


# ------------------------------------------------------ ahead-of-time compile for a GPU


def _case(case_id, kernel, signature, constexprs, div16=()):
    return triton_aot.Case(case_id, "fastreg.triton_kernels.drop_block", kernel, signature, constexprs, div16=div16)


DROP_BLOCK_AOT_CASES = [
    _case("seeds", "_seeds_kernel", {"seeds_ptr": "*u8", "seed_ptr": "*i64", "n_points": "i32", "threshold": "i64"},
          {"BLOCK": 1024}),
    _case("sliding_or", "_sliding_or_kernel", {"in_ptr": "*u8", "out_ptr": "*u8", "in_length": "i32",
                                               "out_length": "i32", "inner": "i32", "block": "i32"}, {"BLOCK": 1024}),
    *(_case(f"pack-{'channels_last' if cl else 'contiguous'}{'-shared' if shared else ''}", "_pack_kernel",
            {"drop_ptr": "*u8", "mask_ptr": "*u8", "kept_ptr": "*i64", "n_bytes": "i32", "row_bytes": "i32",
             "row_length": "i32", "channels": "i32", "spatial": "i32"},
            {"CHANNELS_LAST": cl, "SHARED": shared, "BYTES": 128})
      for cl in (False, True) for shared in (False, True)),
    *(_case(f"apply-{dtype}", "_apply_kernel", {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "mask_ptr": "*u8",
                                               "scale_ptr": "*fp64", "numel": "i64", "row_length": "i32",
                                               "row_bytes": "i32"},
            {"ACC_DTYPE": triton_aot.dtype("fp64" if dtype == "fp64" else "fp32"), "BLOCK": 1024}, div16=("numel",))
      for dtype in ("fp32", "bf16", "fp16", "fp64")),
]


@pytest.fixture(scope="module")
def drop_block_aot_ptx():
    return triton_aot.compile_ptx(DROP_BLOCK_AOT_CASES)


@pytest.mark.parametrize("case", DROP_BLOCK_AOT_CASES, ids=str)
def test_triton_kernel_compiles_for_a_gpu(drop_block_aot_ptx, case):
    """Every kernel variant compiles for sm_90 (tests/triton_aot.py); the apply kernel moves x
    and out in 16-byte accesses."""
    ptx = triton_aot.ptx_of(drop_block_aot_ptx, case)
    assert triton_aot.global_accesses(ptx, "st")
    if case.kernel == "_apply_kernel":
        stores = triton_aot.global_accesses(ptx, "st")
        assert stores == triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), stores
