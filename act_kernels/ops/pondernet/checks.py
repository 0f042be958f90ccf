"""`pondernet`'s argument checks, on top of the ponder checks every loop runs."""
from __future__ import annotations

import torch

from ..checks import check_ponder_args

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
