"""What the per-token engine knows of a layer (design §15): its row math
around exactly one token-mixing op, one adapter per layer kind.

A layer kind (`EncoderLayers`, `DecoderLayers`) is a block of layers the
engine applies in order at every step, with

    d_model, heads, kv_heads, head_dim, weight (its device and dtype), len()
    rows(training, positions) -> one row adapter per layer for one call
    final_norm(x) or None: applied at the end of every step
    check_input(x): a clear error for an input the layers cannot take

and a row adapter (one layer, one call) with

    key_values(x, rows) -> (R, 2 * kv_heads * head_dim): each row's key, then its value
    forward(x, rows, attend) -> (R, d_model): the layer's output for rows x,
        where the layer calls attend(q (R, heads, head_dim), kv, scale, dropout_p)
        once, kv a zero-argument callable giving key_values of the same rows

`rows` are the packed token indices of x's rows (None: every token of the
call, in order): what a layer with positions (rotary embeddings) needs.
The ponder loop, the pools, the cache and ragged attention are shared by
every kind (layers/transformer.py, layers/token_ponder.py, layers/cache.py).
"""
from .torch_encoder import EncoderLayerRows, EncoderLayers
from .transformers_decoder import DecoderLayerRows, DecoderLayers
from .lean_decoder import LeanDecoderLayers, LeanDecoderRows, RMSNorm, decoder_kind, linear_rows

__all__ = ["EncoderLayers", "EncoderLayerRows", "DecoderLayers", "DecoderLayerRows", "LeanDecoderLayers",
           "LeanDecoderRows", "RMSNorm", "decoder_kind", "linear_rows"]
