"""Benchmark workloads: a GRU-cell ponder with a controlled, skewed halting
distribution, and the inputs of a single halting step."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from naive import naive_ponder  # noqa: E402  the padded-and-masked baseline

__all__ = ["GRUPonder", "skewed_steps", "naive_ponder", "halting_step_inputs"]


def skewed_steps(batch: int, max_steps: int, mean: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Target N per row: geometric with the given mean, capped at max_steps,
    one row forced to max_steps (the padded baseline pays for the slowest)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=g)
    q = 1.0 - 1.0 / mean
    n = 1 + torch.floor(torch.log1p(-u) / math.log(q)).long()
    n = n.clamp(1, max_steps)
    n[0] = max_steps
    return n


class GRUPonder:
    """A GRU cell pondering on a fixed input; feature 0 of every new state is
    set to a per-row logit so that row b halts after exactly target[b] steps
    (h_b = 0.99 / N_b + 1e-4 each step), with gradients flowing as usual."""

    def __init__(self, batch, hidden, max_steps, dtype=torch.float32, device="cuda", seed=0, mean=3.0):
        torch.manual_seed(seed)
        self.cell = torch.nn.GRUCell(hidden, hidden).to(device, dtype)
        self.x = torch.randn(batch, hidden, device=device, dtype=dtype)
        self.h0 = torch.zeros(batch, hidden, device=device, dtype=dtype, requires_grad=True)
        self.target = skewed_steps(batch, max_steps, mean, seed).to(device)
        h = 0.99 / self.target.double() + 1e-4
        self.logit = torch.log(h / (1 - h)).to(dtype)
        self.weight = torch.zeros(hidden, device=device, dtype=dtype)
        self.weight[0] = 1.0
        self.weight.requires_grad_()
        self.bias = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        self.onehot = torch.zeros(hidden, device=device, dtype=dtype)
        self.onehot[0] = 1.0
        self.max_steps = max_steps

    def step(self, s, n, active):
        out = self.cell(self.x[active], s)
        return out + self.onehot * (self.logit[active, None] - out[:, :1])

    @property
    def padded_rows(self) -> int:
        return self.target.numel() * int(self.target.max())

    @property
    def ragged_rows(self) -> int:
        return int(self.target.sum())


def halting_step_inputs(rows, hidden, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(
        state=torch.randn(rows, hidden, generator=g).to(device, dtype),
        active=torch.arange(rows, device=device),
        weight=(torch.randn(hidden, generator=g) / math.sqrt(hidden)).to(device, dtype),
        bias=torch.zeros(1, device=device, dtype=dtype),
        threshold=torch.full((1,), 0.99, device=device, dtype=acc),
    )
    buffers = dict(
        running_sum=torch.zeros(rows, device=device, dtype=acc),
        accumulator=torch.zeros(rows, hidden, device=device, dtype=acc),
        steps=torch.zeros(rows, device=device, dtype=torch.int64),
        remainder=torch.zeros(rows, device=device, dtype=acc),
    )
    return args, buffers
