"""Index helpers for the packed, step-major row layout (design §2).

The states of step n live in the tensor the step function returned for that
step; the kernels address every packed row through one base pointer plus a
per-row element offset, so the per-step tensors are never concatenated.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch


class StepTable(NamedTuple):
    base: torch.Tensor
    table: torch.Tensor
    rows_aligned_16: bool  # every packed row starts on a 16-byte boundary


def segment_table(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, S) int64 on the segments' device: for every segment k, its element
    offset from segments[0].data_ptr(), its row stride, and its first row in
    the row-wise concatenation. Row t of segment k starts at element
    `table[0, k] + (t - table[2, k]) * table[1, k]` from segments[0].

    S numbers built on the host and one small copy. Offsets between separate
    allocations are exact because the allocator aligns every block to far
    more than one element.
    """
    base = segments[0]
    elem = base.element_size()
    deltas, strides, firsts = [], [], []
    first = 0
    for t in segments:
        diff = t.data_ptr() - base.data_ptr()
        if diff % elem:
            raise ValueError("a segment is not aligned to its element size")
        deltas.append(diff // elem)
        strides.append(t.stride(0))
        firsts.append(first)
        first += t.shape[0]
    return torch.tensor([deltas, strides, firsts], dtype=torch.int64).to(base.device, non_blocking=True)


def step_table(states: Sequence[torch.Tensor]) -> StepTable:
    """Returns (base, table, rows_aligned_16): the `segment_table` of the
    per-step state tensors, so packed row t of step k starts at element
    `table[0, k] + (t - table[2, k]) * table[1, k]` from base: the kernels never
    need a per-row offset array. Every tensor must be 2-D with unit column
    stride and the same dtype; rows may be strided.
    """
    base = states[0]
    elem = base.element_size()
    aligned = True
    for t in states:
        if t.dtype != base.dtype or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError("packed states must be 2-D, of one dtype, with unit column stride")
        aligned = aligned and t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or (t.stride(0) * elem) % 16 == 0)
    return StepTable(base, segment_table(states), aligned)


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
    """(T,) 1-based step of every packed row, from the per-step row counts A_n.
    Built with fills on the device: a table copied from the host
    (torch.tensor(counts, device=...)) would be a blocking copy, a stream
    sync after the ponder loop."""
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([torch.full((c,), n, dtype=torch.int64, device=device) for n, c in enumerate(counts, 1)])


def survivors(halt: torch.Tensor, active: torch.Tensor, new: Tuple[torch.Tensor, ...]):
    """The rows a reference ponder loop runs next, from this step's halting
    decisions: (active, states), or None when every row halted. When nobody
    halted the same tensors run on, with no copy."""
    halted = int(halt.sum())
    if halted == active.numel():
        return None
    if halted == 0:
        return active, new
    keep = ~halt
    return active[keep], tuple(t[keep] for t in new)


def compact(halted: torch.Tensor, active: torch.Tensor, new: Tuple[torch.Tensor, ...]):
    """`survivors` for the kernel drivers: one host sync (the survivors' count)
    and index_select gathers, which cost less host work than boolean indexing."""
    keep = torch.nonzero(~halted).squeeze(1)
    if keep.numel() == 0:
        return None
    if keep.numel() == active.numel():
        return active, new
    return active.index_select(0, keep), tuple(t.index_select(0, keep) for t in new)
