"""Multi-tensor optimizer steps in Triton: SGD (momentum, Nesterov) and Adam / AdamW, with a
proximal L1 step and a max-norm row projection in the same pass, updating in place.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

One launch covers every tensor of a (param dtype, value dtype) group, not one launch per
parameter. The launcher packs, in one int64 buffer on the device:

    table     int64[tensors, 8]     data pointers of param, state0..2, master, step; numel, row length
    items     int64[programs, 3]    (tensor index, first element, elements or rows): one per program
    steps     int64[params]         data pointers of the step counts (Adam)

and, in a buffer of their own, the grads' data pointers (int64[tensors] per launch),

and the kernel casts the table's integers back to typed pointers
(`tl.load(table + i).to(tl.pointer_type(dtype))`). Under the Triton interpreter (CPU
tensors) this works unchanged: the interpreter hands CPU tensors to the kernel without
copying them, so the table's addresses are the tensors' real addresses.

No host work per step beyond the launches: the buffer is built once per set of tensors
(keyed by their addresses, shapes and dtypes: new or moved tensors build a new one) and
kept. Grads are often new tensors at each step (zero_grad(set_to_none=True)): their
pointers are compared, and copied to the device only when they moved. The float scalars
are kernel arguments (float64); GradScaler's scale and inf flag,
and Adam's step counts, are read by the kernels on the device (a step with found_inf != 0
changes nothing), and Adam's bias corrections 1 - beta^step are formed there in float64.
So a step reads nothing back to the host and can be captured in a CUDA graph.

Tensors projected by max-norm (>= 2 dims, max_norm > 0) get their own launch of the same
kernel, in which a program owns whole rows: it writes each updated row while summing its
squares in float32 (float64 for float64 values), then re-reads the row and rescales it when
its norm exceeds max_norm.

Contract (fastreg::sgd_step_ / adam_step_, term by term in fastreg/_reference.py): the value
updated is masters[i] (float32) when masters is given, params[i] then receiving it rounded,
else params[i]; optimizer states have the value's dtype, grads the param's; any strides
(non-contiguous tensors go through contiguous copies), on one device; arithmetic in
float32 (float64 for float64 values).
"""

import collections
import math
from operator import attrgetter

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 4096  # elements per program of the elementwise launch
ROW_BLOCK_SIZE = 1024  # elements per step along a row of the max-norm launch
STEPS_BLOCK_SIZE = 128  # step counts per program of the increment launch
NUM_WARPS = 8
ALIGN_BYTES = 16  # every pointer of a group aligned to this: vector loads (hinted to the compiler)
PLAN_CACHE_SIZE = 64  # tensor sets whose device buffers are kept

TABLE_WIDTH = tl.constexpr(8)  # param, state0, state1, state2, master, step, numel, row length
ITEM_WIDTH = tl.constexpr(3)  # tensor index, first element, elements (or rows when projecting)

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    # IEEE-rounded like torch (Triton's `/` on float32 is an approximation)
    if FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x, FP64: tl.constexpr):
    if FP64:
        return tl.sqrt(x)  # float64: IEEE-rounded
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """x (float32/64) in DTYPE, rounded to nearest even like torch's casts.

    float32 -> bfloat16 is rounded here with integer ops: the Triton interpreter truncates
    that conversion, and one code path on the GPU and in the interpreter keeps the CPU tests
    meaningful (a few integer ops per element; the kernel is memory bound).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the carry could reach infinity)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _store_value(param_ptr, master_ptr, offs, w, mask, HAS_MASTER: tl.constexpr, MASKED: tl.constexpr):
    if HAS_MASTER:
        _store(master_ptr, offs, _cast(w, master_ptr.dtype.element_ty), mask, MASKED)
    _store(param_ptr, offs, _cast(w, param_ptr.dtype.element_ty), mask, MASKED)


@triton.jit
def _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, offs, mask,
                   inv_grad_scale, lr, weight_decay, decay_factor, momentum, one_minus_dampening, one_minus_beta1,
                   beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, l1_threshold,
                   ACC: tl.constexpr, FP64: tl.constexpr, IS_ADAM: tl.constexpr, HAS_MASTER: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                   DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                   FIRST_STEP: tl.constexpr, AMSGRAD: tl.constexpr, HAS_L1: tl.constexpr, MASKED: tl.constexpr):
    """The block's new value (ACC dtype) after the step and the L1 proximal step; states stored.

    The scalars are ACC scalars, formed once per program by the kernel. The order of operations
    is fastreg/_reference.py's. State 0 is SGD's momentum buffer or Adam's exp_avg; states
    1 and 2 are Adam's exp_avg_sq and max_exp_avg_sq.
    """
    if HAS_MASTER:
        w = _load(master_ptr, offs, mask, MASKED).to(ACC)
    else:
        w = _load(param_ptr, offs, mask, MASKED).to(ACC)
    g = _load(grad_ptr, offs, mask, MASKED).to(ACC)
    if HAS_GRAD_SCALE:
        g = g * inv_grad_scale
    if MAXIMIZE:
        g = -g
    if IS_ADAM:
        if HAS_WEIGHT_DECAY:
            if DECOUPLED:
                w = w * decay_factor
            else:
                g = g + weight_decay * w
        m = _load(state0_ptr, offs, mask, MASKED).to(ACC)
        m = m + one_minus_beta1 * (g - m)
        v = _load(state1_ptr, offs, mask, MASKED).to(ACC) * beta2
        v = v + one_minus_beta2 * g * g
        _store(state0_ptr, offs, _cast(m, state0_ptr.dtype.element_ty), mask, MASKED)
        _store(state1_ptr, offs, _cast(v, state1_ptr.dtype.element_ty), mask, MASKED)
        if AMSGRAD:
            # NaN in either stays NaN, as torch.maximum
            v = tl.maximum(_load(state2_ptr, offs, mask, MASKED).to(ACC), v, propagate_nan=tl.PropagateNan.ALL)
            _store(state2_ptr, offs, _cast(v, state2_ptr.dtype.element_ty), mask, MASKED)
        denom = _div(_sqrt(v, FP64), bias_correction2_sqrt, FP64) + eps
        w = w - step_size * _div(m, denom, FP64)
    else:
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * w
        if HAS_MOMENTUM:
            if FIRST_STEP:
                b = g
            else:
                b = _load(state0_ptr, offs, mask, MASKED).to(ACC) * momentum + one_minus_dampening * g
            b = _cast(b, state0_ptr.dtype.element_ty)
            _store(state0_ptr, offs, b, mask, MASKED)
            b = b.to(ACC)  # the buffer as stored, as the reference reads it back
            if NESTEROV:
                g = g + momentum * b
            else:
                g = b
        w = w - lr * g
    if HAS_L1:
        # sign(w) * max(|w| - lr * l1, 0), exact zeros inside the threshold; NaN stays NaN
        w = tl.where(tl.abs(w) <= l1_threshold, 0.0, w - tl.where(w > 0, l1_threshold, -l1_threshold))
    return w


@triton.jit
def _f64(x):
    """A float64 kernel argument as a float64 scalar (the interpreter hands Python floats
    through as they are, which arithmetic would round to float32)."""
    return tl.full([], x, tl.float64)


@triton.jit
def _step_program(table_ptr, items_ptr, grads_ptr, grad_scale_ptr, lr, weight_decay, l1_threshold, max_norm,
                  momentum, one_minus_dampening, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2, eps,
                  decay_factor, PARAM_DTYPE: tl.constexpr, VALUE_DTYPE: tl.constexpr, ACC: tl.constexpr,
                  FP64: tl.constexpr, IS_ADAM: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                  HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
                  AMSGRAD: tl.constexpr, HAS_L1: tl.constexpr, PROJECT_ROWS: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One program of _optimizer_step_kernel (its arguments): work item program_id(0)."""
    item = items_ptr + tl.program_id(0).to(tl.int64) * ITEM_WIDTH
    t = tl.load(item)
    start = tl.load(item + 1)
    count = tl.load(item + 2)  # elements of this block, or rows when PROJECT_ROWS
    row = table_ptr + t * TABLE_WIDTH
    param_ptr = tl.load(row + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(grads_ptr + t).to(tl.pointer_type(PARAM_DTYPE))
    state0_ptr = tl.load(row + 1).to(tl.pointer_type(VALUE_DTYPE))
    state1_ptr = tl.load(row + 2).to(tl.pointer_type(VALUE_DTYPE))
    state2_ptr = tl.load(row + 3).to(tl.pointer_type(VALUE_DTYPE))
    master_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # the launcher checked every pointer of the group: lets the compiler vectorize
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        state0_ptr = tl.multiple_of(state0_ptr, 16)
        state1_ptr = tl.multiple_of(state1_ptr, 16)
        state2_ptr = tl.multiple_of(state2_ptr, 16)
        master_ptr = tl.multiple_of(master_ptr, 16)
        start = tl.multiple_of(start, BLOCK)

    # the program's scalars, formed in float64 and rounded once to ACC (as torch rounds a
    # Python scalar for a float tensor)
    inv_grad_scale = _f64(1.0)
    if HAS_GRAD_SCALE:
        inv_grad_scale = 1.0 / tl.load(grad_scale_ptr).to(tl.float64)
    step_size = _f64(lr)
    bias_correction2_sqrt = _f64(1.0)
    if IS_ADAM:  # 1 - beta^step of this tensor's count (incremented by the launch before)
        step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32))).to(tl.float64)
        step_size = _f64(lr) / (1.0 - tl.exp(step * _f64(log_beta1)))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * _f64(log_beta2)))
    inv_grad_scale = inv_grad_scale.to(ACC)
    lr_acc = _f64(lr).to(ACC)
    weight_decay = _f64(weight_decay).to(ACC)
    decay_factor = _f64(decay_factor).to(ACC)
    momentum = _f64(momentum).to(ACC)
    one_minus_dampening = _f64(one_minus_dampening).to(ACC)
    one_minus_beta1 = _f64(one_minus_beta1).to(ACC)
    beta2 = _f64(beta2).to(ACC)
    one_minus_beta2 = _f64(one_minus_beta2).to(ACC)
    eps = _f64(eps).to(ACC)
    step_size = step_size.to(ACC)
    bias_correction2_sqrt = bias_correction2_sqrt.to(ACC)
    l1_threshold = _f64(l1_threshold).to(ACC)
    lanes = tl.arange(0, BLOCK)

    if not PROJECT_ROWS:
        offs = start + lanes
        if count == BLOCK:  # full block: unmasked, vectorizable accesses
            w = _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, offs, None,
                               inv_grad_scale, lr_acc, weight_decay, decay_factor, momentum, one_minus_dampening,
                               one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
                               l1_threshold, ACC, FP64, IS_ADAM, HAS_MASTER, HAS_GRAD_SCALE, MAXIMIZE,
                               HAS_WEIGHT_DECAY, DECOUPLED, HAS_MOMENTUM, NESTEROV, FIRST_STEP, AMSGRAD, HAS_L1,
                               False)
            _store_value(param_ptr, master_ptr, offs, w, None, HAS_MASTER, False)
        else:  # the tensor's tail
            mask = lanes < count
            w = _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, offs, mask,
                               inv_grad_scale, lr_acc, weight_decay, decay_factor, momentum, one_minus_dampening,
                               one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
                               l1_threshold, ACC, FP64, IS_ADAM, HAS_MASTER, HAS_GRAD_SCALE, MAXIMIZE,
                               HAS_WEIGHT_DECAY, DECOUPLED, HAS_MOMENTUM, NESTEROV, FIRST_STEP, AMSGRAD, HAS_L1,
                               True)
            _store_value(param_ptr, master_ptr, offs, w, mask, HAS_MASTER, True)
    else:
        row_len = tl.load(row + 7)
        bound = _f64(max_norm).to(ACC)
        for r in range(0, count):
            row_start = start + r * row_len
            squares = tl.zeros([BLOCK], dtype=ACC)
            for col in range(0, row_len, BLOCK):
                mask = col + lanes < row_len
                offs = row_start + col + lanes
                w = _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, offs,
                                   mask, inv_grad_scale, lr_acc, weight_decay, decay_factor, momentum,
                                   one_minus_dampening, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                                   bias_correction2_sqrt, l1_threshold, ACC, FP64, IS_ADAM, HAS_MASTER,
                                   HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, HAS_MOMENTUM, NESTEROV,
                                   FIRST_STEP, AMSGRAD, HAS_L1, True)
                _store_value(param_ptr, master_ptr, offs, w, mask, HAS_MASTER, True)
                squares += tl.where(mask, w * w, 0.0)
            norm = _sqrt(tl.sum(squares, axis=0), FP64)
            if norm > bound:
                scale = _div(bound, norm, FP64)
                tl.debug_barrier()  # the row's stores, by any thread of the program, are visible
                for col in range(0, row_len, BLOCK):
                    mask = col + lanes < row_len
                    offs = row_start + col + lanes
                    # re-read from cache: exact when the value is float32/64 or a master; a
                    # low-precision param without master is rounded twice (written, then rescaled)
                    if HAS_MASTER:
                        w = tl.load(master_ptr + offs, mask=mask, other=0).to(ACC)
                    else:
                        w = tl.load(param_ptr + offs, mask=mask, other=0).to(ACC)
                    _store_value(param_ptr, master_ptr, offs, w * scale, mask, HAS_MASTER, True)
            tl.debug_barrier()  # the next row starts after this row's rescale


@triton.jit
def _optimizer_step_kernel(
    table_ptr,  # int64 [tensors, TABLE_WIDTH]: pointers, numel, row length
    items_ptr,  # int64 [programs, ITEM_WIDTH]: (tensor index, first element, elements or rows)
    grads_ptr,  # int64 [tensors]: the grads' data pointers
    grad_scale_ptr,  # float32 [1]: GradScaler's scale (HAS_GRAD_SCALE), else unused
    found_inf_ptr,  # float32 [1]: != 0 skips the step (HAS_FOUND_INF), else unused
    lr: tl.float64,
    weight_decay: tl.float64,
    l1_threshold: tl.float64,  # lr * l1
    max_norm: tl.float64,
    momentum: tl.float64,  # SGD
    one_minus_dampening: tl.float64,  # SGD
    one_minus_beta1: tl.float64,  # Adam
    beta2: tl.float64,  # Adam
    one_minus_beta2: tl.float64,  # Adam
    log_beta1: tl.float64,  # Adam: log(beta1) (-inf for 0), for 1 - beta1^step
    log_beta2: tl.float64,  # Adam
    eps: tl.float64,  # Adam
    decay_factor: tl.float64,  # AdamW: 1 - lr * weight_decay
    PARAM_DTYPE: tl.constexpr, VALUE_DTYPE: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    IS_ADAM: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, AMSGRAD: tl.constexpr, HAS_L1: tl.constexpr,
    PROJECT_ROWS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:  # a step with inf/NaN gradients changes nothing
        if tl.load(found_inf_ptr) == 0:
            _step_program(table_ptr, items_ptr, grads_ptr, grad_scale_ptr, lr, weight_decay, l1_threshold, max_norm,
                          momentum, one_minus_dampening, one_minus_beta1, beta2, one_minus_beta2, log_beta1,
                          log_beta2, eps, decay_factor, PARAM_DTYPE, VALUE_DTYPE, ACC, FP64, IS_ADAM, HAS_MASTER,
                          HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, HAS_MOMENTUM, NESTEROV, FIRST_STEP,
                          AMSGRAD, HAS_L1, PROJECT_ROWS, ALIGNED, BLOCK)
    else:
        _step_program(table_ptr, items_ptr, grads_ptr, grad_scale_ptr, lr, weight_decay, l1_threshold, max_norm,
                      momentum, one_minus_dampening, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2,
                      eps, decay_factor, PARAM_DTYPE, VALUE_DTYPE, ACC, FP64, IS_ADAM, HAS_MASTER, HAS_GRAD_SCALE,
                      MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, HAS_MOMENTUM, NESTEROV, FIRST_STEP, AMSGRAD, HAS_L1,
                      PROJECT_ROWS, ALIGNED, BLOCK)


@triton.jit
def _increment_steps_kernel(
    steps_ptr,  # int64 [count]: data pointers of float32 scalars
    count,  # int
    found_inf_ptr,  # float32 [1]: != 0 leaves the counts (HAS_FOUND_INF), else unused
    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if HAS_FOUND_INF:  # a skipped step is not counted
        count = tl.where(tl.load(found_inf_ptr) == 0, count, 0)
    mask = offs < count
    pointers = tl.load(steps_ptr + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(pointers, tl.load(pointers, mask=mask) + 1.0, mask=mask)


# ------------------------------------------------------------------------- launchers


def _check_list(name, tensors, params, dtype_of, required):
    if not tensors:
        if required:
            raise ValueError(f"{name} is empty but {len(params)} params were given")
        return
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors, params {len(params)}")
    for i, (tensor, param) in enumerate(zip(tensors, params)):
        if tensor.device != param.device:
            raise ValueError(f"{name}[{i}] is on {tensor.device}, params[{i}] on {param.device}")
        if tensor.shape != param.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(tensor.shape)}, params[{i}] {tuple(param.shape)}")
        expected = dtype_of(i)
        if tensor.dtype != expected:
            raise ValueError(f"{name}[{i}] is {tensor.dtype}, expected {expected}")


def _check_scalars(name, tensors, device):
    for i, t in enumerate(tensors):
        if t is not None and (t.device != device or t.dtype != torch.float32 or t.numel() != 1):
            raise ValueError(f"{name if len(tensors) == 1 else f'{name}[{i}]'} must be a float32 scalar on {device}, "
                             f"got {t.dtype} on {t.device} with {t.numel()} elements")


def _check_args(params, grads, states, masters, steps):
    """states: (name, tensors, required) in the kernel's state-slot order; steps: None (SGD) or a list."""
    device = params[0].device
    for i, param in enumerate(params):
        if param.device != device:
            raise ValueError(f"params[{i}] is on {param.device}, params[0] on {device}: one device per call")
        if param.dtype not in _TL_DTYPE:
            raise ValueError(f"params[{i}] is {param.dtype}; supported: float32, float64, bfloat16, float16")
    _check_list("masters", masters, params, lambda i: torch.float32, required=False)

    def value_dtype(i):
        return masters[i].dtype if masters else params[i].dtype

    _check_list("grads", grads, params, lambda i: params[i].dtype, required=True)
    for name, tensors, required in states:
        _check_list(name, tensors, params, value_dtype, required)
    if steps is not None:
        if len(steps) != len(params):
            raise ValueError(f"steps has {len(steps)} tensors, params {len(params)}")
        _check_scalars("steps", steps, device)


def _contiguous_stand_ins(lists, written):
    """The lists with every non-contiguous tensor replaced by a contiguous copy (the kernel
    walks a tensor as numel consecutive elements), and the (original, copy) pairs of the
    lists the step writes (`written`, one flag per list), to copy back afterwards."""
    if all(t.is_contiguous() for tensors in lists for t in tensors):
        return lists, []
    stand_ins, pairs = [], []
    for tensors, is_written in zip(lists, written):
        stand_ins.append([t.contiguous() for t in tensors])
        pairs += [(t, copy) for t, copy in zip(tensors, stand_ins[-1]) if is_written and copy is not t]
    return stand_ins, pairs


def _items(numels, row_lens, project_rows):
    """Work items (tensor index, first element, count) for tensors of these sizes, as int64 [n, 3].

    Elementwise: one item per BLOCK_SIZE elements (count: its elements). Projected rows: one
    item per group of whole rows of about BLOCK_SIZE elements (count: its rows).
    """
    numels = torch.tensor(numels, dtype=torch.int64)
    row_lens = torch.tensor(row_lens, dtype=torch.int64)
    if project_rows:
        units = numels // row_lens  # rows
        per_item = torch.clamp(BLOCK_SIZE // row_lens, min=1)
    else:
        units = numels  # elements
        per_item = torch.full_like(numels, BLOCK_SIZE)
    item_counts = (units + per_item - 1) // per_item
    tensor_index = torch.repeat_interleave(torch.arange(len(numels)), item_counts)
    first_item = torch.cumsum(item_counts, 0) - item_counts
    first_unit = (torch.arange(len(tensor_index)) - first_item[tensor_index]) * per_item[tensor_index]
    count = torch.minimum(per_item[tensor_index], units[tensor_index] - first_unit)
    first_element = first_unit * row_lens[tensor_index] if project_rows else first_unit
    return torch.stack([tensor_index, first_element, count], dim=1)


class _Plan:
    """The device buffers of one set of tensors: per launch (param dtype, value dtype,
    projected, table, items, item count, grads view, aligned), the step counts' pointers,
    and the grads' pointers last copied."""

    __slots__ = ("buffer", "host_buffer", "launches", "steps", "step_count", "grad_order", "grad_ptrs",
                 "grad_buffers", "aligned", "captured", "device")

    def __init__(self, device):
        self.device, self.captured, self.grad_ptrs, self.grad_buffers = device, False, None, []

    def set_grads(self, grad_ptrs):
        """The grads' pointers to the device (one small copy), when they moved since the last step."""
        ordered = [grad_ptrs[i] for i in self.grad_order]
        host = torch.tensor(ordered, dtype=torch.int64)
        if self.device.type == "cpu":
            buffer = host
        else:
            host = host.pin_memory()
            buffer = host.to(self.device, non_blocking=True)
        # a CUDA graph captured over the old buffers reads them again at each replay
        self.grad_buffers = (self.grad_buffers if self.captured else []) + [(host, buffer)]
        launches, offset = [], 0
        for param_dtype, value_dtype, projected, table, items, item_count, _, static_aligned, count in self.launches:
            grads = buffer[offset:offset + count]
            aligned = static_aligned and all(p % ALIGN_BYTES == 0 for p in ordered[offset:offset + count])
            launches.append((param_dtype, value_dtype, projected, table, items, item_count, grads, aligned, count))
            offset += count
        self.launches, self.grad_ptrs = launches, grad_ptrs


_PLANS = collections.OrderedDict()  # key -> _Plan, least recently used first


def _build_plan(params, state_lists, masters, steps, project):
    """Groups the tensors by (param dtype, value dtype) and by projection and packs pointer
    tables, work items and step pointers into one buffer, copied to the device once."""
    device = params[0].device
    plan = _Plan(device)
    groups = {}
    for i, param in enumerate(params):
        if param.numel() == 0:
            continue
        value_dtype = masters[i].dtype if masters else param.dtype
        projected = project and param.dim() >= 2
        groups.setdefault((param.dtype, value_dtype, projected), []).append(i)

    def pointer(tensors, i):
        return tensors[i].data_ptr() if tensors else 0

    pieces, launches, offset = [], [], 0
    plan.grad_order = []
    for (param_dtype, value_dtype, projected), indices in groups.items():
        rows = []
        for i in indices:
            pointers = [params[i].data_ptr()] + [pointer(states, i) for states in state_lists]
            pointers += [pointer(masters, i), pointer(steps, i)]
            row_len = params[i].numel() // params[i].shape[0] if projected else 1
            rows.append(pointers + [params[i].numel(), row_len])
        table = torch.tensor(rows, dtype=torch.int64)
        aligned = not projected and bool((table[:, :5] % ALIGN_BYTES == 0).all())
        items = _items(table[:, 6].tolist(), table[:, 7].tolist(), projected)
        launches.append((param_dtype, value_dtype, projected, offset, table.numel(), len(items), aligned,
                         len(indices)))
        plan.grad_order += indices
        pieces += [table.flatten(), items.flatten()]
        offset += table.numel() + items.numel()
    step_offset = offset
    if steps:
        pieces.append(torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64))
    host = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    if device.type == "cpu":
        buffer = host
    else:  # kept with the plan: a copy captured in a CUDA graph reads it again at each replay
        host = host.pin_memory()
        buffer = host.to(device, non_blocking=True)
    plan.buffer, plan.host_buffer = buffer, host
    plan.launches = [(pd, vd, pr, buffer[o:o + n], buffer[o + n:o + n + 3 * k], k, None, al, count)
                     for pd, vd, pr, o, n, k, al, count in launches]
    plan.steps, plan.step_count = buffer[step_offset:step_offset + len(steps or [])], len(steps or [])
    return plan


def _plan(params, grads, state_lists, state_names, masters, steps, project):
    """The plan of these tensors: cached while their addresses, shapes and dtypes stay (a
    dict lookup per step), the grads' pointers refreshed when they moved; built, after
    checking the arguments, when anything else changes."""
    flat = list(params)
    for states in state_lists:
        flat += states
    flat += masters
    if steps is not None:
        flat += steps
    states_spec = list(zip(state_names, state_lists, state_names.required))
    key = (params[0].device, project, tuple(map(len, state_lists)), len(masters), len(grads),
           tuple(map(torch.Tensor.data_ptr, flat)), tuple(map(attrgetter("shape"), flat)),
           tuple(map(attrgetter("dtype"), flat)), tuple(map(attrgetter("shape"), grads)),
           tuple(map(attrgetter("dtype"), grads)), tuple(map(attrgetter("device"), grads)))
    plan = _PLANS.get(key)
    if plan is None:
        _check_args(params, grads, states_spec, masters, steps)
        plan = _PLANS[key] = _build_plan(params, state_lists, masters, steps, project)
        # evict the least recently used plan, unless a CUDA graph captured it
        for old_key in list(_PLANS)[:max(0, len(_PLANS) - PLAN_CACHE_SIZE)]:
            if not _PLANS[old_key].captured:
                del _PLANS[old_key]
    else:
        _PLANS.move_to_end(key)
    if params[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        plan.captured = True
    grad_ptrs = tuple(map(torch.Tensor.data_ptr, grads))
    if grad_ptrs != plan.grad_ptrs:
        plan.set_grads(grad_ptrs)
    return plan


class _StateNames(tuple):
    """The kernel's state slots' names, with which of them must be given."""

    def __new__(cls, names, required):
        self = super().__new__(cls, names)
        self.required = required
        return self


def _launch(plan, scalars, flags, grad_scale, found_inf, masters):
    """The step count increment (Adam), then one launch per group of the plan."""
    has_scale, has_inf = grad_scale is not None, found_inf is not None
    if plan.step_count:
        _increment_steps_kernel[(triton.cdiv(plan.step_count, STEPS_BLOCK_SIZE),)](
            plan.steps, plan.step_count, found_inf, HAS_FOUND_INF=has_inf, BLOCK=STEPS_BLOCK_SIZE)
    for param_dtype, value_dtype, projected, table, items, item_count, grads, aligned, _ in plan.launches:
        _optimizer_step_kernel[(item_count,)](
            table, items, grads, grad_scale, found_inf, *map(float, scalars),
            PARAM_DTYPE=_TL_DTYPE[param_dtype], VALUE_DTYPE=_TL_DTYPE[value_dtype],
            ACC=tl.float64 if value_dtype == torch.float64 else tl.float32, FP64=value_dtype == torch.float64,
            HAS_MASTER=bool(masters), HAS_GRAD_SCALE=has_scale, HAS_FOUND_INF=has_inf, PROJECT_ROWS=projected,
            ALIGNED=aligned, BLOCK=ROW_BLOCK_SIZE if projected else BLOCK_SIZE, num_warps=NUM_WARPS, **flags,
        )


def _check_amp(grad_scale, found_inf, device):
    _check_scalars("grad_scale", [grad_scale], device)
    _check_scalars("found_inf", [found_inf], device)


def _log(beta):
    return math.log(beta) if beta > 0 else -math.inf


def sgd_step_(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1, max_norm,
              nesterov, maximize, first_step, grad_scale=None, found_inf=None):
    """torch.optim.SGD's step over lists of tensors, in place, plus an L1 proximal step and max-norm rows.

    params: list of tensors (float32, float64, bfloat16 or float16), any shapes and strides
    (non-contiguous ones are stepped through contiguous copies, written back), one device; grads: the params' shapes and dtypes; momentum_buffers: one per param in the
    value's dtype, or empty when momentum == 0; masters: empty, or one float32 tensor per
    param, updated in place of the param (the param then receives it rounded).
    grad_scale, found_inf: None or float32 scalars on the params' device (GradScaler's),
    read by the kernel: found_inf != 0 leaves everything as it was.
    g = grad / grad_scale (negated if maximize) + weight_decay * w; buf = g on first_step,
    else momentum * buf + (1 - dampening) * g; w -= lr * (nesterov ? g + momentum * buf : buf);
    then w = sign(w) * max(|w| - lr * l1, 0) if l1 > 0, and rows (dim 0) of tensors of >= 2
    dims rescaled to norm max_norm where above it if max_norm > 0.
    """
    if not params:
        return
    (params, grads, momentum_buffers, masters), write_back = _contiguous_stand_ins(
        [params, grads, momentum_buffers, masters], (True, False, True, True))
    buffers = momentum_buffers if momentum != 0 else []
    plan = _plan(params, grads, [buffers, [], []], _SGD_STATES if momentum != 0 else _SGD_STATES_NO_MOMENTUM,
                 masters, None, max_norm > 0)
    _check_amp(grad_scale, found_inf, params[0].device)
    scalars = (lr, weight_decay, lr * l1, max_norm, momentum, 1 - dampening, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    flags = dict(IS_ADAM=False, MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=False,
                 HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, FIRST_STEP=first_step, AMSGRAD=False,
                 HAS_L1=l1 > 0)
    _launch(plan, scalars, flags, grad_scale, found_inf, masters)
    for original, copy in write_back:
        original.copy_(copy)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, beta1, beta2, eps,
               weight_decay, decoupled, l1, max_norm, maximize, grad_scale=None, found_inf=None):
    """torch.optim.Adam / AdamW's step over lists of tensors, in place, plus L1 and max-norm rows.

    params, grads, masters, grad_scale, found_inf: as in sgd_step_; exp_avgs, exp_avg_sqs:
    one per param in the value's dtype; max_exp_avg_sqs: likewise for amsgrad, or empty;
    steps: one float32 scalar per param on the params' device (torch's state["step"]),
    incremented here (unless found_inf != 0). bias_correction1/2 = 1 - beta1/2 ** step of
    the new count, in float64 on the device. decoupled: AdamW's w *= 1 - lr * weight_decay,
    else weight_decay * w is added to g.
    m += (1 - beta1) * (g - m); v = beta2 * v + (1 - beta2) * g * g (v = max(v_max, v) for
    amsgrad); w -= lr / bias_correction1 * m / (sqrt(v) / sqrt(bias_correction2) + eps);
    then the L1 and max-norm steps of sgd_step_.
    """
    if not params:
        return
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters), write_back = _contiguous_stand_ins(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters], (True, False, True, True, True, True))
    plan = _plan(params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs], _ADAM_STATES, masters, steps,
                 max_norm > 0)
    _check_amp(grad_scale, found_inf, params[0].device)
    scalars = (lr, weight_decay, lr * l1, max_norm, 0.0, 0.0, 1 - beta1, beta2, 1 - beta2, _log(beta1), _log(beta2),
               eps, 1 - lr * weight_decay)
    flags = dict(IS_ADAM=True, MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled,
                 HAS_MOMENTUM=False, NESTEROV=False, FIRST_STEP=False, AMSGRAD=bool(max_exp_avg_sqs),
                 HAS_L1=l1 > 0)
    _launch(plan, scalars, flags, grad_scale, found_inf, masters)
    for original, copy in write_back:
        original.copy_(copy)


_SGD_STATES = _StateNames(("momentum_buffers", "unused", "unused"), (True, False, False))
_SGD_STATES_NO_MOMENTUM = _StateNames(("momentum_buffers", "unused", "unused"), (False, False, False))
_ADAM_STATES = _StateNames(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), (True, True, False))
