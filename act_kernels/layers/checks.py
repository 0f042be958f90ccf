"""The layers' own checks: options at construction, inputs against the
layer's parameters. They raise before any kernel runs."""
from __future__ import annotations

import torch

from ..backends import BACKENDS


def check_layer_options(max_steps, eps, backend) -> None:
    """A layer's ACT options, checked at construction (ValueError)."""
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
