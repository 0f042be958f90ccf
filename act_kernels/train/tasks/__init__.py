"""The four synthetic tasks of the ACT paper as batch generators, and a
per-token task for the transformer encoder (pointer chasing)."""
from .addition import Addition
from .base import Batch, Task
from .logic import Logic
from .parity import Parity
from .pointer import PointerChase
from .sort import Sort

TASKS = {"parity": Parity, "logic": Logic, "addition": Addition, "sort": Sort, "pointer": PointerChase}

# Reduced sizes that learn on a laptop CPU in minutes; the paper's sizes are
# each class's defaults.
SMALL = {
    "parity": dict(size=8),
    "logic": dict(max_len=5, max_gates=3),
    "addition": dict(max_len=3, max_digits=2),
    "sort": dict(max_len=5),
    "pointer": dict(max_len=8, values=8, max_hops=3),
}


def make_task(name: str, scale: str = "small", **knobs: int) -> Task:
    """The task at the reduced ("small") or the paper's size; `knobs` override
    single settings (e.g. size=16 for parity)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if scale not in ("small", "paper"):
        raise ValueError(f"scale must be 'small' or 'paper', got {scale!r}")
    settings = dict(SMALL[name]) if scale == "small" else {}
    settings.update(knobs)
    return TASKS[name](**settings)


__all__ = ["Batch", "Task", "Parity", "Logic", "Addition", "Sort", "PointerChase", "TASKS", "SMALL", "make_task"]
