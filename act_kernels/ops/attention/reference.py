"""Reference twin of ragged attention (design §9), in pure PyTorch.

Readable and differentiable by ordinary autograd: the sequences are padded
per sequence and handed to PyTorch's scaled_dot_product_attention with an
explicit mask. Scores, softmax and the weighted sum run in the accumulation
dtype (float32; float64 for float64 inputs); the output is cast back to q's
dtype. `ragged_attention_lse` and `ragged_attention_backward` write the same
computation out with its scores, as the twins of the kernels' forward
(which also returns the logsumexp) and backward.

Grouped-query attention: q has Hq = g * Hkv heads, the keys and values Hkv,
and query head h reads kv head h // g. The twins repeat each kv head g times
(`per_query_head`), which the kernels never do; the reference backend's
fused attention takes the Hkv heads as they are (`enable_gqa`).
"""
from __future__ import annotations

import itertools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..state import accumulation_dtype
from .index import PerStep, query_offsets, sequence_of_tokens, to_pool

Pool = Union[torch.Tensor, Sequence[torch.Tensor]]


def gather_keys(pool: Pool, kv_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """(T_tok, Hkv, d): every token's key (or value) row, read from the pool."""
    rows = pool if isinstance(pool, torch.Tensor) else torch.cat(list(pool))
    return rows if kv_rows is None else rows.index_select(0, kv_rows.to(torch.int64))


def per_query_head(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, Hq, d) from (N, Hkv, d) key or value rows: query head h reads kv
    head h // g, g = Hq / Hkv (a copy when g > 1; the twins are oracles)."""
    return rows if rows.shape[1] == heads else rows.repeat_interleave(heads // rows.shape[1], dim=1)


def per_kv_head(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(N, Hkv, d) from per-query-head gradients (N, Hq, d): each kv head's
    gradient is the sum over the g query heads that read it."""
    n, heads, dim = grad.shape
    return grad if heads == kv_heads else grad.reshape(n, kv_heads, heads // kv_heads, dim).sum(2)


class Layout(NamedTuple):
    """Where queries and keys sit once padded per sequence: (B, max_q) query
    slots and (B, max_len) key slots. Only index vectors, no (queries, keys)
    matrix: `allowed()` builds the mask when it is needed."""

    key_slots: torch.Tensor    # (B, max_len) int64: the token at each key slot (a valid token at padding)
    query_slots: torch.Tensor  # (B, max_q) int64: the query at each query slot (0 at padding)
    real_q: torch.Tensor       # (B, max_q) bool: the slot holds a query
    q_pos: torch.Tensor        # (B, max_q) int64: the query's position in its sequence
    lengths: torch.Tensor      # (B,) int64
    q_flat: torch.Tensor       # (A,) int64: query a sits at flat slot q_flat[a] of (B * max_q)
    tok_flat: torch.Tensor     # (T_tok,) int64: token j sits at flat slot tok_flat[j] of (B * max_len)

    def allowed(self, causal: bool) -> Optional[torch.Tensor]:
        """(B, 1, max_q, max_len) bool: which keys each query slot sees; None
        when every slot sees every key (full attention over equal lengths),
        which lets PyTorch take its unmasked fused kernel."""
        if not causal and bool((self.lengths == self.key_slots.shape[1]).all()):
            return None
        key_pos = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)
        allowed = (key_pos[None, None, :] < self.lengths[:, None, None])
        if causal:
            allowed = allowed & (key_pos[None, None, :] <= self.q_pos[:, :, None])
        # Padded query slots see every key: they are dropped afterwards, and a
        # query that sees no key at all would be NaN on the way.
        return (allowed | ~self.real_q[:, :, None])[:, None]


def key_slots_and_tokens(cu_seqlens: torch.Tensor, num_tokens: int, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The key side of the padded layout: (B, max_len) the token at each key
    slot (a valid token at padding), and (T_tok,) the flat slot of every token."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    slot_k = torch.arange(max_len, device=cu.device)
    key_slots = torch.where(slot_k[None] < lengths[:, None], cu[:-1, None] + slot_k[None], 0)
    tokens = torch.arange(num_tokens, device=cu.device)
    tok_seq = sequence_of_tokens(cu_seqlens, tokens)
    return key_slots, tok_seq * max_len + tokens - cu[tok_seq]


def layout(cu_seqlens: torch.Tensor, q_rows: torch.Tensor, num_tokens: int, max_len: Optional[int] = None) -> Layout:
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    device = cu.device
    q_rows = q_rows.to(torch.int64)
    cu_q = query_offsets(cu_seqlens, q_rows).to(torch.int64)
    counts = cu_q[1:] - cu_q[:-1]
    max_len = int(lengths.max()) if max_len is None else max_len
    max_q = int(counts.max())
    slot_q = torch.arange(max_q, device=device)
    key_slots, tok_flat = key_slots_and_tokens(cu_seqlens, num_tokens, max_len)
    real_q = slot_q[None] < counts[:, None]
    query_slots = torch.where(real_q, cu_q[:-1, None] + slot_q[None], 0)
    q_pos = q_rows[query_slots] - cu[:-1, None]
    q_seq = sequence_of_tokens(cu_seqlens, q_rows)
    q_flat = q_seq * max_q + torch.arange(q_rows.numel(), device=device) - cu_q[q_seq]
    return Layout(key_slots, query_slots, real_q, q_pos, lengths, q_flat, tok_flat)


def padded(rows: torch.Tensor, slots: torch.Tensor, dtype) -> torch.Tensor:
    """(B, heads, M, d) from (N, heads, d) rows and (B, M) slot indices."""
    batch, m = slots.shape
    return rows.index_select(0, slots.reshape(-1)).reshape(batch, m, *rows.shape[1:]).transpose(1, 2).to(dtype)


def pool_rows(pool: Sequence[Tensor], index: Tensor) -> Tensor:
    """pool rows `index` (n,) of segments read as their row-wise concatenation.
    Gathering from each segment costs n rows per segment, concatenating costs
    the whole pool: a decode step reads a few rows of a long cache, so it
    gathers (the sizes are host metadata: no device read either way)."""
    if len(pool) == 1:
        return pool[0].index_select(0, index)
    sizes = [t.shape[0] for t in pool]
    if len(pool) * index.numel() >= sum(sizes):
        return torch.cat(list(pool)).index_select(0, index)
    starts = list(itertools.accumulate(sizes, initial=0))
    segment = torch.bucketize(index, torch.tensor(starts[1:-1], dtype=index.dtype).to(index.device), right=True)
    out = None
    for k, (rows, start) in enumerate(zip(pool, starts)):
        if not rows.shape[0]:
            continue
        part = rows.index_select(0, (index - start).clamp(0, rows.shape[0] - 1))
        out = part if out is None else torch.where((segment == k).view(-1, *[1] * (part.dim() - 1)), part, out)
    return out


def padded_pool(pool: Sequence[Tensor], slots: Tensor, dtype) -> Tensor:
    """`padded` of the pool rows at `slots`, the pool given as segments."""
    batch, m = slots.shape
    rows = pool_rows(pool, slots.reshape(-1))
    return rows.reshape(batch, m, *rows.shape[1:]).transpose(1, 2).to(dtype)


def unpadded(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(n, heads, d) rows at `flat` slots of a (B, heads, M, d) padded tensor."""
    batch, heads, m, dim = x.shape
    return x.transpose(1, 2).reshape(batch * m, heads, dim).index_select(0, flat)


def ragged_attention(
    q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of a subset of packed queries over their own sequences.

    q (A, Hq, d): the queries, token indices q_rows (A,) ascending.
    k, v: (P, Hkv, d) pools (or sequences of such tensors, concatenated by
    rows), Hq = g * Hkv: query head h reads kv head h // g; token j's key
    and value are pool row kv_rows[j] (default: row j).
    cu_seqlens (B + 1,) int32. Query a attends to the tokens of its sequence,
    and only to positions <= its own when causal. Returns (A, Hq, d).

    Written as PyTorch's scaled_dot_product_attention over the sequences
    padded to (B, heads, max queries, max length) with an explicit mask.
    dropout_p > 0 drops attention probabilities as nn.MultiheadAttention does
    in training.
    """
    acc = accumulation_dtype(q.dtype)
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:  # still a function of q, k and v, so autograd sees zero gradients
        return q.new_zeros(q.shape) + 0 * (keys.sum() + values.sum()).to(q.dtype)
    keys, values = per_query_head(keys, q.shape[1]), per_query_head(values, q.shape[1])
    lay = layout(cu_seqlens, q_rows, keys.shape[0])
    out = torch.nn.functional.scaled_dot_product_attention(
        padded(q, lay.query_slots, acc), padded(keys, lay.key_slots, acc), padded(values, lay.key_slots, acc),
        attn_mask=lay.allowed(causal), dropout_p=dropout_p, scale=scale)
    return unpadded(out, lay.q_flat).to(q.dtype)


def _probabilities(q, keys, lay: Layout, causal: bool, scale: float, acc):
    """Softmax probabilities (B, heads, max_q, max_len) and the logsumexp, written out."""
    scores = padded(q, lay.query_slots, acc) @ padded(keys, lay.key_slots, acc).transpose(-1, -2) * scale
    allowed = lay.allowed(causal)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)


def ragged_attention_lse(
    q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ragged_attention` written out with its scores, also returning the
    logsumexp (A, heads) of every query's scaled scores (accumulation dtype)."""
    acc = accumulation_dtype(q.dtype)
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), q.new_zeros(0, q.shape[1], dtype=acc)
    keys, values = per_query_head(keys, q.shape[1]), per_query_head(values, q.shape[1])
    lay = layout(cu_seqlens, q_rows, keys.shape[0])
    probs, lse = _probabilities(q, keys, lay, causal, scale, acc)
    out = probs @ padded(values, lay.key_slots, acc)
    return unpadded(out, lay.q_flat).to(q.dtype), lse.transpose(1, 2).reshape(-1, q.shape[1])[lay.q_flat]


def ragged_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: Pool, v: Pool, cu_seqlens: torch.Tensor, q_rows: torch.Tensor,
    kv_rows: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward written out (no autograd): returns dq (A, Hq, d) and the
    per-token dk, dv (T_tok, Hkv, d), the twin of the Triton backward.

        dV = P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO * O)),
        dQ = scale dS K,  dK = scale dS^T Q

    per query head; a kv head's dK and dV sum those of its g query heads.
    """
    acc = accumulation_dtype(q.dtype)
    keys, values = gather_keys(k, kv_rows), gather_keys(v, kv_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(keys), torch.zeros_like(values)
    kv_heads = keys.shape[1]
    keys, values = per_query_head(keys, q.shape[1]), per_query_head(values, q.shape[1])
    lay = layout(cu_seqlens, q_rows, keys.shape[0])
    probs, _ = _probabilities(q, keys, lay, causal, scale, acc)
    d_out = padded(grad_out, lay.query_slots, acc) * lay.real_q[:, None, :, None]   # padded slots carry none
    vp, qp, kp = padded(values, lay.key_slots, acc), padded(q, lay.query_slots, acc), padded(keys, lay.key_slots, acc)
    out = probs @ vp
    d_v = probs.transpose(-1, -2) @ d_out
    d_s = probs * (d_out @ vp.transpose(-1, -2) - (d_out * out).sum(-1, keepdim=True))
    d_q = d_s @ kp * scale
    d_k = d_s.transpose(-1, -2) @ qp * scale
    return (unpadded(d_q, lay.q_flat).to(q.dtype), per_kv_head(unpadded(d_k, lay.tok_flat), kv_heads).to(q.dtype),
            per_kv_head(unpadded(d_v, lay.tok_flat), kv_heads).to(q.dtype))


# -- the reference backend of RaggedAttention: PyTorch's fused attention over padded sequences --

# the layers of one ponder step share the padded layout of their packed
# sequences and running queries
step_layout = PerStep(layout)


_last_mask: list = [None, None, None]
# Only small masks are kept between calls (a large one costs more to hold than
# to rebuild: there the attention's own work dwarfs the host's).
MASK_KEPT = 1 << 22


def mask_of(lay: Layout, causal: bool) -> Optional[torch.Tensor]:
    """`lay.allowed(causal)`, reused for the same layout."""
    if _last_mask[0] is lay and _last_mask[1] == causal:
        return _last_mask[2]
    mask = lay.allowed(causal)
    kept = mask is None or mask.numel() <= MASK_KEPT
    _last_mask[:] = [lay, causal, mask] if kept else [None, None, None]
    return mask


def padded_sdpa(q, k_pool, v_pool, lay, slots, causal, scale, grad=False):
    """The reference backend's attention: PyTorch's scaled_dot_product_attention
    over sequences padded to (B, heads, max_q, max_len), keys and values read
    from the pool at `slots` (B, max_len) with their own Hkv heads (grouped
    queries through `enable_gqa`, no repeat). Returns the (A, Hq, d) output
    and the padded leaves (q, k, v) when grad is set."""
    acc = accumulation_dtype(q.dtype)
    leaves = [padded(q, lay.query_slots, acc), padded_pool(k_pool, slots, acc), padded_pool(v_pool, slots, acc)]
    if grad:
        leaves = [t.detach().requires_grad_() for t in leaves]
    gqa = dict(enable_gqa=True) if k_pool[0].shape[1] != q.shape[1] else {}
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=mask_of(lay, causal), scale=scale,
                                                           **gqa)
    return unpadded(out, lay.q_flat).to(q.dtype), leaves


def slot_grads(d_padded: Tensor, slots: Tensor, pool: Sequence[Tensor]) -> List[Tensor]:
    """Gradients of padded keys (B, Hkv, max_len, d) back onto the pool's
    segments. Padding slots point at a real row but carry exactly zero: their
    keys are masked out of every softmax."""
    batch, heads, m, dim = d_padded.shape
    return to_pool(d_padded.transpose(1, 2).reshape(batch * m, heads, dim), slots.reshape(-1), pool)
