"""The ragged PonderNet loop on the fused kernels (DESIGN §10, §2).

At step n the step function sees only the rows still running; one fused
halting-step launch evaluates lambda, updates the unhalted mass, writes p and
decides which rows halt; the survivors are compacted for the next step.

Autograd: the step function's own graph carries gradients from step to step
and into `.states`; `_Halting` attaches the backward of p and kl to the
per-step states (through lambda), the halting weight and bias, as one
packed reverse-scan launch over all T entries.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from ..ops.checks import check_step_output
from ..ops.pondernet.checks import check_pondernet_args
from ..ops.state import accumulation_dtype, as_state_tuple
from ..ops.pondernet import PonderNetKernels
from ..ops.pondernet.reference import MODES, halting_unit_backward
from ..ops.ragged import compact, packed_step_index
from .output import PonderNetOutput
from .prior import kl_per_row, log_prior


class _Saved(NamedTuple):
    p: torch.Tensor
    lam: torch.Tensor
    u_before: torch.Tensor
    kl: torch.Tensor
    batch_index: torch.Tensor
    step_index: torch.Tensor
    steps: torch.Tensor
    counts: List[int]
    prior: float
    kernels: PonderNetKernels


class _Halting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, saved: _Saved, weight, bias, *step_states):
        # The fused forward already ran inside the loop; this exposes p and kl.
        ctx.counts, ctx.prior, ctx.kernels = saved.counts, saved.prior, saved.kernels
        ctx.save_for_backward(weight, bias, saved.p, saved.lam, saved.u_before, saved.batch_index,
                              saved.step_index, saved.steps, *step_states)
        return saved.p.clone(), saved.kl.clone()

    @staticmethod
    @once_differentiable   # kernels autograd cannot see through: a 2nd derivative raises
    def backward(ctx, grad_p, grad_kl):
        weight, bias, p, lam, u_before, batch_index, step_index, steps, *step_states = ctx.saved_tensors
        acc = p.dtype
        grad_p = torch.zeros_like(p) if grad_p is None else grad_p
        grad_kl = torch.zeros(steps.shape, dtype=acc, device=p.device) if grad_kl is None else grad_kl
        gz = ctx.kernels.halting_backward(p, lam, u_before, batch_index, step_index, steps, grad_p, grad_kl,
                                          ctx.prior)
        grads, gw, gc = halting_unit_backward(gz, weight, bias, step_states)
        return (None, gw, gc, *grads)


def ragged_pondernet(
    kernels: PonderNetKernels,
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 20,
    eps: float = 0.01,
    prior: float = 0.2,
    halting: str = "train",
    threshold: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> PonderNetOutput:
    """`pondernet` on the fused kernels of one backend; same contract as the reference."""
    states, was_tuple = as_state_tuple(state)
    check_pondernet_args(states, weight, bias, max_steps, eps, prior, halting, threshold, generator)
    batch, device = states[0].shape[0], states[0].device
    acc = accumulation_dtype(states[0].dtype)
    w = weight.detach().reshape(-1).to(acc).contiguous()
    c = bias.detach().reshape(1).to(acc)
    mode = MODES[halting]

    unhalted = torch.ones(batch, dtype=acc, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.arange(batch, device=device)
    current = states
    ps, lams, us, rows, counts = [], [], [], [], []
    packed: List[List[torch.Tensor]] = [[] for _ in states]

    for n in range(1, max_steps + 1):
        given = tuple(current) if was_tuple else current[0]
        new = check_step_output(step_fn(given, n, active), states, active.numel(), n)
        first = new[0] if new[0].shape[1] <= 1 or new[0].stride(1) == 1 else new[0].contiguous()
        uniform = None
        if mode == 1:
            uniform = torch.rand(active.numel(), generator=generator, device=device, dtype=acc)
        p, lam, u_before, halted = kernels.halting_step(first.detach(), active, w, c, unhalted, steps, uniform,
                                                        n, max_steps, mode, float(eps), float(threshold))
        ps.append(p)
        lams.append(lam)
        us.append(u_before)
        rows.append(active)
        counts.append(active.numel())
        for k, t in enumerate(new):
            packed[k].append(t)
        nxt = compact(halted, active, new)  # the one host sync per step
        if nxt is None:
            break
        active, current = nxt

    p_all, batch_index = torch.cat(ps), torch.cat(rows)
    step_index = packed_step_index(counts, device)
    last = step_index == steps[batch_index]
    kl = kl_per_row(p_all, log_prior(step_index, last, prior, acc), batch_index, batch)
    saved = _Saved(p_all, torch.cat(lams), torch.cat(us), kl, batch_index, step_index, steps, counts,
                   float(prior), kernels)
    p_out, kl_out = _Halting.apply(saved, weight, bias, *packed[0])
    all_states = tuple(torch.cat(t) for t in packed)
    last_rows = torch.empty_like(steps).index_put_((batch_index[last],), torch.nonzero(last).squeeze(1))
    final = tuple(t.index_select(0, last_rows) for t in all_states)
    return PonderNetOutput(
        states=all_states if was_tuple else all_states[0], p=p_out, kl=kl_out, steps=steps,
        batch_index=batch_index, step_index=step_index,
        state=final if was_tuple else final[0], batch_size=batch,
    )
