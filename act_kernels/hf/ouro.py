"""Ouro (ByteDance's looped LM, model_type "ouro") as one model kind on the
looped core (design §18), loaded from its published checkpoints with no
remote code: config.json as published (its `auto_map` names remote files we
never read) and safetensors under the published parameter names
(`model.embed_tokens`, `model.layers.{i}.{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, input_layernorm_2,
post_attention_layernorm, post_attention_layernorm_2}`, `model.norm`,
`model.early_exit_gate`, `lm_head`).

The whole decoder stack is the pondered block, looped `total_ut_steps`
times; every layer has sandwich norms, and the model norm closes every loop
(its output feeds the next loop, the exit gate and the head). The exit gate
is the block's halting unit: λ_t = σ(gate(h_t)), p_t = λ_t Π_{j<t}(1 − λ_j),
the last loop takes the rest, a token exits at the first loop whose
cumulative p reaches the threshold (`exit="gate"`, the default at inference,
threshold = config.early_exit_threshold). An exited token leaves every later
loop, and later tokens read it as it was at its exit (the frozen-token rule,
design §9). `every_loop=True` is the release's behaviour: every loop for
every token, the exit picking the loop the head reads.

Positions count from each row's first real token and padding is never
attended (the release ignores attention_mask and counts from 0: the same on
unpadded rows). Norms and RoPE tables compute in float32 or wider, float64
in float64 (the release rounds to float32 inside).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..layers import ACTTransformerEncoder
from ..layers.kinds import RMSNorm, decoder_kind, linear_rows
from .published import COMMON_KEYS, PublishedLoopedLM

MODEL_TYPE = "ouro"
# the published config's keys (Ouro-1.4B / 2.6B config.json) that shape the model
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "rope_theta", "rope_scaling", "total_ut_steps", "early_exit_threshold", "attention_dropout",
               "initializer_range", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
               "use_cache", "tie_word_embeddings")
_COMMON_KEYS = COMMON_KEYS | {"rope_parameters"}
# ours, beside the published keys (OuroConfig's docstring)
_OUR_KEYS = ("backend", "ponder_weight", "every_loop")
# what `check_ouro_settings` reads of a built config (the vLLM plugin's check, after hf_overrides)
CHECKED_KEYS = ("rope_theta", "rope_parameters", "use_sliding_window", "layer_types", "hidden_act", "total_ut_steps",
                "early_exit_threshold", "every_loop")


def check_ouro_settings(settings: Mapping[str, Any]) -> None:
    """What an Ouro config may not hold, refused by name: the one place that
    decides, run by OuroConfig on its arguments and by the vLLM plugin on
    the built config as vLLM's hf_overrides left it (act_kernels.vllm.checks).
    settings: config keys -> values; a key that is absent is not checked.
    Refused: keys that are neither the published config's, ours nor those
    every transformers config reads; RoPE scaling (rope_scaling or
    rope_parameters of another rope_type than "default", or whose
    rope_theta is not rope_theta: our rotary reads rope_theta alone);
    sliding windows (use_sliding_window, layer_types other than full
    attention); another activation than SiLU; total_ut_steps not an int
    >= 1; early_exit_threshold not a probability mass in (0, 1];
    every_loop not a bool."""
    unknown = sorted(set(settings) - set(_SHAPE_KEYS) - set(_OUR_KEYS) - _COMMON_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} (not in Ouro's published config, nor ours): refused rather "
                         "than ignored")
    for key in ("rope_scaling", "rope_parameters"):
        rope = settings.get(key)
        why = None if rope is None else _rope_refused(rope, settings.get("rope_theta"))
        if why:
            raise ValueError(f"{key} = {rope!r} is not supported: {why}")
    layer_types = settings.get("layer_types") or ()
    if settings.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ValueError("sliding-window attention (use_sliding_window / layer_types) is not supported: Ouro's "
                         "published models use full causal attention")
    if "hidden_act" in settings and settings["hidden_act"] != "silu":
        raise ValueError(f"hidden_act = {settings['hidden_act']!r}: Ouro's MLP is SwiGLU (silu)")
    if "total_ut_steps" in settings:
        steps = settings["total_ut_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"total_ut_steps must be an int >= 1, got {steps!r}")
    if "early_exit_threshold" in settings:
        threshold = settings["early_exit_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise ValueError(f"early_exit_threshold is the exit gate's threshold, a probability mass in (0, 1], got "
                             f"{threshold!r}")
    if "every_loop" in settings and not isinstance(settings["every_loop"], bool):
        raise ValueError(f"every_loop must be a bool (True: the release's every-loop mode), got "
                         f"{settings['every_loop']!r}")


def _rope_refused(rope, theta) -> Optional[str]:
    """Why RoPE parameters (a dict, or per layer type a dict of dicts) ask
    for more than our rotary embedding computes, plain RoPE at rope_theta;
    None where they do not."""
    if not isinstance(rope, Mapping):
        return "not a dict of RoPE parameters"
    if rope and all(isinstance(v, Mapping) for v in rope.values()):   # per layer type
        return next(filter(None, (_rope_refused(v, theta) for v in rope.values())), None)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"RoPE scaling ({kind!r}): our rotary embedding computes plain RoPE (the published Ouro configs " \
               "have none)"
    given = rope.get("rope_theta")
    if given is not None and theta is not None and float(given) != float(theta):
        return f"its rope_theta {given!r} is not rope_theta = {theta!r}, which our rotary embedding reads"
    return None


class OuroConfig(PreTrainedConfig):
    """Ouro's published config. Every key of the published config.json is
    read; settings our engine does not compute (sliding windows, RoPE
    scaling, another activation than SiLU), bad exit settings and unknown
    keys are refused by name (`check_ouro_settings`). Ours besides: backend (as LoopedCausalLM's), ponder_weight (τ
    in loss = lm_loss + τ · mean ponder cost, when training by ACT) and
    every_loop (bool, default False: the mode the vLLM plugin serves, the
    release's every-loop mode when True; act_kernels.vllm.ouro). Our forward
    and generate take every_loop per call and do not read this key, as
    LoopedCausalLM does not read the plugin's act_exit."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 49152, hidden_size: int = 2048, intermediate_size: int = 5632,
                 num_hidden_layers: int = 24, num_attention_heads: int = 16, num_key_value_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, hidden_act: str = "silu", max_position_embeddings: int = 65536,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 1e6, rope_scaling=None, total_ut_steps: int = 4,
                 early_exit_threshold: float = 1.0, attention_dropout: float = 0.0, initializer_range: float = 0.02,
                 use_sliding_window: bool = False, sliding_window=None, max_window_layers: Optional[int] = None,
                 layer_types=None, use_cache: bool = True, tie_word_embeddings: bool = False, backend: str = "auto",
                 ponder_weight: float = 0.0, every_loop: bool = False, **kwargs):
        check_ouro_settings({**kwargs, "rope_theta": rope_theta, "rope_scaling": rope_scaling,
                             "use_sliding_window": use_sliding_window, "layer_types": layer_types,
                             "hidden_act": hidden_act, "total_ut_steps": total_ut_steps,
                             "early_exit_threshold": early_exit_threshold, "every_loop": every_loop})
        # plain RoPE at rope_theta (checked above): the key is not kept, as rope_scaling below
        kwargs.pop("rope_parameters", None)
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        # rope_scaling is null in the published configs and refused otherwise; transformers 5 folds the key into
        # rope_parameters (and warns when it is set), so it is not kept as an attribute
        self.rms_norm_eps, self.rope_theta = rms_norm_eps, rope_theta
        self.total_ut_steps, self.early_exit_threshold = total_ut_steps, float(early_exit_threshold)
        self.attention_dropout, self.initializer_range = attention_dropout, initializer_range
        self.use_sliding_window, self.sliding_window = use_sliding_window, sliding_window
        self.max_window_layers = max_window_layers if max_window_layers is not None else num_hidden_layers
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * num_hidden_layers
        self.use_cache, self.backend = use_cache, backend
        # ours, not the release's (its loaders ignore them): the kernels' backend, τ of ACT's training loss, the
        # mode the vLLM plugin serves
        self.ponder_weight, self.every_loop = ponder_weight, every_loop
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Rotary(nn.Module):
    """RoPE's (cos, sin) at given positions, rotate_half layout, the angles
    in float64 (then the probe's dtype)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, float(theta)

    def forward(self, probe: Tensor, positions: Tensor):
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64,
                                                device=positions.device) / self.head_dim)
        angles = positions.to(torch.float64)[..., None] * inv_freq
        angles = torch.cat([angles, angles], -1)
        return angles.cos().to(probe.dtype), angles.sin().to(probe.dtype)


class _Attention(nn.Module):
    def __init__(self, config: OuroConfig):
        super().__init__()
        d, h, hk = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, hk * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, hk * self.head_dim, bias=False)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)


class _MLP(nn.Module):
    def __init__(self, config: OuroConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act_fn = nn.SiLU()


class OuroDecoderLayer(nn.Module):
    """One Ouro layer's parameters under the published names; its math runs
    in the engine's lean decoder rows (layers/kinds/lean_decoder.py):
    x += input_layernorm_2(attn(input_layernorm(x))),
    x += post_attention_layernorm_2(mlp(post_attention_layernorm(x)))."""

    lean = True

    def __init__(self, config: OuroConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn, self.mlp = _Attention(config), _MLP(config)
        self.input_layernorm, self.input_layernorm_2 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.post_attention_layernorm, self.post_attention_layernorm_2 = RMSNorm(d, eps), RMSNorm(d, eps)


class OuroModel(nn.Module):
    def __init__(self, config: OuroConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OuroDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.rotary_emb = Rotary(config.head_dim, config.rope_theta)


class OuroForCausalLM(PublishedLoopedLM):
    """Ouro on the looped core: `forward`, `generate` (both schedules,
    continuous batching, transformers' generation config and processors),
    `pondernet` (entropy=True is Ouro's objective) as `LoopedCausalLM`'s,
    with the exit gate as the block's halting unit. At inference the default
    exit is the gate at config.early_exit_threshold (threshold 1.0: every
    loop, unless a token's exit mass rounds to 1 earlier in float32, as in
    the release); `every_loop=True` computes every loop and picks
    the exit afterwards (the release's behaviour). In training mode without
    an exit rule the gate halts tokens by ACT (ponder_weight) or trains with
    `pondernet`."""

    config_class = OuroConfig
    _no_split_modules = ["OuroDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OuroConfig):
        PreTrainedModel.__init__(self, config)
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        kind = decoder_kind(list(self.model.layers), self.model.rotary_emb, config, self.model.norm)
        block = ACTTransformerEncoder(kind, max_steps=config.total_ut_steps, backend=config.backend)
        block.halting = self.model.early_exit_gate     # the exit gate is the halting unit
        self._keep_block(block)        # not a submodule: its one parameter is the gate's
        self.prelude = self.coda = None
        self.block_range, self.step_norm = (0, config.num_hidden_layers), True
        self.max_steps, self.eps, self.max_len = config.total_ut_steps, block.eps, None
        self.post_init()

    def _init_std(self) -> float:
        return self.config.initializer_range

    def extra_repr(self) -> str:
        return f"total_ut_steps={self.max_steps}, early_exit_threshold={self.config.early_exit_threshold}"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model.embed_tokens(tokens)

    def _head(self, h: Tensor) -> Tensor:
        return linear_rows(self.lm_head, h)     # the block's every loop ends in the model norm

    def _exit_rule(self, exit, threshold, min_steps, every_loop, prefill_steps=None):
        inference = not (self.training and torch.is_grad_enabled())
        if exit is None and inference:
            exit = "gate"
        if exit == "gate" and threshold is None:
            threshold = self.config.early_exit_threshold
        return super()._exit_rule(exit, threshold, min_steps, every_loop, prefill_steps)


__all__ = ["OuroConfig", "OuroForCausalLM", "MODEL_TYPE", "check_ouro_settings", "CHECKED_KEYS"]
