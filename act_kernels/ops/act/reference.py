"""Reference twins of the two ACT kernel contracts (DESIGN §3): the same
arguments and results as the Triton and CUDA kernels, written for clarity."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..ragged import packed_step_index


def halting_decision(sum_before, h, threshold, is_last_step: bool):
    """The halting test of eq. (4)-(6): returns (halt, p).

    A row halts at the first step whose h brings the running sum to at least
    1 - eps, or at the last allowed step; its last weight is the remainder
    R = 1 - (sum of the earlier h), so the weights of a row always sum to 1.
    """
    if is_last_step:
        halt = torch.ones_like(h, dtype=torch.bool)
    else:
        halt = sum_before + h >= threshold
    p = torch.where(halt, 1 - sum_before, h)
    return halt, p


def halting_step(
    state: torch.Tensor,
    active: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor,
    running_sum: torch.Tensor,
    accumulator: torch.Tensor,
    steps: torch.Tensor,
    remainder: torch.Tensor,
    step: int,
    max_steps: int,
    extra: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused halting step over the A active rows.

    state (A, H) new states s^n of the active rows; active (A,) their batch rows;
    weight (H,), bias (1,), threshold (1,) = 1 - eps in the accumulation dtype.
    Updated in place for the active rows: running_sum (B,), accumulator (B, H)
    (+= p s), and for the rows that halt: steps (B,) = n, remainder (B,) = R.
    extra: (state_k (A, H_k), accumulator_k (B, H_k)) pairs of the further
    tensors of a tuple state (an LSTM's c): accumulator_k += p state_k too.
    Returns p (A,), h (A,) in the accumulation dtype and halted (A,) bool.
    """
    acc = running_sum.dtype
    with torch.no_grad():
        s = state.to(acc)
        with torch.autocast(device_type=s.device.type, enabled=False):  # the halting math stays in acc
            h = torch.sigmoid(s @ weight.to(acc) + bias.to(acc).reshape(()))
        sum_before = running_sum[active]
        halt, p = halting_decision(sum_before, h, threshold, step >= max_steps)
        running_sum[active] = torch.where(halt, sum_before, sum_before + h)
        accumulator[active] += p[:, None] * s
        for t, m in extra:
            m[active] += p[:, None] * t.to(acc)
        steps[active[halt]] = step
        remainder[active[halt]] = p[halt]
    return p, h, halt


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
