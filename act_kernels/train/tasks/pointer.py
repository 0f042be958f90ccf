"""Pointer chasing, a per-token task for the ACT transformer encoder: every
token i of a sequence holds a value v_i in 0..values-1, a pointer p_i to a
position of its own sequence, and a hop count k_i in 0..max_hops. Its target
is the value found after k_i hops: j <- p_j, k_i times from j = i, then v_j.
Each hop is one attention read, so the depth a token needs grows with k_i,
which is its difficulty. Sequences have 2..max_len tokens (zero-padded).

Token input: one-hot(v_i) | one-hot(p_i) over max_len positions | one-hot(k_i).
The model adds its own position embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, Task


class PointerChase(Task):
    def __init__(self, max_len: int = 8, values: int = 8, max_hops: int = 3):
        super().__init__(name="pointer", input_size=values + max_len + max_hops + 1, heads=1, classes=values,
                         cell="transformer", hidden=64, batch_size=64, max_steps=8,
                         difficulty_name="hops", knobs=dict(max_len=max_len, values=values, max_hops=max_hops))
        self.max_len, self.values, self.max_hops = max_len, values, max_hops

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        L = self.max_len
        lengths = torch.randint(2, L + 1, (batch,), generator=generator)
        mask = torch.arange(L)[:, None] < lengths[None]                          # (L, B)
        values = torch.randint(0, self.values, (L, batch), generator=generator)
        # a pointer to a uniformly chosen position of the token's own sequence
        pointers = (torch.rand(L, batch, generator=generator) * lengths[None]).long()
        hops = torch.randint(0, self.max_hops + 1, (L, batch), generator=generator)
        where = torch.arange(L)[:, None].expand(L, batch).clone()
        cols = torch.arange(batch)[None].expand(L, batch)
        for k in range(self.max_hops):
            where = torch.where(hops > k, pointers[where, cols], where)
        targets = values[where, cols]
        x = torch.cat([F.one_hot(values, self.values), F.one_hot(pointers, L),
                       F.one_hot(hops, self.max_hops + 1)], dim=-1).float() * mask[..., None]
        return Batch(x, lengths, (targets * mask)[..., None], mask, hops * mask)
