"""Ragged attention as an autograd Function, a torch.library op, and the public
function `ragged_attention` (DESIGN §9).

The eager path calls the Triton launchers through `RaggedAttention` directly;
the op `act_kernels::ragged_attention` (with its backward op and fake
implementations) serves torch.compile and fake-tensor users.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable
from torch import Tensor

from ...backends import op_backend, resolve_attention
from .checks import as_pool, check_attention_args
from . import reference
from ..launch import dense
from ..state import accumulation_dtype
from .index import query_offsets, row_offsets


def _max_seqlen(cu_seqlens: Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def _to_pool(values: Tensor, rows: Tensor, pool: Sequence[Tensor]) -> List[Tensor]:
    """Gradients (N, heads, d) of the pool rows `rows` (N,), summed per row and
    split back onto the pool's segments (rows nobody read get zeros)."""
    d_pool = values.new_zeros(sum(t.shape[0] for t in pool), *values.shape[1:], dtype=pool[0].dtype)
    d_pool.index_add_(0, rows, values.to(pool[0].dtype))
    return list(d_pool.split([t.shape[0] for t in pool]))


def _pool_grads(d_tok: Tensor, pool: Sequence[Tensor], kv_rows: Optional[Tensor]) -> List[Tensor]:
    """Per-token gradients (T_tok, heads, d) back onto the pool's segments."""
    if kv_rows is None and len(pool) == 1:
        return [d_tok]
    rows = torch.arange(d_tok.shape[0], device=d_tok.device) if kv_rows is None else kv_rows.to(torch.int64)
    return _to_pool(d_tok, rows, pool)


class _Launch:
    """The Triton forward and backward for one call, with the index tables
    they share (built once per forward)."""

    def __init__(self, k_pool, v_pool, cu_seqlens, q_rows, kv_rows, num_tokens):
        from .triton_kernels import uniform_pool

        # the kernels read the indices by position, and every pool segment
        # with one head stride and a unit feature stride
        self.cu_seqlens, self.q_rows = dense(cu_seqlens), dense(q_rows)
        self.k_pool, self.v_pool = uniform_pool(k_pool), uniform_pool(v_pool)
        self.k_off = row_offsets(self.k_pool, kv_rows, num_tokens)
        self.v_off = row_offsets(self.v_pool, kv_rows, num_tokens)
        self.cu_q = query_offsets(self.cu_seqlens, self.q_rows)


class RaggedAttention(torch.autograd.Function):
    """forward(ctx, backend, causal, scale, max_seqlen, n_k, q, cu_seqlens, q_rows, kv_rows, *k_pool, *v_pool).

    Flash-style on every backend: the forward saves q, the pools, the output
    and index vectors (Triton: also the logsumexp); the backward recomputes
    the probabilities ("triton": the Triton backward kernels; "reference":
    PyTorch's fused attention over the padded sequences, differentiated by
    autograd). No (queries, keys) matrix is kept between the two."""

    @staticmethod
    def forward(ctx, backend, causal, scale, max_seqlen, n_k, q, cu_seqlens, q_rows, kv_rows, *pool):
        k_pool, v_pool = pool[:n_k], pool[n_k:]
        num_tokens = kv_rows.numel() if kv_rows is not None else sum(t.shape[0] for t in k_pool)
        if backend == "triton":
            from .triton_kernels import attention_forward

            launch = _Launch(k_pool, v_pool, cu_seqlens, q_rows, kv_rows, num_tokens)
            cu_seqlens, q_rows = launch.cu_seqlens, launch.q_rows
            out, lse = attention_forward(q, launch.k_pool, launch.v_pool, launch.k_off, launch.v_off,
                                         cu_seqlens, launch.cu_q, q_rows, causal, scale, max_seqlen)
            k_pool, v_pool, tables = launch.k_pool, launch.v_pool, (launch.cu_q, launch.k_off, launch.v_off)
        else:
            # PyTorch's fused attention over the padded sequences, keys and
            # values gathered straight from the pool; only index vectors are
            # kept for the backward's recomputation.
            lay = reference.layout(cu_seqlens, q_rows, num_tokens, max_seqlen)
            slots = lay.key_slots if kv_rows is None else kv_rows.to(torch.int64)[lay.key_slots]
            out = _padded_sdpa(q, k_pool, v_pool, lay, slots, causal, scale)[0].detach()
            lse, tables = None, (*lay, slots)
        ctx.meta = (backend, causal, scale, max_seqlen, len(k_pool))
        ctx.save_for_backward(q, cu_seqlens, q_rows, kv_rows, out, lse, *k_pool, *v_pool, *tables)
        return out

    @staticmethod
    @once_differentiable   # kernels autograd cannot see through: a 2nd derivative raises
    def backward(ctx, grad_out):
        backend, causal, scale, max_seqlen, n_k = ctx.meta
        q, cu_seqlens, q_rows, kv_rows, out, lse, *rest = ctx.saved_tensors
        k_pool, v_pool, tables = rest[:n_k], rest[n_k:2 * n_k], rest[2 * n_k:]
        if backend == "triton":
            from .triton_kernels import attention_backward

            cu_q, k_off, v_off = tables
            dq, dk, dv = attention_backward(grad_out, q, k_pool, v_pool, k_off, v_off, cu_seqlens, cu_q, q_rows,
                                            out, lse, causal, scale, max_seqlen)
            return (None, None, None, None, None, dq, None, None, None,
                    *_pool_grads(dk, k_pool, kv_rows), *_pool_grads(dv, v_pool, kv_rows))
        # the reference backend: recompute the fused attention with autograd
        lay, slots = reference.Layout(*tables[:-1]), tables[-1]
        with torch.enable_grad():
            o, leaves = _padded_sdpa(q, k_pool, v_pool, lay, slots, causal, scale, grad=True)
            dqp, dkp, dvp = torch.autograd.grad(o, leaves, grad_out)
        dq = reference.unpadded(dqp, lay.q_flat).to(q.dtype)
        return (None, None, None, None, None, dq, None, None, None,
                *_slot_grads(dkp, slots, k_pool), *_slot_grads(dvp, slots, v_pool))


def _padded_sdpa(q, k_pool, v_pool, lay, slots, causal, scale, grad=False):
    """The reference backend's attention: PyTorch's scaled_dot_product_attention
    over sequences padded to (B, heads, max_q, max_len), keys and values read
    from the pool at `slots` (B, max_len). Returns the (A, heads, d) output and
    the padded leaves (q, k, v) when grad is set."""
    acc = accumulation_dtype(q.dtype)
    k_rows = k_pool[0] if len(k_pool) == 1 else torch.cat(list(k_pool))
    v_rows = v_pool[0] if len(v_pool) == 1 else torch.cat(list(v_pool))
    leaves = [reference.padded(q, lay.query_slots, acc), reference.padded(k_rows, slots, acc),
              reference.padded(v_rows, slots, acc)]
    if grad:
        leaves = [t.detach().requires_grad_() for t in leaves]
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=lay.allowed(causal), scale=scale)
    return reference.unpadded(out, lay.q_flat).to(q.dtype), leaves


def _slot_grads(d_padded: Tensor, slots: Tensor, pool: Sequence[Tensor]) -> List[Tensor]:
    """Gradients of padded keys (B, heads, max_len, d) back onto the pool's
    segments. Padding slots point at a real row but carry exactly zero: their
    keys are masked out of every softmax."""
    batch, heads, m, dim = d_padded.shape
    return _to_pool(d_padded.transpose(1, 2).reshape(batch * m, heads, dim), slots.reshape(-1), pool)


def attend(q: Tensor, k_pool: Sequence[Tensor], v_pool: Sequence[Tensor], cu_seqlens: Tensor, q_rows: Tensor,
           kv_rows: Optional[Tensor], causal: bool, scale: float, max_seqlen: int, backend: str) -> Tensor:
    """`ragged_attention` without the argument checks, for callers that build
    valid indices themselves (the transformer layer). backend is concrete."""
    return RaggedAttention.apply(backend, causal, scale, max_seqlen, len(k_pool), q, cu_seqlens, q_rows, kv_rows,
                                 *k_pool, *v_pool)


def ragged_attention(
    q: Tensor,
    k,
    v,
    cu_seqlens: Tensor,
    q_rows: Tensor,
    *,
    kv_rows: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention of a subset of packed tokens (the running queries)
    over the tokens of their own sequences.

    q:          (A, heads, d) queries, one per running token
    k, v:       (P, heads, d) key and value pools, or sequences of such
                tensors read as their row-wise concatenation (never copied)
    cu_seqlens: (B + 1,) int32 offsets of the B packed sequences, T_tok tokens
    q_rows:     (A,) int64/int32 packed token index of every query, strictly ascending
    kv_rows:    (T_tok,) optional: token j's key and value are pool row
                kv_rows[j] (default: row j, so P = T_tok)
    causal:     query at position i sees positions <= i of its sequence
                (positions counted from the sequence start, not bottom-right aligned)
    scale:      default 1 / sqrt(d); max_seqlen: optional longest length (saves a sync)
    backend:    "auto" | "reference" | "triton"

    Returns (A, heads, d) in q's dtype. Softmax statistics are float32
    (float64 on the reference for float64 inputs). Every backend saves only
    q, k, v, the output and index vectors (Triton also the logsumexp) for
    the backward, which recomputes the probabilities; the Triton kernels never store an (A, T_tok) matrix
    at all. `act_kernels.ops.attention.reference.ragged_attention` is the
    plain autograd twin.

        cu = torch.tensor([0, 3, 5], dtype=torch.int32)   # two sequences: 3 and 2 tokens
        q_rows = torch.tensor([0, 2, 4])                   # tokens 0, 2 (seq 0) and 4 (seq 1) run
        out = ak.ragged_attention(q, k, v, cu, q_rows, causal=True)
    """
    k_pool, v_pool = as_pool(k, "k"), as_pool(v, "v")
    check_attention_args(q, k_pool, v_pool, cu_seqlens, q_rows, kv_rows, scale, max_seqlen)
    chosen = resolve_attention(backend, q.device, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if max_seqlen is None:
        max_seqlen = _max_seqlen(cu_seqlens)
    return attend(q, k_pool, v_pool, cu_seqlens, q_rows, kv_rows, bool(causal), scale, max_seqlen, chosen)


# ---------------------------------------------------------------------------
# torch.library ops: act_kernels::ragged_attention and its backward
# ---------------------------------------------------------------------------

def _op_backend(device: torch.device, dtype: torch.dtype) -> str:
    # no CUDA C++ kernel, and Triton takes no float64
    backend = op_backend(device, has_cuda_kernels=False)
    return "reference" if dtype == torch.float64 else backend


@torch.library.custom_op("act_kernels::ragged_attention", mutates_args=())
def ragged_attention_op(
    q: Tensor, k: List[Tensor], v: List[Tensor], cu_seqlens: Tensor, q_rows: Tensor,
    kv_rows: Optional[Tensor], causal: bool, scale: float, max_seqlen: int,
) -> Tuple[Tensor, Tensor]:
    """Returns (out (A, heads, d), lse (A, heads)); see `ragged_attention`."""
    if _op_backend(q.device, q.dtype) == "reference":
        out, lse = reference.ragged_attention_lse(q, k, v, cu_seqlens, q_rows, kv_rows, causal, scale)
        return out.clone(), lse.clone()
    from .triton_kernels import attention_forward

    num_tokens = kv_rows.numel() if kv_rows is not None else sum(t.shape[0] for t in k)
    launch = _Launch(k, v, cu_seqlens, q_rows, kv_rows, num_tokens)
    return attention_forward(q, launch.k_pool, launch.v_pool, launch.k_off, launch.v_off, launch.cu_seqlens,
                             launch.cu_q, launch.q_rows, causal, scale, max_seqlen)


@ragged_attention_op.register_fake
def _(q, k, v, cu_seqlens, q_rows, kv_rows, causal, scale, max_seqlen):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("act_kernels::ragged_attention_backward", mutates_args=())
def ragged_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: List[Tensor], v: List[Tensor], cu_seqlens: Tensor, q_rows: Tensor,
    kv_rows: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool, scale: float, max_seqlen: int,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Returns (dq, dk per segment of k, dv per segment of v)."""
    if _op_backend(q.device, q.dtype) == "reference":
        dq, dk, dv = reference.ragged_attention_backward(grad_out, q, k, v, cu_seqlens, q_rows, kv_rows,
                                                         causal, scale)
        return dq, [t.clone() for t in _pool_grads(dk, k, kv_rows)], [t.clone() for t in _pool_grads(dv, v, kv_rows)]
    from .triton_kernels import attention_backward

    num_tokens = kv_rows.numel() if kv_rows is not None else sum(t.shape[0] for t in k)
    launch = _Launch(k, v, cu_seqlens, q_rows, kv_rows, num_tokens)
    dq, dk, dv = attention_backward(grad_out, q, launch.k_pool, launch.v_pool, launch.k_off, launch.v_off,
                                    launch.cu_seqlens, launch.cu_q, launch.q_rows, out, lse, causal, scale,
                                    max_seqlen)
    # an op's outputs may not alias each other: no views of one buffer
    return dq, [t.clone() for t in _pool_grads(dk, k, kv_rows)], [t.clone() for t in _pool_grads(dv, v, kv_rows)]


@ragged_attention_backward_op.register_fake
def _(grad_out, q, k, v, cu_seqlens, q_rows, kv_rows, out, lse, causal, scale, max_seqlen):
    return q.new_empty(q.shape), [t.new_empty(t.shape) for t in k], [t.new_empty(t.shape) for t in v]


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, q_rows, kv_rows, causal, scale, max_seqlen = inputs
    out, lse = output
    ctx.meta = (len(k), causal, scale, max_seqlen, kv_rows is None)
    saved = [q, cu_seqlens, q_rows, out, lse, *k, *v] + ([] if kv_rows is None else [kv_rows])
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out, grad_lse):
    n_k, causal, scale, max_seqlen, no_rows = ctx.meta
    q, cu_seqlens, q_rows, out, lse, *rest = ctx.saved_tensors
    kv_rows = None if no_rows else rest.pop()
    k, v = rest[:n_k], rest[n_k:]
    dq, dk, dv = ragged_attention_backward_op(grad_out.contiguous(), q, k, v, cu_seqlens, q_rows, kv_rows,
                                              out, lse, causal, scale, max_seqlen)
    return dq, list(dk), list(dv), None, None, None, None, None, None


ragged_attention_op.register_autograd(_backward, setup_context=_setup)
