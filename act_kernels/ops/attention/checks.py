"""`ragged_attention`'s argument checks: they run before any kernel launches
and raise a ValueError or TypeError that says what was expected and what came."""
from __future__ import annotations

from typing import Tuple

import torch

from ..state import SUPPORTED_DTYPES


def as_pool(pool, name: str) -> Tuple[torch.Tensor, ...]:
    """A key/value pool: one (P, Hkv, d) tensor or a sequence of them."""
    if isinstance(pool, torch.Tensor):
        return (pool,)
    if isinstance(pool, (tuple, list)) and len(pool) > 0 and all(isinstance(t, torch.Tensor) for t in pool):
        return tuple(pool)
    raise TypeError(f"{name} must be a tensor (P, Hkv, d) or a non-empty sequence of such tensors, "
                    f"got {type(pool).__name__}")


def _check_index(t, name: str, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like q")


def check_attention_args(q, k_pool, v_pool, cu_seqlens, q_rows, kv_rows, scale, max_seqlen) -> None:
    """Checks for `ragged_attention`. The value checks (monotone offsets,
    ascending rows in range) read the indices back with one device sync."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a tensor (A, heads, d), got {type(q).__name__}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.dim() != 3 or q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q must have shape (A, heads, d) with heads, d >= 1, got {tuple(q.shape)}")
    heads, dim = q.shape[1:]
    kv_heads = None   # Hkv, every segment of k and v alike; Hq = g * Hkv (grouped-query attention)
    for name, pool in (("k", k_pool), ("v", v_pool)):
        for i, t in enumerate(pool):
            what = name if len(pool) == 1 else f"{name}[{i}]"
            if t.dim() != 3 or t.shape[1] == 0 or t.shape[2] != dim:
                raise ValueError(f"{what} must have shape (P, {heads}, {dim}) like q, or (P, Hkv, {dim}) with "
                                 f"Hkv >= 1 dividing q's Hq = {heads} heads, got {tuple(t.shape)}")
            if heads % t.shape[1]:
                raise ValueError(f"{what} has Hkv = {t.shape[1]} heads, which does not divide q's Hq = {heads}: "
                                 f"grouped-query attention needs Hq = g * Hkv for an integer g")
            if kv_heads is None:
                kv_heads = t.shape[1]
            elif t.shape[1] != kv_heads:
                raise ValueError(f"{what} has Hkv = {t.shape[1]} heads and k {kv_heads}: every key and value "
                                 f"tensor must have the same heads")
            if t.dtype != q.dtype:
                raise TypeError(f"{what} has dtype {t.dtype}, expected {q.dtype} like q")
            if t.device != q.device:
                raise ValueError(f"{what} is on {t.device}, expected {q.device} like q")
    pool_k = sum(t.shape[0] for t in k_pool)
    pool_v = sum(t.shape[0] for t in v_pool)
    if pool_k != pool_v:
        raise ValueError(f"k holds {pool_k} rows and v {pool_v}; they must hold the same pool rows")

    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (flash-attn's convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, expected {q.device} like q")
    _check_index(q_rows, "q_rows", q.device)
    if q_rows.numel() != q.shape[0]:
        raise ValueError(f"q_rows has {q_rows.numel()} entries, expected one per query (A = {q.shape[0]})")
    if kv_rows is not None:
        _check_index(kv_rows, "kv_rows", q.device)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")

    # One read-back for every value check.
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    qr = q_rows.to(torch.int64)
    facts = torch.stack([
        cu[0], cu[-1], lengths.min(), lengths.max(),
        qr.min() if qr.numel() else cu.new_zeros(()), qr.max() if qr.numel() else cu.new_zeros(()),
        (qr[1:] <= qr[:-1]).sum() if qr.numel() > 1 else cu.new_zeros(()),
        kv_rows.min().to(torch.int64) if kv_rows is not None and kv_rows.numel() else cu.new_zeros(()),
        kv_rows.max().to(torch.int64) if kv_rows is not None and kv_rows.numel() else cu.new_zeros(()),
    ]).tolist()
    first, total, shortest, longest, q_lo, q_hi, not_ascending, kv_lo, kv_hi = facts
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if shortest < 0:
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    tokens = kv_rows.numel() if kv_rows is not None else pool_k
    if total != tokens:
        what = "kv_rows has" if kv_rows is not None else "the k/v pool holds"
        raise ValueError(f"cu_seqlens[-1] = {total} tokens, but {what} {tokens} rows")
    if q_rows.numel() and (q_lo < 0 or q_hi >= total):
        raise ValueError(f"q_rows must lie in [0, {total}), got values in [{q_lo}, {q_hi}]")
    if not_ascending:
        raise ValueError("q_rows must be strictly ascending (each running token once, in packed order)")
    if kv_rows is not None and kv_rows.numel() and (kv_lo < 0 or kv_hi >= pool_k):
        raise ValueError(f"kv_rows must lie in [0, {pool_k}) (the pool's rows), got [{kv_lo}, {kv_hi}]")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest sequence ({longest})")
