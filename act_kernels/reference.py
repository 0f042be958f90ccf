"""Pure-PyTorch reference: the oracle every kernel is tested against.

`ponder` follows Graves (2016) line by line (DESIGN §1) and is differentiable by
ordinary autograd. It is ragged like the kernels: at step n the step function
sees only the A_n rows still running, so the rows it is given add up to sum(N).

`halting_step` and `combine_backward`, the reference twins of the two kernel
contracts (DESIGN §3), live in `act_kernels.ops.act.reference` and are
re-exported here.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from .ops.checks import check_ponder_args, check_step_output
from .ops.state import accumulation_dtype, as_state_tuple
from .ops.act.reference import combine_backward, halting_decision, halting_step
from .ops.ragged import survivors
from .output import HaltingProbs, PonderOutput


def ponder(
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 100,
    eps: float = 0.01,
) -> PonderOutput:
    """Adaptive Computation Time over a batch of rows that halt independently.

    step_fn(state_active, step, active) -> new state of exactly those rows.
      state_active: (A, H) (or a tuple of (A, H_k)) rows still running;
      step: 1-based ponder step; active: (A,) int64 batch indices, ascending.
    state: (B, H) initial state s^0, or a tuple (halting reads the first tensor,
      all of them are mean-fielded). weight: (H,) or (1, H); bias: one element.

    Example: a GRU cell pondering on a fixed input x (B, I):
        cell = torch.nn.GRUCell(I, H); halt = torch.nn.Linear(H, 1)
        out = ponder(lambda s, n, idx: cell(x[idx], s), s0, halt.weight, halt.bias)
        loss = task_loss(out.state) + tau * out.ponder_cost.sum()
    """
    states, was_tuple = as_state_tuple(state)
    check_ponder_args(states, weight, bias, max_steps, eps)
    batch, device = states[0].shape[0], states[0].device
    acc = accumulation_dtype(states[0].dtype)
    w = weight.reshape(-1).to(acc)
    c = bias.reshape(()).to(acc)
    threshold = torch.tensor(1.0 - eps, dtype=acc, device=device)

    active = torch.arange(batch, device=device)
    running_sum = torch.zeros(batch, dtype=acc, device=device)  # h^1 + ... + h^(n-1)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    remainder = torch.zeros(batch, dtype=acc, device=device)
    mean_field = [torch.zeros(s.shape, dtype=acc, device=device) for s in states]
    current = states
    probs: List[torch.Tensor] = []
    rows: List[torch.Tensor] = []
    row_steps: List[torch.Tensor] = []

    for n in range(1, max_steps + 1):
        given = current if was_tuple else current[0]
        new = check_step_output(step_fn(given, n, active), states, active.numel(), n)

        # halting unit, eq. (3), in the accumulation dtype even under autocast
        with torch.autocast(device_type=device.type, enabled=False):
            h = torch.sigmoid(new[0].to(acc) @ w + c)
        sum_before = running_sum[active]
        halt, p = halting_decision(sum_before, h, threshold, n == max_steps)
        running_sum = running_sum.index_add(0, active, torch.where(halt, torch.zeros_like(h), h))
        mean_field = [m.index_add(0, active, p[:, None] * s.to(acc)) for m, s in zip(mean_field, new)]
        steps = steps.index_fill(0, active[halt], n)
        remainder = remainder.index_add(0, active[halt], p[halt])

        probs.append(p.detach())
        rows.append(active)
        row_steps.append(torch.full_like(active, n))

        nxt = survivors(halt, active, new)
        if nxt is None:
            break
        active, current = nxt

    ponder_cost = steps.to(acc) + remainder                  # rho = N + R, eq. (9)
    out_state = tuple(m.to(states[0].dtype) for m in mean_field)
    return PonderOutput(
        state=out_state if was_tuple else out_state[0],
        ponder_cost=ponder_cost,
        steps=steps,
        remainder=remainder,
        halting_probs=HaltingProbs(torch.cat(probs), torch.cat(rows), torch.cat(row_steps), batch),
    )


from .pondernet.reference import pondernet  # noqa: E402  the PonderNet oracle

__all__ = ["ponder", "pondernet", "halting_decision", "halting_step", "combine_backward"]
