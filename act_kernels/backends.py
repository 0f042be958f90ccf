"""Which backend serves a call: the one place where backends are chosen.

Four op families: ACT's halting kernels (`resolve`, for `ponder` and the
layers) and PonderNet's (`resolve_pondernet`), which have reference, Triton
and CUDA implementations; ragged attention (`resolve_attention`), which has
reference and Triton ones; and the ACT layers' fused cell gates
(`resolve_gates`), which follow the layer's ACT backend on a GPU and have
CPU kernels of their own.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import List

import torch

from .ops.extension import load_error

BACKENDS = ("reference", "triton", "cuda")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_extension_error() -> str:
    """Empty when `act_kernels._C` imports; otherwise why it does not."""
    return load_error()


def available_backends() -> List[str]:
    """Backends that can run on this machine, e.g. ["reference", "triton", "cuda"]."""
    out = ["reference"]
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreted()):
        out.append("triton")
    if not cuda_extension_error() and torch.cuda.is_available():
        out.append("cuda")
    return out


def why_unavailable(backend: str, device: torch.device) -> str:
    """Empty when `backend` can serve tensors on `device`; otherwise the reason."""
    if backend == "reference":
        return ""
    if backend == "triton":
        if not _triton_importable():
            return "the triton backend needs the triton package (pip install triton)"
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpreted():
            return ""
        return (f"the triton backend needs CUDA tensors (got {device.type}); on the CPU it runs "
                "only under TRITON_INTERPRET=1")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got tensors on {device.type}"
        return cuda_extension_error()
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; raises a clear error if it cannot serve it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if not why_unavailable(candidate, device):
                    return candidate
        return "reference"
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(reason)
    return backend


def resolve_attention(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ragged attention: "reference" or "triton".

    "auto" takes Triton on CUDA tensors (float16, bfloat16, float32) and the
    reference otherwise (the CPU, float64). There is no CUDA C++ kernel for
    this op: backend="cuda" is an error that says so.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and not why_unavailable("triton", device):
            return "triton"
        return "reference"
    if backend == "cuda":
        raise RuntimeError("ragged_attention has no CUDA C++ kernel; use backend='triton' (or 'auto')")
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(reason)
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("the triton ragged_attention supports float16, bfloat16 and float32, got "
                        "torch.float64; use backend='reference' for float64")
    return backend


def resolve_gates(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """How an ACT GRU/LSTM layer runs its cell: with the input projection
    hoisted out of the ponder loop and a ponder step's gates and halting step
    in one kernel call (ops.cells), or "" for torch's own cell module.

    - "cuda" or "triton": the layer's ponder backend, as `resolve` picks it;
    - "cpu": "auto" on CPU tensors of float32 or float64 when the compiled
      extension is built: the CPU gate kernels, on the kernel driver with the
      reference twins for the rest;
    - "": backend "reference" (the oracle: torch's cell on the reference
      ponder), and "auto" on the CPU without the extension or in half
      precision.
    """
    chosen = resolve(backend, device)
    if chosen in ("triton", "cuda"):
        return chosen
    if (backend == "auto" and device.type == "cpu" and dtype in (torch.float32, torch.float64)
            and not cuda_extension_error()):
        return "cpu"
    return ""


def resolve_pondernet(backend: str, device: torch.device) -> str:
    """The concrete backend for PonderNet: the same rules as ACT's `resolve`
    ("auto": the CUDA extension on a GPU when it is built, else Triton there,
    else the reference)."""
    return resolve(backend, device)


def op_backend(device: torch.device, *, has_cuda_kernels: bool) -> str:
    """The implementation a torch.library op runs ("cuda", "triton" or
    "reference"; the eager paths choose with `resolve*`): the CUDA extension
    on CUDA tensors when the op family has CUDA kernels and it is built, else
    Triton on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 so
    the CPU tests reach the Triton path; the reference otherwise."""
    if has_cuda_kernels and device.type == "cuda" and not cuda_extension_error():
        return "cuda"
    if (device.type == "cuda" or triton_interpreted()) and not why_unavailable("triton", device):
        return "triton"
    return "reference"
