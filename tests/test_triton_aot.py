"""Every Triton kernel variant the launchers of triton_kernels/ launch, compiled ahead of
time for an H100/H200 (sm_90) with no GPU (tests/triton_aot.py), and checked for what
a GPU run would show of the compiled code:

- it compiles (the interpreter of the CPU tests accepts code a GPU compile rejects);
- no register spills (the cubin's stack frame is empty);
- global memory is read and written 16 bytes per access where the layout allows;
- no per-element integer division (dropout's group and bias-column indices).

The variants are not restated here: each is recorded from a launcher call on a GPU-sized
shape (tests/kernel_launches.py), so the argument types, constexprs, num_warps and grid
are the launcher's own.
"""

import functools
import re

import pytest

triton = pytest.importorskip("triton")

from tests import kernel_launches, triton_aot  # noqa: E402

FAMILIES = {
    "dropout": kernel_launches.DROPOUT,
    "layer_norm": kernel_launches.NORM,
    "group_norm": kernel_launches.GROUP_NORM,
    "batch_norm": kernel_launches.BATCH_NORM,
}
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
# Variants that an older triton compiles with spills (its code for the same kernel needs
# more registers), by the first triton that compiles them without; from the sm_90 compile
# of triton 3.6.0, 3.7.1, 3.8.0 and 3.9.0. Under an older triton they fail as expected
# (strict: a clean compile fails the test, so the table stays true). Whether the spills
# cost time on a GPU awaits a GPU run. Another triton for this file alone:
# `pip install --no-deps --target DIR triton==3.6.0`, then PYTHONPATH=DIR:. pytest ...
SPILL_FREE_FROM = {
    "layer_norm-bf16-n16384:_norm_bwd_kernel": (3, 8),
    "dropout_norm-rms_norm-bf16-n16384:_norm_bwd_kernel": (3, 8),
    "group_norm-bf16-channels_last-sd-c320-64x64:_gn_chunk_dx_kernel": (3, 7),
    "group_norm-fp16-channels_last-sd-c320-64x64:_gn_chunk_dx_kernel": (3, 7),
}
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


@functools.lru_cache(maxsize=None)
def _cases(family):
    return triton_aot.recorded_cases(FAMILIES[family])


@functools.lru_cache(maxsize=None)
def _compiled(family):
    return triton_aot.compile_ptx(_cases(family))


def _params(family):
    return [pytest.param(family, case, id=case.id) for case in _cases(family)]


def _spill_params():
    """Every family's variants, those that SPILL_FREE_FROM says this triton spills marked so."""
    params = []
    for family in FAMILIES:
        for case in _cases(family):
            marks = ()
            if TRITON_VERSION < SPILL_FREE_FROM.get(case.id, (0, 0)):
                reason = f"triton {triton.__version__} compiles it with spills (SPILL_FREE_FROM)"
                marks = pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError)
            params.append(pytest.param(family, case, id=case.id, marks=marks))
    return params


def _itemsize(case, pointer):
    return ITEMSIZE[case.signature[pointer].lstrip("*")]


@pytest.mark.parametrize("family, case", _spill_params())
def test_compiles_without_spills(family, case):
    """The variant compiles for sm_90 and keeps its values in registers: a stack frame
    means spills to local memory (a Triton kernel has no local arrays)."""
    usage = triton_aot.usage_of(_compiled(family), case)
    assert usage["STACK"] == 0, f"{usage['STACK']} bytes of stack per thread (spills) at {usage['REG']} registers"


def test_spill_table_names_recorded_variants():
    recorded = {case.id for family in FAMILIES for case in _cases(family)}
    assert set(SPILL_FREE_FROM) <= recorded, set(SPILL_FREE_FROM) - recorded


# ------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("family, case", _params("dropout"))
def test_dropout_accesses_and_index_arithmetic(family, case):
    """x, residual and out are accessed 16 bytes at a time, and the bias too where its
    columns come in aligned runs of 16 bytes; besides, only the seed is loaded. An
    element's group (grouped draws) and bias column cost no per-element division: at
    most one 64-bit division per quotient, done once per program."""
    ptx = triton_aot.ptx_of(_compiled(family), case)
    constexprs = case.constexprs
    loads, stores = triton_aot.global_accesses(ptx, "ld"), triton_aot.global_accesses(ptx, "st")
    wide_loads = triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True)
    assert stores and stores == triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), stores
    bias_wide = constexprs["HAS_BIAS"] and constexprs["BIAS_VEC"] * _itemsize(case, "x_ptr") == 16
    streams = 1 + constexprs["HAS_RESIDUAL"] + bias_wide  # x, residual, bias
    assert len(wide_loads) == streams * len(stores), loads
    if bias_wide or not constexprs["HAS_BIAS"]:
        assert len(loads) == len(wide_loads) + 1, loads  # + the seed
    divisions = [line for line in ptx.splitlines() if re.search(r"\b(div|rem)\.[su]64\b", line)]
    assert len(divisions) <= constexprs["GROUPED"] + constexprs["HAS_BIAS"], divisions


# ------------------------------------------------------------------ LayerNorm, RMSNorm


def _norm_params(param_grads):
    return [param for param in _params("layer_norm")
            if (param.values[1].kernel == "_norm_param_grads_kernel") == param_grads]


@pytest.mark.parametrize("family, case", _norm_params(param_grads=False))
def test_norm_rows_accessed_16_bytes_at_a_time(family, case):
    """Every access of a row (x, residual, h, y, dy, dh, dx, the weight and bias, the
    partial sums) is 16 bytes wide: the only narrower ones are the per-row scalars
    (mean, rstd) and the seed. The looped backward's launch has two kinds of programs (dx
    of rows; dw, db partials of a column block), each loading mean and rstd."""
    ptx = triton_aot.ptx_of(_compiled(family), case)
    c = case.constexprs
    scalars = [name for name in ("MEAN", "RSTD", "SEED") if name in case.signature]
    if c.get("ROW_PARTS") == 0 and (c["HAS_W"] or c["HAS_B"]):
        scalars += ["MEAN", "RSTD"]  # the dw, db programs' loads
    for kind in ("ld", "st"):
        accesses = triton_aot.global_accesses(ptx, kind)
        narrow = [line for line in accesses if line not in triton_aot.global_accesses(ptx, kind, sixteen_bytes=True)]
        assert len(accesses) > len(narrow), f"no 16-byte {kind}: {accesses}"
        assert len(narrow) <= len(scalars) and not any(".v" in line for line in narrow), narrow


@pytest.mark.parametrize("family, case", _norm_params(param_grads=True))
def test_norm_partials_read_16_bytes_at_a_time(family, case):
    """The sum of the backward's partial rows reads them 16 bytes per access; its
    stores, dweight and dbias (N values per launch, one column per thread after the
    sum over rows), may be narrower: one per output."""
    ptx = triton_aot.ptx_of(_compiled(family), case)
    loads = triton_aot.global_accesses(ptx, "ld")
    assert loads and loads == triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True), loads
    outputs = case.constexprs["HAS_W"] + case.constexprs["HAS_B"]
    assert len(triton_aot.global_accesses(ptx, "st")) == outputs


# ------------------------------------------------------------------ GroupNorm

# kernel step -> (tile loads, tile stores): x read in 3 passes and y written once by the
# one-kernel forward, x and dy read twice and dx written once by the one-kernel backward;
# split: x read twice (stats), x read and y written (apply), x and dy read (grad sums), x
# and dy read and dx written (dx)
GN_TILE_PASSES = {"fwd": (3, 1), "bwd": (4, 1), "stats": (2, 0), "apply": (1, 1), "grad_sums": (2, 0), "dx": (2, 1)}


def _gn_tile_vector_accesses(case):
    """(loads, stores): the 16-byte accesses of x, dy, y, dx a GroupNorm kernel has at
    least, or None where its tiles are not 16-byte aligned along their fast axis: S of a
    contiguous input ("group" family: stride_s the constexpr 1, S divisible by 16), C of a
    channels-last one ("chunk" family: a chunk's row a multiple of 16 bytes, the strides
    divisible by 16). Each tile is spread over the 32 * num_warps threads, and read or
    written GN_TILE_PASSES times."""
    c = case.constexprs
    if case.kernel == "_gn_param_grads_kernel":  # no tile of x: test_group_norm_param_grads_reads_partials
        return None
    itemsize = _itemsize(case, "X")
    if "GROUPS" in c:  # chunk
        lanes = c["BLOCK_C"]
        aligned = (c["GROUPS"] * c["D"] * itemsize) % 16 == 0 and {"stride_n", "stride_s"} <= set(case.div16)
    else:
        lanes = c["BLOCK_D"]
        aligned = c.get("stride_s") == 1 and "S" in case.div16
    per_thread = lanes * c["BLOCK_S"] * itemsize // (16 * 32 * case.num_warps)
    if not aligned or per_thread == 0:
        return None
    step = case.kernel.removeprefix("_gn_").removeprefix("chunk_").removesuffix("_kernel")
    loads, stores = GN_TILE_PASSES[step]
    if step == "stats" and c.get("TILES_PER_SPLIT") == 1:
        loads = 1  # a split of one tile: the second pass reuses the first's loads
    return loads * per_thread, stores * per_thread


@pytest.mark.parametrize("family, case", _params("group_norm"))
def test_group_norm_tiles_accessed_16_bytes_at_a_time(family, case):
    """x (and dy) are read, y (dx) written, 16 bytes per access where the tile's fast axis
    is aligned: counted, not "any" (the parameters' loads and the sums' stores may be 16
    bytes too)."""
    ptx = triton_aot.ptx_of(_compiled(family), case)
    expected = _gn_tile_vector_accesses(case)
    if expected is None:
        return
    loads, stores = expected
    found = len(triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True))
    assert found >= loads, f"{found} 16-byte loads, fewer than the {loads} of x (and dy) 16 bytes at a time"
    found = len(triton_aot.global_accesses(ptx, "st", sixteen_bytes=True))
    assert found >= stores, f"{found} 16-byte stores, fewer than the {stores} of the output 16 bytes at a time"


@pytest.mark.parametrize("shape", [name for name in kernel_launches.GN_SHAPES if name.startswith("sd-")])
def test_group_norm_channels_last_unet_shapes_take_aligned_chunks(shape):
    """Diffusion UNet GroupNorms (32 groups of 10, 20, 40 channels) channels-last: every
    kernel walks aligned chunks of whole groups, so the count above applies (it returns
    None for a layout that cannot take 16-byte accesses)."""
    cases = [case for case in _cases("group_norm") if case.id.startswith(f"group_norm-bf16-channels_last-{shape}:")]
    assert cases
    for case in cases:
        assert case.kernel.startswith("_gn_chunk_"), case
        assert _gn_tile_vector_accesses(case) is not None, case


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", ["sd-c320-64x64", "sd-c640-32x32", "sd-c1280-16x16", "d16-64x64", "d8-32x32"])
def test_group_norm_launches_fill_the_gpu(shape, layout):
    """Shapes with a few dozen groups or chunks per launch: S is split so that each launch
    has at least SPLIT_PROGRAMS_PER_SM programs per SM (the recorded grids, on an H100's
    132 SMs)."""
    from fastreg.triton_kernels.group_norm import SPLIT_PROGRAMS_PER_SM

    cases = [case for case in _cases("group_norm") if case.id.startswith(f"group_norm-bf16-{layout}-{shape}:")]
    assert cases
    for case in cases:
        assert case.programs >= SPLIT_PROGRAMS_PER_SM * triton_aot.H100_SMS, (case, case.grid)


# ------------------------------------------------------------------ BatchNorm


@pytest.mark.parametrize("family, case", _params("batch_norm"))
def test_batch_norm_accesses(family, case):
    """x (and dy) are read 16 bytes at a time along the layout's unit stride; the apply
    kernel writes its output so too."""
    ptx = triton_aot.ptx_of(_compiled(family), case)
    assert triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True), "no 16-byte loads of x"
    if case.kernel == "_bn_affine_kernel":
        stores = triton_aot.global_accesses(ptx, "st")
        assert stores == triton_aot.global_accesses(ptx, "st", sixteen_bytes=True), stores


@pytest.mark.parametrize("family, case", [param for param in _params("group_norm")
                                          if param.values[1].kernel == "_gn_param_grads_kernel"])
def test_group_norm_param_grads_reads_partials_16_bytes_at_a_time(family, case):
    """dweight / dbias from the per-sample channel sums: each partial tile (rows of C
    float32 values) is read 16 bytes per access where C is a multiple of 4; only the
    per-(sample, group) rstd gathered for dweight and the final stores are narrower."""
    ptx = triton_aot.ptx_of(_compiled(family), case)
    partials = case.constexprs["HAS_WEIGHT"] + case.constexprs["HAS_BIAS"]
    rows_per_thread = case.constexprs["GRAD_ROWS"] * case.constexprs["GRAD_BLOCK_C"] * 4 // (16 * 32 * case.num_warps)
    if "C" not in case.div16:
        return
    wide = triton_aot.global_accesses(ptx, "ld", sixteen_bytes=True)
    assert len(wide) >= partials * rows_per_thread, wide
