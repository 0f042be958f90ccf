"""Ragged attention's forward on the CPU (csrc/attention/ragged_cpu.cpp, in
the compiled extension), behind the contract of `reference.ragged_attention`
without autograd: each query reads its own sequence's keys through the
token -> pool-row index, with no padded layout, no gather and no mask.

It serves what the padded reference does worst: a decode step, one query
(or a few) per sequence over a long cache, where building the padded layout
and gathering every key cost more than the attention itself.
`backends.cpu_attention_serves` says when it runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..extension import DTYPE_CODES, extension
from ..launch import dense

CPU_DTYPES = (torch.float32, torch.float64)


def _unit_features(t: Tensor) -> Tensor:
    """t with contiguous features (the kernel's inner loops read them in order)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(q: Tensor, k_pool: Sequence[Tensor], v_pool: Sequence[Tensor], cu_seqlens: Tensor,
                      q_rows: Tensor, kv_rows: Optional[Tensor], causal: bool, scale: float) -> Tensor:
    """(A, Hq, d) in q's dtype: `reference.ragged_attention` of q over one-
    segment pools k_pool, v_pool ((P, Hkv, d), q's dtype), computed in it."""
    (k,), (v,) = k_pool, v_pool
    q, k, v = _unit_features(q), _unit_features(k), _unit_features(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    cu = dense(cu_seqlens.to(torch.int32))
    rows = dense(q_rows.to(torch.int64))
    table = dense(kv_rows.to(torch.int64)) if kv_rows is not None else None
    pool_rows = min(k.shape[0], v.shape[0])
    # the kernel checks every index against these bounds before it reads
    extension().cpu_ragged_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
        v.stride(1), pool_rows, table.data_ptr() if table is not None else 0,
        table.shape[0] if table is not None else pool_rows, cu.data_ptr(), cu.shape[0] - 1, rows.data_ptr(),
        q.shape[0], q.shape[1], k.shape[1], q.shape[2], bool(causal), float(scale), out.data_ptr(),
        DTYPE_CODES[q.dtype])
    return out
