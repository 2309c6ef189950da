"""The "torch" backend: fastreg's ops written with plain PyTorch tensor ops.

It draws the same Philox stream as the kernels (csrc/include/fastreg/philox.h), so it
is both the fallback where no compiled backend runs and the bit-exact reference the
tests hold the kernels to. It is differentiable through ordinary autograd (and saves
the mask, unlike the kernels). Integers are int64 tensors holding 32-bit words;
products are split into 16-bit halves so no step overflows int64.
"""

import torch

from fastreg._rng import drop_threshold, keep_scale

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mul_hilo(a: torch.Tensor, m: int):
    """(high, low) 32-bit words of a * m for 32-bit a and constant m, without overflow."""
    low_part = (a & 0xFFFF) * m  # < 2**48
    high_part = (a >> 16) * m  # < 2**48
    middle = (high_part & 0xFFFF) + (low_part >> 16)
    hi = (high_part >> 16) + (middle >> 16)
    lo = ((middle & 0xFFFF) << 16) | (low_part & 0xFFFF)
    return hi, lo


def philox4x32_10(counter: torch.Tensor, seed: torch.Tensor):
    """Four 32-bit words (int64 tensors) of Philox 4x32-10 for each 64-bit counter."""
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for round in range(10):
        if round > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mul_hilo(c0, _PHILOX_M0)
        hi1, lo1 = _mul_hilo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_words(numel: int, seed: torch.Tensor, offset: int = 0, inner: int = 1) -> torch.Tensor:
    """The 32-bit word drawn by each of `numel` row-major elements (int64 tensor)."""
    position = offset + torch.arange(numel, device=seed.device, dtype=torch.int64) // inner
    words = torch.stack(philox4x32_10(position >> 2, seed.reshape(())), dim=-1)
    return words.gather(-1, (position & 3).unsqueeze(-1)).squeeze(-1)


def keep_mask(shape, seed, p, offset=0, inner=1) -> torch.Tensor:
    """Boolean keep-mask of the kernels for a row-major tensor of this shape."""
    numel = 1
    for size in shape:
        numel *= size
    return (philox_words(numel, seed, offset, inner) >= drop_threshold(p)).reshape(shape)


def dropout(x, seed, p, offset=0, inner=1, bias=None, residual=None):
    """residual + (x + bias) * keep * scale, with the kernels' mask and rounding order."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    multiplier = keep_mask(x.shape, seed, p, offset, inner).to(acc) * keep_scale(p)
    v = x.to(acc)
    if bias is not None:
        v = v + bias.to(acc)
    v = v * multiplier
    if residual is not None:
        v = residual.to(acc) + v
    return v.to(x.dtype)


def norm_fwd(x, weight, bias, eps, is_rms, residual=None, seed=None, p=0.0, residual_in_fp32=False, store_h=True):
    """LayerNorm / RMSNorm of the rows of 2-D x, optionally of h = residual + dropout(x).

    Same contract as the kernels' norm_fwd: returns (y, h or empty, mean or empty, rstd),
    statistics in float32 (float64 for float64 x), h formed in that dtype and rounded to
    its own before the norm. Differentiable through autograd (y and h).
    """
    fused = residual is not None or seed is not None
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    v = x.to(acc_dtype)
    if seed is not None:
        v = v * (keep_mask(x.shape, seed, p).to(acc_dtype) * keep_scale(p))
    if residual is not None:
        v = residual.to(acc_dtype) + v
    h = x.new_empty(0)
    if fused:
        h_dtype = acc_dtype if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
        h = v.to(h_dtype)
        v = h.to(acc_dtype)
    if is_rms:
        mean = v.new_empty(0)
        rstd = torch.rsqrt(v.pow(2).mean(-1) + eps)
        normalized = v * rstd[:, None]
    else:
        mean = v.mean(-1)
        rstd = torch.rsqrt((v - mean[:, None]).pow(2).mean(-1) + eps)
        normalized = (v - mean[:, None]) * rstd[:, None]
    if weight is not None:
        normalized = normalized * weight.to(acc_dtype)
    if bias is not None:
        normalized = normalized + bias.to(acc_dtype)
    return normalized.to(x.dtype), h if store_h else h.new_empty(0), mean.detach(), rstd.detach()


# ---------------------------------------------------------------- batch_norm
# x is (N, C, S) with any strides (a view of (N, C, *spatial) in either memory format);
# per-channel statistics are over N and S, in float32 (float64 for float64 x).


def _acc(x):
    return torch.promote_types(x.dtype, torch.float32)


def _per_channel(t):
    return t[None, :, None]


def _bn_ncs(x):
    return x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)


def bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, batches_tracked=None):
    """bn_fwd over x (N, C, *): (y, mean, invstd), differentiable by torch's autograd
    through the batch statistics; the running statistics take torch's update in place."""
    x3 = _bn_ncs(x)
    if training:
        mean, var = bn_stats(x3)
        if running_mean is not None:
            with torch.no_grad():
                factor = 1.0 / batches_tracked if batches_tracked is not None else momentum
                count = x3.shape[0] * x3.shape[2]
                unbiased = var * (count / max(count - 1, 1))
                running_mean.mul_(1 - factor).add_(mean.detach().to(running_mean.dtype) * factor)
                running_var.mul_(1 - factor).add_(unbiased.detach().to(running_var.dtype) * factor)
    else:
        mean, var = running_mean.to(_acc(x)), running_var.to(_acc(x))
    y = bn_apply(x3, mean, var, weight, bias, eps).view(x.shape)
    return y, mean.detach(), torch.rsqrt(var.detach() + eps)


def bn_bwd(dy, x, weight, mean, invstd, training, output_mask):
    """bn_bwd's contract: (dx, dweight, dbias), each empty where output_mask is False."""
    x3, dy3 = _bn_ncs(x), _bn_ncs(dy)
    acc = _acc(x)
    var = invstd.to(acc).pow(-2)  # eps folded in: bn_bwd_* take var + eps with eps = 0
    sum_dy, sum_dy_xhat = bn_bwd_reduce(dy3, x3, mean, var, 0.0)
    count = x3.shape[0] * x3.shape[2]
    sums = (sum_dy, sum_dy_xhat, count) if training else ()
    dx = bn_bwd_apply(dy3, x3, mean, var, weight, 0.0, *sums).view(x.shape) if output_mask[0] else x.new_empty(0)
    param_dtype = weight.dtype if weight is not None else x.dtype
    dweight = sum_dy_xhat.to(param_dtype) if output_mask[1] else x.new_empty(0, dtype=param_dtype)
    dbias = sum_dy.to(param_dtype) if output_mask[2] else x.new_empty(0, dtype=param_dtype)
    return dx, dweight, dbias


def bn_stats(x):
    """(mean, biased variance) per channel, two-pass."""
    v = x.to(_acc(x))
    mean = v.mean((0, 2))
    return mean, (v - _per_channel(mean)).pow(2).mean((0, 2))


def bn_apply(x, mean, var, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in x's dtype and layout."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return (x.to(scale.dtype) * _per_channel(scale) + _per_channel(shift)).to(x.dtype)


def bn_bwd_reduce(dy, x, mean, var, eps):
    """(sum of dy, sum of dy * xhat) per channel: dbias and dweight."""
    acc = _acc(x)
    xhat = (x.to(acc) - _per_channel(mean)) * _per_channel(torch.rsqrt(var + eps))
    dy = dy.to(acc)
    return dy.sum((0, 2)), (dy * xhat).sum((0, 2))


def bn_bwd_apply(dy, x, mean, var, weight, eps, sum_dy=None, sum_dy_xhat=None, count=0):
    """dx. With the sums (training, statistics of the batch over `count` values):
    dx = (dy - sum_dy / count - xhat * sum_dy_xhat / count) * weight / sqrt(var + eps);
    without (eval, fixed statistics): dx = dy * weight / sqrt(var + eps)."""
    acc = _acc(x)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight.to(acc) if weight is not None else invstd
    g = dy.to(acc)
    if sum_dy is not None:
        xhat = (x.to(acc) - _per_channel(mean)) * _per_channel(invstd)
        g = g - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count)
    return (g * _per_channel(scale)).to(x.dtype)


# ---------------------------------------------------------------- optimizer steps
# The contract of sgd_step_ / adam_step_ (csrc/ops.cpp), term by term: the kernels follow
# these lines in this order, in the accumulate dtype (float32, float64 for float64 values).


def _prox_and_project(w, lr, l1, max_norm):
    """The regularization applied after the update: proximal L1, then max-norm rows."""
    if l1 > 0:
        w = torch.sign(w) * torch.clamp(w.abs() - lr * l1, min=0)
    if max_norm > 0 and w.dim() >= 2:
        norms = w.reshape(w.shape[0], -1).pow(2).sum(1).sqrt()
        scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
        w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    return w


def _value_and_gradient(value, grad, grad_scale, maximize):
    """The value updated and its unscaled gradient (negated to maximize), in the accumulate dtype."""
    acc = _acc(value)
    g = grad.to(acc)
    if grad_scale is not None:
        g = g * (1 / grad_scale.double()).to(acc)  # the inverse formed in float64, rounded once
    return value.to(acc), -g if maximize else g


def _store(target, new, skip):
    """target <- new, or left as it is where the step is skipped (found_inf != 0; no host read)."""
    target.copy_(new if skip is None else torch.where(skip, target.to(new.dtype), new))


def _write_back(params, masters, i, w, skip):
    if masters:
        _store(masters[i], w, skip)
    _store(params[i], w, skip)  # rounded to the param's dtype


def _skip_flag(found_inf):
    return None if found_inf is None else found_inf != 0


def sgd_step_(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1, max_norm,
              nesterov, maximize, first_step, grad_scale=None, found_inf=None):
    """torch.optim.SGD's update (plus l1 and max_norm), in place; nothing changes when found_inf != 0."""
    skip = _skip_flag(found_inf)
    for i, param in enumerate(params):
        w, g = _value_and_gradient(masters[i] if masters else param, grads[i], grad_scale, maximize)
        acc = w.dtype
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = momentum_buffers[i]
            b = g if first_step else buf.to(acc) * momentum + (1 - dampening) * g
            b = b.to(buf.dtype).to(acc)  # as stored
            _store(buf, b, skip)
            g = g + momentum * b if nesterov else b
        w = _prox_and_project(w - lr * g, lr, l1, max_norm)
        _write_back(params, masters, i, w, skip)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, beta1, beta2, eps,
               weight_decay, decoupled, l1, max_norm, maximize, grad_scale=None, found_inf=None):
    """torch.optim.Adam / AdamW's update (plus l1 and max_norm), in place: steps[i] += 1, and the
    bias corrections 1 - beta**step of the new count in float64; nothing changes when found_inf != 0."""
    skip = _skip_flag(found_inf)
    for i, param in enumerate(params):
        step = steps[i] + 1
        _store(steps[i], step, skip)
        step = step.double()
        step_size = lr / (1 - beta1 ** step)  # float64 scalars, as torch.optim forms them on the host
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        w, g = _value_and_gradient(masters[i] if masters else param, grads[i], grad_scale, maximize)
        acc = w.dtype
        if weight_decay != 0:
            if decoupled:
                w = w * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m = exp_avgs[i].to(acc)
        m = m + (1 - beta1) * (g - m)
        v = exp_avg_sqs[i].to(acc) * beta2 + (1 - beta2) * g * g
        _store(exp_avgs[i], m, skip)
        _store(exp_avg_sqs[i], v, skip)
        if max_exp_avg_sqs:
            v = torch.maximum(max_exp_avg_sqs[i].to(acc), v)
            _store(max_exp_avg_sqs[i], v, skip)
        denom = v.sqrt() / bias_correction2_sqrt.to(acc) + eps
        w = _prox_and_project(w - step_size.to(acc) * (m / denom), lr, l1, max_norm)
        _write_back(params, masters, i, w, skip)


# ---------------------------------------------------------------- group_norm
# x is (N, C, *spatial) with any strides, taken as (N, C, S); statistics per (sample, group of D = C / groups
# channels) over its D * S values, in float32 (float64 for float64 x). Outputs are
# allocated with empty_like(x), as the kernels do.


def _per_group_channel(t, groups, channels):
    """(N, groups) -> (N, C, 1): each group's value repeated over its channels."""
    return t.repeat_interleave(channels // groups, dim=1)[:, :, None]


def _as_ncs(t):
    """(N, C, *spatial) -> (N, C, S), a view in either memory format where one exists."""
    if t.dim() == 3:
        return t
    return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)


def gn_fwd(x, weight, bias, groups, eps, silu):
    """(y, mean, rstd): y = silu?((x - mean) * rstd * weight + bias), two-pass statistics."""
    shape, x = x.shape, _as_ncs(x)
    N, C, S = x.shape
    acc = _acc(x)
    values = x.to(acc).reshape(N, groups, C // groups * S)  # not -1: N may be 0
    mean = values.mean(-1)
    rstd = torch.rsqrt((values - mean[..., None]).pow(2).mean(-1) + eps)
    z = ((values - mean[..., None]) * rstd[..., None]).reshape(N, C, S)
    if weight is not None:
        z = z * _per_channel(weight.to(acc))
    if bias is not None:
        z = z + _per_channel(bias.to(acc))
    if silu:
        z = torch.nn.functional.silu(z)
    return torch.empty_like(x).copy_(z).view(shape), mean, rstd


def gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu):
    """(dx, dweight, dbias) by the formulas of csrc/include/fastreg/gn_steps.h: with g the
    gradient reaching the pre-activation z, per (n, c) sum_g and sum_gxhat, then
    dx = rstd * w * g + k_x * (x - mean) + k_one per group."""
    shape, x, dy = x.shape, _as_ncs(x), _as_ncs(dy)
    N, C, S = x.shape
    D = C // groups
    acc = _acc(x)
    w = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=x.device)
    r = _per_group_channel(rstd, groups, C)
    centered = x.to(acc) - _per_group_channel(mean, groups, C)
    g = dy.to(acc)
    if silu:  # the pre-activation, recomputed
        z = centered * r * _per_channel(w)
        if bias is not None:
            z = z + _per_channel(bias.to(acc))
        s = torch.sigmoid(z)
        g = g * s * (1 + z * (1 - s))
    sum_g = g.sum(2)
    sum_gxhat = (g * centered).sum(2) * r[:, :, 0]
    sum_wg = (sum_g * w).reshape(N, groups, D).sum(-1)
    sum_wgxhat = (sum_gxhat * w).reshape(N, groups, D).sum(-1)
    k_x = -rstd * rstd * sum_wgxhat / (D * S)
    k_one = -rstd * sum_wg / (D * S)
    dx = g * r * _per_channel(w) + centered * _per_group_channel(k_x, groups, C) + _per_group_channel(k_one, groups, C)
    dweight = sum_gxhat.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = sum_g.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return torch.empty_like(x).copy_(dx).view(shape), dweight, dbias


# ---------------------------------------------------------------- gaussian noise, alpha dropout
# The normals of csrc/include/fastreg/normal.h, operation for operation in float32 tensors
# (each torch op rounds once, none is fused), so they equal the kernels' bit for bit.

_LN2, _SQRT2 = 0.6931471824645996, 1.4142135381698608
_LOG_SERIES = (0.2222222238779068, 0.2857142984867096, 0.4000000059604645, 0.6666666865348816, 2.0)
_SIN_SERIES = (0.00016044118092395365, -0.004681753925979137, 0.07969262450933456, -0.6459640860557556,
               1.5707963705062866)
_COS_SERIES = (-2.520204179745633e-05, 0.0009192602592520416, -0.020863480865955353, 0.25366950035095215,
               -1.2337005138397217, 1.0)
_TWO_POW_MINUS_24 = 2.0**-24


def _horner(coefficients, z):
    """c0 z^n + ... + cn, evaluated innermost first as the kernels do (mul, then add)."""
    value = coefficients[1] + z * coefficients[0]
    for c in coefficients[2:]:
        value = c + z * value
    return value


def normal_pair(radius_word: torch.Tensor, angle_word: torch.Tensor):
    """(r cos t, r sin t) of the Box-Muller transform of two 32-bit words (int64 tensors)."""
    u = ((radius_word >> 9) * 2 + 1).to(torch.float32) * _TWO_POW_MINUS_24
    bits = u.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    halve = m > _SQRT2
    m = torch.where(halve, m * 0.5, m)
    exponent = exponent + halve.to(torch.int32)
    s = (m - 1.0) / (m + 1.0)
    log_u = exponent.to(torch.float32) * _LN2 + s * _horner(_LOG_SERIES, s * s)
    # torch.sqrt of float32 is not always correctly rounded on CPU (SLEEF, 0.5001 ulp); the
    # float64 square root rounded to float32 is (53 >= 2 * 24 + 2 bits)
    r = torch.sqrt((log_u * -2.0).double()).to(torch.float32)

    quadrant = angle_word >> 30
    t = ((((angle_word >> 7) & 0x7FFFFF) * 2 + 1) - 8388608).to(torch.float32) * _TWO_POW_MINUS_24
    t2 = t * t
    sin_t = t * _horner(_SIN_SERIES, t2)
    cos_t = 1.0 + t2 * _horner(_COS_SERIES[:-1], t2)
    swap = (quadrant & 1) == 1
    c, sn = torch.where(swap, sin_t, cos_t), torch.where(swap, cos_t, sin_t)
    cos_angle = torch.where((quadrant == 1) | (quadrant == 2), -c, c)
    sin_angle = torch.where(quadrant >= 2, -sn, sn)
    return r * cos_angle, r * sin_angle


def normal_noise(numel: int, seed: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The float32 standard normal drawn by each of `numel` row-major elements."""
    position = offset + torch.arange(numel, device=seed.device, dtype=torch.int64)
    w0, w1, w2, w3 = philox4x32_10(position >> 2, seed.reshape(()))
    second_pair = (position & 2) != 0
    cosine, sine = normal_pair(torch.where(second_pair, w2, w0), torch.where(second_pair, w3, w1))
    return torch.where((position & 1) != 0, sine, cosine)


def gaussian_noise(x, seed, std, multiplicative, offset=0):
    """x * (1 + std * n) (multiplicative) or x + std * n, with the kernels' normals and order."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    noise = std * normal_noise(x.numel(), seed, offset).reshape(x.shape).to(acc)
    v = x.to(acc)
    return (v * (1.0 + noise) if multiplicative else v + noise).to(x.dtype)


def alpha_dropout(x, seed, p, scale, keep_shift, drop_shift, offset=0, inner=1):
    """x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift), the kernels' mask and order."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    keep = keep_mask(x.shape, seed, p, offset, inner)
    v = x.to(acc) * (keep.to(acc) * scale)
    shift = torch.where(keep, torch.tensor(keep_shift, dtype=acc, device=x.device),
                        torch.tensor(drop_shift, dtype=acc, device=x.device))
    return (v + shift).to(x.dtype)


# ---------------------------------------------------------------- drop_block
# Geometry, stream and mask layout: csrc/include/fastreg/drop_block.h.


def drop_block_channels_last(x) -> bool:
    """Whether the kernels treat x as channels-last: dense in that order and not contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def drop_block_keep(shape, seed, gamma, block_size, shared_mask=False) -> torch.Tensor:
    """Boolean keep mask (N, C, *spatial) of the kernels: seeds of the Philox stream on the
    grid (planes, spatial - block + 1), each widened into its block by a max-pool."""
    n, c, *spatial = shape
    blocks = [block_size] * len(spatial)
    grid = [size - block + 1 for size, block in zip(spatial, blocks)]
    planes = n if shared_mask else n * c
    points = planes
    for size in grid:
        points *= size
    seeds = (philox_words(points, seed) < drop_threshold(gamma)).reshape(planes, 1, *grid).to(torch.float32)
    # drop[a] = max of seeds[a - k], k < block: pad block - 1 zeros on both sides, pool with stride 1
    padding = []
    for block in reversed(blocks):
        padding += [block - 1, block - 1]
    padded = torch.nn.functional.pad(seeds, padding)
    pool = torch.nn.functional.max_pool3d if len(spatial) == 3 else torch.nn.functional.max_pool2d
    drop = pool(padded, kernel_size=blocks, stride=1)
    keep = (drop == 0).reshape(n, 1 if shared_mask else c, *spatial)
    return keep.expand(n, c, *spatial)


def _memory_order(x):
    """The permutation of x's dims from the largest stride to the smallest (x dense)."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d))


def pack_keep_bits(keep: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The kernels' mask: keep in memory order, one row per plane (or per sample when
    channels-last), each row padded to bytes, bit j of byte k = element 8k + j."""
    n, c = keep.shape[:2]
    rows = keep.movedim(1, -1).reshape(n, -1) if channels_last else keep.reshape(n * c, -1)
    length = rows.shape[1]
    padded = torch.nn.functional.pad(rows.to(torch.uint8), (0, (-length) % 8))
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=keep.device)
    return (padded.reshape(rows.shape[0], -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_keep_bits(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Boolean keep of `like`'s shape from a mask in `like`'s memory order."""
    rows = mask.shape[0]
    length = like.numel() // rows if rows > 0 else 0
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    flat = ((mask.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, :length].bool()
    order = _memory_order(like)
    in_memory_order = flat.reshape([like.shape[d] for d in order])
    return in_memory_order.permute([order.index(d) for d in range(like.dim())])


def _drop_block_scale(numel, kept, eps):
    # numel / (eps + kept) in float64 with the kernels' two roundings (not a reciprocal)
    return torch.full((), float(numel), dtype=torch.float64, device=kept.device) / (eps + kept.to(torch.float64))


def _times_keep_scale(x, keep, scale):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) * (keep.to(acc) * scale.to(acc))).to(x.dtype)


def drop_block(x, seed, gamma, block_size, eps, shared_mask=False):
    """(y, mask, scale) of the kernels: y = x * keep * scale in x's layout (channels-last kept,
    other layouts made contiguous), scale = numel / (eps + kept) as a float64 scalar tensor."""
    channels_last = drop_block_channels_last(x)
    keep = drop_block_keep(x.shape, seed, gamma, block_size, shared_mask)
    scale = _drop_block_scale(x.numel(), keep.sum(), eps)
    y = _times_keep_scale(x, keep, scale)
    layout = (torch.channels_last if x.dim() == 4 else torch.channels_last_3d) if channels_last else torch.contiguous_format
    return y.contiguous(memory_format=layout), pack_keep_bits(keep, channels_last), scale


def drop_block_apply(x, mask, scale):
    """x * keep * scale for a mask in x's memory order; y has x's strides."""
    y = _times_keep_scale(x, unpack_keep_bits(mask, x), scale)
    return torch.empty_like(x).copy_(y)  # x is dense: its strides


def cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, reduction, compute_grad=False):
    """Cross-entropy of logits input (N, C, S) over dim 1 with class indices target (N, S):
    the contract of the kernels' cross_entropy_fwd (csrc/ops.cpp), in float32 (float64 for
    float64) torch ops differentiated by autograd. Returns (loss, z_term, empty): the
    gradient comes from autograd here, and z_term is detached (the kernels' is not
    differentiable). The out-of-range check and its IndexError are nll_loss's."""
    acc = torch.promote_types(input.dtype, torch.float32)
    # rows (N * S, C): torch's last-dim softmax kernels (its dim-1 kernels of (N, C, S) take
    # a coarser exp in their backward)
    x = input.to(acc).movedim(1, 2).reshape(-1, input.shape[1])
    rows = target.reshape(-1)
    w = weight.to(acc) if weight is not None else None
    log_p = torch.log_softmax(x, dim=1)
    counted = rows != ignore_index
    # (1 - eps) * w_t * -log p_t, 0 where ignored; nll_loss checks the targets' range
    ce = (1 - label_smoothing) * torch.nn.functional.nll_loss(
        log_p, rows, weight=w, ignore_index=ignore_index, reduction="none")
    if label_smoothing > 0:  # eps / C * sum_c w_c * -log p_c, torch's smoothing term
        weighted = log_p * w if w is not None else log_p
        ce = ce + label_smoothing / x.shape[1] * torch.where(counted, -weighted.sum(1), 0)
    z = torch.where(counted, z_loss * torch.logsumexp(x, dim=1).square(), 0)
    if reduction == 0:
        loss, z_term = (ce + z).view(target.shape), z.view(target.shape)
    else:
        loss, z_term = ce.sum(), z.sum()
        if reduction == 1:  # ce over the counted targets' total weight, z over their count
            safe_target = torch.where(counted, rows, 0)
            target_weight = w[safe_target] if w is not None else torch.ones_like(ce)
            count = counted.sum().to(acc)
            z_term = z_term / count
            loss = loss / torch.where(counted, target_weight, 0).sum() + z_term
        else:
            loss = loss + z_term
    return loss.to(input.dtype), z_term.detach().to(input.dtype), input.new_empty(0)


def linear_cross_entropy_fwd(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
                             z_loss, reduction, grad_loss=None, grad_input=False, grad_weight=False,
                             grad_bias=False, chunk_tokens=0):
    """cross_entropy_fwd of input @ linear_weight^T + linear_bias (input (T, H), target (T,)),
    the whole logits at once; the gradients come from autograd (empty here)."""
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    loss, z_term, _ = cross_entropy_fwd(logits.unsqueeze(2), target.unsqueeze(1), weight, ignore_index,
                                        label_smoothing, z_loss, reduction)
    if reduction == 0:
        loss, z_term = loss.squeeze(1), z_term.squeeze(1)
    empty = input.new_empty(0)
    return loss, z_term, empty, empty, empty
