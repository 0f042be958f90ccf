"""Input checks shared by every backend: they run before any kernel launches.

Every check raises a ValueError (wrong value, shape or device) or a TypeError
(wrong type or dtype) whose message says what was expected and what came.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of z, h, the running sum and the accumulator (DESIGN §1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_state_tuple(state) -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """Returns (tensors, was_tuple). A single tensor becomes a 1-tuple."""
    if isinstance(state, torch.Tensor):
        return (state,), False
    if isinstance(state, (tuple, list)) and len(state) > 0 and all(
        isinstance(s, torch.Tensor) for s in state
    ):
        return tuple(state), True
    raise TypeError(
        "state must be a tensor of shape (B, H) or a non-empty tuple of such tensors, "
        f"got {type(state).__name__}"
    )


def check_ponder_args(states: Sequence[torch.Tensor], weight, bias, max_steps, eps) -> None:
    first = states[0]
    for k, s in enumerate(states):
        name = "state" if len(states) == 1 else f"state[{k}]"
        if s.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {s.dtype}")
        if s.dim() != 2:
            raise ValueError(f"{name} must have shape (B, H), got shape {tuple(s.shape)}")
        if s.shape[0] == 0 or s.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(s.shape)}")
        if s.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name} has batch size {s.shape[0]}, expected {first.shape[0]} like state[0]"
            )
        if s.device != first.device:
            raise ValueError(f"{name} is on {s.device}, expected {first.device} like state[0]")
        if s.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {s.dtype}, expected {first.dtype} like state[0]")

    hidden = first.shape[1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor of shape (H,), got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() == 2 and weight.shape[0] == 1:
        weight_h = weight.shape[1]  # nn.Linear(H, 1).weight
    elif weight.dim() == 1:
        weight_h = weight.shape[0]
    else:
        raise ValueError(f"weight must have shape (H,) or (1, H), got {tuple(weight.shape)}")
    if weight_h != hidden:
        raise ValueError(f"weight has {weight_h} features, expected H = {hidden} (state's width)")
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a one-element tensor, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if bias.numel() != 1:
        raise ValueError(f"bias must hold exactly one element, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, expected {first.device} like state")

    if isinstance(max_steps, bool) or not isinstance(max_steps, int):
        raise TypeError(f"max_steps must be an int, got {type(max_steps).__name__}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (0.0 < float(eps) < 1.0):
        raise ValueError(f"eps must lie in (0, 1), got {eps}")


def check_step_output(new, expected: Sequence[torch.Tensor], num_active: int, step: int):
    """Validates what step_fn returned for the `num_active` rows it was given."""
    tensors, _ = (new, False) if isinstance(new, torch.Tensor) else (None, True)
    if tensors is None:
        if not isinstance(new, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in new):
            raise TypeError(
                f"step_fn must return a tensor or a tuple of tensors, got {type(new).__name__} "
                f"at step {step}"
            )
        tensors = tuple(new)
    else:
        tensors = (tensors,)
    if len(tensors) != len(expected):
        raise ValueError(
            f"step_fn returned {len(tensors)} tensors at step {step}, expected {len(expected)} "
            "like the initial state"
        )
    for k, (t, ref) in enumerate(zip(tensors, expected)):
        want = (num_active, ref.shape[1])
        if tuple(t.shape) != want:
            raise ValueError(
                f"step_fn returned shape {tuple(t.shape)} at step {step} (tensor {k}), "
                f"expected {want}: one row per active row"
            )
        if t.dtype != ref.dtype:
            if t.dtype != _autocast_dtype(t.device):
                raise TypeError(
                    f"step_fn returned dtype {t.dtype} at step {step} (tensor {k}), expected {ref.dtype}"
                )
        if t.device != ref.device:
            raise ValueError(
                f"step_fn returned a tensor on {t.device} at step {step}, expected {ref.device}"
            )
    # Under autocast a step computes in the autocast dtype; the ponder keeps
    # the initial state's dtype (the halting math is float32 either way).
    return tuple(t if t.dtype == ref.dtype else t.to(ref.dtype) for t, ref in zip(tensors, expected))


def _autocast_dtype(device: torch.device):
    """The dtype autocast computes in on this device type, or None when it is off."""
    kind = device.type if device.type in ("cuda", "cpu") else None
    if kind is None or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def as_pool(pool, name: str) -> Tuple[torch.Tensor, ...]:
    """A key/value pool: one (P, heads, d) tensor or a sequence of them."""
    if isinstance(pool, torch.Tensor):
        return (pool,)
    if isinstance(pool, (tuple, list)) and len(pool) > 0 and all(isinstance(t, torch.Tensor) for t in pool):
        return tuple(pool)
    raise TypeError(f"{name} must be a tensor (P, heads, d) or a non-empty sequence of such tensors, "
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
    for name, pool in (("k", k_pool), ("v", v_pool)):
        for i, t in enumerate(pool):
            what = name if len(pool) == 1 else f"{name}[{i}]"
            if t.dim() != 3 or tuple(t.shape[1:]) != (heads, dim):
                raise ValueError(f"{what} must have shape (P, {heads}, {dim}) like q, got {tuple(t.shape)}")
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


HALTING_MODES = ("train", "sample", "threshold")


def check_pondernet_args(states, weight, bias, max_steps, eps, prior, halting, threshold, generator) -> None:
    """`pondernet`'s checks, on top of `check_ponder_args`."""
    check_ponder_args(states, weight, bias, max_steps, eps)
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise TypeError(f"prior must be a float in (0, 1), got {type(prior).__name__}")
    if not 0.0 < float(prior) < 1.0:
        raise ValueError(f"prior (the geometric prior's lambda_p) must lie in (0, 1), got {prior}")
    if halting not in HALTING_MODES:
        raise ValueError(f"halting must be one of {HALTING_MODES}, got {halting!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in (0, 1], got {type(threshold).__name__}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = states[0].device
        if generator.device.type != device.type or (
                device.type == "cuda" and generator.device.index not in (None, device.index)):
            raise ValueError(f"generator is on {generator.device}, but the state is on {device}")


def check_layer_options(max_steps, eps, backend) -> None:
    """A layer's ACT options, checked at construction (ValueError)."""
    from .backends import BACKENDS

    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be a float in (0, 1), got {eps!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def check_layer_input(x: torch.Tensor, param: torch.Tensor) -> None:
    """An input must match the layer's parameters in dtype and device: say so
    here, not deep inside a cell."""
    if x.dtype != param.dtype:
        raise TypeError(f"input has dtype {x.dtype}, but the layer's parameters are {param.dtype}; "
                        f"convert one of them (e.g. layer.to({x.dtype}))")
    if x.device != param.device:
        raise ValueError(f"input is on {x.device}, but the layer's parameters are on {param.device}")
