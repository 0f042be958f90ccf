"""Parity (Graves 2016, §3.1): one input vector of `size` entries, a random
number 1..size of them set to +1 or -1 at random, the rest 0; the target is
whether the number of +1 entries is odd. One time step; difficulty = the
number of nonzero entries."""
from __future__ import annotations

import torch

from .base import Batch, Task


class Parity(Task):
    def __init__(self, size: int = 64):
        super().__init__(name="parity", input_size=size, heads=1, classes=2, cell="rnn", hidden=128,
                         batch_size=128, max_steps=100, difficulty_name="nonzero entries",
                         knobs=dict(size=size))
        self.size = size

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        size = self.size
        nonzero = torch.randint(1, size + 1, (batch,), generator=generator)
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
