"""The pure-PyTorch oracles every kernel is tested against (`ak.reference`):
ACT's `ponder` and PonderNet's `pondernet`, with the same signatures as the
public functions, and the reference twins of ACT's two kernel contracts."""
from .ops.act.reference import combine_backward, halting_decision, halting_step, ponder
from .ops.pondernet.reference import pondernet

__all__ = ["ponder", "pondernet", "halting_decision", "halting_step", "combine_backward"]
