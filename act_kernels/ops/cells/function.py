"""Autograd Functions over the fused gates, and the public functions. Each
Function saves only its inputs and recomputes the gates in its backward
(one fused launch each way on the Triton backend). `gate_kernels` names a
backend's implementation, for the whole-ponder Function of `ponder`."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...backends import implementation_module
from ..launch import as_dtype


def gate_kernels(backend: str):
    """The module implementing the gate contracts of `reference` for a backend:
    "reference", "cpu" (the extension's C++ kernels), "triton" or "cuda"."""
    return implementation_module(__package__, backend, ("reference", "cpu", "triton", "cuda"), "the fused gates")


class _GRUGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh, h, backend):
        ctx.impl = gate_kernels(backend)
        ctx.save_for_backward(gi, gh, h)
        return ctx.impl.gru_gates_forward(gi, gh, h)

    @staticmethod
    @once_differentiable   # the kernel backends' backward is not differentiable: a 2nd derivative raises
    def backward(ctx, grad):
        gi, gh, h = ctx.saved_tensors
        d_gi, d_gh, d_h = ctx.impl.gru_gates_backward(grad, gi, gh, h)
        return d_gi, d_gh, d_h, None


class _LSTMGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh, c, backend):
        ctx.impl = gate_kernels(backend)
        ctx.save_for_backward(gi, gh, c)
        return ctx.impl.lstm_gates_forward(gi, gh, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_c):
        gi, gh, c = ctx.saved_tensors
        grad_h = torch.zeros_like(c) if grad_h is None else grad_h
        grad_c = torch.zeros_like(c) if grad_c is None else grad_c
        d_a, d_c = ctx.impl.lstm_gates_backward(grad_h, grad_c, gi, gh, c)
        return d_a, as_dtype(d_a, gh.dtype), d_c, None


def _check(name: str, gi: Tensor, gh: Tensor, state: Tensor, gates: int) -> None:
    for arg, t in (("gi", gi), ("gh", gh), ("state", state)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    rows, hidden = state.shape
    for arg, t in (("gi", gi), ("gh", gh)):
        if tuple(t.shape) != (rows, gates * hidden):
            raise ValueError(f"{name}: {arg} must be (rows, {gates} * hidden) = {(rows, gates * hidden)}, "
                             f"got {tuple(t.shape)}")
        if t.device != state.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, the state on {state.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be floating point, got {t.dtype}")


def gru_gates(gi: Tensor, gh: Tensor, h: Tensor, *, backend: str = "reference") -> Tensor:
    """The pointwise part of torch.nn.GRUCell: gi = x W_ih^T + b_ih and
    gh = h W_hh^T + b_hh (A, 3H, gates r, z, n), h (A, H) -> h' (A, H) in
    h's dtype. Differentiable in gi, gh and h."""
    _check("gru_gates", gi, gh, h, 3)
    return _GRUGates.apply(gi, gh, h, backend)


def lstm_gates(gi: Tensor, gh: Tensor, c: Tensor, *, backend: str = "reference") -> Tuple[Tensor, Tensor]:
    """The pointwise part of torch.nn.LSTMCell: gi, gh (A, 4H, gates i, f, g, o),
    c (A, H) -> (h', c') in c's dtype. Differentiable in gi, gh and c."""
    _check("lstm_gates", gi, gh, c, 4)
    return _LSTMGates.apply(gi, gh, c, backend)
