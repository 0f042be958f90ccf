"""The checks of a ponder's arguments and of what its step function
returns, shared by the ACT and PonderNet loops and their references: they
run before any kernel launches.

Every check raises a ValueError (wrong value, shape or device) or a TypeError
(wrong type or dtype) whose message says what was expected and what came.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .state import SUPPORTED_DTYPES


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
