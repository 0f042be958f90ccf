"""Addition (Graves 2016, §3.3): sequences of 1..max_len numbers, each of D
decimal digits (D random in 1..max_digits), given as max_digits one-hot
blocks of 10 (least significant digit first; blocks past D are zero). At
every step the target is the running sum so far, as max_digits + 1 digit
classifications of 11 classes each (least significant first; class 10 means
"no digit", past the sum's last digit). Difficulty = D."""
from __future__ import annotations

import torch

from .base import Batch, Task


class Addition(Task):
    def __init__(self, max_len: int = 5, max_digits: int = 5):
        super().__init__(name="addition", input_size=10 * max_digits, heads=max_digits + 1, classes=11,
                         cell="lstm", hidden=512, batch_size=32, max_steps=20,
                         difficulty_name="digits", knobs=dict(max_len=max_len, max_digits=max_digits))
        self.max_len, self.max_digits = max_len, max_digits

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        L, D = self.max_len, self.max_digits
        lengths = torch.randint(1, L + 1, (batch,), generator=generator)
        n_digits = torch.randint(1, D + 1, (L, batch), generator=generator)
        digits = torch.randint(0, 10, (L, batch, D), generator=generator)
        present = torch.arange(D)[None, None] < n_digits[..., None]
        digits = digits * present
        mask = torch.arange(L)[:, None] < lengths[None]
        x = torch.nn.functional.one_hot(digits, 10).float() * (present & mask[..., None])[..., None]
        place = 10 ** torch.arange(D)
        values = (digits * place).sum(-1) * mask
        running = values.cumsum(0)
        heads = D + 1
        sum_digits = (running[..., None] // 10 ** torch.arange(heads)) % 10
        n_sum = torch.where(running > 0, torch.floor(torch.log10(running.clamp(min=1).double())).long() + 1,
                            torch.ones_like(running))
        targets = torch.where(torch.arange(heads) < n_sum[..., None], sum_digits, torch.full_like(sum_digits, 10))
        return Batch(x.reshape(L, batch, 10 * D), lengths, targets, mask, n_digits * mask)
