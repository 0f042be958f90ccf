"""Our attention backend in transformers' registry (design §15): registered
once with `AttentionInterface` under ATTENTION_NAME, and selected only for
the duration of our own calls (`ours`), so the model keeps its own attention
implementation everywhere else, its own forward and generate included."""
from __future__ import annotations

import contextlib

from transformers import AttentionInterface

from ..layers.kinds.transformers_decoder import attention_function

ATTENTION_NAME = "act_kernels_ragged"
AttentionInterface.register(ATTENTION_NAME, attention_function)


@contextlib.contextmanager
def ours(config):
    """Routes the layers' attention (they read config._attn_implementation at
    every call) to our backend inside the block, and back after it."""
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
