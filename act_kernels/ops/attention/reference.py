"""Reference twin of ragged attention (DESIGN §9), in pure PyTorch.

Readable and differentiable by ordinary autograd; it materialises each
sequence's (queries, keys) score matrix, which the kernels never do. Scores,
softmax and the weighted sum run in the accumulation dtype (float32; float64
for float64 inputs); the output is cast back to q's dtype.
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


class _Padded(NamedTuple):
    """Queries, keys and values padded per sequence, with the scatter indices."""

    q: torch.Tensor        # (B, max_q, heads, d), accumulation dtype
    k: torch.Tensor        # (B, max_len, heads, d)
    v: torch.Tensor
    allowed: torch.Tensor  # (B, 1 | heads, max_q, max_len) bool: which keys a query sees
    q_index: tuple         # (q_seq, q_slot): query a sits at [q_seq[a], q_slot[a]]
    tok_index: tuple       # (tok_seq, tok_pos): token j sits at [tok_seq[j], tok_pos[j]]


def _pad(q, keys, values, cu_seqlens, q_rows, causal, acc) -> _Padded:
    num_q, heads, dim = q.shape
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

    kp = keys.new_zeros(batch, max_len, heads, dim).index_put((tok_seq, tok_pos), keys).to(acc)
    vp = values.new_zeros(batch, max_len, heads, dim).index_put((tok_seq, tok_pos), values).to(acc)
    qp = q.new_zeros(batch, max_q, heads, dim).index_put((q_seq, q_slot), q).to(acc)
    key_pos = torch.arange(max_len, device=q.device)
    allowed = (key_pos[None, :] < lengths[:, None])[:, None, None, :]    # (B, 1, 1, K)
    if causal:
        qpos_pad = torch.zeros(batch, max_q, dtype=torch.int64, device=q.device).index_put((q_seq, q_slot), q_pos)
        allowed = allowed & (key_pos[None, None, :] <= qpos_pad[:, :, None])[:, None]
    return _Padded(qp, kp, vp, allowed, (q_seq, q_slot), (tok_seq, tok_pos))


def _probabilities(pad: _Padded, scale: float):
    """Softmax probabilities (B, heads, max_q, max_len) and the logsumexp."""
    scores = torch.einsum("bqhd,bkhd->bhqk", pad.q, pad.k) * scale
    scores = scores.masked_fill(~pad.allowed, -math.inf)
    # Padded query slots may see no key at all; they are dropped later, but
    # must not produce NaN on the way (NaN * 0 would poison the gradients).
    scores = torch.where(pad.allowed.any(-1, keepdim=True), scores, torch.zeros_like(scores))
    return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)


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
    if num_q == 0:  # still a function of q, k and v, so autograd sees zero gradients
        empty = q.new_zeros(q.shape) + 0 * (keys.sum() + values.sum()).to(q.dtype)
        return empty, q.new_zeros(0, heads, dtype=acc)
    pad = _pad(q, keys, values, cu_seqlens, q_rows, causal, acc)
    probs, lse = _probabilities(pad, scale)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, pad.v)
    return out[pad.q_index].to(q.dtype), lse.permute(0, 2, 1)[pad.q_index]


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
    pad = _pad(q, keys, values, cu_seqlens, q_rows, causal, acc)
    probs, _ = _probabilities(pad, scale)
    d_out = torch.zeros_like(pad.q).index_put(pad.q_index, grad_out.to(acc))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, pad.v)
    d_v = torch.einsum("bhqk,bqhd->bkhd", probs, d_out)
    d_p = torch.einsum("bqhd,bkhd->bhqk", d_out, pad.v)
    d_s = probs * (d_p - (d_out * out).sum(-1).permute(0, 2, 1)[..., None])
    d_q = torch.einsum("bhqk,bkhd->bqhd", d_s, pad.k) * scale
    d_k = torch.einsum("bhqk,bqhd->bkhd", d_s, pad.q) * scale
    return (d_q[pad.q_index].to(q.dtype), d_k[pad.tok_index].to(q.dtype), d_v[pad.tok_index].to(q.dtype))


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
