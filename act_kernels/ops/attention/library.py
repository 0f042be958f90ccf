"""Ragged attention as torch.library ops, for torch.compile and fake-tensor
users (design §6): `act_kernels::ragged_attention` (returning the output
and the logsumexp) and its backward, with fake implementations and the
autograd registration that joins them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...backends import attention_op_implementation
from ..state import accumulation_dtype
from . import reference
from .index import pool_grads


@torch.library.custom_op("act_kernels::ragged_attention", mutates_args=())
def ragged_attention_op(
    q: Tensor, k: List[Tensor], v: List[Tensor], cu_seqlens: Tensor, q_rows: Tensor,
    kv_rows: Optional[Tensor], causal: bool, scale: float, max_seqlen: int,
) -> Tuple[Tensor, Tensor]:
    """Returns (out (A, Hq, d), lse (A, Hq)), k and v with Hkv heads; see `ragged_attention`."""
    if attention_op_implementation(q.device, q.dtype) == "reference":
        out, lse = reference.ragged_attention_lse(q, k, v, cu_seqlens, q_rows, kv_rows, causal, scale)
        return out.clone(), lse.clone()
    from .triton_kernels import Launch, attention_forward

    num_tokens = kv_rows.numel() if kv_rows is not None else sum(t.shape[0] for t in k)
    launch = Launch(k, v, cu_seqlens, q_rows, kv_rows, num_tokens)
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
    """Returns (dq, dk per segment of k, dv per segment of v), each shaped as its input (Hkv heads for dk, dv)."""
    if attention_op_implementation(q.device, q.dtype) == "reference":
        dq, dk, dv = reference.ragged_attention_backward(grad_out, q, k, v, cu_seqlens, q_rows, kv_rows,
                                                         causal, scale)
        return dq, [t.clone() for t in pool_grads(dk, k, kv_rows)], [t.clone() for t in pool_grads(dv, v, kv_rows)]
    from .triton_kernels import Launch, attention_backward

    num_tokens = kv_rows.numel() if kv_rows is not None else sum(t.shape[0] for t in k)
    launch = Launch(k, v, cu_seqlens, q_rows, kv_rows, num_tokens)
    dq, dk, dv = attention_backward(grad_out, q, launch.k_pool, launch.v_pool, launch.k_off, launch.v_off,
                                    launch.cu_seqlens, launch.cu_q, launch.q_rows, out, lse, causal, scale,
                                    max_seqlen)
    # an op's outputs may not alias each other: no views of one buffer
    return dq, [t.clone() for t in pool_grads(dk, k, kv_rows)], [t.clone() for t in pool_grads(dv, v, kv_rows)]


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
