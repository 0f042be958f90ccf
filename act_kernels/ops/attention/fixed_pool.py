"""Ragged attention over a fixed pool: one key/value row per token, at the
token's own packed index, updated in place between calls (design §9, §11).

A layer that keeps its keys and values this way (the per-token encoder's
pool path, layers/token_ponder.py) reads them with no token -> row table, so everything
about the keys is fixed for a whole ponder: `key_table` builds it once per
call, `query_table` what depends on the running queries once per step (the
block's layers share it), and `pool_forward` / `pool_backward` are one
forward and one backward launch (Triton), or PyTorch's fused attention over
the padded sequences (reference), with no other index work.

The pool is one (T_tok, 2 d_model) tensor per layer, a token's key in the
first half of its row and its value in the second: what one projection of
the in_proj's key and value rows writes. The backward returns dk, dv per
token; accumulating them into the pool's gradient is the caller's.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..state import accumulation_dtype
from . import reference
from .index import query_offsets


class KeyTable(NamedTuple):
    """What the keys of a ponder look like, fixed for the whole call."""

    backend: str
    cu_seqlens: Tensor            # (B + 1,) int32, contiguous
    num_tokens: int
    max_seqlen: int
    heads: int
    causal: bool
    scale: float
    acc: torch.dtype              # the dtype the reference computes in
    cpu_flash: bool               # reference on the CPU: torch's flash kernels called directly
    uniform: bool                 # every sequence max_seqlen long: padding is a view, no gather
    key_slots: Optional[Tensor]   # (B, max_len) token at each key slot (reference, not uniform)
    tok_flat: Optional[Tensor]    # (T_tok,) flat key slot of every token (reference, not uniform)
    offsets: Optional[Tensor]     # (T_tok,) element offset of every token's row (triton)


class QueryTable(NamedTuple):
    """The running queries of one step (shared by the block's layers)."""

    q_rows: Tensor                # (A,) int64, ascending
    cu_q: Optional[Tensor]        # (B + 1,) int32 (triton)
    padded: bool                  # reference: the queries are gathered into padded slots (else a view)
    query_slots: Optional[Tensor]  # (B, max_q) the query at each slot (0 at padding)
    real_q: Optional[Tensor]      # (B, max_q) bool: the slot holds a query
    q_flat: Optional[Tensor]      # (A,) flat slot of every query
    mask: Optional[Tensor]        # (B, 1, max_q, max_len) bool, or None: every slot sees every key


def key_table(backend: str, cu_seqlens: Tensor, num_tokens: int, max_seqlen: int, heads: int, d_model: int,
              causal: bool, scale: float, lengths: list, dtype: torch.dtype) -> KeyTable:
    """Built once per call. `lengths`: the B sequence lengths as ints (the
    caller has them already; reading them again would be a device sync);
    dtype: the layer input's."""
    cu = cu_seqlens.contiguous()
    uniform = all(n == max_seqlen for n in lengths)
    key_slots = tok_flat = offsets = None
    if backend == "triton":
        # row j of the (T_tok, 2 d_model) pool starts 2 d_model elements after row j - 1
        offsets = torch.arange(num_tokens, device=cu.device) * (2 * d_model)
    elif not uniform:
        key_slots, tok_flat = reference.key_slots_and_tokens(cu, num_tokens, max_seqlen)
    return KeyTable(backend, cu, num_tokens, max_seqlen, heads, bool(causal), float(scale), accumulation_dtype(dtype),
                    cu.device.type == "cpu", uniform, key_slots, tok_flat, offsets)


def query_table(keys: KeyTable, q_rows: Tensor, num_queries: int) -> QueryTable:
    """Built once per ponder step, from the running tokens' indices."""
    if keys.backend == "triton":
        return QueryTable(q_rows, query_offsets(keys.cu_seqlens, q_rows), False, None, None, None, None)
    if num_queries == keys.num_tokens and keys.uniform:
        # every token of equal-length sequences: queries and keys are views of (B, L, ...)
        return QueryTable(q_rows, None, False, None, None, None, None)
    cu = keys.cu_seqlens.to(torch.int64)
    cu_q = query_offsets(keys.cu_seqlens, q_rows).to(torch.int64)
    counts = cu_q[1:] - cu_q[:-1]
    slot = torch.arange(int(counts.max()), device=q_rows.device)
    real_q = slot[None] < counts[:, None]
    query_slots = torch.where(real_q, cu_q[:-1, None] + slot[None], 0)
    # the queries fill their sequences' slots in order: query a is the a-th real slot
    q_flat = torch.nonzero(real_q.reshape(-1)).squeeze(1)
    mask = None
    if keys.causal or not keys.uniform:
        key_pos = torch.arange(keys.max_seqlen, device=q_rows.device)
        if keys.causal:
            allowed = key_pos[None, None, :] <= (q_rows[query_slots] - cu[:-1, None])[:, :, None]
        else:
            allowed = (key_pos < (cu[1:] - cu[:-1])[:, None])[:, None, :]
        # padded query slots see every key: dropped afterwards, and never NaN on the way
        mask = (allowed | ~real_q[:, :, None])[:, None]
        if keys.cpu_flash:   # torch's CPU flash kernels take the mask as scores to add
            mask = torch.zeros(mask.shape, dtype=keys.acc, device=mask.device).masked_fill_(~mask, float("-inf"))
    return QueryTable(q_rows, None, True, query_slots, real_q, q_flat, mask)


class PoolViews(NamedTuple):
    """Views of one pool tensor, made when it becomes the pool (rows written
    in place later show through them)."""

    k: Tensor                     # (T_tok, heads, d) keys
    v: Tensor                     # (T_tok, heads, d) values
    padded: Optional[Tuple[Tensor, Tensor]]   # (B, heads, L, d) keys and values: equal lengths, reference


def pool_views(pool: Tensor, keys: KeyTable) -> PoolViews:
    """pool (T_tok, 2 d_model): a token's key, then its value."""
    d_model = pool.shape[1] // 2
    shape = (pool.shape[0], keys.heads, d_model // keys.heads)
    k, v = pool[:, :d_model].view(shape), pool[:, d_model:].view(shape)
    padded = None
    if keys.backend != "triton" and keys.uniform and pool.dtype == keys.acc:
        padded = _padded_keys(k, v, keys, keys.acc)
    return PoolViews(k, v, padded)


def _padded_keys(k: Tensor, v: Tensor, keys: KeyTable, acc) -> Tuple[Tensor, Tensor]:
    """(B, heads, max_len, d) keys and values of the padded sequences."""
    if keys.uniform:
        batch = keys.cu_seqlens.shape[0] - 1
        return tuple(t.view(batch, keys.max_seqlen, *t.shape[1:]).transpose(1, 2).to(acc) for t in (k, v))
    return reference.padded(k, keys.key_slots, acc), reference.padded(v, keys.key_slots, acc)


def _keys_of(views: PoolViews, keys: KeyTable) -> Tuple[Tensor, Tensor]:
    return views.padded if views.padded is not None else _padded_keys(views.k, views.v, keys, keys.acc)


def _padded_queries(q: Tensor, keys: KeyTable, queries: QueryTable, acc) -> Tensor:
    if not queries.padded:
        batch = keys.cu_seqlens.shape[0] - 1
        return q.view(batch, keys.max_seqlen, *q.shape[1:]).transpose(1, 2).to(acc)
    return reference.padded(q, queries.query_slots, acc)


def _unpadded_queries(out: Tensor, queries: QueryTable) -> Tensor:
    if not queries.padded:
        batch, heads, length, dim = out.shape
        return out.transpose(1, 2).reshape(batch * length, heads, dim)
    return reference.unpadded(out, queries.q_flat)


def _sdpa(qp: Tensor, kp: Tensor, vp: Tensor, keys: KeyTable, queries: QueryTable) -> Tensor:
    # grouped-query pools keep their Hkv heads: torch maps query head h to kv head h // g
    gqa = dict(enable_gqa=True) if kp.shape[1] != qp.shape[1] else {}
    if not queries.padded:   # every token of equal-length sequences: no mask, torch's causal path
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=keys.causal, scale=keys.scale, **gqa)
    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=queries.mask, scale=keys.scale, **gqa)


def pool_forward(q: Tensor, views: PoolViews, keys: KeyTable, queries: QueryTable) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """q (A, heads, d), views: `pool_views` of the pool. Returns the output (A, heads,
    d) in q's dtype and what the backward needs besides: the logsumexp
    (Triton), the padded output and its logsumexp (torch's CPU flash
    kernels), nothing (elsewhere the reference recomputes)."""
    if keys.backend == "triton":
        from .triton_kernels import attention_forward

        out, lse = attention_forward(q, [views.k], [views.v], keys.offsets, keys.offsets, keys.cu_seqlens, queries.cu_q,
                                     queries.q_rows, keys.causal, keys.scale, keys.max_seqlen)
        return out, (lse,)
    kp, vp = _keys_of(views, keys)
    qp = _padded_queries(q, keys, queries, keys.acc)
    if keys.cpu_flash:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, keys.causal and not queries.padded, attn_mask=queries.mask, scale=keys.scale)
        return _unpadded_queries(out, queries).to(q.dtype), (out, lse)
    out = _sdpa(qp, kp, vp, keys, queries)
    return _unpadded_queries(out, queries).to(q.dtype), ()


def pool_backward(grad_out: Tensor, q: Tensor, views: PoolViews, out: Tensor, saved: Sequence[Tensor],
                  keys: KeyTable, queries: QueryTable) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns dq (A, heads, d) and every token's dk, dv (T_tok, heads, d),
    for the pool as it was at the forward (`saved`: what `pool_forward`
    returned besides the output)."""
    if keys.backend == "triton":
        from .triton_kernels import attention_backward

        return attention_backward(grad_out, q, [views.k], [views.v], keys.offsets, keys.offsets, keys.cu_seqlens,
                                  queries.cu_q, queries.q_rows, out, saved[0], keys.causal, keys.scale,
                                  keys.max_seqlen)
    acc = keys.acc
    kp, vp = _keys_of(views, keys)
    qp = _padded_queries(q, keys, queries, acc)
    grad_padded = _padded_queries(grad_out, keys, queries, acc)
    if queries.padded:   # padded query slots carry no gradient
        grad_padded = grad_padded * queries.real_q[:, None, :, None]
    if keys.cpu_flash:
        dqp, dkp, dvp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_padded, qp, kp, vp, saved[0], saved[1], 0.0, keys.causal and not queries.padded,
            attn_mask=queries.mask, scale=keys.scale)
    else:
        leaves = [t.detach().requires_grad_() for t in (qp, kp, vp)]
        with torch.enable_grad():
            dqp, dkp, dvp = torch.autograd.grad(_sdpa(*leaves, keys, queries), leaves, grad_padded)
    dq = _unpadded_queries(dqp, queries).to(q.dtype)
    return dq, _token_rows(dkp, keys).to(q.dtype), _token_rows(dvp, keys).to(q.dtype)


def _token_rows(d_padded: Tensor, keys: KeyTable) -> Tensor:
    """(T_tok, heads, d) per-token gradients from the padded key slots: every
    token sits in exactly one slot, padding slots carry none."""
    batch, heads, length, dim = d_padded.shape
    flat = d_padded.transpose(1, 2).reshape(batch * length, heads, dim)
    return flat if keys.uniform else flat.index_select(0, keys.tok_flat)
