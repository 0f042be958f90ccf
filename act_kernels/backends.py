"""Which implementation serves a call: the one place where backend names
are chosen and translated, for every op family.

A user names a backend ("auto", "reference", "triton", "cuda"); the
functions here turn it, with the tensors' device and dtype, into the name
of the implementation that runs, in the vocabulary each family's loader
takes (`ops.act.get_kernels`, `ops.pondernet.get_kernels`,
`ops.cells.gate_kernels`, all through `implementation_module`): "reference"
(the oracle; the gate twins for the cells), "twins" (the reference
twins of the kernel contracts on the kernel loop), "triton", "cuda", "cpu"
(the CPU gate kernels). The families and the layers ask here and never
translate names themselves.

    resolve            ACT's halting kernels (`ponder`, the layers)
    resolve_pondernet  PonderNet's
    resolve_attention  ragged attention (reference, the CPU forward kernel, Triton)
    resolve_encoder    the per-token encoder: halting and attention
    resolve_gates      the ACT GRU/LSTM cells' fused gates
    resolve_cell       those gates with the combine backward that goes with them
    op_implementation, attention_op_implementation
                       what the torch.library ops run
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch.autograd import forward_ad

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
    """The concrete backend for ragged attention: "reference", "cpu" or "triton".

    "auto" takes Triton on CUDA tensors (float16, bfloat16, float32); on CPU
    float32/float64 tensors with the extension built, "cpu": the reference
    backend, with the extension's forward kernel for the calls it serves
    (`cpu_attention_serves`); the reference otherwise. There is no CUDA C++
    kernel for this op: backend="cuda" is an error that says so.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and not why_unavailable("triton", device):
            return "triton"
        return "cpu" if cpu_kernels_serve(device, dtype) else "reference"
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
    if backend == "auto" and cpu_kernels_serve(device, dtype):
        return "cpu"
    return ""


def cpu_kernels_serve(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the extension's CPU kernels (the cells' gates, ACT's halting
    step) can serve tensors of this device and dtype: CPU float32/float64,
    the extension built."""
    return device.type == "cpu" and dtype in (torch.float32, torch.float64) and not cuda_extension_error()


def cpu_attention_serves(q: torch.Tensor, k_pool: Sequence[torch.Tensor], v_pool: Sequence[torch.Tensor],
                         num_sequences: int) -> bool:
    """Whether a call of the "cpu" attention backend runs the extension's
    forward kernel (ops/attention/cpu_kernels.py) rather than the reference's
    padded fused attention: nothing needs a gradient (forward-mode
    tangents included), q is a CPU float32/float64 tensor (under autocast it
    may not be, whatever the module's dtype), the pools are one tensor each
    in q's dtype, and there are at most as many queries as
    sequences (a decode step: there the padded layout and its gathers cost
    more than the attention; a prompt's many queries are the fused
    attention's case)."""
    if q.shape[0] > num_sequences or len(k_pool) != 1 or len(v_pool) != 1:
        return False
    # the dtype the call's tensors have, not the module's: under autocast q may be half precision
    if not cpu_kernels_serve(q.device, q.dtype) or k_pool[0].dtype != q.dtype or v_pool[0].dtype != q.dtype:
        return False
    if forward_ad._current_level >= 0:   # inside a dual level a tangent may ride on any input
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k_pool[0].requires_grad or v_pool[0].requires_grad))


def resolve_pondernet(backend: str, device: torch.device) -> str:
    """The concrete backend for PonderNet: the same rules as ACT's `resolve`
    ("auto": the CUDA extension on a GPU when it is built, else Triton there,
    else the reference)."""
    return resolve(backend, device)


# The module of a family's folder that holds each implementation the
# resolvers above name.
IMPLEMENTATION_MODULES = {"triton": "triton_kernels", "cuda": "cuda_kernels", "cpu": "cpu_kernels",
                          "twins": "reference", "reference": "reference"}


def implementation_module(package: str, implementation: str, offered: Sequence[str], what: str):
    """The module of `package` (an op family, e.g. "act_kernels.ops.act") that
    implements its kernel contracts for `implementation`, one of `offered`
    (`what` names them in the error). Imported on first use: a backend
    nobody asks for is never loaded."""
    if implementation not in offered:
        names = ", ".join(repr(name) for name in offered[:-1]) + f" and {offered[-1]!r}"
        raise ValueError(f"{what} have {names} implementations, got {implementation!r}")
    return importlib.import_module(f"{package}.{IMPLEMENTATION_MODULES[implementation]}")


def op_implementation(device: torch.device, *, has_cuda_kernels: bool) -> str:
    """The implementation a torch.library op runs (the eager paths choose with
    `resolve*`): "cuda", the extension on CUDA tensors when the op family has
    CUDA kernels and it is built; else "triton" on CUDA tensors, and on CPU
    tensors under TRITON_INTERPRET=1 so that the CPU tests reach the Triton
    path; else "twins", the reference twins of the kernel contracts."""
    if has_cuda_kernels and device.type == "cuda" and not cuda_extension_error():
        return "cuda"
    if (device.type == "cuda" or triton_interpreted()) and not why_unavailable("triton", device):
        return "triton"
    return "twins"


def attention_op_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """The implementation the ragged-attention op runs: "triton" as
    `op_implementation` picks it (there is no CUDA C++ kernel), "reference"
    otherwise and for float64, which Triton does not take."""
    chosen = op_implementation(device, has_cuda_kernels=False)
    return "triton" if chosen == "triton" and dtype != torch.float64 else "reference"


class EncoderBackends(NamedTuple):
    """What serves one call of the per-token encoder: ACT's halting kernels
    (a `resolve` name), ragged attention (a `resolve_attention` name),
    whether it may take the pool path (layers/token_ponder.py: every backend but
    "reference", whose step-by-step autograd loop is the oracle), and the
    kernels that path's loop runs (an `ops.act.get_kernels` name)."""

    halting: str
    attention: str
    pool_path: bool
    kernels: str


def resolve_encoder(backend: str, device: torch.device, dtype: torch.dtype) -> EncoderBackends:
    """The encoder's two backends from its one option: ragged attention has no
    CUDA C++ kernel, so "cuda" runs it on Triton."""
    halting = resolve(backend, device)
    kernels = halting
    if halting == "reference":
        # on the CPU the extension's halting step, where it is built ("cpu"), else the twins
        kernels = "cpu" if cpu_kernels_serve(device, dtype) else "twins"
    return EncoderBackends(halting, resolve_attention("triton" if backend == "cuda" else backend, device, dtype),
                           backend != "reference", kernels)


class CellBackends(NamedTuple):
    """What serves an ACT GRU/LSTM cell's fused ponder: its gate kernels
    ("cpu", "triton" or "cuda", for `ops.cells.gate_kernels`) and ACT's
    combine backward (for `ops.act.get_kernels`: the CPU gate kernels run
    with the reference twin of it)."""

    gates: str
    combine: str


def resolve_cell(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[CellBackends]:
    """`resolve_gates`, with the combine backward that goes with the gates;
    None where the cell runs as torch's own module."""
    gates = resolve_gates(backend, device, dtype)
    if not gates:
        return None
    return CellBackends(gates, "twins" if gates == "cpu" else gates)
