"""What the training commands share (the task command, `command`, and the
byte LM, `lm`): Ctrl-C handling, the matplotlib check and where a run ran.
It imports neither command: both import it, so neither imports the other
at module level (`command` hands `lm` its arguments from inside `main`)."""
from __future__ import annotations

import os
import platform
import signal

import torch


def machine() -> dict:
    """Where a run ran, for its summary."""
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def matplotlib_or_say_so() -> bool:
    """Whether the figure can be drawn; said before training, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: training runs and writes summary.json and log.jsonl, "
              "but no summary.png (pip install matplotlib, or the [train] extra)", flush=True)
        return False
    return True


class Interrupt:
    """Turns the first Ctrl-C into a request the loop answers at the end of the
    iteration (checkpoint, then a clean exit); a second one interrupts at once."""

    def __enter__(self):
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


__all__ = ["machine", "matplotlib_or_say_so", "Interrupt"]
