"""AdamW on lists of tensors (the update for every ``"adamw"`` group).

.. math::

    m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\quad
    v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\\\
    \\theta_t = (1 - \\eta\\lambda)\\theta_{t-1}
        - \\frac{\\eta}{1 - \\beta_1^t} \\frac{m_t}{\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon}

The same arithmetic, in the same order, as ``torch.optim.AdamW`` (Loshchilov & Hutter, 2019),
so that a group routed here reproduces it (tests/test_functional.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .lowprec import lowprec_lerp_


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    exp_avg_seeds: list[int] | None = None,
) -> None:
    """One AdamW step, in place on ``params``, moments and step counters (CPU scalar tensors).

    ``exp_avg_seeds``: the first moments are bfloat16 buffers, updated in float32 and stored
    with stochastic rounding (:func:`~orthotorch.functional.lowprec.lowprec_lerp_`, one seed per
    buffer); the step uses the unrounded float32 moment. The second moment is never stored in
    low precision: its small increments set the step's denominator.
    """
    if not params:
        return
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if exp_avg_seeds is None:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    else:
        exp_avgs = lowprec_lerp_(exp_avgs, grads, 1 - beta1, exp_avg_seeds)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if torch.compiler.is_compiling():
        _bias_corrected_update_(params, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps)
        return
    # Step counters live on the CPU (as in torch.optim), so reading them is not a device sync.
    counts = [float(s) for s in steps]
    step_sizes = [-lr / (1 - beta1**t) for t in counts]
    bias_correction2_sqrt = [math.sqrt(1 - beta2**t) for t in counts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def _bias_corrected_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """The last line of the step with the step counts kept as tensors (under ``torch.compile``).

    ``float(step)`` would break the graph, and a Python number would be baked into the graph as
    a constant that changes every step (a recompile per step). Same formula as the eager path;
    the rounding of the bias corrections can differ in the last bit.
    """
    for p, m, v, t in zip(params, exp_avgs, exp_avg_sqs, steps, strict=True):
        t = t.to(device=p.device, dtype=torch.float32)
        bias_correction1 = 1 - torch.pow(beta1, t)
        bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
        denom = (v.sqrt() / bias_correction2_sqrt.to(v.dtype)).add_(eps)
        p.addcdiv_(m * (-lr / bias_correction1).to(p.dtype), denom)
