"""Logic (Graves 2016, §3.2): sequences of 1..max_len vectors of size
2 + 10 * max_gates. The first two entries hold bits b0, b1; the rest is
max_gates chunks of 10, the first G of them (G random in 1..max_gates) a
one-hot choice among the 10 two-input gates that depend on both inputs (the
16 truth tables less the two constants and the four that copy or negate one
input); the other chunks are zero. The target is b_{G+1}, applying the gates
in order: b_{i+1} = T_i(b_i, b_{i-1}). For the first vector b0 and b1 are
both given; for every later vector b0 is the previous vector's target (its
entry is 0: the network must remember it) and b1 is given. Difficulty = G."""
from __future__ import annotations

import torch

from .base import Batch, Task

# Truth tables over (a, b) = (0,0), (0,1), (1,0), (1,1): every two-input
# function except 0, 1, a, not a, b and not b.
GATES = torch.tensor([
    [t >> 3 & 1, t >> 2 & 1, t >> 1 & 1, t & 1]
    for t in range(16) if t not in (0b0000, 0b1111, 0b0011, 0b1100, 0b0101, 0b1010)
])
assert GATES.shape == (10, 4)


def apply_gate(gate: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return GATES[gate, 2 * a + b]


class Logic(Task):
    def __init__(self, max_len: int = 10, max_gates: int = 10):
        super().__init__(name="logic", input_size=2 + 10 * max_gates, heads=1, classes=2, cell="lstm",
                         hidden=128, batch_size=16, max_steps=100, difficulty_name="gates per vector",
                         knobs=dict(max_len=max_len, max_gates=max_gates))
        self.max_len, self.max_gates = max_len, max_gates

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        L, G = self.max_len, self.max_gates
        lengths = torch.randint(1, L + 1, (batch,), generator=generator)
        gates = torch.randint(1, G + 1, (L, batch), generator=generator)
        kinds = torch.randint(0, 10, (L, batch, G), generator=generator)
        bits = torch.randint(0, 2, (L + 1, batch), generator=generator)
        x = torch.zeros(L, batch, self.input_size)
        targets = torch.zeros(L, batch, dtype=torch.long)
        prev = bits[0]                                       # b0 of the first vector
        for t in range(L):
            b_prev, b_cur = prev, bits[t + 1]
            x[t, :, 0] = b_prev.float() if t == 0 else 0.0
            x[t, :, 1] = b_cur.float()
            for i in range(G):
                on = i < gates[t]
                x[t, on, 2 + 10 * i + kinds[t, on, i]] = 1.0
                nxt = apply_gate(kinds[t, :, i], b_cur, b_prev)
                b_prev, b_cur = torch.where(on, b_cur, b_prev), torch.where(on, nxt, b_cur)
            targets[t] = b_cur
            prev = b_cur
        mask = torch.arange(L)[:, None] < lengths[None]
        x = x * mask[..., None]
        return Batch(x, lengths, targets[..., None], mask, gates * mask)
