"""What `pondernet` returns: every computed state, the halting distribution,
the KL term, and the per-row bookkeeping of the packed layout."""
from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import torch

States = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


class PonderNetOutput(NamedTuple):
    """states:      (T, H) the step function's state for every computed (row, step),
                    packed step-major (all of step 1 in batch order, then the rows
                    still running at step 2, ...), differentiable; a tuple for tuple states
    p:           (T,) the halting distribution p_b^n, differentiable (accumulation dtype)
    kl:          (B,) KL(p_b || g) against the truncated geometric prior, differentiable
    steps:       (B,) int64 N_b
    batch_index: (T,) int64 row b of every packed entry
    step_index:  (T,) int64 1-based step n of every packed entry
    state:       (B, H) each row's state at its halting step (a tuple for tuple states)
    batch_size:  B
    """

    states: States
    p: torch.Tensor
    kl: torch.Tensor
    steps: torch.Tensor
    batch_index: torch.Tensor
    step_index: torch.Tensor
    state: States
    batch_size: int

    def padded(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, max N, ...) view of a packed per-row value (T, ...): row b holds
        its steps 1..N_b, then `fill`. Differentiable."""
        max_n = int(self.steps.max()) if self.steps.numel() else 0
        out = values.new_full((self.batch_size, max_n, *values.shape[1:]), fill)
        return out.index_put((self.batch_index, self.step_index - 1), values)
