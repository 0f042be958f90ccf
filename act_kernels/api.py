"""The public entry point `ponder` and its backend dispatch."""
from __future__ import annotations

from typing import Callable

import torch

from . import reference
from .ops.state import as_state_tuple
from .backends import resolve
from .driver import ragged_ponder
from .output import PonderOutput


def ponder(
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 100,
    eps: float = 0.01,
    backend: str = "auto",
) -> PonderOutput:
    """Adaptive Computation Time (Graves 2016) with rows that halt independently.

    step_fn(state_active, step, active) -> new state for exactly those rows
        state_active (A, H) (or a tuple of (A, H_k)): the rows still running,
        step: the 1-based ponder step, active (A,) int64: their batch indices.
    state:  (B, H) initial state, or a tuple (LSTM (h, c)): halting reads the
        first tensor, every tensor is mean-fielded.
    weight: (H,) or (1, H) halting unit weight; bias: one-element tensor.
    backend: "auto" | "reference" | "triton" | "cuda" (DESIGN §4).

    Returns PonderOutput(state, ponder_cost, steps, remainder, halting_probs).

        cell, halt = torch.nn.GRUCell(I, H), torch.nn.Linear(H, 1)
        out = ak.ponder(lambda s, n, idx: cell(x[idx], s), h0, halt.weight, halt.bias)
        loss = criterion(out.state) + tau * out.ponder_cost.sum()
    """
    states, _ = as_state_tuple(state)
    chosen = resolve(backend, states[0].device)
    if chosen == "reference":
        return reference.ponder(step_fn, state, weight, bias, max_steps=max_steps, eps=eps)
    from .ops.act import get_kernels

    return ragged_ponder(get_kernels(chosen), step_fn, state, weight, bias,
                         max_steps=max_steps, eps=eps)
