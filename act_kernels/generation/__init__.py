"""Batched generation over the ragged cache (design §14, §17): one slot
scheduler with two policies, "synchronous" and "depthwise"
(scheduler.py), the depth-wise block that steps in-flight tokens each at its
own ponder step (depthwise.py)."""
from .depthwise import SCHEDULES, DepthwiseBlock, check_schedule
from .scheduler import Generated, SequenceDraws, eos_ids, generate_slots

__all__ = ["generate_slots", "Generated", "SequenceDraws", "eos_ids", "DepthwiseBlock", "check_schedule", "SCHEDULES"]
