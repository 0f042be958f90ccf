"""Index helpers for the packed, step-major row layout (DESIGN §2).

The states of step n live in the tensor the step function returned for that
step; the kernels address every packed row through one base pointer plus a
per-row element offset, so the per-step tensors are never concatenated.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def row_offsets(states: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (base, offsets): offsets (T,) int64 such that packed row t starts
    at element `offsets[t]` counted from base.data_ptr().

    Every tensor must be 2-D with unit column stride and the same dtype; rows
    may be strided. Offsets between separate allocations are exact because the
    allocator aligns every block to far more than one element.
    """
    base = states[0]
    elem = base.element_size()
    deltas, strides, counts = [], [], []
    for t in states:
        if t.dtype != base.dtype or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError("packed states must be 2-D, of one dtype, with unit column stride")
        diff = t.data_ptr() - base.data_ptr()
        if diff % elem:
            raise ValueError("a state tensor is not aligned to its element size")
        deltas.append(diff // elem)
        strides.append(t.stride(0))
        counts.append(t.shape[0])
    counts_t = torch.tensor(counts, dtype=torch.int64)
    step_of_row = torch.repeat_interleave(torch.arange(len(states)), counts_t)
    first_of_step = torch.cumsum(counts_t, 0) - counts_t
    pos = torch.arange(int(counts_t.sum())) - first_of_step[step_of_row]
    offsets = torch.tensor(deltas)[step_of_row] + pos * torch.tensor(strides)[step_of_row]
    return base, offsets.to(base.device, non_blocking=True)


def rows_by_batch(batch_index: torch.Tensor, steps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Groups the packed rows by batch row: returns (order, first).

    order (T,): packed row ids sorted by batch row, each row's steps in step
    order (the layout is step-major and the sort is stable); the rows of batch
    row b are order[first[b] : first[b] + steps[b]].
    """
    order = torch.argsort(batch_index, stable=True)
    first = torch.cumsum(steps, 0) - steps
    return order, first


def packed_step_index(counts: Sequence[int], device) -> torch.Tensor:
    """(T,) 1-based step of every packed row, from the per-step row counts A_n."""
    return torch.repeat_interleave(
        torch.arange(1, len(counts) + 1, device=device),
        torch.tensor(list(counts), device=device),
    )
