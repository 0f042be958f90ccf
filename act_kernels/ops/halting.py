"""ACT's halting step in pure PyTorch (design §1, §3): the decision and
the reference twin of the fused halting-step kernel. Shared like its kernel
counterparts (`triton_helpers.halt_row`, csrc/halting.h): ACT's kernel loop
runs it as its "twins" implementation, and the fused cell-and-halting twins
(ops/cells) run it after the gates."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch


def halting_decision(sum_before, h, threshold, is_last_step):
    """The halting test of eq. (4)-(6): returns (halt, p).

    A row halts at the first step whose h brings the running sum to at least
    1 - eps, or at the last allowed step; its last weight is the remainder
    R = 1 - (sum of the earlier h), so the weights of a row always sum to 1.
    is_last_step: a bool for every row, or a bool tensor, one per row (rows
    at their own steps: design §17).
    """
    if isinstance(is_last_step, torch.Tensor):
        halt = (sum_before + h >= threshold) | is_last_step
    elif is_last_step:
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
    step: Union[int, torch.Tensor],
    max_steps: int,
    extra: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused halting step over the A active rows.

    state (A, H) new states s^n of the active rows; active (A,) their batch rows;
    step: n, the step every row is at, or an (A,) int64 tensor on the states'
    device, each row at its own step (the depth-wise scheduler, design §17);
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
        # written through the active rows with the halting flag as a select,
        # not through active[halt]: a boolean index would read the device
        steps[active] = torch.where(halt, step, steps[active])
        remainder[active] = torch.where(halt, p, remainder[active])
    return p, h, halt
