"""What every synthetic task produces, and how it is described."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple

import torch
from torch import Tensor


class Batch(NamedTuple):
    """A batch of variable-length sequences, time-major and zero-padded.

    inputs:     (L, B, input_size) float32
    lengths:    (B,) int64, real length of every sequence (>= 1)
    targets:    (L, B, heads) int64 class indices
    mask:       (L, B) bool, the time steps that carry a target
    difficulty: (L, B) int64, the task's difficulty knob at every time step
    """

    inputs: Tensor
    lengths: Tensor
    targets: Tensor
    mask: Tensor
    difficulty: Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self))


@dataclass
class Task:
    """Base class: the shape of a task's inputs and outputs, its network, and
    the reduced ("small") and paper-size settings of its difficulty knobs."""

    name: str = ""
    input_size: int = 0
    heads: int = 1
    classes: int = 2
    cell: str = "lstm"          # the paper's network for the task
    hidden: int = 128
    batch_size: int = 16
    max_steps: int = 100
    difficulty_name: str = "difficulty"
    knobs: Dict[str, int] = field(default_factory=dict)

    def sample(self, batch: int, generator: torch.Generator) -> Batch:  # pragma: no cover
        raise NotImplementedError
