"""Parity (Graves 2016, §3.1): one input vector of `size` entries, a random
number 1..size of them set to +1 or -1 at random, the rest 0; the target is
whether the number of +1 entries is odd. One time step; difficulty = the
number of nonzero entries. `min_nonzero` / `max_nonzero` narrow the range
(PonderNet's extrapolation study trains on 1..size/2 and tests above it)."""
from __future__ import annotations

import torch

from .base import Batch, Task


class Parity(Task):
    def __init__(self, size: int = 64, min_nonzero: int = 1, max_nonzero: int = 0):
        max_nonzero = max_nonzero or size
        if not 1 <= min_nonzero <= max_nonzero <= size:
            raise ValueError(f"parity needs 1 <= min_nonzero <= max_nonzero <= size, got "
                             f"{min_nonzero}, {max_nonzero}, {size}")
        knobs = dict(size=size)
        if (min_nonzero, max_nonzero) != (1, size):
            knobs.update(min_nonzero=min_nonzero, max_nonzero=max_nonzero)
        super().__init__(name="parity", input_size=size, heads=1, classes=2, cell="rnn", hidden=128,
                         batch_size=128, max_steps=100, difficulty_name="nonzero entries", knobs=knobs)
        self.size, self.min_nonzero, self.max_nonzero = size, min_nonzero, max_nonzero

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        size = self.size
        nonzero = torch.randint(self.min_nonzero, self.max_nonzero + 1, (batch,), generator=generator)
        rank = torch.rand(batch, size, generator=generator).argsort(1).argsort(1)
        chosen = rank < nonzero[:, None]                      # `nonzero` random positions
        signs = torch.randint(0, 2, (batch, size), generator=generator) * 2 - 1
        x = torch.where(chosen, signs, torch.zeros_like(signs)).float()
        odd = ((x == 1).sum(1) % 2).long()
        return Batch(
            inputs=x[None],
            lengths=torch.ones(batch, dtype=torch.long),
            targets=odd[None, :, None],
            mask=torch.ones(1, batch, dtype=torch.bool),
            difficulty=nonzero[None],
        )
