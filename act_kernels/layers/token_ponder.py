"""The per-token ponder step over fixed key/value pools (design §9, §11),
for any layer kind of layers/kinds: the host work of a step is the layers' own
math, one attention launch per layer and the halting launch of ACT's kernel
loop. A looped model's plain prelude and coda run one step of it
(`pool_stack`).

- Keys and values: one (T_tok, 2 Hkv d) pool per layer, a token's row at
  its packed index, written in place where a token's visible state changed.
  No segment list, no token -> row table, no concatenation: the key side of
  attention is fixed for the call (`fixed_pool.key_table`), the query side
  is built once per step for every layer.
- Autograd: one graph, as any module's. Attention at step n read the pool
  as it was then; its backward (`_PoolAttention`) reads the pool again,
  accumulates dK/dV into the pool's gradient, hands the rows written at
  step n their gradient and puts back the rows they replaced. That is right
  because autograd runs it only after every node of step n + 1: step n's
  output feeds all of step n + 1 (its running rows are the queries of every
  layer, its rows the first layer's new keys), so no node of step n is ready
  before step n + 1's attention backwards have all run and restored their
  rows. Within a step each pool is written once, before its one read: a
  layer kind that computes its rows' keys and values in its forward (a
  transformers decoder layer) writes the first pool once with those of the
  running tokens and those of the tokens that have just halted.

It runs the layers through their row adapters (layers/kinds, the same math
the step-by-step path runs); a kind's `pool_path_supported` says when they
qualify (no dropout that acts, LayerNorms and a parameter-free activation
for torch's encoder layers). The step-by-step path of `layers/transformer.py`
serves the rest, and backend="reference".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops.act import Kernels, kernel_ponder_loop
from ..ops.attention import KeyTable, pool_backward, pool_forward, pool_views, query_table
from .rows import RowStep


class _Pool:
    """One layer's keys and values during a ponder, and their gradient
    during the backward."""

    def __init__(self):
        self.rows: Optional[Tensor] = None   # (T_tok, 2 d_model)
        self.views = None                    # its attention views (fixed_pool.pool_views)
        self.grad: Optional[Tensor] = None
        self.spent = False                   # the backward reached step 1: the pool is back at its start


def _write(pool: _Pool, keys: KeyTable, written: Optional[Tensor], rows: Tensor, keep: bool):
    """Writes `rows` into the pool at `written` (every token when None).
    Returns (whole, replaced): whether the rows became the pool, and what
    they replaced when `keep` (the backward puts it back)."""
    whole = written is None or written.numel() == pool.rows.shape[0]
    if whole:
        replaced = pool.rows                 # None at step 1: no pool yet
        pool.rows = rows if rows.is_contiguous() else rows.contiguous()
        pool.views = pool_views(pool.rows, keys)
        return True, replaced if keep else None
    replaced = pool.rows.index_select(0, written) if keep else None
    pool.rows.index_copy_(0, written, rows)
    return False, replaced


def pool_attend(pool: _Pool, keys: KeyTable, queries, written: Optional[Tensor], q: Tensor, kv: Tensor) -> Tensor:
    """`_PoolAttention` when nothing needs a gradient: the same write and
    read, with no autograd node and nothing kept for a backward."""
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return _PoolAttention.apply(pool, keys, queries, written, q, kv)
    _write(pool, keys, written, kv, keep=False)
    return pool_forward(q, pool.views, keys, queries)[0]


class _PoolAttention(torch.autograd.Function):
    """Writes kv (the rows of `written`, all tokens when None) into the pool,
    then attends q to it. The backward returns dq and the gradient of the
    written rows: what this step's attention and every later read of them
    gave, before a later step overwrote them.

    When a step writes every token's row (step 1, and any step at which
    every token ran the step before), kv itself becomes the pool and the
    replaced pool is kept whole: no row is copied either way, and the
    backward swaps the pools back. kv is no other node's saved tensor (the
    projection saves its input, this Function its q and output), so later
    in-place writes to it harm nothing."""

    @staticmethod
    def forward(ctx, pool: _Pool, keys: KeyTable, queries, written: Optional[Tensor], q: Tensor, kv: Tensor):
        ctx.whole, replaced = _write(pool, keys, written, kv.detach(), keep=True)
        out, saved = pool_forward(q, pool.views, keys, queries)
        ctx.pool, ctx.keys, ctx.queries, ctx.written = pool, keys, queries, written
        # the replaced rows too, so that saved-tensor hooks (offloading, accounting) see them
        ctx.save_for_backward(q, out, replaced, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        pool, written = ctx.pool, ctx.written
        if pool.spent:
            raise RuntimeError("ACTTransformerEncoder's backward ran twice over one forward (its key/value pools "
                               "were restored by the first): run the forward again")
        q, out, replaced, *saved = ctx.saved_tensors
        dq, dk, dv = pool_backward(grad_out.contiguous(), q, pool.views, out, saved, ctx.keys, ctx.queries)
        tokens, width = pool.rows.shape
        if pool.grad is None:
            pool.grad = torch.cat([dk.reshape(tokens, width // 2), dv.reshape(tokens, width // 2)], 1)
        else:
            pool.grad[:, :width // 2] += dk.reshape(tokens, width // 2)
            pool.grad[:, width // 2:] += dv.reshape(tokens, width // 2)
        if ctx.whole:   # every row was written here: its whole gradient, and the pool before it comes back
            d_kv, pool.grad = pool.grad, None
            if replaced is None:   # step 1: the pool is back at its start
                pool.spent = True
            else:
                pool.rows = replaced
                pool.views = pool_views(pool.rows, ctx.keys)
        else:
            d_kv = pool.grad.index_select(0, written)
            pool.grad.index_fill_(0, written, 0)
            pool.rows.index_copy_(0, written, replaced)
        return None, None, None, None, dq, d_kv


class PoolStep(RowStep):
    """The step function of one ponder on the kernel loop (the row runner of
    layers/rows.py over fixed pools): the block's layers on the running rows,
    each reading keys and values from its pool. The first layer's pool
    takes the keys and values of every token that ran the step before, every
    later layer's those of the running tokens (at step 1: every token, in
    order)."""

    def __init__(self, kind, keys: KeyTable, x: Tensor, positions: Optional[Tensor] = None):
        # no dropout acts on this path (the kinds' pool_path_supported), so the rows' training mode is moot
        super().__init__(kind, x, False, positions)
        self.keys = keys
        self.pools = [_Pool() for _ in self.math]

    def _first_rows(self, active: Tensor):
        """What the first layer's pool takes at this step: (written, kv) with
        kv a function of the running rows' kv(). A layer kind that computes
        its rows' keys and values in its forward gives the running ones
        there; only the tokens that have just halted are projected apart."""
        written = self.changed_rows
        if not self.kv_in_forward:
            first = self.math[0].key_values(self.changed)
            return written, lambda kv: first
        order, halted = self.halted_order(active)
        if not halted:
            return written, lambda kv: kv()
        local = order[:halted]   # the halted ones first, then the running
        halted_kv = self.math[0].key_values(self.changed[local], written[local])
        back = torch.argsort(order)   # from [halted, running] back to the order of `written`
        return written, lambda kv: torch.cat([halted_kv, kv()]).index_select(0, back)

    def prepare(self, n: int, active: Tensor):
        queries = query_table(self.keys, active, active.numel())
        rows = None if n == 1 else active
        first_written, first = self._first_rows(active)
        attends = []
        for k, pool in enumerate(self.pools):
            written = first_written if k == 0 else rows

            def attend(q, kv, scale, dropout_p, pool=pool, written=written, k=k):
                if dropout_p > 0:   # pool_path_supported rules it out; never drop it silently
                    raise RuntimeError("the pool path takes no attention dropout")
                keys = self.keys if scale == self.keys.scale else self.keys._replace(scale=scale)
                return pool_attend(pool, keys, queries, written, q, first(kv) if k == 0 else kv())

            attends.append(attend)
        return active, attends


@torch.compiler.disable   # a data-dependent loop with a host read per step: runs eagerly under torch.compile
def pool_ponder(kind, keys: KeyTable, kernels: Kernels, x: Tensor, weight: Tensor, bias: Tensor, max_steps: int,
                eps: float, positions: Optional[Tensor] = None):
    """ACT over x (T_tok, D) on the kernel loop with a `PoolStep` of the
    layer kind `kind`: returns the loop's PonderOutput. positions: every
    token's position in its sequence (layers with rotary embeddings)."""
    step = PoolStep(kind, keys, x, positions)
    return kernel_ponder_loop(kernels, step, (x,), False, weight, bias, max_steps, eps)


def pool_stack(kind, keys: KeyTable, x: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """Plain layers once over every token (a looped model's prelude and coda)
    on the pool path: one step of a `PoolStep`."""
    return PoolStep(kind, keys, x, positions)(x, 1, torch.arange(x.shape[0], device=x.device))
