"""Reference twin of ragged attention (DESIGN §9), in pure PyTorch.

Readable and differentiable by ordinary autograd: the sequences are padded
per sequence and handed to PyTorch's scaled_dot_product_attention with an
explicit mask. Scores, softmax and the weighted sum run in the accumulation
dtype (float32; float64 for float64 inputs); the output is cast back to q's
dtype. `ragged_attention_lse` and `ragged_attention_backward` write the same
computation out with its scores, as the twins of the kernels' forward
(which also returns the logsumexp) and backward.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .index import query_offsets, sequence_of_tokens

Pool = Union[torch.Tensor, Sequence[torch.Tensor]]


def gather_keys(pool: Pool, kv_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """(T_tok, heads, d): every token's key (or value) row, read from the pool."""
    rows = pool if isinstance(pool, torch.Tensor) else torch.cat(list(pool))
    return rows if kv_rows is None else rows.index_select(0, kv_rows.to(torch.int64))


class _Layout(NamedTuple):
    """Where queries and keys sit once padded per sequence."""

    key_slots: torch.Tensor    # (B, max_len) int64: the token at each key slot (0 at padding)
    query_slots: torch.Tensor  # (B, max_q) int64: the query at each query slot (0 at padding)
    allowed: torch.Tensor      # (B, 1, max_q, max_len) bool: which keys each query slot sees
    q_index: tuple             # (q_seq, q_slot): query a sits at [q_seq[a], q_slot[a]]
    tok_index: tuple           # (tok_seq, tok_pos): token j sits at [tok_seq[j], tok_pos[j]]


def _layout(cu_seqlens, q_rows, causal, num_tokens, device) -> _Layout:
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    batch = lengths.numel()
    tokens = torch.arange(num_tokens, device=device)
    tok_seq = sequence_of_tokens(cu_seqlens, tokens)
    tok_pos = tokens - cu[tok_seq]                     # position inside its sequence
    cu_q = query_offsets(cu_seqlens, q_rows).to(torch.int64)
    queries = torch.arange(q_rows.numel(), device=device)
    q_seq = tok_seq[q_rows.to(torch.int64)]
    q_slot = queries - cu_q[q_seq]
    max_len, max_q = int(lengths.max()), int((cu_q[1:] - cu_q[:-1]).max())

    key_slots = torch.zeros(batch, max_len, dtype=torch.int64, device=device).index_put((tok_seq, tok_pos), tokens)
    query_slots = torch.zeros(batch, max_q, dtype=torch.int64, device=device).index_put((q_seq, q_slot), queries)
    key_pos = torch.arange(max_len, device=device)
    allowed = (key_pos[None, :] < lengths[:, None])[:, None, :].expand(batch, max_q, max_len)
    if causal:
        q_pos = torch.zeros(batch, max_q, dtype=torch.int64, device=device).index_put(
            (q_seq, q_slot), tok_pos[q_rows.to(torch.int64)])
        allowed = allowed & (key_pos[None, None, :] <= q_pos[:, :, None])
    # Padded query slots see every key: they are dropped afterwards, and a
    # query that sees no key at all would be NaN on the way.
    real_q = torch.zeros(batch, max_q, dtype=torch.bool, device=device).index_put(
        (q_seq, q_slot), torch.ones_like(q_seq, dtype=torch.bool))
    allowed = allowed | ~real_q[:, :, None]
    return _Layout(key_slots, query_slots, allowed[:, None], (q_seq, q_slot), (tok_seq, tok_pos))


def _padded(rows: torch.Tensor, slots: torch.Tensor, dtype) -> torch.Tensor:
    """(B, heads, M, d) from (N, heads, d) rows and (B, M) slot indices."""
    batch, m = slots.shape
    return rows.index_select(0, slots.reshape(-1)).reshape(batch, m, *rows.shape[1:]).transpose(1, 2).to(dtype)


def ragged_attention(
    q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of a subset of packed queries over their own sequences.

    q (A, heads, d): the queries, token indices q_rows (A,) ascending.
    k, v: (P, heads, d) pools (or sequences of such tensors, concatenated by
    rows); token j's key and value are pool row kv_rows[j] (default: row j).
    cu_seqlens (B + 1,) int32. Query a attends to the tokens of its sequence,
    and only to positions <= its own when causal. Returns (A, heads, d).

    Written as PyTorch's scaled_dot_product_attention over the sequences
    padded to (B, heads, max queries, max length) with an explicit mask.
    dropout_p > 0 drops attention probabilities as nn.MultiheadAttention does
    in training.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:  # still a function of q, k and v, so autograd sees zero gradients
        return q.new_zeros(q.shape) + 0 * (keys.sum() + values.sum()).to(q.dtype)
    lay = _layout(cu_seqlens, q_rows, causal, keys.shape[0], q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        _padded(q, lay.query_slots, acc), _padded(keys, lay.key_slots, acc), _padded(values, lay.key_slots, acc),
        attn_mask=lay.allowed, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[lay.q_index].to(q.dtype)


def _probabilities(q, keys, lay: _Layout, scale: float, acc):
    """Softmax probabilities (B, heads, max_q, max_len) and the logsumexp, written out."""
    scores = _padded(q, lay.query_slots, acc) @ _padded(keys, lay.key_slots, acc).transpose(-1, -2) * scale
    scores = scores.masked_fill(~lay.allowed, -math.inf)
    return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)


def ragged_attention_lse(
    q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ragged_attention` written out with its scores, also returning the
    logsumexp (A, heads) of every query's scaled scores (accumulation dtype)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), q.new_zeros(0, q.shape[1], dtype=acc)
    lay = _layout(cu_seqlens, q_rows, causal, keys.shape[0], q.device)
    probs, lse = _probabilities(q, keys, lay, scale, acc)
    out = probs @ _padded(values, lay.key_slots, acc)
    return out.transpose(1, 2)[lay.q_index].to(q.dtype), lse.transpose(1, 2)[lay.q_index]


def ragged_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward written out (no autograd): returns dq (A, heads, d) and the
    per-token dk, dv (T_tok, heads, d), the twin of the Triton backward.

        dV = P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO * O)),
        dQ = scale dS K,  dK = scale dS^T Q
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(keys), torch.zeros_like(values)
    lay = _layout(cu_seqlens, q_rows, causal, keys.shape[0], q.device)
    probs, _ = _probabilities(q, keys, lay, scale, acc)
    real_q = torch.zeros(lay.query_slots.shape, dtype=torch.bool, device=q.device).index_put(
        lay.q_index, torch.ones_like(lay.q_index[0], dtype=torch.bool))
    d_out = _padded(grad_out, lay.query_slots, acc) * real_q[:, None, :, None]   # padded slots carry none
    vp, qp, kp = _padded(values, lay.key_slots, acc), _padded(q, lay.query_slots, acc), _padded(keys, lay.key_slots, acc)
    out = probs @ vp
    d_v = probs.transpose(-1, -2) @ d_out
    d_s = probs * (d_out @ vp.transpose(-1, -2) - (d_out * out).sum(-1, keepdim=True))
    d_q = d_s @ kp * scale
    d_k = d_s.transpose(-1, -2) @ qp * scale
    return (d_q.transpose(1, 2)[lay.q_index].to(q.dtype), d_k.transpose(1, 2)[lay.tok_index].to(q.dtype),
            d_v.transpose(1, 2)[lay.tok_index].to(q.dtype))
