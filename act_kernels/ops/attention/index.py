"""Index helpers for ragged attention (design §9).

Tokens are packed sequence after sequence, with flash-attn's int32
`cu_seqlens` (B + 1 offsets). The running queries are a subset of the tokens,
given by their ascending packed indices `q_rows`, so the queries of sequence b
are the contiguous range `cu_q[b] : cu_q[b + 1]` of q.

Keys and values live in a pool: one tensor, or several tensors ("segments")
read as their row-wise concatenation without copying. Token j reads pool row
`kv_rows[j]`. The kernels address every pool row by an element offset from the
first segment's data pointer, through the same `ops.ragged.segment_table` as
the ACT kernels' packed states.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..ragged import segment_table


def query_offsets(cu_seqlens: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """(B + 1,) int32: the queries of sequence b are q[cu_q[b] : cu_q[b + 1]]."""
    return torch.searchsorted(q_rows.to(torch.int64), cu_seqlens.to(torch.int64)).to(torch.int32)


class PerStep:
    """`build(cu_seqlens, q_rows, *extra)`, made once and reused while the next
    call passes the same two tensors, unchanged in place (their versions),
    and equal extra values: the layers of one ponder step attend with the
    same running queries, so a table that depends only on them is made once
    per step, not per layer."""

    def __init__(self, build: Callable):
        self.build = build
        self.tensors, self.key, self.value = (None, None), None, None

    def __call__(self, cu_seqlens: Tensor, q_rows: Tensor, *extra):
        key = (cu_seqlens._version, q_rows._version, *extra)
        if self.tensors[0] is cu_seqlens and self.tensors[1] is q_rows and self.key == key:
            return self.value
        self.value = self.build(cu_seqlens, q_rows, *extra)
        self.tensors, self.key = (cu_seqlens, q_rows), key
        return self.value


def sequence_of_tokens(cu_seqlens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the sequence each packed token index belongs to."""
    return torch.searchsorted(cu_seqlens.to(torch.int64)[1:], tokens.to(torch.int64), right=True)


def row_offsets(pool: Sequence[torch.Tensor], kv_rows: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """(T_tok,) int64: the element offset of token j's pool row from pool[0].data_ptr().

    Every segment must share pool[0]'s dtype and its head and feature strides
    (the launcher makes sure of it); rows may be strided.
    """
    base = pool[0]
    rows = (torch.arange(num_tokens, device=base.device) if kv_rows is None else kv_rows.to(torch.int64))
    if len(pool) == 1:
        return rows * base.stride(0)
    table = segment_table(pool)
    seg_of_row = torch.searchsorted(table[2], rows, right=True) - 1
    return table[0][seg_of_row] + (rows - table[2][seg_of_row]) * table[1][seg_of_row]


def to_pool(values: Tensor, rows: Tensor, pool: Sequence[Tensor]) -> List[Tensor]:
    """Gradients (N, Hkv, d) of the pool rows `rows` (N,), summed per row and
    split back onto the pool's segments (rows nobody read get zeros)."""
    d_pool = values.new_zeros(sum(t.shape[0] for t in pool), *values.shape[1:], dtype=pool[0].dtype)
    d_pool.index_add_(0, rows, values.to(pool[0].dtype))
    return list(d_pool.split([t.shape[0] for t in pool]))


def pool_grads(d_tok: Tensor, pool: Sequence[Tensor], kv_rows: Optional[Tensor]) -> List[Tensor]:
    """Per-token gradients (T_tok, Hkv, d) back onto the pool's segments."""
    if kv_rows is None and len(pool) == 1:
        return [d_tok]
    rows = torch.arange(d_tok.shape[0], device=d_tok.device) if kv_rows is None else kv_rows.to(torch.int64)
    return to_pool(d_tok, rows, pool)
