"""The CUDA extension act_kernels._C behind the two kernel contracts.

Same signatures as `act_kernels.reference.halting_step` / `combine_backward`.
The extension takes raw pointers, so every tensor is checked here (device,
dtype) and given to it densely or with unit column stride (any caller's
strides work: `ops.launch`); outputs are allocated here, and every launch
runs on the tensors' device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..extension import DTYPE_CODES, check_device, extension, stream
from ..launch import WriteBack, dense, halting_outputs, on_device, row_steps, unit_columns
from ..ragged import rows_by_batch, step_table

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
    step,
    max_steps: int,
    extra: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
):
    """CUDA twin of `act_kernels.reference.halting_step` (same contract; step:
    one int, or each row's own, an (A,) int64 tensor on the device). The
    kernel accumulates the first state tensor; the extra ones (an LSTM's c)
    are accumulated here by index_add_, one launch each."""
    ext = extension()
    device = state.device
    acc = running_sum.dtype
    num_active, hidden = state.shape
    if state.dtype not in DTYPE_CODES:
        raise TypeError(f"state dtype {state.dtype} is not supported")
    state = unit_columns(state)
    for name, t in (("active", active), ("weight", weight), ("bias", bias), ("threshold", threshold),
                    ("running_sum", running_sum), ("accumulator", accumulator), ("steps", steps),
                    ("remainder", remainder)):
        check_device(name, t, device)
    if accumulator.dtype != acc or remainder.dtype != acc or threshold.dtype != acc:
        raise TypeError("running_sum, accumulator, remainder and threshold share the accumulation dtype")
    weight = weight.to(acc).contiguous()
    bias = bias.to(acc).contiguous()
    active = active.contiguous()
    p, h, halted = halting_outputs(num_active, acc, device)
    if num_active == 0:
        return p, h, halted
    per_row = row_steps(step, num_active, device)   # each row at its own step (design §17)
    out = WriteBack(running_sum=running_sum, accumulator=accumulator, steps=steps, remainder=remainder)
    threshold = dense(threshold)
    with on_device(device):
        ext.halting_step(
            state.data_ptr(), state.stride(0), active.data_ptr(), weight.data_ptr(), bias.data_ptr(),
            threshold.data_ptr(), out["running_sum"].data_ptr(), out["accumulator"].data_ptr(),
            out["accumulator"].stride(0), out["steps"].data_ptr(), out["remainder"].data_ptr(), p.data_ptr(),
            h.data_ptr(), halted.data_ptr(),
            num_active, hidden, int(step) if per_row is None else 1, int(max_steps),
            per_row.data_ptr() if per_row is not None else 0,
            DTYPE_CODES[state.dtype], stream(device),
        )
    out.finish()
    for t, m in extra:
        m.index_add_(0, active, p[:, None] * t.to(acc))
    return p, h, halted


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
):
    """CUDA twin of `act_kernels.reference.combine_backward` (same contract).

    gw and gc are deterministic: one partial per row group, summed over the
    groups in a fixed order by a second kernel."""
    ext = extension()
    device = states[0].device
    dtype = states[0].dtype
    acc = p.dtype
    hidden = states[0].shape[1]
    batch = steps.shape[0]
    base, table, rows_aligned = step_table([unit_columns(t) for t in states])
    steps = dense(steps)
    order, first = rows_by_batch(dense(batch_index), steps)
    if grad_state.dtype != dtype:
        grad_state = grad_state.to(dtype)
    if hidden > 1 and grad_state.stride(1) != 1:
        grad_state = grad_state.contiguous()
    grad_ponder = grad_ponder.to(acc).contiguous()
    weight = weight.to(acc).contiguous()
    p, h = p.contiguous(), h.contiguous()
    if extra_dot is not None:
        extra_dot = extra_dot.to(acc).contiguous()
    with on_device(device):  # the group count follows the tensors' device's SM count
        groups = ext.combine_backward_groups(batch, hidden)
    gs = torch.empty(p.shape[0], hidden, dtype=dtype, device=device)
    gw_part = torch.empty(groups, hidden, dtype=acc, device=device)
    gc_part = torch.empty(groups, dtype=acc, device=device)
    gw = torch.empty(hidden, dtype=acc, device=device)
    gc = torch.empty((), dtype=acc, device=device)
    with on_device(device):
        ext.combine_backward(
            base.data_ptr(), table.data_ptr(), table.shape[1], order.data_ptr(), first.data_ptr(),
            steps.data_ptr(), p.data_ptr(), h.data_ptr(), 0 if extra_dot is None else extra_dot.data_ptr(),
            grad_state.data_ptr(), grad_state.stride(0), grad_ponder.data_ptr(), weight.data_ptr(),
            gs.data_ptr(), gw_part.data_ptr(), gc_part.data_ptr(), gw.data_ptr(), gc.data_ptr(),
            batch, hidden, groups, rows_aligned, DTYPE_CODES[dtype], stream(device),
        )
    return gs, gw, gc
