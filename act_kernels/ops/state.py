"""A ponder's state as a tuple of tensors, and the precision its halting
math runs in (design §1): helpers every family's loop and reference share."""
from __future__ import annotations

from typing import Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of z, h, the running sum and the accumulator (design §1)."""
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
