"""The one row runner (design §9, §14, §17): a step of a block's layers on
the rows of the tokens that run it, every layer reading keys and values
from its store. `RowStep` is the runner; its subclasses are the stores:

    SegmentStep   segment pools: a step-by-step ponder appends each step's
                  rows after the cache's, read through a token -> row index
    PoolStep      fixed pools, one row per token written in place, with
                  their own autograd (layers/token_ponder.py, the pool path)
    BufferStep    a cache's buffers: a plain stack's incremental call and the
                  depth-wise iteration write their rows straight into the
                  cache (or its in-flight tail) and read it through one index

A store says what the first layer takes at a step (`prepare`: the rows of
the tokens whose visible state changed, design §9) and gives each layer its
attend closure; the runner applies the layer kind's row adapters
(layers/kinds), the step's norm and the dtype rule.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops.attention import attend as attend_rows
from ..ops.attention import reference_ragged_attention
from .cache import split_key_values


class RowStep:
    """The step function of a ponder, as `ak.ponder` calls it: step(state of
    the running rows, n, their indices ascending) -> their new states. A
    subclass implements `prepare(n, active) -> (the rows' index for the row
    adapters, one attend per layer)`."""

    def __init__(self, kind, x: Tensor, training: bool, positions: Optional[Tensor]):
        self.kind = kind
        # read once per call, not per step
        self.math, self.norm = kind.rows(training, positions), kind.final_norm()
        # a layer whose forward computes its rows' keys and values anyway (a
        # transformers layer) gives the running tokens' first-layer rows from
        # it; only the tokens that have just halted need key_values
        self.kv_in_forward = kind.kv_in_forward
        self.dtype = x.dtype
        self.changed, self.changed_rows = x, None   # the tokens whose visible state changed last step

    def split(self, kv: Tensor) -> Tuple[Tensor, Tensor]:
        return split_key_values(kv, self.kind.kv_heads, self.kind.head_dim)

    def halted_order(self, active: Tensor) -> Tuple[Tensor, int]:
        """The tokens that ran the previous step but not this one (they have
        just halted: their final state s^N) come first in the returned order
        of `changed_rows`, then the running ones; and how many halted. Both
        index lists ascend and the count is known on the host, so no device
        read picks them."""
        changed = self.changed_rows
        halted = 0 if changed is None else changed.numel() - active.numel()
        if not halted:
            return None, 0
        return torch.argsort(torch.isin(changed, active).to(torch.int8), stable=True), halted

    def prepare(self, n: int, active: Tensor):
        raise NotImplementedError

    def __call__(self, state: Tensor, n: int, active: Tensor) -> Tensor:
        index, attends = self.prepare(n, active)
        x = state
        for math, attend in zip(self.math, attends):
            x = math.forward(x, index, attend)
        if self.norm is not None:
            x = self.norm(x)
        # Under autocast the layers return the autocast dtype; the state keeps
        # the input's (the halting math is float32 either way).
        new = x.to(self.dtype)
        self.changed, self.changed_rows = new, active
        return new


class SegmentPool:
    """One layer's key/value rows during a ponder: segments appended step by
    step (after the cache's own rows, read in place, when there is a cache)
    and `kv_rows` (T_tok,), the pool row every packed token is read through.
    With `record`, it keeps which new token each appended row belongs to, so
    that the cache can take the rows in token order after the ponder."""

    def __init__(self, num_tokens: int, device, cached: Optional[Tuple[Tensor, Tensor]] = None,
                 record: bool = False):
        self.k, self.v, self.size = [], [], 0
        if cached is not None and cached[0].shape[0]:
            self.k, self.v, self.size = [cached[0]], [cached[1]], cached[0].shape[0]
        self.first_new = self.size
        self.kv_rows = torch.zeros(num_tokens, dtype=torch.int64, device=device) if cached is not None else None
        self.assigned = [] if record else None

    def append(self, k: Tensor, v: Tensor, tokens: Optional[Tensor], positions: Optional[Tensor]) -> None:
        """k, v: the rows of `tokens` (new-token indices; None: all of them in
        order), which sit at packed `positions` (None: the same)."""
        rows = torch.arange(self.size, self.size + k.shape[0], device=k.device)
        if positions is None:   # every token in order: the first rows of a call without a cache
            self.kv_rows = rows
        else:
            self.kv_rows = self.kv_rows.index_copy(0, positions, rows)
        self.k.append(k)
        self.v.append(v)
        self.size += k.shape[0]
        if self.assigned is not None:
            self.assigned.append((tokens if tokens is not None else rows - self.first_new, rows))


class SegmentStep(RowStep):
    """A step-by-step ponder over segment pools (design §9): a halted token
    is seen as it last was, at the first layer through its final state s^N,
    at every other layer through the rows of its last step. With a cache
    context, the cached tokens of the same sequences are read too, through
    the index, for the step they had reached (`extend`)."""

    def __init__(self, block, x: Tensor, cu_seqlens: Tensor, causal: bool, max_seqlen: int, attention_backend: str,
                 context=None, positions: Optional[Tensor] = None):
        super().__init__(block.kind, x, block.training, positions)
        self.block, self.cu_seqlens, self.causal = block, cu_seqlens, causal
        self.max_seqlen, self.backend, self.context = max_seqlen, attention_backend, context
        num_tokens = x.shape[0] + (context.num_cached if context is not None else 0)
        self.pools = [SegmentPool(num_tokens, x.device, context.buffers(k) if context is not None else None,
                                  record=context is not None) for k in range(len(self.math))]
        # the packed position of every new token (None: the new tokens are all the tokens, in order)
        self.positions = context.new_positions if context is not None else None

    def _at(self, rows: Optional[Tensor]) -> Optional[Tensor]:
        return rows if self.positions is None or rows is None else self.positions[rows]

    def _first_layer(self, x: Tensor, rows: Optional[Tensor]) -> None:
        at = self._at(rows) if rows is not None else self.positions
        self.pools[0].append(*self.split(self.math[0].key_values(x, at)), rows, at)

    def project_changed(self) -> None:
        """Keys and values of the tokens that ran the previous step (all tokens
        at step 1) join the first layer's pool; every other token keeps its
        rows there."""
        self._first_layer(self.changed, self.changed_rows)

    def prepare(self, n: int, active: Tensor):
        self.block.iterations += 1
        if not self.kv_in_forward:
            self.project_changed()
        else:
            order, halted = self.halted_order(active)
            if halted:
                local = order[:halted]
                self._first_layer(self.changed[local], self.changed_rows[local])
        if self.context is not None:
            self.context.read_cached(self.pools, n)
        at = self._at(active)
        everyone = n == 1 and self.positions is None   # step 1 of a plain call: all tokens, in order
        return at, [self._attend(k, pool, at, active, everyone) for k, pool in enumerate(self.pools)]

    def _attend(self, k: int, pool: SegmentPool, q_rows: Tensor, active: Tensor, everyone: bool):
        """A later layer (and the first, for a layer that computes keys and
        values in its forward) first writes the running tokens' rows of this
        step (every other token keeps the rows of its last step), then the
        queries read the pool."""
        writes = k > 0 or self.kv_in_forward

        def attend(q: Tensor, kv, scale: float, dropout_p: float) -> Tensor:
            if writes:
                pool.append(*self.split(kv()), None if everyone else active, None if everyone else q_rows)
            if dropout_p > 0:
                return reference_ragged_attention(q, pool.k, pool.v, self.cu_seqlens, q_rows, pool.kv_rows,
                                                  self.causal, scale, dropout_p=dropout_p)
            return attend_rows(q, pool.k, pool.v, self.cu_seqlens, q_rows, pool.kv_rows, self.causal, scale,
                               self.max_seqlen, self.backend)

        return attend


class BufferStep(RowStep):
    """One step of rows over a cache's buffers: layer k writes its rows' keys
    and values at buffer rows `own[k]` and reads every key through
    `tables[k]` (the cached tokens' rows, then these), as the causal queries
    at the layout's new positions. Used once per call: a plain stack's
    incremental call (its new tokens' rows are final as soon as computed,
    so they go straight into the cache, design §14) and a depth-wise
    iteration (its rows live in the cache's in-flight tail, design §17)."""

    def __init__(self, kind, x: Tensor, positions: Optional[Tensor], buffers, own: Sequence[Tensor],
                 tables: Sequence[Tensor], layout, backend: str):
        super().__init__(kind, x, False, positions)
        self.buffers, self.own, self.tables = buffers, own, tables
        self.layout, self.backend = layout, backend

    def write(self, k: int, kv: Tensor, rows: Optional[Tensor] = None) -> None:
        """kv (R, 2 Hkv d) into layer k's buffers at `rows` (default: own[k])."""
        keys, values = self.split(kv)
        buffer = self.buffers[k]
        buffer.k.index_copy_(0, self.own[k] if rows is None else rows, keys)
        buffer.v.index_copy_(0, self.own[k] if rows is None else rows, values)

    def prepare(self, n: int, active: Tensor):
        if not self.kv_in_forward:
            self.write(0, self.math[0].key_values(self.changed))
        return None, [self._attend(k) for k in range(len(self.math))]

    def _attend(self, k: int):
        writes, layout = k > 0 or self.kv_in_forward, self.layout

        def attend(q: Tensor, kv, scale: float, dropout_p: float) -> Tensor:
            if writes:
                self.write(k, kv())
            buffer = self.buffers[k]
            return attend_rows(q, (buffer.k,), (buffer.v,), layout.cu_seqlens, layout.new_positions, self.tables[k],
                               True, scale, layout.max_seqlen, self.backend)

        return attend


__all__: List[str] = ["RowStep", "SegmentPool", "SegmentStep", "BufferStep"]
