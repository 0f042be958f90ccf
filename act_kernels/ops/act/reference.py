"""ACT's pure-PyTorch oracle and the reference twins of its two kernel
contracts (design §1, §3).

`ponder` follows Graves (2016) line by line and is differentiable by ordinary
autograd. It is ragged like the kernels: at step n the step function sees
only the A_n rows still running, so the rows it is given add up to sum(N).
`halting_step` (shared with the fused cells, so it lives in `ops.halting`)
and `combine_backward` take the same arguments and give the same results as
the Triton and CUDA kernels, written for clarity; the kernel loop runs on
them as the "twins" implementation.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..checks import check_ponder_args, check_step_output
from ..halting import halting_decision, halting_step
from ..output import HaltingProbs, PonderOutput
from ..ragged import packed_step_index, survivors
from ..state import accumulation_dtype, as_state_tuple


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
    return ponder_loop(step_fn, states, was_tuple, weight, bias, max_steps, eps)


def ponder_loop(step_fn: Callable, states: Tuple[torch.Tensor, ...], was_tuple: bool, weight: torch.Tensor,
                bias: torch.Tensor, max_steps: int, eps: float) -> PonderOutput:
    """`ponder` on arguments already checked (`states` as `as_state_tuple` gives them)."""
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


def combine_backward(
    states: Sequence[torch.Tensor],
    batch_index: torch.Tensor,
    p: torch.Tensor,
    h: torch.Tensor,
    steps: torch.Tensor,
    grad_state: torch.Tensor,
    grad_ponder: torch.Tensor,
    weight: torch.Tensor,
    extra_dot: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of S = sum_n p^n s^n and rho = N + R over the packed rows.

    states: the per-step state tensors, step n holding its A_n rows (T rows in
    all, step-major); batch_index, p, h: (T,) per packed row; steps (B,) N;
    grad_state (B, H) = gS; grad_ponder (B,) = grho; weight (H,).
    extra_dot (T,), optional: <gS', s'> of further mean-fielded tensors of a
    tuple state, added to each row's <gS, s> (their states share the halting).
    Returns gs (T, H) in the state dtype, gw (H,) and gc () in the accumulation dtype.
    """
    acc = p.dtype
    s = torch.cat([t.to(acc) for t in states])
    g = grad_state.to(acc)[batch_index]
    dot = (g * s).sum(-1)
    if extra_dot is not None:
        dot = dot + extra_dot.to(acc)
    row_step = packed_step_index([t.shape[0] for t in states], s.device)
    is_last = row_step == steps[batch_index]
    last_row = torch.empty_like(steps)
    last_row[batch_index[is_last]] = torch.nonzero(is_last).squeeze(1)
    # dS/dh^n = s^n - s^N and drho/dh^n = -1 for n < N; nothing for n = N.
    gh = torch.where(is_last, torch.zeros_like(dot),
                     dot - dot[last_row[batch_index]] - grad_ponder.to(acc)[batch_index])
    gz = gh * h * (1 - h)
    gs = p[:, None] * g + gz[:, None] * weight.to(acc)
    gw = (gz[:, None] * s).sum(0)
    gc = gz.sum()
    return gs.to(states[0].dtype), gw, gc


__all__ = ["ponder", "ponder_loop", "halting_decision", "halting_step", "combine_backward"]
