"""Reference twin of ragged attention (DESIGN §9), in pure PyTorch.

Readable and differentiable by ordinary autograd; it materialises each
sequence's (queries, keys) score matrix, which the kernels never do. Scores,
softmax and the weighted sum run in the accumulation dtype (float32; float64
for float64 inputs); the output is cast back to q's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .index import query_offsets, sequence_of_tokens

Pool = Union[torch.Tensor, Sequence[torch.Tensor]]


def gather_keys(pool: Pool, kv_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """(T_tok, heads, d): every token's key (or value) row, read from the pool."""
    rows = pool if isinstance(pool, torch.Tensor) else torch.cat(list(pool))
    return rows if kv_rows is None else rows.index_select(0, kv_rows.to(torch.int64))


def ragged_attention_lse(
    q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ragged_attention` that also returns the logsumexp (A, heads) of every
    query's scaled scores, in the accumulation dtype. dropout_p > 0 drops
    attention probabilities as torch.nn.MultiheadAttention does in training
    (only the reference offers it)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    num_q, heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if num_q == 0:
        return q.new_zeros(q.shape), q.new_zeros(0, heads, dtype=acc)
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    batch = lengths.numel()
    tokens = torch.arange(keys.shape[0], device=q.device)
    tok_seq = sequence_of_tokens(cu_seqlens, tokens)
    tok_pos = tokens - cu[tok_seq]                     # position inside its sequence
    cu_q = query_offsets(cu_seqlens, q_rows).to(torch.int64)
    q_seq = tok_seq[q_rows.to(torch.int64)]
    q_slot = torch.arange(num_q, device=q.device) - cu_q[q_seq]
    q_pos = tok_pos[q_rows.to(torch.int64)]
    max_len, max_q = int(lengths.max()), int((cu_q[1:] - cu_q[:-1]).max())

    # Pad per sequence: (B, max_len, heads, d) keys and (B, max_q, heads, d) queries.
    kp = keys.new_zeros(batch, max_len, heads, dim).index_put((tok_seq, tok_pos), keys).to(acc)
    vp = values.new_zeros(batch, max_len, heads, dim).index_put((tok_seq, tok_pos), values).to(acc)
    qp = q.new_zeros(batch, max_q, heads, dim).index_put((q_seq, q_slot), q).to(acc)
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) * scale

    key_pos = torch.arange(max_len, device=q.device)
    allowed = (key_pos[None, :] < lengths[:, None])[:, None, None, :]    # (B, 1, 1, K)
    if causal:
        qpos_pad = torch.zeros(batch, max_q, dtype=torch.int64, device=q.device).index_put((q_seq, q_slot), q_pos)
        allowed = allowed & (key_pos[None, None, :] <= qpos_pad[:, :, None])[:, None]
    scores = scores.masked_fill(~allowed, -math.inf)
    # Padded query slots may see no key at all; they are dropped below, but
    # must not produce NaN on the way (NaN * 0 would poison the gradients).
    scores = torch.where(allowed.any(-1, keepdim=True), scores, torch.zeros_like(scores))
    lse = torch.logsumexp(scores, dim=-1)                                  # (B, heads, max_q)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vp)
    return out[q_seq, q_slot].to(q.dtype), lse.permute(0, 2, 1)[q_seq, q_slot]


def ragged_attention(
    q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
) -> torch.Tensor:
    """Softmax attention of a subset of packed queries over their own sequences.

    q (A, heads, d): the queries, token indices q_rows (A,) ascending.
    k, v: (P, heads, d) pools (or sequences of such tensors, concatenated by
    rows); token j's key and value are pool row kv_rows[j] (default: row j).
    cu_seqlens (B + 1,) int32. Query a attends to the tokens of its sequence,
    and only to positions <= its own when causal. Returns (A, heads, d).
    """
    return ragged_attention_lse(q, k, v, cu_seqlens, q_rows, kv_rows, causal, scale)[0]
