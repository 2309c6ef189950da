"""fastreg's ops with the signatures of torch.nn.functional.

Each call checks its arguments as torch does, asks fastreg._backend for the backend and
runs the op there; autograd is registered on the ops themselves, in C++ (csrc/autograd/;
docs/architecture.md).
Arguments fastreg's kernels do not take (integer or complex tensors, tensors on different
devices, shapes or options torch rejects) go to torch's own function instead, which
raises torch's error in torch's words and in torch's order of checks on every torch
version (or returns torch's result, where torch takes them).
"""

import math
import operator
import struct
import warnings

import torch
import torch.nn.functional as torch_F

from fastreg import _reference, _rng
from fastreg._backend import choose_backend
from fastreg.ops.batch_norm import BN_FWD
from fastreg.ops.cross_entropy import CROSS_ENTROPY_FWD, LINEAR_CROSS_ENTROPY_FWD
from fastreg.ops.drop_block import DROP_BLOCK, DROP_BLOCK_
from fastreg.ops.dropout import DROPOUT, DROPOUT_
from fastreg.ops.group_norm import GN_FWD
from fastreg.ops.noise import ALPHA_DROPOUT, ALPHA_DROPOUT_, GAUSSIAN_NOISE
from fastreg.ops.norm import NORM_FWD, norm_fwd_y

__all__ = [
    "dropout", "dropout1d", "dropout2d", "dropout3d", "drop_path", "dropout_add",
    "layer_norm", "rms_norm", "dropout_add_layer_norm", "dropout_add_rms_norm", "batch_norm",
    "group_norm", "instance_norm", "cross_entropy", "linear_cross_entropy",
    "gaussian_dropout", "gaussian_noise", "alpha_dropout", "feature_alpha_dropout", "drop_block2d", "drop_block3d",
]


def _check_probability(p: float, what: str = "dropout probability") -> None:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")


def _torch_decides(first: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether fastreg's kernels do not take these tensors (None: an absent optional one):
    one is not floating point, or they are not all on one device. The caller then returns
    what torch's function does with the same arguments."""
    if not first.is_floating_point():
        return True
    # loops, not any(<generator>), and no torch.device objects for CPU and CUDA tensors:
    # this runs on every call, and a small layer's call is mostly host time
    if first.is_cpu:
        for t in others:
            if t is not None and not (t.is_cpu and t.is_floating_point()):
                return True
        return False
    if first.is_cuda:
        index = first.get_device()
        for t in others:
            if t is not None and not (t.is_cuda and t.get_device() == index and t.is_floating_point()):
                return True
        return False
    device = first.device
    for t in others:
        if t is not None and (not t.is_floating_point() or t.device != device):
            return True
    return False


def _backend_for(t: torch.Tensor) -> str:
    """The backend for t's device (fastreg._backend decides), without building a torch.device."""
    return choose_backend("cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type)


def _check_floating(name: str, tensor: torch.Tensor, op: str) -> None:
    """For fastreg's own functions (no torch function to defer to): floating-point inputs only."""
    if not tensor.is_floating_point():
        raise RuntimeError(f"fastreg.{op}: expected a floating-point '{name}', got {tensor.dtype}")


def _masked(x: torch.Tensor, p: float, inplace: bool, inner: int, op: str) -> torch.Tensor:
    """x * keep / (1 - p) with one draw per `inner` consecutive elements (mask-free)."""
    backend = _backend_for(x)
    seed = _rng.new_seed(x.device)
    if not inplace:
        return DROPOUT[backend](x, seed, p, 0, inner)
    if backend != "torch" and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad):
        DROPOUT_[backend](x, seed, p, 0, inner)
        return x
    # Autograd records the in-place copy (and raises as torch does for a leaf).
    return x.copy_(DROPOUT[backend](x, seed, p, 0, inner))


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout, mask-free: backward regenerates the mask from a seed."""
    _check_probability(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if _torch_decides(input):
        return torch_F.dropout(input, p, training, inplace)
    return _masked(input, p, inplace, inner=1, op="dropout")


def _feature_dropout(x: torch.Tensor, p: float, training: bool, inplace: bool, op: str) -> torch.Tensor:
    """One draw per (sample, channel) of x shaped (N, C, *): torch's feature_dropout."""
    if x.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if _torch_decides(x):
        return torch.feature_dropout_(x, p, training) if inplace else torch.feature_dropout(x, p, training)
    return _masked(x, p, inplace, inner=x[0, 0].numel(), op=op)


def _warn_feature_rank(name: str, rank: int, spatial: int) -> None:
    # torch's deprecation warnings for the ranks it still accepts
    if rank not in (spatial + 1, spatial + 2):
        warnings.warn(
            f"{name}: Received a {rank}-D input to {name}, which is deprecated and will result "
            "in an error in a future release. To retain the behavior and silence this warning, "
            f"please use dropout instead. Note that {name} exists to provide channel-wise dropout "
            f"on inputs with {spatial} spatial dimensions, a channel dimension, and an optional "
            f"batch dimension (i.e. {spatial + 1}D or {spatial + 2}D inputs).",
            stacklevel=3,
        )
    if spatial == 2 and rank == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout "
            "behavior is desired - input is interpreted as shape (N, C, L), where C is the channel "
            "dim. This behavior will change in a future release to interpret the input as one "
            "without a batch dimension, i.e. shape (C, H, W). To maintain the 1D channel-wise "
            "dropout behavior, please switch to using dropout1d instead.",
            stacklevel=3,
        )


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout1d: zero whole channels of (N, C, L) or (C, L) inputs."""
    _check_probability(p)
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    batched = input if input.dim() == 3 else input.unsqueeze(0)
    out = _feature_dropout(batched, p, training, inplace, "dropout1d")
    return out if input.dim() == 3 else out.squeeze(0)


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout2d: zero whole channels of (N, C, H, W) inputs.

    As in torch, a 3-D input is taken as (N, C, L), and other ranks use their first
    two dims as (N, C); both warn as torch does.
    """
    _check_probability(p)
    _warn_feature_rank("dropout2d", input.dim(), spatial=2)
    return _feature_dropout(input, p, training, inplace, "dropout2d")


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout3d: zero whole channels of (N, C, D, H, W) or (C, D, H, W)."""
    _check_probability(p)
    _warn_feature_rank("dropout3d", input.dim(), spatial=3)
    batched = input if input.dim() == 5 else input.unsqueeze(0)  # as torch: all but 5-D are unbatched
    out = _feature_dropout(batched, p, training, inplace, "dropout3d")
    return out if input.dim() == 5 else out.squeeze(0)


def drop_path(input: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Stochastic depth: zero whole samples (dim 0) with probability p, scale the rest by 1/(1-p)."""
    _check_probability(p, "drop probability")
    if input.dim() == 0:
        raise RuntimeError("fastreg.drop_path: 'input' needs a batch dimension (dim 0), got a 0-dim tensor")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if _torch_decides(input):  # fails as dropout does
        return torch_F.dropout(input, p, training)
    return _masked(input, p, inplace=False, inner=input[0].numel(), op="drop_path")


def dropout_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    p: float,
    training: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + dropout(x + bias, p) in one pass (bias: 1-D of size x.shape[-1])."""
    _check_probability(p)
    if _torch_decides(x, residual, bias):  # fails as the composition does
        return residual + torch_F.dropout(x if bias is None else x + bias, p, training)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise RuntimeError(
            f"fastreg.dropout_add: 'residual' must match x in shape, dtype and device; got "
            f"{tuple(residual.shape)} {residual.dtype} {residual.device} for x "
            f"{tuple(x.shape)} {x.dtype} {x.device}"
        )
    if bias is not None and (
        bias.dim() != 1 or x.dim() == 0 or bias.shape[0] != x.shape[-1]
        or bias.dtype != x.dtype or bias.device != x.device
    ):
        raise RuntimeError(
            f"fastreg.dropout_add: 'bias' must be 1-D of size x.shape[-1] with x's dtype and device; "
            f"got {tuple(bias.shape)} {bias.dtype} {bias.device} for x {tuple(x.shape)} {x.dtype}"
        )
    if x.numel() == 0:  # nothing to draw; bias still in the graph (a zero gradient, as torch's)
        return residual + (x if bias is None else x + bias)
    backend = _backend_for(x)
    if training:
        seed = _rng.new_seed(x.device)
    else:  # the same fused pass with nothing dropped; eval leaves the RNG untouched
        p, seed = 0.0, torch.zeros((), dtype=torch.int64, device=x.device)
    return DROPOUT[backend](x, seed, p, 0, 1, bias, residual)


# ------------------------------------------------------------------ LayerNorm / RMSNorm


def _norm_shape(x, normalized_shape, weight, bias):
    """normalized_shape as a tuple where fastreg's kernels take these arguments (torch's
    checks of layer_norm / rms_norm pass), else None: torch's function then decides."""
    if type(normalized_shape) is int:
        shape = (normalized_shape,)
    elif type(normalized_shape) is tuple and len(normalized_shape) == 1 and type(normalized_shape[0]) is int:
        shape = normalized_shape  # the common case, without the conversion below
    else:
        try:
            shape = (operator.index(normalized_shape),) if not hasattr(normalized_shape, "__iter__") else \
                tuple(map(operator.index, normalized_shape))
        except TypeError:
            return None
        if not shape:
            return None
    x_shape = x.shape
    if len(shape) == 1:  # the common case, without slicing torch.Size
        if not x_shape or x_shape[-1] != shape[0]:
            return None
    elif len(x_shape) < len(shape) or x_shape[len(x_shape) - len(shape):] != shape:
        return None
    if weight is not None and weight.shape != shape or bias is not None and bias.shape != shape:
        return None
    return None if _torch_decides(x, weight, bias) else shape


def _norm(x, shape, weight, bias, eps, is_rms, residual=None, p=0.0, training=False,
          prenorm=False, residual_in_fp32=False):
    """The norm over the trailing `shape` of x (of h = residual + dropout(x) when fused)."""
    n = shape[0] if len(shape) == 1 else math.prod(shape)
    # as rows (no reshape of a 2-D x: in eager mode each view is one more autograd node);
    # contiguous() returns a contiguous tensor itself
    as_rows = x.dim() != 2 or len(shape) != 1
    if as_rows:
        m = math.prod(x.shape[:x.dim() - len(shape)])  # not -1: n may be 0
        rows = x.reshape(m, n).contiguous()
        residual = residual.reshape(m, n).contiguous() if residual is not None else None
    else:
        rows = x.contiguous()
        residual = residual.contiguous() if residual is not None else None
    if len(shape) > 1:
        weight = weight.reshape(-1) if weight is not None else None
        bias = bias.reshape(-1) if bias is not None else None
    backend = _backend_for(x)
    seed = _rng.new_seed(x.device) if training and p > 0.0 else None
    if residual is None and seed is None:  # the plain norm: the op's fused arguments keep their defaults
        y = norm_fwd_y(backend, rows, weight, bias, float(eps), is_rms)
        if as_rows:
            y = y.view_as(x)
        return (y, x) if prenorm else y  # without residual or dropout, h is x
    # h is written only when it is returned or backward will need it
    store_h = prenorm or torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
        or residual is not None and residual.requires_grad)
    y, h, _, _ = NORM_FWD[backend](rows, weight, bias, float(eps), is_rms, residual, seed,
                                   p if seed is not None else 0.0, residual_in_fp32, store_h)
    if as_rows:
        y = y.view_as(x)
    if not prenorm:
        return y
    return y, h.view_as(x) if as_rows else h


def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.layer_norm; statistics in float32, deterministic backward."""
    shape = _norm_shape(input, normalized_shape, weight, bias)
    if shape is None:
        return torch_F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _norm(input, shape, weight, bias, eps, is_rms=False)


def rms_norm(input, normalized_shape, weight=None, eps: float | None = None) -> torch.Tensor:
    """torch.nn.functional.rms_norm (eps=None: the machine epsilon of input's dtype)."""
    shape = _norm_shape(input, normalized_shape, weight, None)
    if shape is None:
        return torch_F.rms_norm(input, normalized_shape, weight, eps)
    return _norm(input, shape, weight, None, torch.finfo(input.dtype).eps if eps is None else eps, is_rms=True)


def _fused_norm_shape(x, residual, weight, bias, p, op):
    """The normalized shape (x's last dim) where fastreg's kernels take these arguments,
    else None: the composition of torch's ops (_composed_norm) then decides."""
    _check_probability(p)
    if _torch_decides(x, residual, weight, bias) or x.dim() == 0:
        return None
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise RuntimeError(
            f"fastreg.{op}: 'residual' must match x in shape, dtype and device; got "
            f"{tuple(residual.shape)} {residual.dtype} for x {tuple(x.shape)} {x.dtype}"
        )
    return _norm_shape(x, x.shape[-1:], weight, bias)


def _composed_norm(x, residual, weight, bias, p, eps, training, prenorm, is_rms):
    """The fused block in torch's ops: norm(residual + dropout(x)), and h when prenorm."""
    h = torch_F.dropout(x, p, training)
    if residual is not None:
        h = residual + h
    if is_rms:
        y = torch_F.rms_norm(h, x.shape[-1:], weight, eps)
    else:
        y = torch_F.layer_norm(h, x.shape[-1:], weight, bias, eps)
    return (y, h) if prenorm else y


def dropout_add_layer_norm(x, residual, weight, bias, p, eps=1e-5, training=True, prenorm=False,
                           residual_in_fp32=False):
    """layer_norm(residual + dropout(x, p)) over the last dim, in one pass (mask-free).

    Returns the normalized output, or (output, h) with h = residual + dropout(x) when
    prenorm (h in float32 if residual_in_fp32). residual may be None. The mask is that
    of fastreg.functional.dropout_add for the same seed.
    """
    shape = _fused_norm_shape(x, residual, weight, bias, p, "dropout_add_layer_norm")
    if shape is None:
        return _composed_norm(x, residual, weight, bias, p, eps, training, prenorm, is_rms=False)
    return _norm(x, shape, weight, bias, eps, False, residual, p, training, prenorm, residual_in_fp32)


def dropout_add_rms_norm(x, residual, weight, p, eps=None, training=True, prenorm=False, residual_in_fp32=False):
    """rms_norm(residual + dropout(x, p)) over the last dim; see dropout_add_layer_norm."""
    shape = _fused_norm_shape(x, residual, weight, None, p, "dropout_add_rms_norm")
    if shape is None:
        return _composed_norm(x, residual, weight, None, p, eps, training, prenorm, is_rms=True)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _norm(x, shape, weight, None, eps, True, residual, p, training, prenorm, residual_in_fp32)


# The torch backend's bit-exact mask, for tests and debugging.
keep_mask = _reference.keep_mask


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.batch_norm: (N, C, *) in its own memory format, statistics in
    float32, running statistics updated in place when training, deterministic backward.
    One bn_fwd call (csrc/ops.cpp): statistics, running statistics and y."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_takes_eval_eps_zero() -> bool:
    """Whether the installed torch's batch_norm takes eps=0 in eval mode (2.11 asks eps > 0
    in both modes; later torches only in training)."""
    try:
        torch_F.batch_norm(torch.ones(1, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except ValueError:
        return False
    return True


_EVAL_EPS_ZERO_OK = _torch_takes_eval_eps_zero()


def _batch_norm_runs(input, running_mean, running_var, weight, bias, training, eps) -> bool:
    """Whether fastreg's kernels take these arguments (torch's checks pass, the batch is not
    empty): in one pass, as this runs on every BatchNorm call."""
    if (not input.is_floating_point() or input.dim() < 2 or eps < 0.0
            or (eps == 0.0 and (training or not _EVAL_EPS_ZERO_OK))
            or (running_mean is None) != (running_var is None) or (not training and running_mean is None)
            or input.numel() == 0):
        return False
    device, channels = input.device, input.shape[1]
    for t in (running_mean, running_var, weight, bias):
        if t is not None and (t.device != device or t.numel() != channels or not t.is_floating_point()):
            return False
    return True


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, batches_tracked=None):
    """batch_norm; with batches_tracked (a module's num_batches_tracked, momentum=None) the
    running statistics take the cumulative average, 1 / batches_tracked read on the device."""
    if not _batch_norm_runs(input, running_mean, running_var, weight, bias, training, eps):
        # torch's errors; an empty batch: torch's result (running statistics left as they are)
        if batches_tracked is not None:
            momentum = 1.0 / float(batches_tracked)
        return torch_F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training and input.numel() == input.shape[1]:  # one value per channel: torch's error
        torch_F._verify_batch_size(input.size())
    return BN_FWD[_backend_for(input)](input, weight, bias, running_mean, running_var, training, momentum,
                                       eps, batches_tracked)[0]


# ------------------------------------------------------------ GroupNorm / InstanceNorm

_ACTIVATIONS = (None, "silu")


def _group_norm_runs(x, num_groups, weight, bias):
    """Whether fastreg's kernels take these group_norm arguments (torch's checks pass)."""
    if _torch_decides(x, weight, bias) or x.dim() < 2 or num_groups <= 0 or x.shape[1] % num_groups != 0:
        return False
    return all(param is None or (param.dim() == 1 and param.numel() == x.shape[1]) for param in (weight, bias))


def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
               activation: str | None = None) -> torch.Tensor:
    """torch.nn.functional.group_norm, optionally followed by SiLU in the same pass
    (activation="silu"): (N, C, *) in its own memory format, statistics in float32,
    deterministic backward that recomputes the activation instead of storing it."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"fastreg.group_norm: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if not _group_norm_runs(input, num_groups, weight, bias):
        y = torch_F.group_norm(input, num_groups, weight, bias, eps)  # torch's error
        return torch_F.silu(y) if activation == "silu" else y
    if input.numel() == num_groups:  # one value per group: torch's error (no variance)
        torch_F._verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    return GN_FWD[_backend_for(input)](input, weight, bias, num_groups, eps, activation == "silu")[0]


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.instance_norm: GroupNorm with one group per channel (the same
    kernels) when use_input_stats, updating the running statistics as torch does (the
    batch's per-sample mean and unbiased variance, averaged over the samples); else the
    per-channel affine map of the running statistics (BatchNorm's eval kernel)."""
    if (_torch_decides(input, running_mean, running_var, weight, bias) or input.dim() < 2 or eps < 0.0
            or (not use_input_stats and (running_mean is None or running_var is None))
            or any(t is not None and t.numel() != input.shape[1] for t in (running_mean, running_var, weight, bias))):
        return torch_F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    torch_F._verify_spatial_size(input.size())
    channels = input.shape[1]
    y, mean, rstd = GN_FWD[_backend_for(input)](input, weight, bias, channels, eps, False)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():  # torch's update: per-sample statistics averaged over the batch
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.mean(0).to(running_mean.dtype) * momentum)
            if running_var is not None:
                count = math.prod(input.shape[2:])
                biased = rstd.double().pow(-2) - eps  # the variance behind rstd = 1 / sqrt(var + eps)
                unbiased = (biased * (count / max(count - 1, 1))).mean(0)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)
    return y


# ------------------------------------------------------------------ Gaussian noise, alpha dropout


def gaussian_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Multiplicative Gaussian noise of mean 1 and variance p / (1 - p) (Srivastava et al.'s
    Gaussian dropout): input * (1 + sqrt(p / (1 - p)) * n), n ~ N(0, 1) per element.

    Mask-free: backward regenerates n from a seed drawn from torch's RNG. The identity in
    eval mode and for p = 0; p = 1 (infinite variance) raises ValueError.
    """
    _check_probability(p)
    if p == 1.0:
        raise ValueError("gaussian_dropout: p = 1 gives noise of infinite variance; p must be in [0, 1)")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    _check_floating("input", input, "gaussian_dropout")
    backend = _backend_for(input)
    return GAUSSIAN_NOISE[backend](input, _rng.new_seed(input.device), math.sqrt(p / (1.0 - p)), True, 0)


def gaussian_noise(input: torch.Tensor, std: float, training: bool = True) -> torch.Tensor:
    """Additive Gaussian noise: input + std * n, n ~ N(0, 1) per element, in training; the
    identity in eval mode and for std = 0. Backward passes the gradient through unchanged."""
    if std < 0.0:
        raise ValueError(f"gaussian_noise: std must be non-negative, but got {std}")
    if not training or std == 0.0 or input.numel() == 0:
        return input
    _check_floating("input", input, "gaussian_noise")
    backend = _backend_for(input)
    return GAUSSIAN_NOISE[backend](input, _rng.new_seed(input.device), float(std), False, 0)


_SELU_ALPHA_SCALE = 1.7580993408473766  # SELU's scale * alpha: the value a dropped unit takes


def _round_to(value: float, dtype: torch.dtype) -> float:
    """value rounded to nearest (ties to even) in float32, float16 or bfloat16, with plain
    Python (no tensor: torch.compile traces it as constants)."""
    as_float32 = struct.unpack("<f", struct.pack("<f", value))[0]  # torch converts through float32 too
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", as_float32))[0]
    if dtype != torch.bfloat16:
        return as_float32
    bits = struct.unpack("<I", struct.pack("<f", as_float32))[0]  # float32 -> bfloat16: the top 16 bits, rounded
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _alpha_dropout_constants(p: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """(scale, keep_shift, drop_shift) of torch's alpha dropout, as torch forms them in the
    input's dtype: noise = keep * a and b = (keep - 1) * alpha * a + alpha * a * p, each
    step computed in float32 (float64 for float64) and rounded to the dtype."""
    if p == 1.0:  # torch returns input * 0
        return 0.0, 0.0, 0.0
    alpha = _SELU_ALPHA_SCALE
    a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
    alpha_a, alpha_a_p = alpha * a, alpha * a * p
    if dtype == torch.float64:
        return a, alpha_a_p, -alpha_a + alpha_a_p

    def to_float(v):
        return _round_to(v, torch.float32)

    def to_dtype(v):
        return _round_to(to_float(v), dtype)

    # (keep - 1) * alpha_a rounds to the dtype before + alpha_a_p (torch's two in-place ops)
    drop_shift = to_dtype(to_dtype(-to_float(alpha_a)) + to_float(alpha_a_p))
    return to_dtype(a), to_dtype(alpha_a_p), drop_shift


def _alpha_dropout(x: torch.Tensor, p: float, training: bool, inplace: bool, feature: bool, op: str):
    _check_probability(p)
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if feature and x.dim() < 2 and p < 1.0:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    _check_floating("input", x, op)
    inner = x[0, 0].numel() if feature and p < 1.0 else 1  # one draw per (sample, channel)
    scale, keep_shift, drop_shift = _alpha_dropout_constants(p, x.dtype)
    backend = _backend_for(x)
    seed = _rng.new_seed(x.device)
    args = (seed, p, scale, keep_shift, drop_shift, 0, inner)
    if not inplace:
        return ALPHA_DROPOUT[backend](x, *args)
    if backend != "torch" and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad):
        ALPHA_DROPOUT_[backend](x, *args)
        return x
    return x.copy_(ALPHA_DROPOUT[backend](x, *args))  # autograd records the in-place copy


def alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.alpha_dropout (for SELU networks), mask-free: dropped elements take
    SELU's negative saturation value, then the affine map a * x + b of torch's keeps mean
    and variance."""
    return _alpha_dropout(input, p, training, inplace, feature=False, op="alpha_dropout")


def feature_alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False,
                          inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.feature_alpha_dropout: alpha dropout of whole channels of
    (N, C, *) inputs, mask-free."""
    return _alpha_dropout(input, p, training, inplace, feature=True, op="feature_alpha_dropout")


# ------------------------------------------------------------------------------ DropBlock


def _drop_block(x: torch.Tensor, p: float, block_size: int, inplace: bool, eps: float, training: bool,
                shared_mask: bool, dims: int) -> torch.Tensor:
    """torchvision's drop_block2d / drop_block3d: its checks, messages, gamma and placement."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}.")
    if x.ndim != dims + 2:
        raise ValueError(f"input should be {dims + 2} dimensional. Got {x.ndim} dimensions.")
    if not training or p == 0.0:
        return x
    spatial = x.shape[2:]
    block_size = min(block_size, *spatial)
    if block_size % 2 == 0:
        raise ValueError(f"block size should be odd. Got {block_size} which is even.")
    if block_size < 0:  # where torchvision's F.pad stops
        raise RuntimeError(f"pad must be non-negative, but got pad: {block_size // 2}")
    # torchvision's gamma, the same float operations in the same order
    if dims == 2:
        H, W = spatial
        gamma = (p * H * W) / ((block_size**2) * ((H - block_size + 1) * (W - block_size + 1)))
    else:
        D, H, W = spatial
        gamma = (p * D * H * W) / ((block_size**3) * ((D - block_size + 1) * (H - block_size + 1) * (W - block_size + 1)))
    if gamma > 1.0:
        raise RuntimeError(f"bernoulli_ expects p to be in [0, 1], but got p={gamma:g}")
    if x.numel() == 0:
        return x if inplace else x.clone()
    _check_floating("input", x, f"drop_block{dims}d")
    backend = _backend_for(x)
    args = (_rng.new_seed(x.device), gamma, block_size, eps, shared_mask)
    if not inplace:
        return DROP_BLOCK[backend](x, *args)[0]
    dense = x.is_contiguous() or _reference.drop_block_channels_last(x)
    if backend != "torch" and dense and not (torch.is_grad_enabled() and x.requires_grad):
        DROP_BLOCK_[backend](x, *args)
        return x
    return x.copy_(DROP_BLOCK[backend](x, *args)[0])  # autograd records the in-place copy


def drop_block2d(input: torch.Tensor, p: float, block_size: int, inplace: bool = False, eps: float = 1e-06,
                 training: bool = True, *, shared_mask: bool = False) -> torch.Tensor:
    """torchvision.ops.drop_block2d (DropBlock, Ghiasi et al. 2018) on (N, C, H, W) inputs.

    Seeds of probability gamma = p H W / (block_size^2 (H - block_size + 1)(W - block_size + 1))
    each zero a block_size x block_size block inside the plane, a mask per (sample, channel);
    the output is scaled by numel / (eps + number kept) over the whole tensor. Channels-last
    inputs stay channels-last. shared_mask=True: one mask per sample for all its channels
    (timm's couple_channels). Backward multiplies by the stored bit-packed mask (1 bit per
    element).
    """
    return _drop_block(input, p, block_size, inplace, eps, training, shared_mask, dims=2)


def drop_block3d(input: torch.Tensor, p: float, block_size: int, inplace: bool = False, eps: float = 1e-06,
                 training: bool = True, *, shared_mask: bool = False) -> torch.Tensor:
    """torchvision.ops.drop_block3d on (N, C, D, H, W) inputs: drop_block2d with cubes."""
    return _drop_block(input, p, block_size, inplace, eps, training, shared_mask, dims=3)


# ------------------------------------------------------------------------ cross-entropy

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # torch's at::Reduction
_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _class_index_call_ok(input, target, weight, reduction, label_smoothing, classes, batch_shape) -> bool:
    """Whether a call with class-index targets passes every check torch makes before it reads
    the targets' values: then fastreg's kernels run it; else torch does (and raises its error)."""
    return (
        input.dtype in _LOGIT_DTYPES
        and target.dtype in (torch.int64, torch.uint8)
        and target.device == input.device
        and tuple(target.shape) == batch_shape
        and (weight is None or (weight.dim() == 1 and weight.shape[0] == classes and weight.dtype == input.dtype
                                and weight.device == input.device))
        and reduction in _REDUCTION_CODES
        and label_smoothing <= 1.0
    )


def _z_loss_term(logits, class_dim, z_loss, reduction):
    """z_loss * logsumexp^2 over the class dim, reduced (mean over the positions): the z-loss
    of probability targets, which run on torch's cross_entropy."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = z_loss * torch.logsumexp(logits.to(acc), dim=class_dim).square()
    if reduction == "mean":
        z = z.mean()
    elif reduction == "sum":
        z = z.sum()
    return z.to(logits.dtype)


def _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    """torch's cross_entropy (probability targets, and calls torch rejects: its error) plus the z-loss."""
    loss = torch_F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing)
    z_term = _z_loss_term(input, 0 if input.dim() == 1 else 1, z_loss, reduction) if z_loss else loss.new_zeros(())
    return (loss + z_term if z_loss else loss), z_term.detach()


def _class_view(input, target):
    """The logits as an (N, C, S) view with the classes on dim 1 and the targets as (N, S)
    int64. The positions (N, d1, ...) -> S are a view where they merge (contiguous and
    channels-last inputs); transposed (N, C) logits (C-major) become (1, C, N), read as
    positions. Otherwise the kernel copies the logits to contiguous (one more pass)."""
    target = target if target.dtype == torch.int64 else target.long()
    if input.dim() == 1:
        return input.unsqueeze(0).unsqueeze(2), target.reshape(1, 1)
    if input.dim() == 2:
        if input.stride(1) != 1 and input.stride(0) == 1 and input.shape[0] > 1:
            return input.t().unsqueeze(0), target.unsqueeze(0)
        return input.unsqueeze(2), target.unsqueeze(1)
    return input.flatten(2), target.reshape(input.shape[0], -1)


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    """(loss, z_term) of fastreg.functional.cross_entropy."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)) or input.dim() == 0 \
            or input.shape == target.shape:  # probability targets (torch's test): torch runs them
        return _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss)
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if not _class_index_call_ok(input, target, weight, reduction, label_smoothing, classes, batch_shape):
        return _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss)
    logits, targets = _class_view(input, target)
    backend = _backend_for(input)
    # torch ignores a negative label_smoothing
    loss, z_term, _ = CROSS_ENTROPY_FWD[backend](logits, targets, weight, int(ignore_index),
                                                 float(max(label_smoothing, 0.0)), float(z_loss),
                                                 _REDUCTION_CODES[reduction], False)
    if reduction == "none":
        return loss.view(batch_shape), z_term.view(batch_shape)
    return loss, z_term


def _check_z_loss(z_loss):
    if z_loss < 0:
        raise ValueError(f"z_loss must be non-negative, got {z_loss}")


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy (same arguments, same errors) with the gradient of the
    logits computed in the forward's pass over them, plus PaLM's z-loss: z_loss * logsumexp^2
    per counted position, added to the loss (a mean takes it over the counted positions).

    Class-index targets run on fastreg's kernels: inputs (C,), (N, C), (N, C, d1, ...),
    float16 / bfloat16 / float32 logits with float32 math (float64 in float64), class weights,
    ignore_index, label smoothing as torch defines it. Probability targets (float targets of
    the input's shape) run on torch's own cross_entropy, the z-loss added by torch ops.
    The gradient is saved instead of the logits; backward scales it by the incoming gradient
    (in place), so a second backward through the same graph raises.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn.functional._Reduction.legacy_get_string(size_average, reduce)
    _check_z_loss(z_loss)
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss)[0]


def _linear_checks(input, linear_weight, linear_bias):
    """torch's checks of linear_cross_entropy's shapes, with its messages."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    expected_bias = tuple(linear_weight.shape[:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != expected_bias:
        raise RuntimeError(f"expected linear_bias shape {expected_bias}, got {tuple(linear_bias.shape)}")
    if linear_weight.dim() > 2 and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {input.shape[-1]}), got unbatched input with shape {tuple(input.shape)}"
        )


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: bool = False, options=None):
    """torch.nn.functional.linear_cross_entropy (torch 2.13+; same arguments, defaults and
    errors; `options` is accepted and ignored): cross_entropy(F.linear(input, linear_weight,
    linear_bias), target, ...) without ever holding the (tokens, classes) logits or their
    gradient. Chunks of tokens run through the backend's matmul and cross-entropy row pass;
    the input, weight and bias gradients are made in the forward (the weight's accumulated in
    float32) and scaled in backward; reduction "none" recomputes them in backward instead.

    ignore_index=None means -100 for class-index targets (torch's mapping). z_loss as in
    cross_entropy; return_z_loss=True returns (loss, z_loss term) (the term for logging: its
    gradient is part of the loss's). K-dimensional weights (C, d1, ..., in_features) and
    probability targets take the unfused path: F.linear, then fastreg's cross_entropy.
    """
    _check_z_loss(z_loss)
    _linear_checks(input, linear_weight, linear_bias)
    classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    logits_shape = (*input.shape[:-1], classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    fused = (
        not out_features and not probabilities
        and linear_weight.dtype == input.dtype and linear_weight.device == input.device
        and (linear_bias is None or (linear_bias.dtype == input.dtype and linear_bias.device == input.device))
        and _class_index_call_ok(input, target, weight, reduction, label_smoothing, classes, tuple(input.shape[:-1]))
    )
    if not fused:  # what torch's reference path computes (and raises)
        flat_bias = linear_bias.reshape(-1) if linear_bias is not None else None
        logits = torch_F.linear(input, linear_weight.reshape(-1, input.shape[-1]), flat_bias).reshape(logits_shape)
        loss, z_term = _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss)
    else:
        tokens = input if input.dim() == 2 else input.unsqueeze(0)
        targets = (target if target.dtype == torch.int64 else target.long()).reshape(-1)
        backend = _backend_for(input)
        loss, z_term, _, _, _ = LINEAR_CROSS_ENTROPY_FWD[backend](
            tokens, linear_weight, linear_bias, targets, weight, int(ignore_index), float(max(label_smoothing, 0.0)),
            float(z_loss), _REDUCTION_CODES[reduction], None, False, False, False)
        if reduction == "none" and input.dim() == 1:
            loss, z_term = loss.squeeze(0), z_term.squeeze(0)
    return (loss, z_term) if return_z_loss else loss
