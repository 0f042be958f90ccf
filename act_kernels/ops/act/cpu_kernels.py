"""ACT's halting step on the CPU (csrc/cells/gates_cpu.cpp, in the compiled
extension), behind the contract of `ops.halting.halting_step`: one call where
the twin issues about twenty ATen ops, for states that are their own
accumulation dtype (float32, float64). The combine backward runs once per
ponder, so the CPU implementation takes the reference twin's.

The per-token encoder's pool path (layers/token_ponder.py) takes these on the CPU
(`backends.resolve_encoder`): there, host work per step is the wall time.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from ..extension import DTYPE_CODES, extension
from ..halting import halting_step as twin_halting_step
from ..launch import as_dtype, cell_step_buffers, dense, halting_outputs, row_steps, unit_columns
from .reference import combine_backward

CPU_DTYPES = (torch.float32, torch.float64)


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
    """`ops.halting.halting_step` in one call of the extension (step: one
    int, or each row's own, an (A,) int64 tensor). A state in another dtype
    than its accumulation, or further mean-fielded tensors (`extra`), run on
    the twin."""
    acc = running_sum.dtype
    if state.dtype != acc or acc not in CPU_DTYPES or extra:
        return twin_halting_step(state, active, weight, bias, threshold, running_sum, accumulator, steps,
                                 remainder, step, max_steps, extra)
    state = unit_columns(state)
    rows, hidden = state.shape
    p, h, halted = halting_outputs(rows, acc, state.device)
    if rows == 0:
        return p, h, halted
    # the loops hand dense buffers; anything else goes through a dense copy and back
    dense_buffers = running_sum.is_contiguous() and steps.is_contiguous() and remainder.is_contiguous() and (
        accumulator.shape[1] <= 1 or accumulator.stride(1) == 1)
    out = None if dense_buffers else cell_step_buffers(running_sum, steps, remainder, [accumulator])
    if out is not None:
        running_sum, steps, remainder, accumulator = out["running_sum"], out["steps"], out["remainder"], out["acc_h"]
    if not (weight.dtype == bias.dtype == threshold.dtype == acc and weight.is_contiguous()):
        weight, bias, threshold = (dense(as_dtype(t, acc)) for t in (weight, bias, threshold))
    active = dense(active)
    per_row = row_steps(step, rows, state.device)
    extension().cpu_halting_step(
        state.data_ptr(), state.stride(0), rows, hidden, active.data_ptr(), weight.data_ptr(), bias.data_ptr(),
        threshold.data_ptr(), running_sum.data_ptr(), accumulator.data_ptr(), accumulator.stride(0),
        steps.data_ptr(), remainder.data_ptr(), p.data_ptr(), h.data_ptr(), halted.data_ptr(),
        1 if per_row is not None else max(int(step), 1), int(max_steps),
        per_row.data_ptr() if per_row is not None else 0, DTYPE_CODES[acc])
    if out is not None:
        out.finish()
    return p, h, halted


__all__ = ["halting_step", "combine_backward"]
