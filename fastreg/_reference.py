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


def _value_and_gradient(value, grad, inv_grad_scale, maximize):
    """The value updated and its unscaled gradient (negated to maximize), in the accumulate dtype."""
    acc = _acc(value)
    g = grad.to(acc) * inv_grad_scale
    return value.to(acc), -g if maximize else g


def _write_back(params, masters, i, w):
    if masters:
        masters[i].copy_(w)
        params[i].copy_(w)  # rounded to the param's dtype
    else:
        params[i].copy_(w)


def sgd_step_(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1, max_norm,
              nesterov, maximize, first_step, inv_grad_scale):
    """torch.optim.SGD's update (plus l1 and max_norm), in place."""
    for i, param in enumerate(params):
        w, g = _value_and_gradient(masters[i] if masters else param, grads[i], inv_grad_scale, maximize)
        acc = w.dtype
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = momentum_buffers[i]
            b = g if first_step else buf.to(acc) * momentum + (1 - dampening) * g
            buf.copy_(b)
            b = buf.to(acc)  # as stored
            g = g + momentum * b if nesterov else b
        w = _prox_and_project(w - lr * g, lr, l1, max_norm)
        _write_back(params, masters, i, w)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, beta1, beta2, eps,
               weight_decay, decoupled, l1, max_norm, maximize, bias_correction1, bias_correction2,
               inv_grad_scale):
    """torch.optim.Adam / AdamW's update (plus l1 and max_norm), in place."""
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    for i, param in enumerate(params):
        w, g = _value_and_gradient(masters[i] if masters else param, grads[i], inv_grad_scale, maximize)
        acc = w.dtype
        if weight_decay != 0:
            if decoupled:
                w = w * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m = exp_avgs[i].to(acc)
        m = m + (1 - beta1) * (g - m)
        v = exp_avg_sqs[i].to(acc) * beta2 + (1 - beta2) * g * g
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if max_exp_avg_sqs:
            v = torch.maximum(max_exp_avg_sqs[i].to(acc), v)
            max_exp_avg_sqs[i].copy_(v)
        denom = v.sqrt() / bias_correction2_sqrt + eps
        w = _prox_and_project(w - step_size * (m / denom), lr, l1, max_norm)
        _write_back(params, masters, i, w)


# ---------------------------------------------------------------- group_norm
# x is (N, C, S) with any strides; statistics per (sample, group of D = C / groups
# channels) over its D * S values, in float32 (float64 for float64 x). Outputs are
# allocated with empty_like(x), as the kernels do.


def _per_group_channel(t, groups, channels):
    """(N, groups) -> (N, C, 1): each group's value repeated over its channels."""
    return t.repeat_interleave(channels // groups, dim=1)[:, :, None]


def gn_fwd(x, weight, bias, groups, eps, silu):
    """(y, mean, rstd): y = silu?((x - mean) * rstd * weight + bias), two-pass statistics."""
    N, C, S = x.shape
    acc = _acc(x)
    values = x.to(acc).reshape(N, groups, -1)
    mean = values.mean(-1)
    rstd = torch.rsqrt((values - mean[..., None]).pow(2).mean(-1) + eps)
    z = ((values - mean[..., None]) * rstd[..., None]).reshape(N, C, S)
    if weight is not None:
        z = z * _per_channel(weight.to(acc))
    if bias is not None:
        z = z + _per_channel(bias.to(acc))
    if silu:
        z = torch.nn.functional.silu(z)
    return torch.empty_like(x).copy_(z), mean, rstd


def gn_bwd(dy, x, weight, bias, mean, rstd, groups, silu):
    """(dx, dweight, dbias) by the formulas of csrc/include/fastreg/gn_steps.h: with g the
    gradient reaching the pre-activation z, per (n, c) sum_g and sum_gxhat, then
    dx = rstd * w * g + k_x * (x - mean) + k_one per group."""
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
    return torch.empty_like(x).copy_(dx), dweight, dbias


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
