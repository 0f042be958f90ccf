"""Tiny Huginn checkpoints in the published format of tomg-group-umd/huginn-0125.

What the published folder holds (see oracle.py for the sources):
  config.json       the keys of PUBLISHED_CONFIG_KEYS (oracle.py), in that order: sorted as
                    save_pretrained (transformers 4.44.2) wrote them, then bos/eos/pad token ids
                    appended by a later edit. Reconstructed from the HF blob def35f6 (keys through
                    vocab_size, then "bos_token_id": 65504, "eos_token_id", ..); with the published
                    values it serialises (indent 2) to 1,372 bytes without the token ids -- the
                    size of the intermediate checkpoint's config.json -- and to 1,447 bytes with
                    all three, the main repo's listed 1.45 kB. pad_token_id 65509 and eos 65505
                    are the values RavenConfig's comments give; not read from the file itself.
                    auto_map names raven_config_minimal.RavenConfig and
                    raven_modeling_minimal.RavenForCausalLM, remote files NOT written here.
  model-0000i-of-0000n.safetensors + model.safetensors.index.json (published: 4 shards,
                    float32 -- torch_dtype "float32"; the four shard sizes 4.77 + 4.74 + 4.74 +
                    1.38 GB add up to the float32 parameter count with the embedding stored twice,
                    and the last shard is exactly one 65536 x 5280 float32 matrix: lm_head.weight),
                    index {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}.
                    One shard: model.safetensors, no index.
  Tensors: the names of oracle.BLOCK_PARAMS under transformer.{prelude,core_block,coda}.{i}.,
  transformer.wte.weight, transformer.adapter.weight, transformer.ln_f.weight,
  lm_head.weight (tied: a separate identical copy, as the model card says the upload stored
  "2 copies of the tied embedding"), and freqs_cis (1, block_size, 1, hd/2, 2) float32 [cos,
  sin] -- a persistent buffer, so in the state dict save_pretrained writes (its presence in the
  published index is inferred from the code, the index itself was not read).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from .oracle import BLOCK_PARAMS, PUBLISHED_CONFIG_KEYS

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}

# Tiny sizes; everything else as published.
TINY = dict(
    vocab_size=61, padded_vocab_size=64, padding_multiple=64,
    n_embd=64, n_heads=4, intermediate_size=96,
    n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1,
    mean_recurrence=4, mean_backprop_depth=2, block_size=128,
    bos_token_id=56, eos_token_id=57, pad_token_id=60,
)


def huginn_config(**overrides) -> dict:
    """A config dict with exactly the published keys (tiny sizes unless overridden). Derived
    keys (n_layers, head_dim, num_key_value_heads, effective_expected_depth, init_values) follow
    RavenConfig's formulas from the base keys unless given; init_values overrides are merged
    into the derived dict."""
    unknown = set(overrides) - set(PUBLISHED_CONFIG_KEYS)
    if unknown:
        raise KeyError(f"not a published Huginn config key: {sorted(unknown)}")
    base = dict(
        activation_checkpoint_impl="per-iteration", architecture_class_name="RecurrentGPT",
        architectures=["RavenForCausalLM"],
        auto_map={"AutoConfig": "raven_config_minimal.RavenConfig",
                  "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        bias=False, block_class_name="SandwichBlock", init_orthogonal=False, init_strategy="takase",
        injection_type="linear", mlp_class_name="GatedMLP", model_type="huginn_raven", nonlin_name="SiLU",
        norm_class_name="RMSNorm_llama", norm_eps=1e-6, qk_bias=True, rope_base=50000,
        sampling_scheme="poisson-lognormal-filling", state_init="like-init", tie_embeddings=True,
        torch_dtype="float32", transformers_version="4.44.2",
    )
    base.update(TINY)
    base.update({k: v for k, v in overrides.items() if k != "init_values"})
    d, h = base["n_embd"], base["n_heads"]
    depth = base["n_layers_in_prelude"] + base["n_layers_in_coda"] + base["n_layers_in_recurrent_block"] * base[
        "mean_recurrence"]
    base.setdefault("n_layers", base["n_layers_in_prelude"] + base["n_layers_in_recurrent_block"]
                    + base["n_layers_in_coda"])
    base.setdefault("head_dim", d // h)
    base.setdefault("num_key_value_heads", h)
    base.setdefault("effective_expected_depth", depth)
    std = math.sqrt(2 / (5 * d))
    init_values = {"embed_scale": math.sqrt(d), "embedding": std,
                   "out_proj": std / math.sqrt(2 * base["effective_expected_depth"]), "std": std}
    init_values.update(overrides.get("init_values") or {})
    base["init_values"] = init_values
    return {k: base[k] for k in PUBLISHED_CONFIG_KEYS}


def freqs_cis_table(head_dim: int, block_size: int, base: float) -> torch.Tensor:
    """The published RoPE buffer's format: (1, block_size, 1, head_dim/2, 2) float32 [cos, sin],
    computed in float32 as the model computes it."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angle = torch.outer(torch.arange(block_size, dtype=torch.float32), inv)
    return torch.stack([angle.cos(), angle.sin()], dim=-1)[None, :, None]


def huginn_params(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random weights under the published names, in checkpoint order (freqs_cis, the transformer
    ModuleDict's order, lm_head). Scaled for O(1) activations and logits: token embeddings of
    scale 1/sqrt(D) (times emb_scale sqrt(D) -> O(1)), linear maps of scale 1/sqrt(fan_in), norm
    weights 1 + 0.1 N(0,1), qk_bias 0.3 N(0,1); the sandwich norms keep every block output O(1)
    and the random core makes successive steps differ."""
    g = torch.Generator().manual_seed(seed)
    d, h, inter, v = config["n_embd"], config["n_heads"], config["intermediate_size"], config["padded_vocab_size"]
    hd = d // h

    def normal(*shape, scale):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    def norm_weight():
        return 1 + 0.1 * normal(d, scale=1.0)

    def block(pre):
        out = {}
        for name in BLOCK_PARAMS:
            if name == "attn.qk_bias":
                if config["qk_bias"]:
                    out[pre + name] = normal(2, 1, h, hd, scale=0.3)
            elif name.startswith("norm_"):
                out[pre + name] = norm_weight()
            elif name == "attn.Wqkv.weight":
                out[pre + name] = normal(3 * d, d, scale=d ** -0.5)
            elif name == "attn.proj.weight":
                out[pre + name] = normal(d, d, scale=d ** -0.5)
            elif name == "mlp.fc.weight":
                out[pre + name] = normal(2 * inter, d, scale=d ** -0.5)
            elif name == "mlp.proj.weight":
                out[pre + name] = normal(d, inter, scale=inter ** -0.5)
            else:
                raise AssertionError(name)
        return out

    params = {"freqs_cis": freqs_cis_table(hd, config["block_size"], config["rope_base"])}
    params["transformer.wte.weight"] = normal(v, d, scale=d ** -0.5)
    for i in range(config["n_layers_in_prelude"]):
        params.update(block(f"transformer.prelude.{i}."))
    params["transformer.adapter.weight"] = normal(d, 2 * d, scale=(2 * d) ** -0.5)
    if config["bias"]:
        params["transformer.adapter.bias"] = normal(d, scale=0.1)
    for i in range(config["n_layers_in_recurrent_block"]):
        params.update(block(f"transformer.core_block.{i}."))
    for i in range(config["n_layers_in_coda"]):
        params.update(block(f"transformer.coda.{i}."))
    params["transformer.ln_f.weight"] = norm_weight()
    params["lm_head.weight"] = (params["transformer.wte.weight"].clone() if config["tie_embeddings"]
                                else normal(v, d, scale=d ** -0.5))
    return {k: (t if k == "freqs_cis" else t.to(dtype)).contiguous() for k, t in params.items()}


def _split(names, sizes, shards):
    """Contiguous groups of names, shards of them, balanced by bytes; none empty."""
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be in 1..{len(names)}")
    total, groups, current, done = sum(sizes), [], [], 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        left_names, left_groups = len(names) - i, shards - len(groups)
        if current and (left_names < left_groups or done >= total * (len(groups) + 1) / shards):
            groups.append(current)
            current = []
        current.append(name)
        done += size
    groups.append(current)
    assert len(groups) == shards, (len(groups), shards)
    return groups


def write_huginn_checkpoint(folder, *, seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 1,
                            **config_overrides):
    """Write a tiny Huginn checkpoint to `folder` (created if missing) in the published format.
    Returns (config dict as written to config.json, params dict name -> tensor as written).
    `dtype` is the weights' dtype (torch_dtype follows it); freqs_cis stays float32."""
    if "torch_dtype" in config_overrides:
        raise KeyError("torch_dtype follows dtype")
    config = huginn_config(**config_overrides)
    config["torch_dtype"] = _DTYPE_NAMES[dtype]
    params = huginn_params(config, seed=seed, dtype=dtype)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    names = list(params)
    sizes = [params[n].numel() * params[n].element_size() for n in names]
    if shards == 1:
        save_file(params, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return config, params
    weight_map = {}
    for i, group in enumerate(_split(names, sizes, shards), start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: params[n] for n in group}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write(json.dumps(index, indent=2) + "\n")
    return config, params
