"""What every launcher does before handing tensors to a kernel: kernels index
1-D inputs by position and rows by a row stride, and launch on the current
device; these helpers make any caller's strides and device safe."""
from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Optional, Tuple

import torch


def dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t itself when its elements are laid out densely, else a contiguous copy:
    the kernels index 1-D inputs and row contents by position, so a stride-0
    (expanded) or strided view must not reach them as it is."""
    if t is None or t.is_contiguous():
        return t
    return t.contiguous()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; t itself when it already is (a no-op .to() still costs a
    dispatch, and launchers run once per ponder step)."""
    return t if t.dtype == dtype else t.to(dtype)


def halting_outputs(rows: int, acc: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-row outputs of every halting-step launch: p, h (in the
    accumulation dtype) and the halted flags."""
    return (torch.empty(rows, dtype=acc, device=device), torch.empty(rows, dtype=acc, device=device),
            torch.empty(rows, dtype=torch.bool, device=device))


def cell_step_buffers(running_sum, steps, remainder, accumulators) -> "WriteBack":
    """The buffers a fused gates-and-halting launch updates in place, as a
    WriteBack with keys running_sum, steps, remainder, acc_h (and acc_c for an
    LSTM's second accumulator)."""
    names = ("acc_h", "acc_c")[:len(accumulators)]
    return WriteBack(running_sum=running_sum, steps=steps, remainder=remainder, **dict(zip(names, accumulators)))


def row_steps(step, rows: int, device: torch.device) -> Optional[torch.Tensor]:
    """A halting step's per-row steps for a kernel: None when `step` is one
    int for every row; else the (rows,) int64 tensor, dense, checked to be
    one step per row on the states' device (a kernel reads it by row)."""
    if not isinstance(step, torch.Tensor):
        return None
    if step.shape != (rows,) or step.device != device:
        raise ValueError(f"step per row must be a ({rows},) tensor on {device}, got {tuple(step.shape)} on "
                         f"{step.device}")
    if step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
        raise TypeError(f"step per row must be an integer tensor, got {step.dtype}")
    return dense(step.to(torch.int64))


def unit_columns(t: torch.Tensor) -> torch.Tensor:
    """A (rows, H) tensor whose rows may be strided but whose columns are not."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


class WriteBack:
    """Hands a kernel dense versions of the buffers it updates in place, and
    copies the results back into any caller tensor that was not dense."""

    def __init__(self, **buffers: torch.Tensor):
        self.given = buffers
        # (rows, H) buffers may keep a row stride; 1-D ones must be dense
        self.dense = {k: unit_columns(v) if v.dim() == 2 else dense(v) for k, v in buffers.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.dense[name]

    def finish(self) -> None:
        for k, v in self.given.items():
            if self.dense[k] is not v:
                v.copy_(self.dense[k])


def on_device(device: torch.device):
    """Launch on the tensors' device, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@lru_cache(maxsize=64)
def device_constants(values: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small read-only tensor of constants on `device`, made once per
    (values, dtype, device) and reused: building it per launch would be a
    host-to-device copy every ponder step. Kernels only read it; nothing may
    write to it."""
    return torch.tensor(values, dtype=dtype).to(device)
