"""Cross-entropy in Triton: the loss and, in the same pass over the logits, their gradient;
label smoothing with class weights (torch's definition), ignore_index, z-loss; and the
linear form (input @ weight^T then cross-entropy) in chunks of tokens.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

Logits are a 3-D view (N, C, S) with the classes on dim 1 ((N, C) inputs: S = 1). One
program takes one sample and a block of BLOCK_S positions, walking the classes in blocks of
BLOCK_C: classes contiguous (rows, BLOCK_S = 1) or positions contiguous (columns, positions
across the lanes) are both read in place, with any strides otherwise. First sweep: the
running max and sum of exp (online softmax), the target logit and the smoothing sum; second
sweep (re-read from L2): the gradient. For a row with target t, weights w (1 without),
smoothing eps, z-loss coefficient z and lse = logsumexp(x):
    ce   = (1 - eps) * w_t * (lse - x_t) + eps / C * sum_c w_c * (lse - x_c)
    zrow = z * lse^2
    g_c  = alpha * softmax_c - beta * w_c - [c == t] * target_term     (gradient of
           ce_scale * ce + z_scale * zrow), with alpha = ce_scale * ((1 - eps) * w_t +
           eps / C * sum_c w_c) + z_scale * 2 * z * lse, beta = ce_scale * eps / C and
           target_term = ce_scale * (1 - eps) * w_t.
A mean divides the ce terms by the total weight of the counted targets and the z terms by
their count (torch's mean; PaLM's z-loss mean over tokens); these scales stay on the device.
Arithmetic in float32 (float64 for float64 logits).
"""

import torch
import triton
import triton.language as tl

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2  # torch's enum
MAX_TILE = 4096  # logits per program per class block (BLOCK_C * BLOCK_S)
# tokens per chunk of linear_cross_entropy (linear_chunk_tokens): at most 1/LINEAR_CHUNK_PARTS
# of the tokens and LINEAR_CHUNK_BYTES of logits, in multiples of LINEAR_CHUNK_MIN_TOKENS
LINEAR_CHUNK_BYTES, LINEAR_CHUNK_PARTS, LINEAR_CHUNK_MIN_TOKENS = 256 << 20, 5, 32


@triton.jit
def _cross_entropy_kernel(
    X,  # (N, C, S) logits, float16 / bfloat16 / float32 / float64, strides stride_xn, stride_xc, stride_xs
    G,  # (N, C, S) gradient out, X's dtype (may be X itself), strides stride_gn, stride_gc, stride_gs
    TARGET,  # (N * S,) int64 class indices
    WEIGHT,  # (C,) class weights in CE's dtype; read only if HAS_WEIGHT
    SCALE,  # (ce_scale, z_scale) pairs in CE's dtype, row r's at SCALE + r * scale_stride (0: one pair)
    CE,  # (N * S,) float32 (float64) out: the rows' cross-entropy terms
    Z,  # (N * S,) float32 (float64) out: the rows' z-loss terms
    C, S, stride_xn, stride_xc, stride_xs, stride_gn, stride_gc, stride_gs, scale_stride,
    ignore_index, smoothing, z_loss,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ACC: tl.constexpr = CE.dtype.element_ty
    s_blocks = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0)
    n = (pid // s_blocks).to(tl.int64)
    s = (pid % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    rows = n * S + s
    t = tl.load(TARGET + rows, mask=s_mask, other=ignore_index)
    counted = s_mask & (t != ignore_index)
    in_range = (t >= 0) & (t < C)
    tl.device_assert(~counted | in_range, "target out of bounds")
    active = counted & in_range
    safe_t = tl.where(active, t, 0)
    x_row = X + n * stride_xn + s.to(tl.int64) * stride_xs  # (BLOCK_S,) pointers to class 0
    x_t = tl.load(x_row + safe_t * stride_xc, mask=active, other=0.0).to(ACC)
    shift = tl.load(x_row, mask=active, other=0.0).to(ACC)  # smoothing sums of x - shift: no offset lost
    cols = tl.arange(0, BLOCK_C)

    # sweep 1: max and sum of exp (online), smoothing sums
    running_max = tl.full((BLOCK_S,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_S,), ACC)
    smooth_sum = tl.zeros((BLOCK_S,), ACC)
    weight_sum = tl.zeros((BLOCK_C,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        c_mask = c < C
        mask = c_mask[:, None] & active[None, :]
        v = tl.load(x_row[None, :] + c[:, None].to(tl.int64) * stride_xc, mask=mask, other=float("-inf")).to(ACC)
        new_max = tl.maximum(running_max, tl.max(v, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: sum stays 0
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(v - safe_max[None, :]), axis=0)
        running_max = new_max
        if SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + c, mask=c_mask, other=0.0).to(ACC)
            else:
                w = tl.where(c_mask, 1.0, 0.0).to(ACC)
            smooth_sum += tl.sum(w[:, None] * tl.where(mask, v - shift[None, :], 0.0), axis=0)
            weight_sum += w
    # lse = running_max + log_sum; differences with a logit are taken from the max first, so a
    # large common offset of the logits costs no precision
    running_max = tl.where(active, running_max, 0.0)
    log_sum = tl.log(tl.where(active, running_sum, 1.0))
    lse = running_max + log_sum
    if HAS_WEIGHT:
        target_weight = tl.load(WEIGHT + safe_t, mask=active, other=0.0).to(ACC)
    else:
        target_weight = tl.where(active, 1.0, 0.0).to(ACC)
    uniform = smoothing / C
    total_weight = tl.sum(weight_sum, axis=0)
    ce = (1.0 - smoothing) * target_weight * ((running_max - x_t) + log_sum)
    if SMOOTHING:
        ce += uniform * (((running_max - shift) + log_sum) * total_weight - smooth_sum)
    z = z_loss * lse * lse
    # a target out of range (the assert is off outside debug mode) makes its row nan
    ce = tl.where(active, ce, tl.where(counted, float("nan"), 0.0))
    z = tl.where(active, z, 0.0)
    tl.store(CE + rows, ce, mask=s_mask)
    tl.store(Z + rows, z, mask=s_mask)

    # sweep 2: the gradient
    if WITH_GRAD:
        ce_scale = tl.load(SCALE + rows * scale_stride, mask=s_mask, other=0.0).to(ACC)
        z_scale = tl.load(SCALE + rows * scale_stride + 1, mask=s_mask, other=0.0).to(ACC)
        alpha = ce_scale * ((1.0 - smoothing) * target_weight + uniform * total_weight) + z_scale * 2.0 * z_loss * lse
        beta = ce_scale * uniform
        target_term = ce_scale * (1.0 - smoothing) * target_weight
        g_row = G + n * stride_gn + s.to(tl.int64) * stride_gs
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            c_mask = c < C
            mask = c_mask[:, None] & s_mask[None, :]
            read = c_mask[:, None] & active[None, :]  # ignored rows are written, not read
            v = tl.load(x_row[None, :] + c[:, None].to(tl.int64) * stride_xc, mask=read, other=0.0).to(ACC)
            g = alpha[None, :] * tl.exp((v - running_max[None, :]) - log_sum[None, :])
            if SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(WEIGHT + c, mask=c_mask, other=0.0).to(ACC)
                else:
                    w = tl.full((BLOCK_C,), 1.0, ACC)
                g -= beta[None, :] * w[:, None]
            g = tl.where(c[:, None] == t[None, :], g - target_term[None, :], g)
            g = tl.where(counted[None, :], g, 0.0)  # ignored rows: exactly 0 whatever their logits
            g = tl.where(active[None, :] | ~counted[None, :], g, float("nan"))
            tl.store(g_row[None, :] + c[:, None].to(tl.int64) * stride_gc, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    G,  # (numel,) the dense gradient, scaled in place
    FACTOR,  # (1,) the incoming gradient, any float dtype
    numel,
    BLOCK: tl.constexpr,
):
    factor = tl.load(FACTOR)
    if factor != 1.0:  # an incoming 1 (a loss used alone) costs no pass over G
        ACC: tl.constexpr = tl.float64 if G.dtype.element_ty == tl.float64 else tl.float32
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(G + offsets, mask=mask).to(ACC)
        tl.store(G + offsets, (g * factor.to(ACC)).to(G.dtype.element_ty), mask=mask)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reads_rows(x):
    """Whether the kernel reads x (N, C, S) as rows (classes contiguous)."""
    N, C, S = x.shape
    return (S == 1 and (C <= 1 or x.stride(1) == 1)) or (S > 1 and C > 1 and x.stride(1) == 1)


def reads_columns(x):
    """Whether the kernel reads x (N, C, S) as columns (positions contiguous, S > 1)."""
    return not reads_rows(x) and x.shape[2] > 1 and x.stride(2) == 1


def readable_logits(x):
    """x where the kernel reads it in place, else a contiguous copy (one more pass)."""
    return x if reads_rows(x) or reads_columns(x) else x.contiguous()


def gradient_like(x):
    """The gradient of logits x (N, C, S), dense in the layout the kernel reads x in."""
    N, C, S = x.shape
    if reads_rows(x) and S > 1:
        return x.new_empty((N, S, C)).permute(0, 2, 1)
    return x.new_empty((N, C, S))


def _blocks(x):
    """(BLOCK_C, BLOCK_S, num_warps) for logits x (readable)."""
    N, C, S = x.shape
    block_s = 1 if reads_rows(x) else min(triton.next_power_of_2(S), 64)
    block_c = max(1, min(triton.next_power_of_2(max(C, 1)), MAX_TILE // block_s))
    return block_c, block_s, 8 if block_c * block_s >= 2048 else 4


def cross_entropy_rows(x, target, weight, ignore_index, smoothing, z_loss, scale, ce_rows, z_rows, grad=None):
    """The row pass: the rows' terms and, when grad is given, their gradient.

    x:       (N, C, S) logits (see readable_logits; other strides are copied here).
    target:  (N, S) int64; rows equal to ignore_index count for nothing.
    weight:  (C,) class weights in the accumulate dtype (float32; float64 for float64 x), or None.
    scale:   (1, 2) or (N * S, 2) accumulate dtype: (ce_scale, z_scale), the multipliers of
             the two terms' gradients (1 / total weight and 1 / count for a mean).
    ce_rows, z_rows: (N * S,) accumulate dtype, written: the unscaled row terms.
    grad:    (N, C, S) like x (gradient_like(x), or x itself to overwrite the logits), or None.
    A target outside [0, C) (not ignored) makes its row's terms and gradient nan.
    """
    N, C, S = x.shape
    x = readable_logits(x)
    target = target.contiguous()
    if N * S == 0:
        return
    block_c, block_s, num_warps = _blocks(x)
    g = grad if grad is not None else x
    _cross_entropy_kernel[(N * triton.cdiv(S, block_s),)](
        x, g, target, weight if weight is not None else ce_rows, scale, ce_rows, z_rows,
        C, S, *x.stride(), *g.stride(), scale.stride(0) if scale.shape[0] > 1 else 0,
        ignore_index, smoothing, z_loss,
        HAS_WEIGHT=weight is not None, SMOOTHING=smoothing != 0.0, WITH_GRAD=grad is not None,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )


def _target_totals(target, weight, ignore_index, classes):
    """(total weight, count) of the counted targets, as device tensors (no host sync)."""
    counted = target != ignore_index
    acc = weight.dtype if weight is not None else torch.float32
    if weight is None:
        return counted.sum(dtype=acc), counted.sum(dtype=acc)
    safe = torch.where(counted & (target >= 0) & (target < classes), target, 0)
    return torch.where(counted, weight[safe], 0).sum(), counted.sum(dtype=acc)


def _reduction_scale(reduction, totals, acc, device):
    if reduction == REDUCTION_MEAN:
        return torch.stack([1.0 / totals[0], 1.0 / totals[1]]).to(acc).view(1, 2)
    return torch.ones((1, 2), dtype=acc, device=device)


def _reduce(ce_rows, z_rows, reduction, totals, shape, dtype):
    """(loss, z_term) in dtype: per row in `shape` for none, else reduced."""
    if reduction == REDUCTION_NONE:
        return (ce_rows + z_rows).view(shape).to(dtype), z_rows.view(shape).to(dtype)
    ce, z = ce_rows.sum(), z_rows.sum()
    if reduction == REDUCTION_MEAN:  # 0 / 0 = nan when nothing counts, as torch
        ce, z = ce / totals[0], z / totals[1]
    return (ce + z).to(dtype), z.to(dtype)


def cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, reduction, compute_grad):
    """Cross-entropy of logits over dim 1, and its gradient in the same pass.

    input:  (N, C, S) float16 / bfloat16 / float32 / float64 logits, any strides.
    target: (N, S) int64 class indices; ignore_index rows count for nothing.
    weight: (C,) class weights in input's dtype, or None.
    reduction: 0 none, 1 mean (ce terms over the counted targets' total weight, z terms over
            their count), 2 sum.
    Returns (loss, z_term, grad): loss and its z-loss part in input's dtype, 0-dim or (N, S)
    for none; grad (gradient_like(input)) the gradient of loss for an incoming 1 (per row,
    for none) when compute_grad, else an empty tensor.
    """
    x = readable_logits(input)
    N, C, S = x.shape
    acc = _acc_dtype(x.dtype)
    w = weight.to(acc).contiguous() if weight is not None else None
    target = target.contiguous()
    totals = _target_totals(target, w, ignore_index, C)
    scale = _reduction_scale(reduction, totals, acc, x.device)
    ce_rows = torch.empty(N * S, dtype=acc, device=x.device)
    z_rows = torch.empty(N * S, dtype=acc, device=x.device)
    grad = gradient_like(x) if compute_grad else x.new_empty(0)
    cross_entropy_rows(x, target, w, ignore_index, label_smoothing, z_loss, scale, ce_rows, z_rows,
                       grad if compute_grad else None)
    loss, z_term = _reduce(ce_rows, z_rows, reduction, totals, (N, S), x.dtype)
    return loss, z_term, grad


def _dense(t):
    """Whether t's elements fill numel consecutive slots from its data pointer, in some order."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def cross_entropy_bwd_(grad, grad_loss):
    """grad *= grad_loss in place: grad_loss one element (a kernel that returns at once when it
    is 1, no host sync), or (N, S) per-row values broadcast over dim 1 of grad (N, C, S)."""
    if grad.numel() == 0:
        return
    if grad_loss.numel() != 1:
        grad.mul_(grad_loss.reshape(grad.shape[0], 1, grad.shape[2]))
    elif not _dense(grad):
        grad.mul_(grad_loss.reshape(()))
    else:  # dense: its numel elements from data_ptr, in whatever order
        block = 4096
        _scale_kernel[(triton.cdiv(grad.numel(), block),)](grad, grad_loss, grad.numel(), BLOCK=block)


def linear_chunk_tokens(tokens, hidden, classes, element_size):
    """Tokens per chunk: as many as make the chunk's (rows, V) logits the size of the (T, H)
    input (with V >> H a buffer small enough to stay in cache between the row pass and the
    matmuls after it), rounded up to a multiple of LINEAR_CHUNK_MIN_TOKENS, capped as above."""
    step = LINEAR_CHUNK_MIN_TOKENS
    input_sized = -(-tokens * hidden // max(classes, 1))  # ceil
    rows = -(-input_sized // step) * step
    rows = min(rows, -(-tokens // LINEAR_CHUNK_PARTS), LINEAR_CHUNK_BYTES // max(classes * element_size, 1))
    return max(1, min(max(rows, step), tokens))


def linear_cross_entropy_fwd(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
                             z_loss, reduction, grad_loss=None, grad_input=False, grad_weight=False,
                             grad_bias=False, chunk_tokens=0):
    """cross_entropy_fwd of logits = input @ linear_weight^T + linear_bias, never holding them.

    input (T, H), linear_weight (V, H), linear_bias (V,) or None: one float dtype; target (T,)
    int64; weight (V,) or None. Chunks of tokens (linear_chunk_tokens's rows each): the
    chunk's logits by torch.mm, turned into their gradient G in place by the row pass, then
    grad_input = G @ W, grad_weight += G^T @ x and grad_bias += sum of G's rows, accumulated
    in float32 (float64). grad_loss (T,): per-token multipliers of the gradients (the
    backward of reduction none); without it, the gradients of the loss for an incoming 1.
    chunk_tokens: tokens per chunk (0: linear_chunk_tokens's choice).
    Returns (loss, z_term, grad_input, grad_weight, grad_bias), unrequested gradients empty.
    """
    T, H = input.shape
    V = linear_weight.shape[0]
    acc = _acc_dtype(input.dtype)
    w = weight.to(acc).contiguous() if weight is not None else None
    target = target.contiguous()
    totals = _target_totals(target, w, ignore_index, V)
    if grad_loss is not None:
        scale = grad_loss.to(acc).view(T, 1).expand(T, 2).contiguous()
    else:
        scale = _reduction_scale(reduction, totals, acc, input.device)
    ce_rows = torch.empty(T, dtype=acc, device=input.device)
    z_rows = torch.empty(T, dtype=acc, device=input.device)
    with_grad = grad_input or grad_weight or grad_bias
    d_input = input.new_empty((T, H) if grad_input else (0,))
    d_weight = torch.zeros((V, H), dtype=acc, device=input.device) if grad_weight else input.new_empty(0)
    d_bias = torch.zeros(V, dtype=acc, device=input.device) if grad_bias else input.new_empty(0)
    if chunk_tokens > 0:
        chunk = min(chunk_tokens, max(T, 1))
    else:
        chunk = linear_chunk_tokens(T, H, V, input.element_size())
    buffer = input.new_empty((chunk if T > 0 else 0, V))
    for start in range(0, T, chunk):
        rows = min(chunk, T - start)
        x = input[start:start + rows]
        logits = buffer[:rows]
        if linear_bias is not None:
            torch.addmm(linear_bias, x, linear_weight.t(), out=logits)
        else:
            torch.mm(x, linear_weight.t(), out=logits)
        view = logits.unsqueeze(2)
        cross_entropy_rows(view, target[start:start + rows].view(rows, 1), w, ignore_index, label_smoothing, z_loss,
                           scale[start:start + rows] if scale.shape[0] > 1 else scale,
                           ce_rows[start:start + rows], z_rows[start:start + rows], view if with_grad else None)
        if grad_input:
            torch.mm(logits, linear_weight, out=d_input[start:start + rows])
        if grad_weight:
            if input.dtype == acc:
                d_weight.addmm_(logits.t(), x)
            elif input.is_cuda:  # float32 accumulation inside the matmul
                torch.addmm(d_weight, logits.t(), x, out_dtype=acc, out=d_weight)
            else:
                d_weight.addmm_(logits.t().to(acc), x.to(acc))
        if grad_bias:
            d_bias += logits.sum(0, dtype=acc)
    loss, z_term = _reduce(ce_rows, z_rows, reduction, totals, (T,), input.dtype)
    if input.dtype != acc:
        d_weight, d_bias = d_weight.to(input.dtype), d_bias.to(input.dtype)
    return loss, z_term, d_input, d_weight, d_bias
