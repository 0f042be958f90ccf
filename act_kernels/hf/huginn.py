"""Huginn (recurrent-depth LM, model_type "huginn_raven") as one model kind
on the looped core (design §18), loaded from its published checkpoints with
no remote code: config.json as published (its `auto_map` names remote files
we never read) and safetensors under the published names
(`transformer.wte`, `transformer.{prelude,core_block,coda}.{i}.{norm_1..4,
attn.Wqkv, attn.qk_bias, attn.proj, mlp.fc, mlp.proj}`, `transformer.adapter`,
`transformer.ln_f`, `lm_head`, `freqs_cis`).

    e = prelude(wte[ids] · √D);  s_0 = the initial state
    s_n = core(adapter([s_{n−1}, e])),  n = 1 .. num_steps
    logits = lm_head(ln_f(coda(ln_f(s_N))))

The core is the pondered block over rows [s, e] (layers/kinds/sandwich.py),
prelude and coda run once. num_steps (default: the config's
mean_recurrence, as the release runs at inference) is the fixed depth; at
inference a token may exit earlier by Huginn's criteria (`exit=` "kl",
"entropy-diff", "latent-diff", "argmax-stability", with `threshold` and
`min_steps`), every token on its own: in generate (either schedule) every
new token, the prompt at num_steps; in forward every token ("latent-diff"
in the parallel forward; the criteria that read the coda feed the tokens
one position at a time through a cache, as decoded tokens). An exited
token freezes for later tokens (design §9).

Initial state: state_init "zero" or init_values.std 0 give zeros; otherwise
Huginn's rule, a normal draw truncated at ±3 std, times √D, from
`generator` (forward and generate take one). Positions count from each
row's first real token and padding is never attended (the release ignores
attention_mask and counts from 0: the same on unpadded rows). Norms and
RoPE tables compute in float32 or wider (float64 stays float64).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedModel

from ..layers import ACTTransformerEncoder, CausalStack
from ..layers.exits import RECURRENT_RULES, FixedExit
from ..layers.kinds import RMSNorm, linear_rows
from ..layers.kinds.sandwich import PairRotary, SandwichLayers, initial_states
from ..models.core import check_generator
from .published import COMMON_KEYS, PublishedLoopedLM

MODEL_TYPE = "huginn_raven"
# published keys the forward does not read (training and bookkeeping), kept as given
_KEPT = ("activation_checkpoint_impl", "architecture_class_name", "effective_expected_depth", "init_orthogonal",
         "init_strategy", "mean_backprop_depth", "n_layers", "padding_multiple", "sampling_scheme", "head_dim")
_COMMON_KEYS = COMMON_KEYS | {"tie_word_embeddings"}
# the published values of the keys that name hard-wired parts
_NAMED = {"block_class_name": "SandwichBlock", "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU",
          "norm_class_name": "RMSNorm_llama", "injection_type": "linear"}


class HuginnConfig(PreTrainedConfig):
    """Huginn's published config. Every published key is read: the ones
    that shape the forward are used, the training ones kept as given, the
    ones naming hard-wired parts (block, MLP, nonlinearity, norm, injection)
    must have the published values; unknown keys and test_time_noise > 0 are
    refused by name. Ours besides: backend, ponder_weight (kept at 0)."""

    model_type = MODEL_TYPE

    def __init__(self, n_embd: int = 5280, n_heads: int = 55, num_key_value_heads: Optional[int] = None,
                 n_layers_in_prelude: int = 2, n_layers_in_recurrent_block: int = 4, n_layers_in_coda: int = 2,
                 mean_recurrence: int = 32, intermediate_size: int = 17920, vocab_size: int = 65536,
                 padded_vocab_size: int = 65536, block_size: int = 4096, rope_base: float = 50000.0,
                 norm_eps: float = 1e-6, bias: bool = False, qk_bias: bool = True, tie_embeddings: bool = True,
                 init_values: Optional[dict] = None, state_init: str = "like-init", test_time_noise: float = 0.0,
                 backend: str = "auto", ponder_weight: float = 0.0, **kwargs):
        for key, value in _NAMED.items():
            given = kwargs.pop(key, value)
            if given != value:
                raise ValueError(f"{key} = {given!r}: Huginn's published model is {value!r}, the only one supported")
            setattr(self, key, value)
        for key in _KEPT:
            if key in kwargs:
                setattr(self, key, kwargs.pop(key))
        unknown = sorted(set(kwargs) - _COMMON_KEYS)
        if unknown:
            raise ValueError(f"HuginnConfig: unknown config keys {unknown} (not in Huginn's published config): "
                             "refused rather than ignored")
        if n_embd % n_heads:
            raise ValueError(f"n_embd = {n_embd} must be a multiple of n_heads = {n_heads}")
        if num_key_value_heads not in (None, n_heads):
            raise ValueError("Huginn has no grouped-query attention: num_key_value_heads must equal n_heads")
        if test_time_noise:
            raise ValueError("test_time_noise > 0 (noise injected before every step) is not supported")
        if state_init not in ("like-init", "zero"):
            raise ValueError(f"state_init = {state_init!r}: 'like-init' (the published rule) or 'zero'")
        if n_layers_in_recurrent_block < 1 or mean_recurrence < 1:
            raise ValueError("the recurrent block needs at least one layer and mean_recurrence >= 1")
        self.n_embd, self.n_heads, self.num_key_value_heads = n_embd, n_heads, n_heads
        self.n_layers_in_prelude, self.n_layers_in_recurrent_block = n_layers_in_prelude, n_layers_in_recurrent_block
        self.n_layers_in_coda, self.mean_recurrence = n_layers_in_coda, mean_recurrence
        self.intermediate_size, self.vocab_size, self.padded_vocab_size = intermediate_size, vocab_size, \
            padded_vocab_size
        self.block_size, self.rope_base, self.norm_eps = block_size, rope_base, norm_eps
        self.bias, self.qk_bias, self.tie_embeddings = bias, qk_bias, tie_embeddings
        self.init_values = dict(init_values) if init_values else {"std": math.sqrt(2 / (5 * n_embd))}
        self.state_init, self.test_time_noise, self.backend = state_init, test_time_noise, backend
        self.ponder_weight = ponder_weight     # ours: LoopedCausalLM's loss term (no halting unit here: 0)
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)

    @classmethod
    def known_keys(cls) -> frozenset:
        """Every key a Huginn config may hold: the published ones (read,
        kept or naming hard-wired parts), ours and the common ones."""
        import inspect

        named = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        return frozenset(named | set(_NAMED) | set(_KEPT) | _COMMON_KEYS)

    # what transformers' generation and pipelines (and vLLM, for the longest sequence) read
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.block_size

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda


class _Attention(nn.Module):
    def __init__(self, config: HuginnConfig):
        super().__init__()
        d, h = config.n_embd, config.n_heads
        self.Wqkv = nn.Linear(d, 3 * d, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, h, d // h)) if config.qk_bias else None
        self.proj = nn.Linear(d, d, bias=False)


class _MLP(nn.Module):
    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)


class SandwichBlock(nn.Module):
    """One block's parameters under the published names; its math runs in
    the engine's rows (layers/kinds/sandwich.py)."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        d, eps = config.n_embd, config.norm_eps
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (RMSNorm(d, eps) for _ in range(4))
        self.attn, self.mlp = _Attention(config), _MLP(config)


class HuginnForCausalLM(PublishedLoopedLM):
    """Huginn on the looped core: `forward` and `generate` as
    `LoopedCausalLM`'s, plus `num_steps` (the recurrence's depth; default
    config.mean_recurrence) and `generator` (the initial state's draws);
    the exit rules are Huginn's criteria."""

    config_class = HuginnConfig
    _no_split_modules = ["SandwichBlock"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: HuginnConfig):
        PreTrainedModel.__init__(self, config)
        d = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, d),
            prelude=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_prelude)),
            adapter=nn.Linear(2 * d, d, bias=config.bias),
            core_block=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block)),
            coda=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda)),
            ln_f=RMSNorm(d, config.norm_eps)))
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        hd = d // config.n_heads
        # the published RoPE table, kept so the checkpoint round-trips (the rows compute theirs in float64)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32),
                             config.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("freqs_cis", torch.stack([angles.cos(), angles.sin()], -1)[None, :, None])
        rotary, t = PairRotary(hd, config.rope_base), self.transformer
        kind = SandwichLayers(list(t.core_block), rotary, d_model=d, heads=config.n_heads, adapter=t.adapter)
        block = ACTTransformerEncoder(kind, max_steps=config.mean_recurrence, backend=config.backend)
        self._keep_block(block)      # not a submodule: its halting unit is unused
        self.prelude = CausalStack(SandwichLayers(list(t.prelude), rotary, d_model=d, heads=config.n_heads),
                                   config.backend) if len(t.prelude) else None
        self.coda = CausalStack(SandwichLayers(list(t.coda), rotary, d_model=d, heads=config.n_heads,
                                               enter_norm=t.ln_f), config.backend) if len(t.coda) else None
        if self.coda is None:
            raise ValueError("Huginn's coda needs at least one layer (n_layers_in_coda >= 1)")
        self.block_range, self.step_norm = (config.n_layers_in_prelude,
                                            config.n_layers_in_prelude + config.n_layers_in_recurrent_block), False
        self.max_steps, self.eps, self.max_len = config.mean_recurrence, block.eps, None
        self._state_generator: Optional[torch.Generator] = None
        self.post_init()

    def _init_std(self) -> float:
        return self.config.init_values.get("std", 0.02) or 0.02

    def extra_repr(self) -> str:
        return f"mean_recurrence={self.config.mean_recurrence}"

    @property
    def vocab_size(self) -> int:
        return self.config.padded_vocab_size

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    # -- the core's hooks --------------------------------------------------------------------

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.transformer.wte(tokens) * math.sqrt(self.config.n_embd)

    def _enter_block(self, e: Tensor) -> Tensor:
        return torch.cat([self.initial_state(e.shape[0], e), e], -1)

    def _head(self, h: Tensor) -> Tensor:
        return linear_rows(self.lm_head, self.transformer.ln_f(h))

    def initial_state(self, rows: int, like: Tensor) -> Tensor:
        """(rows, D) initial states: zeros for state_init "zero" or std 0;
        else a normal draw truncated at ±3 std, times √D (Huginn's rule),
        from the generator the call was given (else torch's default)."""
        std = 0.0 if self.config.state_init == "zero" else float(self.config.init_values.get("std", 0.0))
        return initial_states(rows, self.config.n_embd, std, self._state_generator, like)

    def _exit_rule(self, exit, threshold, min_steps, every_loop, prefill_steps=None):
        if exit in RECURRENT_RULES:
            if every_loop:
                raise ValueError("every_loop applies to the exit rules of LoopedCausalLM, not Huginn's criteria")
            if isinstance(min_steps, bool) or not isinstance(min_steps, int) or not 0 <= min_steps < self.max_steps:
                raise ValueError(f"min_steps must be an int in [0, num_steps = {self.max_steps}), got {min_steps!r}")
            if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not threshold > 0:
                raise ValueError(f"exit={exit!r} needs a threshold > 0, got {threshold!r}")
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(f"exit={exit!r} is an inference rule: call it under torch.no_grad() or in eval")
            return RECURRENT_RULES[exit](float(threshold), min_steps, self.max_steps, self.config.n_embd)
        if exit is None:          # the fixed depth, in training too (no halting unit to read)
            if threshold is not None:
                raise ValueError("threshold applies to an exit rule: give exit=")
            return FixedExit(None, 1)
        return super()._exit_rule(exit, threshold, 1 if min_steps == 0 else min_steps, every_loop, prefill_steps)

    @contextlib.contextmanager
    def _call(self, num_steps: Optional[int], generator: Optional[torch.Generator]):
        """num_steps and the initial state's generator for one call."""
        steps = self.config.mean_recurrence if num_steps is None else num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        check_generator(generator)
        self.max_steps = self.block.max_steps = steps
        self._state_generator = generator
        try:
            yield
        finally:
            self.max_steps = self.block.max_steps = self.config.mean_recurrence
            self._state_generator = None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                num_steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
                exit: Optional[str] = None, threshold: Optional[float] = None, min_steps: int = 0, **kwargs):
        """As LoopedCausalLM.forward, at num_steps recurrent steps (default
        config.mean_recurrence); exit= one of Huginn's criteria lets each
        token exit on its own: "latent-diff" in the parallel forward; "kl",
        "entropy-diff" and "argmax-stability" read the coda at every step, so
        the tokens are fed one position at a time through a cache, each
        exiting as a decoded token does (one call per position)."""
        with self._call(num_steps, generator):
            return super().forward(input_ids, attention_mask, labels, exit=exit, threshold=threshold,
                                   min_steps=min_steps, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *args,
                 num_steps: Optional[int] = None, state_generator: Optional[torch.Generator] = None,
                 min_steps: int = 0, **kwargs):
        """As LoopedCausalLM.generate, at num_steps (default
        config.mean_recurrence); exit= one of Huginn's criteria ("kl",
        "entropy-diff", "latent-diff", "argmax-stability") with threshold
        and min_steps (either schedule: new tokens exit on their own,
        prompts run num_steps). state_generator: the initial states' draws."""
        with self._call(num_steps, state_generator):
            return super().generate(input_ids, attention_mask, *args, min_steps=min_steps, **kwargs)

    def pondernet(self, *args, **kwargs):
        raise NotImplementedError("Huginn has no halting unit to train (its depth is sampled in training)")


__all__ = ["HuginnConfig", "HuginnForCausalLM", "MODEL_TYPE"]
