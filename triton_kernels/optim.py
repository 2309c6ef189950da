"""Multi-tensor optimizer steps in Triton: SGD (momentum, Nesterov) and Adam / AdamW, with a
proximal L1 step and a max-norm row projection in the same pass, updating in place.

Self-contained (imports only torch and triton): copy this file into your codebase to use it.

One launch covers every tensor of a (param dtype, value dtype) group, not one launch per
parameter. The launcher packs, in one int64 buffer copied to the device once per call:

    scalars   float64[16]           lr, inv_grad_scale, ... (computed on the host in float64)
    table     int64[tensors, 8]     data pointers of param, grad, state0..2, master; numel, row length
    items     int64[programs, 3]    (tensor index, first element, elements or rows): one per program

and the kernel casts the table's integers back to typed pointers
(`tl.load(table + i).to(tl.pointer_type(dtype))`). Under the Triton interpreter (CPU
tensors) this works unchanged: the interpreter hands CPU tensors to the kernel without
copying them, so the table's addresses are the tensors' real addresses.

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

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 4096  # elements per program of the elementwise launch
ROW_BLOCK_SIZE = 1024  # elements per step along a row of the max-norm launch
NUM_WARPS = 8
ALIGN_BYTES = 16  # every pointer of a group aligned to this: vector loads (hinted to the compiler)

TABLE_WIDTH = tl.constexpr(8)  # param, grad, state0, state1, state2, master, numel, row length
ITEM_WIDTH = tl.constexpr(3)  # tensor index, first element, elements (or rows when projecting)
NUM_SCALARS = 16

# scalar slots (float64, computed on the host the way the reference computes them)
_LR = tl.constexpr(0)
_INV_GRAD_SCALE = tl.constexpr(1)
_WEIGHT_DECAY = tl.constexpr(2)
_L1_THRESHOLD = tl.constexpr(3)
_MAX_NORM = tl.constexpr(4)
# SGD
_MOMENTUM = tl.constexpr(5)
_ONE_MINUS_DAMPENING = tl.constexpr(6)
# Adam
_ONE_MINUS_BETA1 = tl.constexpr(5)
_BETA2 = tl.constexpr(6)
_ONE_MINUS_BETA2 = tl.constexpr(7)
_EPS = tl.constexpr(8)
_STEP_SIZE = tl.constexpr(9)
_BC2_SQRT = tl.constexpr(10)
_DECAY_FACTOR = tl.constexpr(11)

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
def _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, scalars_ptr, offs, mask,
                   ACC: tl.constexpr, FP64: tl.constexpr, IS_ADAM: tl.constexpr, HAS_MASTER: tl.constexpr,
                   MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                   HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
                   AMSGRAD: tl.constexpr, HAS_L1: tl.constexpr, MASKED: tl.constexpr):
    """The block's new value (ACC dtype) after the step and the L1 proximal step; states stored.

    The order of operations is fastreg/_reference.py's. State 0 is SGD's momentum buffer or
    Adam's exp_avg; states 1 and 2 are Adam's exp_avg_sq and max_exp_avg_sq.
    """
    if HAS_MASTER:
        w = _load(master_ptr, offs, mask, MASKED).to(ACC)
    else:
        w = _load(param_ptr, offs, mask, MASKED).to(ACC)
    g = _load(grad_ptr, offs, mask, MASKED).to(ACC) * tl.load(scalars_ptr + _INV_GRAD_SCALE).to(ACC)
    if MAXIMIZE:
        g = -g
    lr = tl.load(scalars_ptr + _LR).to(ACC)
    if IS_ADAM:
        if HAS_WEIGHT_DECAY:
            if DECOUPLED:
                w = w * tl.load(scalars_ptr + _DECAY_FACTOR).to(ACC)
            else:
                g = g + tl.load(scalars_ptr + _WEIGHT_DECAY).to(ACC) * w
        m = _load(state0_ptr, offs, mask, MASKED).to(ACC)
        m = m + tl.load(scalars_ptr + _ONE_MINUS_BETA1).to(ACC) * (g - m)
        v = _load(state1_ptr, offs, mask, MASKED).to(ACC) * tl.load(scalars_ptr + _BETA2).to(ACC)
        v = v + tl.load(scalars_ptr + _ONE_MINUS_BETA2).to(ACC) * g * g
        _store(state0_ptr, offs, _cast(m, state0_ptr.dtype.element_ty), mask, MASKED)
        _store(state1_ptr, offs, _cast(v, state1_ptr.dtype.element_ty), mask, MASKED)
        if AMSGRAD:
            # NaN in either stays NaN, as torch.maximum
            v = tl.maximum(_load(state2_ptr, offs, mask, MASKED).to(ACC), v, propagate_nan=tl.PropagateNan.ALL)
            _store(state2_ptr, offs, _cast(v, state2_ptr.dtype.element_ty), mask, MASKED)
        denom = _div(_sqrt(v, FP64), tl.load(scalars_ptr + _BC2_SQRT).to(ACC), FP64)
        denom = denom + tl.load(scalars_ptr + _EPS).to(ACC)
        w = w - tl.load(scalars_ptr + _STEP_SIZE).to(ACC) * _div(m, denom, FP64)
    else:
        if HAS_WEIGHT_DECAY:
            g = g + tl.load(scalars_ptr + _WEIGHT_DECAY).to(ACC) * w
        if HAS_MOMENTUM:
            momentum = tl.load(scalars_ptr + _MOMENTUM).to(ACC)
            if FIRST_STEP:
                b = g
            else:
                b = _load(state0_ptr, offs, mask, MASKED).to(ACC) * momentum
                b = b + tl.load(scalars_ptr + _ONE_MINUS_DAMPENING).to(ACC) * g
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
        threshold = tl.load(scalars_ptr + _L1_THRESHOLD).to(ACC)
        w = tl.where(tl.abs(w) <= threshold, 0.0, w - tl.where(w > 0, threshold, -threshold))
    return w


@triton.jit
def _optimizer_step_kernel(table_ptr, items_ptr, scalars_ptr,
                           PARAM_DTYPE: tl.constexpr, VALUE_DTYPE: tl.constexpr, ACC: tl.constexpr,
                           FP64: tl.constexpr, IS_ADAM: tl.constexpr, HAS_MASTER: tl.constexpr,
                           MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                           HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
                           AMSGRAD: tl.constexpr, HAS_L1: tl.constexpr, PROJECT_ROWS: tl.constexpr,
                           ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    item = items_ptr + tl.program_id(0).to(tl.int64) * ITEM_WIDTH
    t = tl.load(item)
    start = tl.load(item + 1)
    count = tl.load(item + 2)  # elements of this block, or rows when PROJECT_ROWS
    row = table_ptr + t * TABLE_WIDTH
    param_ptr = tl.load(row + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    state0_ptr = tl.load(row + 2).to(tl.pointer_type(VALUE_DTYPE))
    state1_ptr = tl.load(row + 3).to(tl.pointer_type(VALUE_DTYPE))
    state2_ptr = tl.load(row + 4).to(tl.pointer_type(VALUE_DTYPE))
    master_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # the launcher checked every pointer of the group: lets the compiler vectorize
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        state0_ptr = tl.multiple_of(state0_ptr, 16)
        state1_ptr = tl.multiple_of(state1_ptr, 16)
        state2_ptr = tl.multiple_of(state2_ptr, 16)
        master_ptr = tl.multiple_of(master_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    lanes = tl.arange(0, BLOCK)

    if not PROJECT_ROWS:
        offs = start + lanes
        if count == BLOCK:  # full block: unmasked, vectorizable accesses
            w = _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, scalars_ptr,
                               offs, None, ACC, FP64, IS_ADAM, HAS_MASTER, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED,
                               HAS_MOMENTUM, NESTEROV, FIRST_STEP, AMSGRAD, HAS_L1, False)
            _store_value(param_ptr, master_ptr, offs, w, None, HAS_MASTER, False)
        else:  # the tensor's tail
            mask = lanes < count
            w = _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, scalars_ptr,
                               offs, mask, ACC, FP64, IS_ADAM, HAS_MASTER, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED,
                               HAS_MOMENTUM, NESTEROV, FIRST_STEP, AMSGRAD, HAS_L1, True)
            _store_value(param_ptr, master_ptr, offs, w, mask, HAS_MASTER, True)
    else:
        row_len = tl.load(row + 7)
        max_norm = tl.load(scalars_ptr + _MAX_NORM).to(ACC)
        for r in range(0, count):
            row_start = start + r * row_len
            squares = tl.zeros([BLOCK], dtype=ACC)
            for col in range(0, row_len, BLOCK):
                mask = col + lanes < row_len
                offs = row_start + col + lanes
                w = _updated_value(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr,
                                   scalars_ptr, offs, mask, ACC, FP64, IS_ADAM, HAS_MASTER, MAXIMIZE,
                                   HAS_WEIGHT_DECAY, DECOUPLED, HAS_MOMENTUM, NESTEROV, FIRST_STEP, AMSGRAD, HAS_L1,
                                   True)
                _store_value(param_ptr, master_ptr, offs, w, mask, HAS_MASTER, True)
                squares += tl.where(mask, w * w, 0.0)
            norm = _sqrt(tl.sum(squares, axis=0), FP64)
            if norm > max_norm:
                scale = _div(max_norm, norm, FP64)
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


def _check_args(params, grads, states, masters):
    """states: (name, tensors, required) in the kernel's state-slot order."""
    if not params:
        return
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


def _launch(params, grads, state_lists, masters, scalars, max_norm, flags):
    """Group the tensors by (param dtype, value dtype) and by projection, pack scalars, pointer
    tables and work items into one buffer (one host-to-device copy), launch once per group."""
    if not params:
        return
    device = params[0].device
    groups = {}
    for i, param in enumerate(params):
        if param.numel() == 0:
            continue
        value_dtype = masters[i].dtype if masters else param.dtype
        project = max_norm > 0 and param.dim() >= 2
        groups.setdefault((param.dtype, value_dtype, project), []).append(i)
    if not groups:
        return

    def pointer(tensors, i):
        return tensors[i].data_ptr() if tensors else 0

    pieces = [torch.tensor(scalars + [0.0] * (NUM_SCALARS - len(scalars)), dtype=torch.float64).view(torch.int64)]
    launches = []
    offset = NUM_SCALARS
    for (param_dtype, value_dtype, project), indices in groups.items():
        rows = []
        for i in indices:
            pointers = [params[i].data_ptr(), grads[i].data_ptr()]
            pointers += [pointer(states, i) for states in state_lists] + [pointer(masters, i)]
            row_len = params[i].numel() // params[i].shape[0] if project else 1
            rows.append(pointers + [params[i].numel(), row_len])
        table = torch.tensor(rows, dtype=torch.int64)
        aligned = not project and bool((table[:, :6] % ALIGN_BYTES == 0).all())
        items = _items(table[:, 6].tolist(), table[:, 7].tolist(), project)
        launches.append((param_dtype, value_dtype, project, aligned, offset, table.numel(), len(items)))
        pieces += [table.flatten(), items.flatten()]
        offset += table.numel() + items.numel()
    packed = torch.cat(pieces)
    if device.type != "cpu":
        packed = packed.pin_memory().to(device, non_blocking=True)
    scalars_dev = packed[:NUM_SCALARS].view(torch.float64)
    for param_dtype, value_dtype, project, aligned, table_offset, table_size, item_count in launches:
        table_dev = packed[table_offset:table_offset + table_size]
        items_dev = packed[table_offset + table_size:table_offset + table_size + 3 * item_count]
        torch.library.wrap_triton(_optimizer_step_kernel)[(item_count,)](
            table_dev, items_dev, scalars_dev,
            PARAM_DTYPE=_TL_DTYPE[param_dtype], VALUE_DTYPE=_TL_DTYPE[value_dtype],
            ACC=tl.float64 if value_dtype == torch.float64 else tl.float32, FP64=value_dtype == torch.float64,
            HAS_MASTER=bool(masters), PROJECT_ROWS=project, ALIGNED=aligned,
            BLOCK=ROW_BLOCK_SIZE if project else BLOCK_SIZE, num_warps=NUM_WARPS, **flags,
        )


def sgd_step_(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1, max_norm,
              nesterov, maximize, first_step, inv_grad_scale):
    """torch.optim.SGD's step over lists of tensors, in place, plus an L1 proximal step and max-norm rows.

    params: list of tensors (float32, float64, bfloat16 or float16), any shapes and strides
    (non-contiguous ones are stepped through contiguous copies, written back), one device; grads: the params' shapes and dtypes; momentum_buffers: one per param in the
    value's dtype, or empty when momentum == 0; masters: empty, or one float32 tensor per
    param, updated in place of the param (the param then receives it rounded).
    g = grad * inv_grad_scale (negated if maximize) + weight_decay * w; buf = g on first_step,
    else momentum * buf + (1 - dampening) * g; w -= lr * (nesterov ? g + momentum * buf : buf);
    then w = sign(w) * max(|w| - lr * l1, 0) if l1 > 0, and rows (dim 0) of tensors of >= 2
    dims rescaled to norm max_norm where above it if max_norm > 0.
    """
    (params, grads, momentum_buffers, masters), write_back = _contiguous_stand_ins(
        [params, grads, momentum_buffers, masters], (True, False, True, True))
    _check_args(params, grads, [("momentum_buffers", momentum_buffers, momentum != 0)], masters)
    scalars = [0.0] * NUM_SCALARS
    scalars[_LR], scalars[_INV_GRAD_SCALE], scalars[_WEIGHT_DECAY] = lr, inv_grad_scale, weight_decay
    scalars[_L1_THRESHOLD], scalars[_MAX_NORM] = lr * l1, max_norm
    scalars[_MOMENTUM], scalars[_ONE_MINUS_DAMPENING] = momentum, 1 - dampening
    flags = dict(IS_ADAM=False, MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=False,
                 HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, FIRST_STEP=first_step, AMSGRAD=False,
                 HAS_L1=l1 > 0)
    buffers = momentum_buffers if momentum != 0 else []
    _launch(params, grads, [buffers, [], []], masters, scalars, max_norm, flags)
    for original, copy in write_back:
        original.copy_(copy)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, beta1, beta2, eps,
               weight_decay, decoupled, l1, max_norm, maximize, bias_correction1, bias_correction2,
               inv_grad_scale):
    """torch.optim.Adam / AdamW's step over lists of tensors, in place, plus L1 and max-norm rows.

    params, grads, masters: as in sgd_step_; exp_avgs, exp_avg_sqs: one per param in the
    value's dtype; max_exp_avg_sqs: likewise for amsgrad, or empty. bias_correction1/2 are
    1 - beta1**step and 1 - beta2**step (the host's, so no step counter is read on the device).
    decoupled: AdamW's w *= 1 - lr * weight_decay, else weight_decay * w is added to g.
    m += (1 - beta1) * (g - m); v = beta2 * v + (1 - beta2) * g * g (v = max(v_max, v) for
    amsgrad); w -= lr / bias_correction1 * m / (sqrt(v) / sqrt(bias_correction2) + eps);
    then the L1 and max-norm steps of sgd_step_.
    """
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters), write_back = _contiguous_stand_ins(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters], (True, False, True, True, True, True))
    _check_args(params, grads, [("exp_avgs", exp_avgs, True), ("exp_avg_sqs", exp_avg_sqs, True),
                                ("max_exp_avg_sqs", max_exp_avg_sqs, False)], masters)
    scalars = [0.0] * NUM_SCALARS
    scalars[_LR], scalars[_INV_GRAD_SCALE], scalars[_WEIGHT_DECAY] = lr, inv_grad_scale, weight_decay
    scalars[_L1_THRESHOLD], scalars[_MAX_NORM] = lr * l1, max_norm
    scalars[_ONE_MINUS_BETA1], scalars[_BETA2], scalars[_ONE_MINUS_BETA2] = 1 - beta1, beta2, 1 - beta2
    scalars[_EPS], scalars[_STEP_SIZE] = eps, lr / bias_correction1
    scalars[_BC2_SQRT], scalars[_DECAY_FACTOR] = bias_correction2 ** 0.5, 1 - lr * weight_decay
    flags = dict(IS_ADAM=True, MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled,
                 HAS_MOMENTUM=False, NESTEROV=False, FIRST_STEP=False, AMSGRAD=bool(max_exp_avg_sqs),
                 HAS_L1=l1 > 0)
    _launch(params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs], masters, scalars, max_norm, flags)
    for original, copy in write_back:
        original.copy_(copy)
