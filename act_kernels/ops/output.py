"""What an ACT ponder returns (`ponder`, and the fused cells' whole-ponder
Function): the mean-field state, the ponder cost, and the packed halting
distribution with a padded per-row view for plots and analysis."""
from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import torch


class HaltingProbs(NamedTuple):
    """The halting distribution p_b^n of every computed row, packed step-major.

    values:      (T,) p of each computed row, T = sum_b N_b (accumulation dtype)
    batch_index: (T,) int64, the batch row b each packed row belongs to
    step_index:  (T,) int64, the 1-based ponder step n of each packed row
    batch_size:  B

    Rows of step 1 come first (all B of them, in batch order), then the rows
    still running at step 2, and so on: the layout the kernels work in.
    Values carry no gradient; the loss uses `ponder_cost`.
    """

    values: torch.Tensor
    batch_index: torch.Tensor
    step_index: torch.Tensor
    batch_size: int

    def padded(self) -> torch.Tensor:
        """(B, max N) view: row b holds p_b^1 .. p_b^{N_b}, then zeros."""
        max_n = int(self.step_index.max().item()) if self.step_index.numel() else 0
        out = self.values.new_zeros(self.batch_size, max_n)
        out[self.batch_index, self.step_index - 1] = self.values
        return out


class PonderOutput(NamedTuple):
    """state:         (B, H) mean-field state S (a tuple if the input state was a tuple),
                      in the input dtype
    ponder_cost:   (B,) rho = N + R, in the accumulation dtype (float32; float64 for
                      float64 inputs), differentiable
    steps:         (B,) int64 N
    remainder:     (B,) R, accumulation dtype
    halting_probs: HaltingProbs (packed p and a padded view)"""

    state: Union[torch.Tensor, Tuple[torch.Tensor, ...]]
    ponder_cost: torch.Tensor
    steps: torch.Tensor
    remainder: torch.Tensor
    halting_probs: HaltingProbs
