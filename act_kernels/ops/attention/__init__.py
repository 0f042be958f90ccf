"""Ragged attention (DESIGN §9): queries are a subset of the packed tokens,
keys and values come from a pool read through a token -> row index.

    reference.py       the reference twin (pure PyTorch)
    triton_kernels.py  flash-style Triton forward and backward, and launchers
    function.py        autograd Function, torch.library op, public function
"""
from .function import RaggedAttention, ragged_attention, ragged_attention_op

__all__ = ["ragged_attention", "RaggedAttention", "ragged_attention_op"]
