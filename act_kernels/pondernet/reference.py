"""PonderNet (Banino et al. 2021) in pure PyTorch, ragged and differentiable by
ordinary autograd: the oracle of DESIGN §10 that the kernel path is tested
against.

    lambda_b^n = sigmoid(w . s_b^n + c)                 (accumulation dtype)
    u_b^n      = prod_{j<=n} (1 - lambda_b^j)           (unhalted mass, step order)
    p_b^n      = lambda_b^n u_b^(n-1)  for n < N_b,   p_b^(N_b) = u_b^(N_b - 1)
    kl_b       = sum_n p_b^n (log p_b^n - log g^n)      (truncated geometric prior g)

N_b: "train" the first n with u_b^n < eps; "sample" a Bernoulli(lambda_b^n)
draw at each step; "threshold" the first n with 1 - u_b^n >= threshold; every
mode stops at max_steps. A row stops stepping when it halts.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..ops.checks import check_step_output
from ..ops.pondernet.checks import check_pondernet_args
from ..ops.state import accumulation_dtype, as_state_tuple
from ..ops.ragged import survivors
from .output import PonderNetOutput
from .prior import kl_per_row, log_prior


def stop_test(halting: str, u_after, lam, eps, threshold, uniform):
    """Whether each running row halts at this step (before the max_steps rule)."""
    if halting == "train":
        return u_after < eps
    if halting == "sample":
        return uniform < lam
    return 1 - u_after >= threshold


def pondernet(
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
    """Same contract as `act_kernels.pondernet` (see there)."""
    states, was_tuple = as_state_tuple(state)
    check_pondernet_args(states, weight, bias, max_steps, eps, prior, halting, threshold, generator)
    batch, device = states[0].shape[0], states[0].device
    acc = accumulation_dtype(states[0].dtype)
    w = weight.reshape(-1).to(acc)
    c = bias.reshape(()).to(acc)

    active = torch.arange(batch, device=device)
    unhalted = torch.ones(batch, dtype=acc, device=device)       # u^(n-1) of every row
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    current = states
    ps: List[torch.Tensor] = []
    rows, step_rows = [], []
    packed: List[List[torch.Tensor]] = [[] for _ in states]

    for n in range(1, max_steps + 1):
        given = current if was_tuple else current[0]
        new = check_step_output(step_fn(given, n, active), states, active.numel(), n)
        with torch.autocast(device_type=device.type, enabled=False):
            lam = torch.sigmoid(new[0].to(acc) @ w + c)
        u_before = unhalted[active]
        u_after = u_before * (1 - lam)
        uniform = None
        if halting == "sample":
            uniform = torch.rand(active.numel(), generator=generator, device=device, dtype=acc)
        halt = stop_test(halting, u_after.detach(), lam.detach(), eps, threshold, uniform)
        if n == max_steps:
            halt = torch.ones_like(halt)
        ps.append(torch.where(halt, u_before, lam * u_before))  # the last step takes the rest
        unhalted = unhalted.index_copy(0, active, u_after)
        steps = steps.index_fill(0, active[halt], n)
        rows.append(active)
        step_rows.append(torch.full_like(active, n))
        for k, t in enumerate(new):
            packed[k].append(t)
        nxt = survivors(halt, active, new)
        if nxt is None:
            break
        active, current = nxt

    p = torch.cat(ps)
    batch_index, step_index = torch.cat(rows), torch.cat(step_rows)
    last = step_index == steps[batch_index]
    kl = kl_per_row(p, log_prior(step_index, last, prior, acc), batch_index, batch)
    all_states = tuple(torch.cat(t) for t in packed)
    last_rows = torch.empty_like(steps).index_put_((batch_index[last],), torch.nonzero(last).squeeze(1))
    final = tuple(t.index_select(0, last_rows) for t in all_states)
    return PonderNetOutput(
        states=all_states if was_tuple else all_states[0], p=p, kl=kl, steps=steps,
        batch_index=batch_index, step_index=step_index,
        state=final if was_tuple else final[0], batch_size=batch,
    )
