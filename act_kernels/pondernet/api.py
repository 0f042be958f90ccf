"""The public entry points `pondernet` and `pondernet_loss`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ops.state import as_state_tuple
from ..backends import resolve_pondernet
from . import reference
from .output import PonderNetOutput


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
    backend: str = "auto",
) -> PonderNetOutput:
    """PonderNet with rows that stop stepping when they halt (DESIGN §10).

    step_fn, state, weight, bias: as for `ak.ponder` (the step function sees
    only the running rows; halting reads the first tensor of a tuple state).
    max_steps: M, every row halts there.
    eps: in "train" mode a row halts at the first step whose unhalted mass
        u^n = prod (1 - lambda^j) drops below eps, and that step's p takes the
        rest u^(N-1). The default 0.01 bounds the probability mass folded into
        the last step from steps never computed at 1 %, the same budget as
        ACT's eps; smaller eps runs more steps for less than 1 % of the mass.
    prior: lambda_p of the geometric prior g^n = lp (1 - lp)^(n-1), truncated at
        each row's N with the rest of its mass at N, so it sums to 1.
    halting: "train" (the rule above), "sample" (halt at step n with
        probability lambda^n, drawn from `generator` for repeatability) or
        "threshold" (halt at the first n with 1 - u^n >= threshold). Every mode
        halts at max_steps, and the step function sees exactly sum N rows.
    backend: "auto" | "reference" | "triton".

    Returns PonderNetOutput: packed per-(row, step) `states`, `p`,
    `batch_index`, `step_index`; per-row `kl`, `steps` and `state` (the state
    at the halting step); `.padded(values)` views packed values as (B, max N).
    p and kl are in the accumulation dtype (float32; float64 for float64).
    """
    states, _ = as_state_tuple(state)
    chosen = resolve_pondernet(backend, states[0].device)
    kwargs = dict(max_steps=max_steps, eps=eps, prior=prior, halting=halting, threshold=threshold,
                  generator=generator)
    if chosen == "reference":
        return reference.pondernet(step_fn, state, weight, bias, **kwargs)
    from ..ops.pondernet import get_kernels
    from .driver import ragged_pondernet

    return ragged_pondernet(get_kernels(chosen), step_fn, state, weight, bias, **kwargs)


def pondernet_loss(out: PonderNetOutput, step_loss: torch.Tensor, beta: float = 0.01) -> torch.Tensor:
    """mean_b sum_n p_b^n L(y_b^n) + beta * mean_b kl_b.

    step_loss (T,): the task loss of every packed (row, step) output, e.g.
    `F.cross_entropy(readout(out.states), y[out.batch_index], reduction="none")`.
    """
    if step_loss.shape != out.p.shape:
        raise ValueError(f"step_loss must have one value per packed (row, step), shape {tuple(out.p.shape)}, "
                         f"got {tuple(step_loss.shape)}")
    per_row = out.p.new_zeros(out.batch_size).index_add(0, out.batch_index, out.p * step_loss.to(out.p.dtype))
    return per_row.mean() + beta * out.kl.mean()
