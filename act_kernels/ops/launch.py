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
