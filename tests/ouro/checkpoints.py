"""Tiny random-weight checkpoints in Ouro's published format (test-side; shares no code with
act_kernels).

Published format of ByteDance/Ouro-1.4B (read from the public mirror of its config.json,
daedalus/llm-fusion:Ouro-1.4B/config.json, and its remote code modeling_ouro.py):

config.json keys, all of them, in the published order:
  architectures ["OuroForCausalLM"], attention_dropout 0.0,
  auto_map {"AutoConfig": "configuration_ouro.OuroConfig", "AutoModel": "modeling_ouro.OuroModel",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
  pad_token_id 0, bos_token_id 0, eos_token_id 0, head_dim 128, hidden_act "silu",
  hidden_size 2048, initializer_range 0.02, intermediate_size 5632,
  layer_types ["full_attention"] * 24, max_position_embeddings 65536, max_window_layers 24,
  model_type "ouro", num_attention_heads 16, num_hidden_layers 24, num_key_value_heads 16,
  rms_norm_eps 1e-06, rope_scaling null, rope_theta 1000000.0, sliding_window null,
  tie_word_embeddings false, torch_dtype "bfloat16", total_ut_steps 4, early_exit_threshold 1.0,
  transformers_version "4.55.0", use_cache true, use_sliding_window false, vocab_size 49152.
  (configuration_ouro.py also knows these keys; it has no early_exit_step / head_dim parameter of
  its own: modeling_ouro.py reads early_exit_step with getattr(..., None) and head_dim with a
  hidden_size // num_attention_heads fallback.)

Parameter names (modules of modeling_ouro.py; the same list in vLLM's and mlx-lm's ports, whose
strict loaders accept exactly these): model.embed_tokens.weight (V, D);
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (no biases); model.layers.{i}.input_layernorm.weight,
.input_layernorm_2.weight, .post_attention_layernorm.weight, .post_attention_layernorm_2.weight;
model.layers.{i}.mlp.{gate,up,down}_proj.weight (no biases); model.norm.weight;
model.early_exit_gate.weight (1, D) and model.early_exit_gate.bias (1,); lm_head.weight (V, D)
(tie_word_embeddings is false in the published 1.4B config, so the head is its own tensor).
The published 1.4B ships a single model.safetensors; shards > 1 here follow transformers'
sharded layout (model-0000k-of-0000n.safetensors + model.safetensors.index.json with
{"metadata": {"total_size": bytes}, "weight_map": {name: file}}).

The remote code files named by auto_map (configuration_ouro.py, modeling_ouro.py) are NOT written.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

__all__ = ["PUBLISHED_KEYS", "tiny_config", "tiny_params", "write_ouro_checkpoint"]

# every key of the published ByteDance/Ouro-1.4B config.json, in its order
PUBLISHED_KEYS = (
    "architectures", "attention_dropout", "auto_map", "pad_token_id", "bos_token_id", "eos_token_id", "head_dim",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "layer_types", "max_position_embeddings",
    "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype",
    "total_ut_steps", "early_exit_threshold", "transformers_version", "use_cache", "use_sliding_window", "vocab_size",
)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def tiny_config(*, dtype: torch.dtype = torch.float32, **overrides) -> dict:
    """The published keys with tiny sizes (vocab 61, hidden 64, 2 layers, 4 heads, 2 kv heads,
    head_dim 16, intermediate 96, 4 loops, early_exit_threshold 1.0). Overrides must be published
    keys; layer_types and max_window_layers follow num_hidden_layers unless given."""
    unknown = set(overrides) - set(PUBLISHED_KEYS)
    if unknown:
        raise ValueError(f"not keys of the published config: {sorted(unknown)}")
    values = {
        "architectures": ["OuroForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModel": "modeling_ouro.OuroModel",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
        },
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "layer_types": None,          # filled below
        "max_position_embeddings": 512,
        "max_window_layers": None,    # filled below (the published value equals num_hidden_layers)
        "model_type": "ouro",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,        # published 1e6; a smaller base makes RoPE matter at test lengths
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "transformers_version": "4.55.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 61,
    }
    values.update(overrides)
    n = values["num_hidden_layers"]
    if values["layer_types"] is None:
        values["layer_types"] = ["full_attention"] * n
    if values["max_window_layers"] is None:
        values["max_window_layers"] = n
    assert tuple(values) == PUBLISHED_KEYS
    return values


def tiny_params(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the published names, scaled so that the normed states have RMS ~1,
    logits are O(1) and the gate's lambda varies across tokens (gate weight std 2/sqrt(D),
    bias near 0); norm weights are 1 + N(0, 0.1^2) so that a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    D, H = config["hidden_size"], config["num_attention_heads"]
    K = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    inner, V = config["intermediate_size"], config["vocab_size"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    def norm_weight():
        return 1.0 + normal(D, std=0.1)

    p = {"model.embed_tokens.weight": normal(V, D, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        p[pre + "self_attn.q_proj.weight"] = normal(H * hd, D, std=1.5 / math.sqrt(D))
        p[pre + "self_attn.k_proj.weight"] = normal(K * hd, D, std=1.5 / math.sqrt(D))
        p[pre + "self_attn.v_proj.weight"] = normal(K * hd, D, std=1.0 / math.sqrt(D))
        p[pre + "self_attn.o_proj.weight"] = normal(D, H * hd, std=1.0 / math.sqrt(H * hd))
        p[pre + "mlp.gate_proj.weight"] = normal(inner, D, std=1.0 / math.sqrt(D))
        p[pre + "mlp.up_proj.weight"] = normal(inner, D, std=1.0 / math.sqrt(D))
        p[pre + "mlp.down_proj.weight"] = normal(D, inner, std=1.0 / math.sqrt(inner))
        p[pre + "input_layernorm.weight"] = norm_weight()
        p[pre + "input_layernorm_2.weight"] = norm_weight()
        p[pre + "post_attention_layernorm.weight"] = norm_weight()
        p[pre + "post_attention_layernorm_2.weight"] = norm_weight()
    p["model.norm.weight"] = norm_weight()
    p["model.early_exit_gate.weight"] = normal(1, D, std=2.0 / math.sqrt(D))
    p["model.early_exit_gate.bias"] = normal(1, std=0.1)
    if not config.get("tie_word_embeddings", False):
        p["lm_head.weight"] = normal(V, D, std=1.5 / math.sqrt(D))
    return {k: v.to(dtype).contiguous() for k, v in p.items()}


def write_ouro_checkpoint(folder, *, seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 1,
                          **config_overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write config.json and the safetensors weights of a tiny random Ouro into folder (created
    if missing). shards == 1: model.safetensors; shards > 1: model-0000k-of-0000n.safetensors and
    model.safetensors.index.json. With tie_word_embeddings=True no lm_head.weight is written (as
    transformers saves tied weights). Returns (config dict, params dict as written, in dtype)."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    config = tiny_config(dtype=dtype, **config_overrides)
    params = tiny_params(config, seed=seed, dtype=dtype)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    names = list(params)
    if shards == 1:
        save_file(params, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return config, params
    if shards > len(names):
        raise ValueError(f"shards {shards} > {len(names)} tensors")
    bounds = [round(k * len(names) / shards) for k in range(shards + 1)]   # every shard non-empty
    groups = [names[bounds[k]:bounds[k + 1]] for k in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: params[n] for n in group}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in params.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return config, params
