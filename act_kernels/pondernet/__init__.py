"""PonderNet (Banino et al. 2021) on the ragged machinery (DESIGN §10).

    out = ak.pondernet(step_fn, state, weight, bias, max_steps=20, prior=0.2)
    loss = ak.pondernet_loss(out, per_step_loss, beta=0.01)
"""
from .api import pondernet, pondernet_loss
from .output import PonderNetOutput

__all__ = ["pondernet", "pondernet_loss", "PonderNetOutput"]
