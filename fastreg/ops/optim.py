"""The optimizer steps' ops on the four backends: sgd_step_, adam_step_ (in place over
lists of tensors, no outputs, no autograd) and add_to_steps_ (the step counts)."""

import torch

from fastreg import _ext, _reference
from fastreg.ops._table import HAVE_TRITON, op_table, register_fake, register_triton


def _sgd_step_fake(params, grads, momentum_buffers, masters, lr, momentum, dampening, weight_decay, l1, max_norm,
                   nesterov, maximize, first_step, inv_grad_scale):
    return None


def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, lr, beta1, beta2, eps,
                    weight_decay, decoupled, l1, max_norm, maximize, bias_correction1, bias_correction2,
                    inv_grad_scale):
    return None


register_fake("sgd_step_", _sgd_step_fake)
register_fake("adam_step_", _adam_step_fake)
register_fake("add_to_steps_", lambda steps, value: None)

if HAVE_TRITON:
    from fastreg.triton_kernels import optim as _kernels

    register_triton("sgd_step_triton_", _kernels.sgd_step_, _sgd_step_fake)
    register_triton("adam_step_triton_", _kernels.adam_step_, _adam_step_fake)

SGD_STEP = op_table("sgd_step_", "sgd_step_triton_", _reference.sgd_step_)
ADAM_STEP = op_table("adam_step_", "adam_step_triton_", _reference.adam_step_)


def add_to_steps_(steps: list[torch.Tensor], value: float) -> None:
    """steps[i] += value for the optimizers' step counts (float32 CPU scalars): the C++
    host loop where the extension is built, else torch's _foreach_add_."""
    if _ext.defines("add_to_steps_"):
        torch.ops.fastreg.add_to_steps_(steps, value)
    else:
        torch._foreach_add_(steps, value)
