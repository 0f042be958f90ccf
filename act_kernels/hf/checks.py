"""What `LoopedCausalLM` refuses, before anything runs (design §15): every
setting our kernels cannot compute exactly is an error that names it."""
from __future__ import annotations

import torch
from torch import nn

from .attention import ours


def check_model(model) -> None:
    """The model's structure and the attention settings we have no kernel for."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not isinstance(model, nn.Module) or inner is None or not all(hasattr(inner, n) for n in needed) \
            or not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise TypeError("model must be a transformers causal LM laid out as model.model.{embed_tokens, layers, "
                        "norm, rotary_emb} and model.lm_head (Llama, Qwen2, Qwen3, Mistral and the like), got "
                        f"{type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported: LoopedCausalLM ponders a causal decoder")
    if getattr(config, "add_cross_attention", False):
        raise ValueError("cross-attention (config.add_cross_attention) is not supported")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        raise ValueError(f"sliding-window attention (config.sliding_window = {window}) is not supported: "
                         "set config.sliding_window = None to use full causal attention")
    types = set(getattr(config, "layer_types", None) or ())
    if types - {"full_attention"}:
        raise ValueError(f"config.layer_types {sorted(types)}: only full causal attention is supported "
                         "(no sliding-window or chunked attention)")
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError("chunked attention (config.attention_chunk_size) is not supported")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise ValueError(f"logit softcapping (config.{name}) is not supported")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise ValueError("ALiBi position biases are not supported: the layers must take rotary position_embeddings")
    for i, layer in enumerate(inner.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            continue
        if getattr(attn, "sinks", None) is not None:
            raise ValueError(f"attention sinks (layer {i}: self_attn.sinks) are not supported")
        if getattr(attn, "is_causal", True) is False:
            raise ValueError(f"layer {i} is not causal (self_attn.is_causal = False): only causal decoders ponder")
        if getattr(attn, "sliding_window", None) is not None:
            raise ValueError(f"layer {i} uses sliding-window attention (self_attn.sliding_window)")


def check_block(block, num_layers: int):
    if not isinstance(block, (tuple, list)) or len(block) != 2 or \
            any(isinstance(b, bool) or not isinstance(b, int) for b in block):
        raise TypeError(f"block must be a pair of ints (start, stop), got {block!r}")
    start, stop = block
    if not 0 <= start < stop <= num_layers:
        raise ValueError(f"block = {tuple(block)} must satisfy 0 <= start < stop <= {num_layers} (the model's "
                         "decoder layers): a block inside the model, not empty")
    return int(start), int(stop)


@torch.no_grad()
def check_routes_attention(model) -> None:
    """Every decoder layer must hand its attention to the configured attention
    function: one token through each layer with our backend, which must be
    called once per layer."""
    inner = model.model
    weight = next(inner.parameters())
    x = torch.zeros(1, 1, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
    position = torch.zeros(1, 1, dtype=torch.long, device=weight.device)
    cos, sin = inner.rotary_emb(x, position)
    calls = []

    def attend(q, kv, scale, dropout_p):
        calls.append(1)
        return q.new_zeros(q.shape)

    with ours(model.config):
        for i, layer in enumerate(inner.layers):
            calls.clear()
            try:
                layer(x, attention_mask=None, position_ids=position, position_embeddings=(cos, sin),
                      act_kernels_attend=attend)
            except Exception as error:   # a layer that cannot take our call at all
                raise ValueError(f"decoder layer {i} ({type(layer).__name__}) cannot be called with "
                                 f"position_embeddings and transformers' attention interface: {error}") from error
            if len(calls) != 1:
                raise ValueError(f"decoder layer {i} ({type(layer).__name__}) does not route its attention "
                                 "through transformers' attention interface (config._attn_implementation)")
