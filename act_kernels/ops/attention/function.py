"""Ragged attention's public function `ragged_attention`, its unchecked
form `attend`, and the autograd Function `RaggedAttention` (design §9).

The eager path calls the Triton launchers through `RaggedAttention`
directly; the torch.library op (`library.py`) serves torch.compile and
fake-tensor users.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...backends import cpu_attention_serves, resolve_attention
from . import reference
from .checks import as_pool, check_attention_args
from .index import pool_grads


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

    q:          (A, Hq, d) queries, one per running token
    k, v:       (P, Hkv, d) key and value pools, or sequences of such
                tensors read as their row-wise concatenation (never copied);
                Hq = g * Hkv: query head h reads kv head h // g (grouped-query
                attention when g > 1; the kv heads are never repeated)
    cu_seqlens: (B + 1,) int32 offsets of the B packed sequences, T_tok tokens
    q_rows:     (A,) int64/int32 packed token index of every query, strictly ascending
    kv_rows:    (T_tok,) optional: token j's key and value are pool row
                kv_rows[j] (default: row j, so P = T_tok)
    causal:     query at position i sees positions <= i of its sequence
                (positions counted from the sequence start, not bottom-right aligned)
    scale:      default 1 / sqrt(d); max_seqlen: optional longest length (saves a sync)
    backend:    "auto" | "reference" | "triton" ("auto" on the CPU: the reference,
                with a C++ forward kernel for calls without gradients and at
                most one query per sequence, when the extension is built)

    Returns (A, Hq, d) in q's dtype. Softmax statistics are float32
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


def attend(q: Tensor, k_pool: Sequence[Tensor], v_pool: Sequence[Tensor], cu_seqlens: Tensor, q_rows: Tensor,
           kv_rows: Optional[Tensor], causal: bool, scale: float, max_seqlen: int, backend: str) -> Tensor:
    """`ragged_attention` without the argument checks, for callers that build
    valid indices themselves (the transformer layer). backend is concrete."""
    if backend == "cpu" and cpu_attention_serves(q, k_pool, v_pool, cu_seqlens.shape[0] - 1):
        from .cpu_kernels import attention_forward

        return attention_forward(q, k_pool, v_pool, cu_seqlens, q_rows, kv_rows, causal, scale)
    return RaggedAttention.apply(backend, causal, scale, max_seqlen, len(k_pool), q, cu_seqlens, q_rows, kv_rows,
                                 *k_pool, *v_pool)


def _max_seqlen(cu_seqlens: Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


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
            from .triton_kernels import Launch, attention_forward

            launch = Launch(k_pool, v_pool, cu_seqlens, q_rows, kv_rows, num_tokens)
            cu_seqlens, q_rows = launch.cu_seqlens, launch.q_rows
            out, lse = attention_forward(q, launch.k_pool, launch.v_pool, launch.k_off, launch.v_off,
                                         cu_seqlens, launch.cu_q, q_rows, causal, scale, max_seqlen)
            k_pool, v_pool, tables = launch.k_pool, launch.v_pool, (launch.cu_q, launch.k_off, launch.v_off)
        else:
            # PyTorch's fused attention over the padded sequences, keys and
            # values gathered straight from the pool; only index vectors are
            # kept for the backward's recomputation.
            lay = reference.step_layout(cu_seqlens, q_rows, num_tokens, max_seqlen)
            slots = lay.key_slots if kv_rows is None else kv_rows.to(torch.int64)[lay.key_slots]
            out = reference.padded_sdpa(q, k_pool, v_pool, lay, slots, causal, scale)[0].detach()
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
                    *pool_grads(dk, k_pool, kv_rows), *pool_grads(dv, v_pool, kv_rows))
        # the reference backend: recompute the fused attention with autograd
        lay, slots = reference.Layout(*tables[:-1]), tables[-1]
        with torch.enable_grad():
            o, leaves = reference.padded_sdpa(q, k_pool, v_pool, lay, slots, causal, scale, grad=True)
            dqp, dkp, dvp = torch.autograd.grad(o, leaves, grad_out)
        dq = reference.unpadded(dqp, lay.q_flat).to(q.dtype)
        return (None, None, None, None, None, dq, None, None, None,
                *reference.slot_grads(dkp, slots, k_pool), *reference.slot_grads(dvp, slots, v_pool))
