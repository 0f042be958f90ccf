"""The compiled extension `act_kernels._C` and what every launcher into it
needs: the loader, the dtype codes its entry points take, the stream to
launch on, and the device check. Shared by every op family's CUDA launchers
and by the CPU gate kernels, which live in the same extension."""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

# The dtype argument of every entry point of `_C` (csrc/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@lru_cache(maxsize=None)
def load_error() -> str:
    """Empty when `act_kernels._C` imports; otherwise why it does not."""
    try:
        _load()
    except ImportError as exc:
        return f"the CUDA extension act_kernels._C is not built ({exc})"
    return ""


def extension():
    """The extension module; a RuntimeError that says why when it is not built."""
    reason = load_error()
    if reason:
        raise RuntimeError(reason)
    return _load()


@lru_cache(maxsize=None)   # launchers ask on every launch; a failed import is not cached
def _load():
    # by its full name: `from .. import _C` would read, to the import
    # contract, as an import of the whole package from this floor
    return importlib.import_module("act_kernels._C")


def stream(device: torch.device) -> int:
    """The raw handle of the current CUDA stream on `device` (launches are ordered with torch's work)."""
    return torch.cuda.current_stream(device).cuda_stream


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """The extension takes raw pointers: every tensor must be on the launch device."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
