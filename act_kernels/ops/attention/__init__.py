"""Ragged attention (design §9): queries are a subset of the packed tokens,
keys and values come from a pool read through a token -> row index. Read
top-down:

    function.py        `ragged_attention` (the public function), `attend`
                       (the same without the argument checks, for layers
                       that build valid indices themselves) and the
                       autograd Function `RaggedAttention`
    reference.py       the reference twin (pure PyTorch), and the reference
                       backend's fused attention over padded sequences
    triton_kernels.py  flash-style Triton forward and backward, and launchers
    cpu_kernels.py     the extension's C++ forward on the CPU (decode steps)
    library.py         the torch.library ops
    fixed_pool.py      the same over a pool of one row per token, updated in
                       place, with its index tables built once per call
    index.py           the index tables the kernels read, and pool gradients
    checks.py          the argument checks
"""
from .fixed_pool import KeyTable, PoolViews, QueryTable, key_table, pool_backward, pool_forward, pool_views, query_table
from .function import RaggedAttention, attend, ragged_attention
from .library import ragged_attention_op
from .reference import ragged_attention as reference_ragged_attention

__all__ = ["ragged_attention", "attend", "RaggedAttention", "ragged_attention_op", "reference_ragged_attention",
           "KeyTable", "QueryTable", "PoolViews", "key_table", "query_table", "pool_views", "pool_forward",
           "pool_backward"]
