"""act_kernels: fused CUDA and Triton kernels for Adaptive Computation Time.

    import act_kernels as ak
    out = ak.ponder(step_fn, state, weight, bias, max_steps=100, eps=0.01)
"""
from . import nn, reference
from .backends import available_backends
from .ops.attention import ragged_attention
from .ops.act import HaltingProbs, PonderOutput, ponder
from .ops.pondernet import PonderNetOutput, pondernet, pondernet_loss

__version__ = "0.1.0"
__all__ = ["nn", "ponder", "pondernet", "pondernet_loss", "PonderNetOutput", "ragged_attention", "reference",
           "available_backends", "PonderOutput", "HaltingProbs", "__version__"]
