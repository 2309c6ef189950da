"""Launcher calls of triton_kernels/*.py on GPU-sized shapes, for tests that record the
launches (tests/triton_aot.py: `record_launches`) instead of running them: the
ahead-of-time compile tests (the argument types, constexprs and num_warps of every
kernel variant come from these calls) and the device-guard tests.

Each entry is `name -> call(device)`: it makes its tensors on `device` (fake CUDA
tensors when recorded: no memory, so the shapes are those of real models) and calls one
or more launchers. Names say launcher, dtype and what the variant is for.
"""

import torch

from fastreg.triton_kernels import batch_norm, dropout, group_norm, layer_norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _seed(device):
    return torch.empty((1,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------ dropout


def _dropout(shape, x, *, p=0.1, inner=1, bias=False, residual=False, offset=0):
    def call(device):
        t = torch.empty(shape, dtype=DTYPES[x], device=device)
        dropout.dropout(t, _seed(device), p, offset=offset, inner=inner,
                        bias=torch.empty(shape[-1], dtype=t.dtype, device=device) if bias else None,
                        residual=torch.empty_like(t) if residual else None)
    return call


DROPOUT = {
    **{f"dropout-{x}": _dropout((4096, 4096), x) for x in DTYPES},
    # p >= 0.5: the drop threshold round(p * 2^32) passes 2^31 (an int64 argument)
    "dropout-bf16-p0.5": _dropout((4096, 4096), "bf16", p=0.5),
    "dropout-fp32-int64_sizes": _dropout((65536, 32784), "fp32", offset=2**33),  # 2^31 + 2^20 elements
    "channel_dropout-fp32": _dropout((32, 64, 56 * 56), "fp32", inner=56 * 56),
    "channel_dropout-bf16-small_maps": _dropout((32, 512, 7 * 7), "bf16", inner=7 * 7),
    "drop_path-bf16": _dropout((64, 197, 768), "bf16", inner=197 * 768),
    "drop_path-bf16-int64_sizes": _dropout((8, 2**28 + 16), "bf16", inner=2**28 + 16),
    "dropout_add-fp32": _dropout((4096, 4096), "fp32", residual=True),
    "dropout_add-bias-bf16": _dropout((4096, 4096), "bf16", bias=True, residual=True),
    "dropout_add-bias-bf16-narrow": _dropout((65536, 768), "bf16", bias=True, residual=True),
    "dropout_add-bias-fp64": _dropout((1024, 1024), "fp64", bias=True, residual=True),
}


# ------------------------------------------------------------------ LayerNorm, RMSNorm


def _norm(n, x, *, rows=4096, is_rms=False, w=None, b=None, res=None, dropout=False, residual_in_fp32=False,
          store_h=True, backward=True, forward=True, dy=None):
    """norm_fwd and norm_bwd on (rows, n): weight w / bias b in the named dtype (None:
    absent), residual in `res`'s dtype, dropout with p = 0.1."""
    def call(device):
        t = torch.empty((rows, n), dtype=DTYPES[x], device=device)
        weight = torch.empty(n, dtype=DTYPES[w], device=device) if w else None
        bias = torch.empty(n, dtype=DTYPES[b], device=device) if b else None
        residual = torch.empty((rows, n), dtype=DTYPES[res], device=device) if res else None
        seed = _seed(device) if dropout else None
        p = 0.1 if dropout else 0.0
        y, h, mean, rstd = layer_norm.norm_fwd(t, weight, bias, 1e-5, is_rms, residual, seed, p, residual_in_fp32,
                                               store_h)
        if backward:
            norm_input = h if h.numel() else t
            grad = torch.empty((rows, n), dtype=DTYPES[dy], device=device) if dy else torch.empty_like(y)
            dh = torch.empty_like(norm_input) if res else None
            layer_norm.norm_bwd(grad, norm_input, weight, mean, rstd, is_rms, bias is not None, dh, seed, p)
    return call


NORM = {
    "layer_norm-fp32-n4096": _norm(4096, "fp32", w="fp32", b="fp32"),
    "layer_norm-bf16-n1024": _norm(1024, "bf16", rows=16384, w="bf16", b="bf16"),
    "layer_norm-bf16-n4096": _norm(4096, "bf16", w="bf16", b="bf16"),
    "layer_norm-bf16-n8192": _norm(8192, "bf16", w="bf16", b="bf16"),
    "layer_norm-bf16-n16384": _norm(16384, "bf16", w="bf16", b="bf16"),
    "layer_norm-fp32-n16384": _norm(16384, "fp32", w="fp32", b="fp32"),
    "layer_norm-bf16-n32768": _norm(32768, "bf16", rows=1024, w="bf16", b="bf16"),
    "layer_norm-fp64-n1024": _norm(1024, "fp64", w="fp64", b="fp64"),
    "layer_norm-fp16-n768-no_affine": _norm(768, "fp16"),
    "rms_norm-bf16-n4096-fp32_weight": _norm(4096, "bf16", is_rms=True, w="fp32"),
    "rms_norm-bf16-n16384": _norm(16384, "bf16", is_rms=True, w="bf16"),
    "prenorm-layer_norm-bf16-n4096": _norm(4096, "bf16", w="bf16", b="bf16", res="bf16", dropout=True),
    "prenorm-layer_norm-bf16-n16384": _norm(16384, "bf16", w="bf16", b="bf16", res="bf16", dropout=True),
    "prenorm-rms_norm-bf16-n16384-no_dropout": _norm(16384, "bf16", is_rms=True, w="bf16", res="bf16"),
    "dropout_norm-rms_norm-bf16-n16384": _norm(16384, "bf16", is_rms=True, w="bf16", dropout=True),
    "prenorm-rms_norm-fp16-n2048-residual_in_fp32": _norm(2048, "fp16", is_rms=True, w="fp16", res="fp16",
                                                         dropout=True, residual_in_fp32=True),
    "dropout_norm-rms_norm-bf16-n1024": _norm(1024, "bf16", is_rms=True, w="bf16", dropout=True),
    "add_norm-layer_norm-fp32-n1024-inference": _norm(1024, "fp32", w="fp32", b="fp32", res="fp32", store_h=False,
                                                      backward=False),
    "layer_norm-fp32-n65536": _norm(65536, "fp32", rows=256, w="fp32", b="fp32"),
    "prenorm-rms_norm-bf16-n65536-inference": _norm(65536, "bf16", rows=256, is_rms=True, w="bf16", res="bf16",
                                                    dropout=True, store_h=False, backward=False),
    "prenorm-layer_norm-fp64-n16384": _norm(16384, "fp64", rows=256, w="fp64", b="fp64", res="fp64"),
    "layer_norm-bf16-n65536-bias_only": _norm(65536, "bf16", rows=256, b="bf16"),
}


# ------------------------------------------------------------------ GroupNorm

# name -> (N, C, G, S): diffusion UNets (Stable Diffusion: 32 groups of 320, 640, 1280
# channels, D = 10, 20, 40), D = 8 and 16, InstanceNorm (D = 1), a small map
GN_SHAPES = {
    "sd-c320-64x64": (2, 320, 32, 64 * 64),
    "sd-c640-32x32": (2, 640, 32, 32 * 32),
    "sd-c1280-16x16": (2, 1280, 32, 16 * 16),
    "d16-64x64": (2, 512, 32, 64 * 64),
    "d16-8x8": (2, 512, 32, 8 * 8),
    "d8-32x32": (16, 256, 32, 32 * 32),
    "instance": (2, 64, 64, 64 * 64),
}


def _group_norm(shape, x, layout, *, silu=True, weight=True, bias=True, backward=True):
    def call(device):
        N, C, G, S = GN_SHAPES[shape]
        if layout == "channels_last":
            t = torch.empty((N, S, C), dtype=DTYPES[x], device=device).transpose(1, 2)
        else:
            t = torch.empty((N, C, S), dtype=DTYPES[x], device=device)
        w = torch.empty(C, dtype=DTYPES[x], device=device) if weight else None
        b = torch.empty(C, dtype=DTYPES[x], device=device) if bias else None
        y, mean, rstd = group_norm.gn_fwd(t, w, b, G, 1e-5, silu)
        if backward:
            group_norm.gn_bwd(torch.empty_like(y), t, w, b, mean, rstd, G, silu)
    return call


def _gn_variants():
    calls = {}
    for shape in GN_SHAPES:
        for layout in ("contiguous", "channels_last"):
            # fp16 compiles as bf16 does, fp64 as fp32 with wider values: two shapes each
            for x in ("fp32", "bf16") if shape not in ("sd-c320-64x64", "d16-8x8") else DTYPES:
                calls[f"group_norm-{x}-{layout}-{shape}"] = _group_norm(shape, x, layout)
    # the flags in fp32 on one shape per family
    for layout in ("contiguous", "channels_last"):
        for silu in (True, False):
            for weight, bias in ((True, False), (False, True), (False, False)):
                affine = {(True, False): "weight", (False, True): "bias", (False, False): "none"}[weight, bias]
                name = f"group_norm-fp32-{layout}-d16-64x64-{'silu' if silu else 'plain'}-{affine}"
                calls[name] = _group_norm("d16-64x64", "fp32", layout, silu=silu, weight=weight, bias=bias)
        calls[f"group_norm-fp32-{layout}-d16-64x64-plain-weight+bias"] = _group_norm("d16-64x64", "fp32", layout,
                                                                                     silu=False)
    return calls


GROUP_NORM = _gn_variants()


# ------------------------------------------------------------------ BatchNorm


def _batch_norm(shape, x, layout):
    def call(device):
        N, C, S = shape
        if layout == "channels_last":
            t = torch.empty((N, S, C), dtype=DTYPES[x], device=device).transpose(1, 2)
        else:
            t = torch.empty((N, C, S), dtype=DTYPES[x], device=device)
        acc = torch.float64 if x == "fp64" else torch.float32
        params = [torch.empty(C, dtype=acc, device=device) for _ in range(2)]
        mean, var = batch_norm.bn_stats(t)
        y = batch_norm.bn_apply(t, mean, var, *params, 1e-5)
        dy = torch.empty_like(y)
        sum_dy, sum_dy_xhat = batch_norm.bn_bwd_reduce(dy, t, mean, var, 1e-5)
        batch_norm.bn_bwd_apply(dy, t, mean, var, params[0], 1e-5, sum_dy, sum_dy_xhat, N * S)
    return call


def _batch_norm_fused(shape, x, layout, training=True):
    """bn_fwd (running statistics, float32 parameters) and bn_bwd with every gradient."""
    def call(device):
        N, C, S = shape
        if layout == "channels_last":
            t = torch.empty((N, S, C), dtype=DTYPES[x], device=device).transpose(1, 2)
        else:
            t = torch.empty((N, C, S), dtype=DTYPES[x], device=device)
        acc = torch.float64 if x == "fp64" else torch.float32
        weight, bias, running_mean, running_var = (torch.empty(C, dtype=acc, device=device) for _ in range(4))
        y, mean, invstd = batch_norm.bn_fwd(t, weight, bias, running_mean, running_var, training, 0.1, 1e-5)
        batch_norm.bn_bwd(torch.empty_like(y), t, weight, mean, invstd, training, [True, True, True])
    return call


BATCH_NORM = {
    **{f"batch_norm-{x}-{layout}": _batch_norm((32, 64, 56 * 56), x, layout)
       for x in DTYPES for layout in ("contiguous", "channels_last")},
    **{f"batch_norm_fused-{x}-{layout}": _batch_norm_fused((32, 64, 56 * 56), x, layout)
       for x in DTYPES for layout in ("contiguous", "channels_last")},
    **{f"batch_norm_fused-eval-{x}": _batch_norm_fused((32, 64, 56 * 56), x, "channels_last", training=False)
       for x in ("fp32", "bf16")},
}

CALLS = {**DROPOUT, **NORM, **GROUP_NORM, **BATCH_NORM}
