"""The kernels as `torch.library` custom ops, for torch.compile and fake-tensor
users (design §6).

    act_kernels::halting_step      the fused halting step (mutates its buffers)
    act_kernels::combine_backward  the fused combine backward
    act_kernels::combine           S = sum p s and rho = N + R over the packed
                                   rows, differentiable (its backward is
                                   combine_backward)

Each op runs the CUDA extension on CUDA tensors when it is built, else the
Triton kernels; on the CPU the Triton kernels under TRITON_INTERPRET=1 (so the
CPU test suite reaches that path), else the reference twins. The eager `ponder` loop
calls the kernels directly and never crosses these registration boundaries.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...backends import op_implementation
from ..ragged import packed_step_index
from .function import get_kernels


def _kernels_for(device: torch.device):
    return get_kernels(op_implementation(device, has_cuda_kernels=True))


@torch.library.custom_op(
    "act_kernels::halting_step", mutates_args=("running_sum", "accumulator", "steps", "remainder")
)
def halting_step(
    state: Tensor, active: Tensor, weight: Tensor, bias: Tensor, threshold: Tensor,
    running_sum: Tensor, accumulator: Tensor, steps: Tensor, remainder: Tensor,
    step: int, max_steps: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """See `act_kernels.reference.halting_step`. Not differentiable on its own:
    gradients of a ponder come from `combine`."""
    return _kernels_for(state.device).halting_step(
        state, active, weight, bias, threshold, running_sum, accumulator, steps, remainder,
        step, max_steps)


@halting_step.register_fake
def _(state, active, weight, bias, threshold, running_sum, accumulator, steps, remainder, step, max_steps):
    rows = state.shape[0]
    acc = running_sum.dtype
    return (state.new_empty(rows, dtype=acc), state.new_empty(rows, dtype=acc),
            state.new_empty(rows, dtype=torch.bool))


@torch.library.custom_op("act_kernels::combine_backward", mutates_args=())
def combine_backward(
    states: List[Tensor], batch_index: Tensor, p: Tensor, h: Tensor, steps: Tensor,
    grad_state: Tensor, grad_ponder: Tensor, weight: Tensor, extra_dot: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """See `act_kernels.reference.combine_backward`."""
    return _kernels_for(states[0].device).combine_backward(
        list(states), batch_index, p, h, steps, grad_state, grad_ponder, weight, extra_dot)


@combine_backward.register_fake
def _(states, batch_index, p, h, steps, grad_state, grad_ponder, weight, extra_dot=None):
    total = p.shape[0]
    hidden = states[0].shape[1]
    return (states[0].new_empty(total, hidden), p.new_empty(hidden), p.new_empty(()))


@torch.library.custom_op("act_kernels::combine", mutates_args=())
def combine(
    states: List[Tensor], weight: Tensor, bias: Tensor,
    batch_index: Tensor, p: Tensor, h: Tensor, steps: Tensor,
) -> Tuple[Tensor, Tensor]:
    """Mean-field state S (B, H) and ponder cost rho (B,) from the packed rows.

    states: per-step (A_n, H) tensors; batch_index, p, h (T,) and steps (B,)
    are the halting decisions a halting-step pass made from these states with
    this weight and bias. Differentiable in states, weight and bias.
    """
    acc = p.dtype
    batch = steps.shape[0]
    s = torch.cat([t.to(acc) for t in states])
    mean = torch.zeros(batch, s.shape[1], dtype=acc, device=s.device)
    mean.index_add_(0, batch_index, p[:, None] * s)
    step_index = packed_step_index([t.shape[0] for t in states], s.device)
    is_last = step_index == steps[batch_index]
    remainder = torch.zeros(batch, dtype=acc, device=s.device)
    remainder.index_add_(0, batch_index[is_last], p[is_last])
    return mean.to(states[0].dtype), steps.to(acc) + remainder


@combine.register_fake
def _(states, weight, bias, batch_index, p, h, steps):
    batch = steps.shape[0]
    return (states[0].new_empty(batch, states[0].shape[1]), p.new_empty(batch))


def _combine_setup(ctx, inputs, output):
    states, weight, bias, batch_index, p, h, steps = inputs
    ctx.num_steps = len(states)
    ctx.weight_meta = (weight.shape, weight.dtype)
    ctx.bias_meta = (bias.shape, bias.dtype)
    ctx.save_for_backward(weight, batch_index, p, h, steps, *states)


def _combine_backward(ctx, grad_state, grad_ponder):
    weight, batch_index, p, h, steps, *states = ctx.saved_tensors
    if grad_state is None:
        grad_state = torch.zeros(steps.shape[0], states[0].shape[1], dtype=states[0].dtype,
                                 device=p.device)
    if grad_ponder is None:
        grad_ponder = torch.zeros_like(steps, dtype=p.dtype)
    gs, gw, gc = combine_backward(states, batch_index, p, h, steps, grad_state, grad_ponder,
                                  weight.reshape(-1).to(p.dtype), None)
    grad_states = list(torch.split(gs, [t.shape[0] for t in states]))
    gw = gw.to(ctx.weight_meta[1]).reshape(ctx.weight_meta[0])
    gc = gc.to(ctx.bias_meta[1]).reshape(ctx.bias_meta[0])
    return grad_states, gw, gc, None, None, None, None


combine.register_autograd(_combine_backward, setup_context=_combine_setup)
