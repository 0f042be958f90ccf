"""PonderNet's kernels as `torch.library` custom ops, for torch.compile and
fake-tensor users (design §6, §10).

    act_kernels::pondernet_halting_step      the fused halting step (mutates u and steps)
    act_kernels::pondernet_halting_backward  the packed reverse-scan backward
    act_kernels::pondernet_distribution      p and kl from the per-step states and the
                                             halting decisions, differentiable (its
                                             backward is pondernet_halting_backward)

Each op runs the CUDA extension on CUDA tensors when it is built, else the
Triton kernels, and the reference twins on the CPU (Triton under
TRITON_INTERPRET=1, so the CPU tests reach that path).
The eager `pondernet` loop calls the kernels directly.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...backends import op_implementation
from .function import get_kernels
from .prior import kl_per_row, log_prior
from .reference import halting_unit_backward


def _kernels_for(device: torch.device):
    return get_kernels(op_implementation(device, has_cuda_kernels=True))


@torch.library.custom_op("act_kernels::pondernet_halting_step", mutates_args=("unhalted", "steps"))
def halting_step(
    state: Tensor, active: Tensor, weight: Tensor, bias: Tensor, unhalted: Tensor, steps: Tensor,
    uniform: Optional[Tensor], step: int, max_steps: int, halting_mode: int, eps: float, threshold: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """See `act_kernels.ops.pondernet.reference.halting_step` (halting_mode is its `mode`;
    the op schema cannot name an argument `mode`)."""
    out = _kernels_for(state.device).halting_step(state, active, weight, bias, unhalted, steps, uniform,
                                                  step, max_steps, halting_mode, eps, threshold)
    return tuple(t.clone() for t in out)  # never an alias of an input


@halting_step.register_fake
def _(state, active, weight, bias, unhalted, steps, uniform, step, max_steps, halting_mode, eps, threshold):
    rows, acc = state.shape[0], unhalted.dtype
    return (state.new_empty(rows, dtype=acc), state.new_empty(rows, dtype=acc), state.new_empty(rows, dtype=acc),
            state.new_empty(rows, dtype=torch.bool))


@torch.library.custom_op("act_kernels::pondernet_halting_backward", mutates_args=())
def halting_backward(
    p: Tensor, lam: Tensor, u_before: Tensor, batch_index: Tensor, step_index: Tensor, steps: Tensor,
    grad_p: Tensor, grad_kl: Tensor, prior: float,
) -> Tensor:
    """See `act_kernels.ops.pondernet.reference.halting_backward`."""
    return _kernels_for(p.device).halting_backward(p, lam, u_before, batch_index, step_index, steps, grad_p,
                                                   grad_kl, prior)


@halting_backward.register_fake
def _(p, lam, u_before, batch_index, step_index, steps, grad_p, grad_kl, prior):
    return torch.empty_like(p)


def _lambda_and_mass(states, weight, bias, batch_index, step_index, steps):
    """lambda and u^(n-1) of every packed entry, recomputed from the states."""
    acc = torch.float64 if states[0].dtype == torch.float64 else torch.float32
    s = torch.cat([t.to(acc) for t in states])
    with torch.autocast(device_type=s.device.type, enabled=False):  # the halting math stays in acc
        lam = torch.sigmoid(s @ weight.reshape(-1).to(acc) + bias.reshape(()).to(acc))
    batch, max_n = steps.shape[0], len(states)
    keep = torch.ones(batch, max_n + 1, dtype=acc, device=s.device)
    keep[batch_index, step_index] = 1 - lam                       # column n holds 1 - lambda^n
    u_before = keep.cumprod(1)[batch_index, step_index - 1]       # prod_{j < n} (1 - lambda^j)
    return lam, u_before


@torch.library.custom_op("act_kernels::pondernet_distribution", mutates_args=())
def distribution(
    states: List[Tensor], weight: Tensor, bias: Tensor, batch_index: Tensor, step_index: Tensor, steps: Tensor,
    prior: float,
) -> Tuple[Tensor, Tensor]:
    """p (T,) and kl (B,) from the per-step states (step n holding its A_n running
    rows) and the halting decisions a halting pass made from them. Differentiable
    in states, weight and bias."""
    lam, u_before = _lambda_and_mass(states, weight, bias, batch_index, step_index, steps)
    last = step_index == steps[batch_index]
    p = torch.where(last, u_before, lam * u_before)
    kl = kl_per_row(p, log_prior(step_index, last, prior, p.dtype), batch_index, steps.shape[0])
    return p, kl


@distribution.register_fake
def _(states, weight, bias, batch_index, step_index, steps, prior):
    acc = torch.float64 if states[0].dtype == torch.float64 else torch.float32
    return batch_index.new_empty(batch_index.shape, dtype=acc), batch_index.new_empty(steps.shape, dtype=acc)


def _setup(ctx, inputs, output):
    states, weight, bias, batch_index, step_index, steps, prior = inputs
    p, _ = output
    ctx.prior = prior
    ctx.save_for_backward(weight, bias, batch_index, step_index, steps, p, *states)


def _backward(ctx, grad_p, grad_kl):
    weight, bias, batch_index, step_index, steps, p, *states = ctx.saved_tensors
    lam, u_before = _lambda_and_mass(states, weight, bias, batch_index, step_index, steps)
    grad_p = torch.zeros_like(p) if grad_p is None else grad_p
    grad_kl = p.new_zeros(steps.shape) if grad_kl is None else grad_kl
    gz = halting_backward(p, lam, u_before, batch_index, step_index, steps, grad_p.contiguous(),
                          grad_kl.contiguous(), ctx.prior)
    grad_states, gw, gc = halting_unit_backward(gz, weight, bias, states)
    return grad_states, gw, gc, None, None, None, None


distribution.register_autograd(_backward, setup_context=_setup)
