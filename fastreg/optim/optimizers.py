"""SGD, Adam and AdamW on fastreg's multi-tensor step ops.

Each class subclasses its torch.optim counterpart and overrides `step` only, so the
constructor, defaults, validation, param-group handling, hooks and state layout are
torch's: state_dicts load both ways. Per group, fastreg adds
    l1=0.0             proximal L1 step after the update: w = sign(w) * max(|w| - lr * l1, 0)
    max_norm=None      rows (dim 0) of >= 2-D params rescaled to norm <= max_norm after the update
    master_weights=False  bfloat16/float16 params are updated through a float32 copy
                       (state["master_param"]); their optimizer states are float32 too
`step` buckets the params with grads by (device, dtype, master dtype, step count) and makes
one op call per bucket.
"""

import itertools

import torch

from fastreg import _backend
from fastreg.ops.optim import ADAM_STEP, SGD_STEP, add_to_steps_

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64) + _LOW_PRECISION
# State entries that have the dtype of the value updated (float32 when there are masters).
_OPTION_DEFAULTS = {"l1": 0.0, "max_norm": None, "master_weights": False}
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


class _FastregStep:
    """What the three optimizers share: fastreg's group options, AMP scaling, state fix-ups."""

    # GradScaler then sets `grad_scale` and `found_inf` on the optimizer instead of
    # unscaling the grads itself (torch/amp/grad_scaler.py): the kernel multiplies by
    # 1 / grad_scale, and a step with found_inf != 0 is skipped.
    _step_supports_amp_scaling = True

    def _init_fastreg(self, l1, max_norm, master_weights, capturable, differentiable):
        name = f"fastreg.optim.{type(self).__name__}"
        if capturable:
            raise RuntimeError(f"{name} does not support capturable=True (CUDA graph capture)")
        if differentiable:
            raise RuntimeError(f"{name} does not support differentiable=True")
        _check_fastreg_options(l1, max_norm)
        # read by add_param_group, which torch's __init__ calls before it returns
        self._fastreg_defaults = {"l1": l1, "max_norm": max_norm, "master_weights": master_weights}

    def add_param_group(self, param_group):
        for key, value in self._fastreg_defaults.items():
            param_group.setdefault(key, value)
        _check_fastreg_options(param_group["l1"], param_group["max_norm"])
        if param_group.get("capturable") or param_group.get("differentiable"):
            raise RuntimeError(f"fastreg.optim.{type(self).__name__} does not support capturable or differentiable")
        super().add_param_group(param_group)
        self.defaults.update(self._fastreg_defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        # unpickling skips __init__: the defaults hold fastreg's options too
        self._fastreg_defaults = {key: self.defaults.get(key, value) for key, value in _OPTION_DEFAULTS.items()}
        for group in self.param_groups:
            for key, value in self._fastreg_defaults.items():
                group.setdefault(key, value)  # a torch optimizer's state_dict lacks them
        for p_state in self.state.values():
            step = p_state.get("step")
            # torch's fused/capturable optimizers keep `step` on the param's device
            if torch.is_tensor(step) and (step.device.type != "cpu" or step.dtype != torch.float32):
                p_state["step"] = step.to("cpu", torch.float32)

    def load_state_dict(self, state_dict):
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

    def _begin_step(self, closure):
        """(the closure's loss, inv_grad_scale, whether GradScaler says to skip this step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return (loss, *self._amp_scaling())

    def _amp_scaling(self):
        """(inv_grad_scale, skip) from the attributes GradScaler sets for this step."""
        found_inf = getattr(self, "found_inf", None)
        # One host read per step (a sync on CUDA): the kernels take the scale as a float,
        # and a skipped step must not advance the step count.
        if found_inf is not None and found_inf.item() != 0:
            return 1.0, True
        grad_scale = getattr(self, "grad_scale", None)
        return (1.0 if grad_scale is None else 1.0 / grad_scale.item()), False

    def _params_with_grads(self, group):
        name = type(self).__name__
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                if name in ("Adam", "AdamW"):
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                raise RuntimeError(f"fastreg.optim.{name} does not support sparse gradients")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise RuntimeError(f"fastreg.optim.{name} supports float32, float64, bfloat16 and float16 params, "
                                   f"got {p.dtype}")
            yield p

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

    @staticmethod
    def _grad(p):
        return p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype)


class SGD(_FastregStep, torch.optim.SGD):
    """torch.optim.SGD on fastreg's sgd_step_ op, plus per-group l1, max_norm, master_weights."""

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None, l1=0.0, max_norm=None, master_weights=False):
        self._init_fastreg(l1, max_norm, master_weights, False, differentiable)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss, inv_grad_scale, skip = self._begin_step(closure)
        if skip:
            return loss
        for group in self.param_groups:
            momentum = group["momentum"]
            buckets = {}
            for p in self._params_with_grads(group):
                value = self._value(p, group)
                buf = self.state[p].get("momentum_buffer") if momentum != 0 else None
                first_step = momentum != 0 and buf is None
                if first_step:
                    buf = torch.empty_like(value, memory_format=torch.contiguous_format)
                    self.state[p]["momentum_buffer"] = buf
                key = (p.device, p.dtype, value.dtype, first_step)
                bucket = buckets.setdefault(key, ([], [], [], []))
                bucket[0].append(p)
                bucket[1].append(self._grad(p))
                if momentum != 0:
                    bucket[2].append(buf)
                if value is not p:
                    bucket[3].append(value)
            for (device, _, _, first_step), (params, grads, bufs, masters) in buckets.items():
                op = SGD_STEP[_backend.choose_backend(device.type)]
                lists, pairs = _contiguous_lists(params, grads, bufs, masters)
                op(*lists, float(group["lr"]), float(momentum), float(group["dampening"]),
                   float(group["weight_decay"]), float(group["l1"]), float(group["max_norm"] or 0.0),
                   bool(group["nesterov"]), bool(group["maximize"]), first_step, inv_grad_scale)
                for original, copy in pairs:
                    original.copy_(copy)
        return loss


class _AdamStep(_FastregStep):
    @torch.no_grad()
    def step(self, closure=None):
        loss, inv_grad_scale, skip = self._begin_step(closure)
        if skip:
            return loss
        for group in self.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            amsgrad = group["amsgrad"]
            buckets = {}
            for p in self._params_with_grads(group):
                value = self._value(p, group)
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(value, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(value, memory_format=torch.preserve_format)
                if amsgrad and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(value, memory_format=torch.preserve_format)
                step = state["step"]
                key = (p.device, p.dtype, value.dtype, step.item())
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = ([], [], [], [], [], [], [])
                params, grads, exp_avgs, exp_avg_sqs, maxes, values, steps = bucket
                params.append(p)
                grads.append(self._grad(p))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                maxes.append(state.get("max_exp_avg_sq"))
                values.append(value)
                steps.append(step)
            for (device, _, _, step), (params, grads, exp_avgs, exp_avg_sqs, maxes, values, steps) in buckets.items():
                step += 1
                masters = [v for v, p in zip(values, params) if v is not p]
                lists, pairs = _contiguous_lists(params, grads, exp_avgs, exp_avg_sqs,
                                                 maxes if amsgrad else [], masters)
                op = ADAM_STEP[_backend.choose_backend(device.type)]
                # bias corrections as torch.optim forms them, in double on the host
                op(*lists, float(group["lr"]), beta1, beta2, float(group["eps"]), float(group["weight_decay"]),
                   bool(group["decoupled_weight_decay"]), float(group["l1"]), float(group["max_norm"] or 0.0),
                   bool(group["maximize"]), 1 - beta1**step, 1 - beta2**step, inv_grad_scale)
                for original, copy in pairs:
                    original.copy_(copy)
                add_to_steps_(steps, 1.0)
        return loss


class Adam(_AdamStep, torch.optim.Adam):
    """torch.optim.Adam on fastreg's adam_step_ op, plus per-group l1, max_norm, master_weights."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, l1=0.0, max_norm=None, master_weights=False):
        self._init_fastreg(l1, max_norm, master_weights, capturable, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)


class AdamW(_AdamStep, torch.optim.AdamW):
    """torch.optim.AdamW on fastreg's adam_step_ op, plus per-group l1, max_norm, master_weights."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, l1=0.0,
                 max_norm=None, master_weights=False):
        self._init_fastreg(l1, max_norm, master_weights, capturable, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
