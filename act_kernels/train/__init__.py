"""The training application: the paper's synthetic tasks (`tasks`), the task
networks (`model`) and the command `python -m act_kernels.train` (`command`).
It uses the kernel library like any user; the library never imports it."""
from .command import main, parse_args

__all__ = ["main", "parse_args"]
