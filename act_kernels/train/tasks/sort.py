"""Sort (Graves 2016, §3.4): 2..max_len numbers drawn from N(0, 1) are given
one per step, as (value, 1 if it is the last number else 0); then as many
steps with zero input follow, during which the target is the index (in
presentation order, max_len-way) of the 1st, 2nd, ... smallest number.
Difficulty = the number of numbers."""
from __future__ import annotations

import torch

from .base import Batch, Task


class Sort(Task):
    def __init__(self, max_len: int = 15):
        super().__init__(name="sort", input_size=2, heads=1, classes=max_len, cell="lstm", hidden=512,
                         batch_size=16, max_steps=100, difficulty_name="numbers",
                         knobs=dict(max_len=max_len))
        self.max_len = max_len

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        K = self.max_len
        count = torch.randint(2, K + 1, (batch,), generator=generator)
        values = torch.randn(K, batch, generator=generator)
        present = torch.arange(K)[:, None] < count[None]
        x = torch.zeros(2 * K, batch, 2)
        x[:K, :, 0] = values * present
        x[:K, :, 1] = (torch.arange(K)[:, None] == count[None] - 1).float()
        order = torch.where(present, values, torch.full_like(values, float("inf"))).argsort(0)
        # Output step j of a sequence of n numbers is time step n + j.
        t = torch.arange(2 * K)[:, None]
        out_index = t - count[None]
        mask = (out_index >= 0) & (out_index < count[None])
        targets = torch.gather(order, 0, out_index.clamp(0, K - 1))
        lengths = 2 * count
        return Batch(x, lengths, (targets * mask)[..., None], mask, count[None].expand(2 * K, -1) * mask)
