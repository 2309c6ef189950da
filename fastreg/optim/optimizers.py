"""SGD, Adam and AdamW on fastreg's multi-tensor step ops.

Each class subclasses its torch.optim counterpart and overrides `step` only, so the
constructor, defaults, validation, param-group handling, hooks and state layout are
torch's: state_dicts load both ways. Per group, fastreg adds
    l1=0.0             proximal L1 step after the update: w = sign(w) * max(|w| - lr * l1, 0)
    max_norm=None      rows (dim 0) of >= 2-D params rescaled to norm <= max_norm after the update
    master_weights=False  bfloat16/float16 params are updated through a float32 copy
                       (state["master_param"]); their optimizer states are float32 too
`step` buckets the params with grads by (device, dtype, master dtype) and makes one op call
per bucket. The step counts live on the params' device (as torch's fused and capturable
optimizers keep them) and the ops increment them and read GradScaler's scale and inf flag
there: a step reads nothing back to the host, so `capturable=True` needs nothing more.
DTensor params (FSDP2, tensor parallelism) are stepped on their local shards
(fastreg/optim/_distributed.py).
"""

import itertools

import torch

from fastreg import _backend
from fastreg.ops.optim import ADAM_STEP, SGD_STEP
from fastreg.optim import _distributed

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64) + _LOW_PRECISION
_OPTION_DEFAULTS = {"l1": 0.0, "max_norm": None, "master_weights": False}
# State entries that have the dtype of the value updated (float32 when there are masters).
_VALUE_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "master_param")


def _check_fastreg_options(l1, max_norm):
    if not 0.0 <= l1:
        raise ValueError(f"Invalid l1 value: {l1}")
    if max_norm is not None and not 0.0 <= max_norm:
        raise ValueError(f"Invalid max_norm value: {max_norm}")


def _match_state_dtypes(state, dtype):
    """The optimizer states of one param (not its step) cast to the dtype of the value updated."""
    for key in _VALUE_STATE_KEYS[:-1]:
        if torch.is_tensor(state.get(key)) and state[key].dtype != dtype:
            state[key] = state[key].to(dtype)


def _contiguous_lists(*lists):
    """The lists with non-contiguous tensors replaced by contiguous copies, and the
    (original, copy) pairs to write back after an in-place op (the kernels need
    contiguous tensors; params and states normally are)."""
    if all(map(torch.Tensor.is_contiguous, itertools.chain.from_iterable(lists))):  # the common case, in C
        return lists, []
    pairs, out = [], []
    for tensors in lists:
        replaced = []
        for t in tensors:
            if t.is_contiguous():
                replaced.append(t)
            else:
                copy = t.contiguous()
                pairs.append((t, copy))
                replaced.append(copy)
        out.append(replaced)
    return out, pairs


def _projected_max_norm(group):
    """The max_norm the kernels apply: none with lr == 0, so that a step with lr = 0 changes no
    weight (torch.distributed.checkpoint creates optimizer states with such a step)."""
    return float(group["max_norm"] or 0.0) if float(group["lr"]) != 0 else 0.0


class _AmpScaling:
    """GradScaler's `grad_scale` and `found_inf` of this step (it sets them on the optimizer
    instead of unscaling the grads itself, torch/amp/grad_scaler.py), as float32 scalars on
    each device that needs them (moved without waiting, as torch's fused optimizers do)."""

    def __init__(self, optimizer):
        self.grad_scale = getattr(optimizer, "grad_scale", None)
        self.found_inf = getattr(optimizer, "found_inf", None)
        self._on_device = {}

    def on(self, device):
        if self.grad_scale is None and self.found_inf is None:
            return None, None
        pair = self._on_device.get(device)
        if pair is None:
            # a copy to the CPU waits: the CPU kernel reads the values as soon as it runs
            pair = self._on_device[device] = tuple(
                None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu")
                for t in (self.grad_scale, self.found_inf))
        return pair


class _Bucket:
    """The lists of one op call: local tensors of one (device, dtype, value dtype)."""

    __slots__ = ("device", "first_step", "params", "grads", "states", "masters", "steps")

    def __init__(self, device, first_step, state_lists):
        self.device, self.first_step = device, first_step
        self.params, self.grads, self.masters, self.steps = [], [], [], []
        self.states = tuple([] for _ in range(state_lists))


class _FastregStep:
    """What the three optimizers share: fastreg's group options, AMP scaling, DTensors, state fix-ups."""

    # GradScaler then sets `grad_scale` and `found_inf` on the optimizer instead of
    # unscaling the grads itself: the kernels multiply by 1 / grad_scale and skip the step
    # where found_inf != 0, reading both on the device.
    _step_supports_amp_scaling = True

    def _init_fastreg(self, l1, max_norm, master_weights, differentiable):
        if differentiable:
            raise RuntimeError(f"fastreg.optim.{type(self).__name__} does not support differentiable=True")
        _check_fastreg_options(l1, max_norm)
        # read by add_param_group, which torch's __init__ calls before it returns
        self._fastreg_defaults = {"l1": l1, "max_norm": max_norm, "master_weights": master_weights}

    def add_param_group(self, param_group):
        for key, value in self._fastreg_defaults.items():
            param_group.setdefault(key, value)
        _check_fastreg_options(param_group["l1"], param_group["max_norm"])
        if param_group.get("differentiable"):
            raise RuntimeError(f"fastreg.optim.{type(self).__name__} does not support differentiable=True")
        super().add_param_group(param_group)
        self.defaults.update(self._fastreg_defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        # unpickling skips __init__: the defaults hold fastreg's options too
        self._fastreg_defaults = {key: self.defaults.get(key, value) for key, value in _OPTION_DEFAULTS.items()}
        for group in self.param_groups:
            for key, value in self._fastreg_defaults.items():
                group.setdefault(key, value)  # a torch optimizer's state_dict lacks them
        for param, p_state in self.state.items():
            step = p_state.get("step")
            # torch's default keeps `step` on the CPU, its fused and capturable optimizers on
            # the param's device; the kernels read it on the param's device
            if torch.is_tensor(step) and (step.device != param.device or step.dtype != torch.float32):
                p_state["step"] = step.to(param.device, torch.float32)

    def state_dict(self):
        """torch's state_dict; fastreg's group options only where they do something (l1 > 0,
        a max_norm, master_weights), so an optimizer without them saves exactly what its
        torch.optim class saves (torch.distributed.checkpoint then loads either into the other)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key, inactive in _OPTION_DEFAULTS.items():
                if key in group and group[key] == inactive:
                    del group[key]
        return state_dict

    def load_state_dict(self, state_dict):
        # fastreg options a saved group does not state keep this optimizer's values for it
        if len(state_dict["param_groups"]) == len(self.param_groups):  # else torch's error
            options = [{key: group[key] for key in _OPTION_DEFAULTS} for group in self.param_groups]
            state_dict = dict(state_dict)
            state_dict["param_groups"] = [{**own, **saved} for own, saved in zip(options, state_dict["param_groups"])]
        # torch casts every floating state entry to its param's dtype; float32 masters and
        # the float32 states of low-precision params must stay float32.
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in saved_groups)
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        groups = itertools.chain.from_iterable([g] * len(g["params"]) for g in self.param_groups)
        for saved_id, p, group in zip(saved_ids, params, groups):
            for key, value in saved_state.get(saved_id, {}).items():
                if key in _VALUE_STATE_KEYS and torch.is_tensor(value) and value.dtype == torch.float32:
                    if p.dtype in _LOW_PRECISION:
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            if p in self.state:  # states of the dtype the next step updates in
                state = self.state[p]
                masters = group["master_weights"] and p.dtype in _LOW_PRECISION and "master_param" in state
                _match_state_dtypes(state, torch.float32 if masters else p.dtype)

    def _params_with_grads(self, group):
        name = type(self).__name__
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                if name in ("Adam", "AdamW"):
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                raise RuntimeError(f"fastreg.optim.{name} does not support sparse gradients")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise RuntimeError(f"fastreg.optim.{name} supports float32, float64, bfloat16 and float16 params, "
                                   f"got {p.dtype}")
            yield p, grad if grad.dtype == p.dtype else grad.to(p.dtype)

    def _value(self, p, group):
        """The tensor the step updates for p: its float32 master, or p. Creating or dropping
        a master (master_weights switched on or off, or a state_dict saved the other way)
        brings the states to the new value's dtype; nothing else changes their dtype, so
        the common step checks nothing per state."""
        if group["master_weights"] and p.dtype in _LOW_PRECISION:
            state = self.state[p]
            master = state.get("master_param")
            if master is None:
                master = state["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
                _match_state_dtypes(state, torch.float32)
            return master
        state = self.state.get(p)  # no entry for momentum-free SGD, as in torch
        if state and "master_param" in state:
            del state["master_param"]
            _match_state_dtypes(state, p.dtype)
        return p

    def _step_group(self, group, amp, dtensor, entries, call):
        """Buckets `entries` ((p, grad, value, states, step count or SGD's first-step flag) per
        param with a grad) by (device, dtype, value dtype, first step) on local tensors and
        calls `call(bucket, max_norm, grad_scale, found_inf)` once per bucket. DTensor params
        whose rows are split across ranks go to buckets of their own, stepped without the
        projection, which SplitRows applies after."""
        max_norm = _projected_max_norm(group)
        buckets = {}
        split_rows = None
        for p, grad, value, states, step in entries:
            split_dims = ()
            has_master = value is not p
            if dtensor is not None and isinstance(p, dtensor):
                if max_norm > 0:
                    split_dims = _distributed.row_splitting_mesh_dims(p)
                grad = _distributed.local_grad(p, grad)
                mesh = p.device_mesh
                states = [s.to_local() for s in states]
                p, value = p.to_local(), value.to_local()
                if split_dims:
                    if split_rows is None:
                        split_rows = _distributed.SplitRows()
                    split_rows.add(value, p if has_master else None, mesh, split_dims)
            first_step = step is True
            key = (p.device, p.dtype, value.dtype, first_step, bool(split_dims))
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket(p.device, first_step, len(states))
            bucket.params.append(p)
            bucket.grads.append(grad)
            for state_list, state in zip(bucket.states, states):
                state_list.append(state)
            if has_master:
                bucket.masters.append(value)
            if torch.is_tensor(step):
                bucket.steps.append(step)
        for (device, _, _, _, split), bucket in buckets.items():
            grad_scale, found_inf = amp.on(device)
            call(bucket, 0.0 if split else max_norm, grad_scale, found_inf)
        if split_rows is not None:
            split_rows.project(max_norm, amp.on(next(iter(buckets.values())).device)[1])


def _run(op, *lists_then_scalars, n_lists):
    """op over the bucket's lists made contiguous (copies written back after)."""
    lists, pairs = _contiguous_lists(*lists_then_scalars[:n_lists])
    op(*lists, *lists_then_scalars[n_lists:])
    for original, copy in pairs:
        original.copy_(copy)


class SGD(_FastregStep, torch.optim.SGD):
    """torch.optim.SGD on fastreg's sgd_step_ op, plus per-group l1, max_norm, master_weights."""

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None, l1=0.0, max_norm=None, master_weights=False):
        self._init_fastreg(l1, max_norm, master_weights, differentiable)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpScaling(self)
        dtensor = _distributed.dtensor_type()
        for group in self.param_groups:
            momentum = group["momentum"]
            entries, new_buffers = [], []
            for p, grad in self._params_with_grads(group):
                value = self._value(p, group)
                first_step, states = False, ()
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        first_step = True
                        if amp.found_inf is None:
                            buf = torch.empty_like(value, memory_format=torch.contiguous_format)
                        else:
                            # the step may be skipped on the device, leaving the buffer as it
                            # is: zeros, and the step a later one's, momentum * 0 + (1 - 0) * g
                            # == g exactly (dampening = 0; otherwise see below)
                            buf = torch.zeros_like(value, memory_format=torch.contiguous_format)
                            first_step = False
                            new_buffers.append(p)
                        state["momentum_buffer"] = buf
                    states = (buf,)
                entries.append((p, grad, value, states, first_step))
            if not entries:
                continue
            if new_buffers and group["dampening"] != 0 and amp.found_inf.item() != 0:
                # with dampening a first step differs from a later one: the flag is read on
                # the host (these first steps only); a skipped step creates no buffer
                for p in new_buffers:
                    del self.state[p]["momentum_buffer"]
                continue
            op = SGD_STEP[_backend.choose_backend(entries[0][0].device.type)]
            lr, dampening, weight_decay = float(group["lr"]), float(group["dampening"]), float(group["weight_decay"])
            l1, nesterov, maximize = float(group["l1"]), bool(group["nesterov"]), bool(group["maximize"])
            if new_buffers and dampening != 0:  # the flag was 0: these are first steps after all
                new_ids = set(map(id, new_buffers))
                entries = [(p, g, v, s, first or id(p) in new_ids) for p, g, v, s, first in entries]

            def call(bucket, max_norm, grad_scale, found_inf):
                buffers = bucket.states[0] if momentum != 0 else []
                _run(op, bucket.params, bucket.grads, buffers, bucket.masters, lr, float(momentum), dampening,
                     weight_decay, l1, max_norm, nesterov, maximize, bucket.first_step, grad_scale, found_inf,
                     n_lists=4)

            self._step_group(group, amp, dtensor, entries, call)
        return loss


class _AdamStep(_FastregStep):
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpScaling(self)
        dtensor = _distributed.dtensor_type()
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            entries = []
            for p, grad in self._params_with_grads(group):
                value = self._value(p, group)
                state = self.state[p]
                step = state.get("step")
                if step is None:
                    step = state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(value, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(value, memory_format=torch.preserve_format)
                if amsgrad:
                    if "max_exp_avg_sq" not in state:
                        state["max_exp_avg_sq"] = torch.zeros_like(value, memory_format=torch.preserve_format)
                    states = (state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"])
                else:
                    states = (state["exp_avg"], state["exp_avg_sq"])
                entries.append((p, grad, value, states, step))
            if not entries:
                continue
            op = ADAM_STEP[_backend.choose_backend(entries[0][0].device.type)]
            beta1, beta2 = (float(b) for b in group["betas"])
            lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            decoupled, l1, maximize = bool(group["decoupled_weight_decay"]), float(group["l1"]), bool(group["maximize"])

            def call(bucket, max_norm, grad_scale, found_inf):
                maxes = bucket.states[2] if amsgrad else []
                _run(op, bucket.params, bucket.grads, bucket.states[0], bucket.states[1], maxes,
                     bucket.masters, bucket.steps, lr, beta1, beta2, eps, weight_decay, decoupled, l1, max_norm,
                     maximize, grad_scale, found_inf, n_lists=7)

            self._step_group(group, amp, dtensor, entries, call)
        return loss


class Adam(_AdamStep, torch.optim.Adam):
    """torch.optim.Adam on fastreg's adam_step_ op, plus per-group l1, max_norm, master_weights."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, l1=0.0, max_norm=None, master_weights=False):
        self._init_fastreg(l1, max_norm, master_weights, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)


class AdamW(_AdamStep, torch.optim.AdamW):
    """torch.optim.AdamW on fastreg's adam_step_ op, plus per-group l1, max_norm, master_weights."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, l1=0.0,
                 max_norm=None, master_weights=False):
        self._init_fastreg(l1, max_norm, master_weights, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
