"""`VLLMOuroForCausalLM`: Ouro (architecture "OuroForCausalLM", model_type
"ouro", `act_kernels.hf.OuroForCausalLM`) built from vLLM's own layers, with
our engine's per-token exit (design §18's Ouro):

    embed -> the whole decoder stack looped total_ut_steps times, each loop
    closed by model.norm -> the head reads each token's state at its exit

Each layer is vLLM's Llama attention (fused qkv projection, no biases,
vLLM's rotary embedding and paged `Attention`) and Llama MLP (fused
gate-up), between Ouro's sandwich norms: x += input_layernorm_2(attn(
input_layernorm(x))), x += post_attention_layernorm_2(mlp(
post_attention_layernorm(x))). As in looped.py, every loop has its own
paged KV cache: loop t's copy of layer i is `model.loop_layers.{u}`, u = t·L
+ i counting on from the L layers, sharing every submodule of
`model.layers.{i}` but its `Attention` (`rows.share_weights`). The
parameters carry the published names (the q/k/v and gate/up projections
stacked at loading).

The exit: the gate `model.early_exit_gate` reads each loop's normed state
s_t, λ_t = σ(gate(s_t)), p_t = λ_t Π_{j<t}(1 − λ_j), the last loop takes the
rest, and a token exits at the first loop whose cumulative p reaches the
threshold (config `early_exit_threshold`, or `hf_overrides`; checked in
(0, 1] when the engine's config is built: config.py) — `exit="gate"`, whose
arithmetic (act_kernels.layers.exits) is reused here. An exited token leaves
every later loop: its projections, norms and MLP run on the running tokens'
rows only, through rows.py's `running_loops` (an Ouro layer seen as vLLM's
Llama layer, `_Sandwich`). Its keys and values at the later loops follow
the frozen-token rule: at the first layer those of its exited (normed)
state, at every other layer those of its exit loop, kept per layer and
re-sent to attention; on vLLM's CPU backend a loop's attention is cut to
the queries from each sequence's first running token to its last
(attention_cut.py), as under looped.py's "act". The row counts
depend on the data (a host sync per loop): the model is left out of vLLM's
torch.compile and CUDA graphs are off.

The release's every-loop mode (config `every_loop` = True, or `hf_overrides=
{"every_loop": True}`; a bool, checked when the engine's config is built):
every token runs all total_ut_steps loops and nobody freezes, so every
layer copy runs the whole batch as the unrolled model would (no row
skipping, no attention cut), later tokens reading every token's state at
each loop; the gate's rule only picks the loop whose normed state the head
reads, the first whose cumulative p reaches the threshold, as our
`OuroForCausalLM.generate(..., every_loop=True)` and forward do. Its shapes
do not depend on the data: it is compiled by vLLM's torch.compile, CUDA
graphs on, as looped.py's "fixed".
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaAttention, LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from ..layers.exits import exits_now, make_exit_rule
from .checks import check_ouro_config
from .looped import VLLMLoopedCausalLM
from .rows import agreed, running_loops, share_weights


class OuroDecoderLayer(nn.Module):
    """One Ouro layer from vLLM's layers, under the published names."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(config=config, hidden_size=d, num_heads=config.num_attention_heads,
                                        num_kv_heads=config.num_key_value_heads,
                                        max_position_embeddings=config.max_position_embeddings,
                                        quant_config=vllm_config.quant_config, cache_config=vllm_config.cache_config,
                                        prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(d, config.intermediate_size, config.hidden_act, quant_config=vllm_config.quant_config,
                            prefix=f"{prefix}.mlp")
        self.input_layernorm, self.input_layernorm_2 = RMSNorm(d, eps=eps), RMSNorm(d, eps=eps)
        self.post_attention_layernorm, self.post_attention_layernorm_2 = RMSNorm(d, eps=eps), RMSNorm(d, eps=eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer on every row (the every-loop mode): Ouro's sandwich."""
        x = x + self.input_layernorm_2(self.self_attn(positions, self.input_layernorm(x)))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


class _Sandwich:
    """An Ouro layer under the names `rows.running_loops` calls (vLLM's Llama
    layer's, whose norm after attention fuses the residual), so that the
    running rows and the frozen keys and values are handled in one place:
    `post_attention_layernorm(o, x)` -> (the MLP's normed input, the
    residual), `mlp(h)` -> what is added to the residual."""

    def __init__(self, layer: OuroDecoderLayer):
        self.layer = layer
        self.self_attn, self.input_layernorm = layer.self_attn, layer.input_layernorm

    def post_attention_layernorm(self, o: torch.Tensor, x: torch.Tensor):
        residual = x + self.layer.input_layernorm_2(o)
        return self.layer.post_attention_layernorm(residual), residual

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attention_layernorm_2(self.layer.mlp(h))


def _compiled(vllm_config: VllmConfig) -> bool:
    """Whether vLLM's torch.compile takes the model: in the every-loop mode
    only, whose shapes do not depend on the data (the frozen exits size the
    products by the tokens still running, a host sync per loop)."""
    return check_ouro_config(vllm_config.model_config.hf_config)[1]


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0}, enable_if=_compiled)
class OuroModel(nn.Module):
    """Embedding, the layers (loop 1's) and their loop copies, the norm and
    the exit gate; forward returns each token's normed state at its exit."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        threshold, self.every_loop = check_ouro_config(config)
        self.max_steps = steps = config.total_ut_steps
        self.rule = make_exit_rule("gate", threshold, 1, steps, training=False, every_loop=self.every_loop)
        num_layers = config.num_hidden_layers
        # vLLM's Llama attention reads config.layer_types[its layer index]: a list covering the loop copies' indices
        # (all full attention: OuroConfig refuses sliding windows)
        layer_config = copy.copy(config)
        layer_config.layer_types = ["full_attention"] * (num_layers * steps)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList([OuroDecoderLayer(vllm_config, layer_config, f"{prefix}.layers.{i}")
                                     for i in range(num_layers)])
        copies = {}
        for u in range(num_layers, num_layers * steps):
            layer = OuroDecoderLayer(vllm_config, layer_config, f"{prefix}.loop_layers.{u}")
            share_weights(layer, self.layers[u % num_layers])
            copies[str(u)] = layer
        self.loop_layers = nn.ModuleDict(copies)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        # the layers each loop runs, in order, as `rows.running_loops` reads them (the modules are registered above)
        stack = list(self.layers) + list(self.loop_layers.values())
        self.loops = [[_Sandwich(layer) for layer in stack[t * num_layers:(t + 1) * num_layers]]
                      for t in range(steps)]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        v = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return self._every_loop(positions, v) if self.every_loop else self._frozen(positions, v.clone())

    def _every_loop(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Every token through every loop (the unrolled model); each token's
        output is its normed state at the first loop the gate's rule picks.
        No host sync: the picks are masks (compiled, module docstring)."""
        tokens = x.shape[0]
        every = torch.arange(tokens, device=x.device)
        state = self.rule.new_state(tokens, x.device, x.dtype)
        picked = torch.zeros(tokens, dtype=torch.bool, device=x.device)
        out = x
        for n, layers in enumerate(self.loops):
            for layer in layers:
                x = layer.layer(positions, x)
            x = self.norm(x)
            # the same flags on every tensor-parallel rank: the head's vocabulary shards must read the same loop
            gone = agreed(exits_now(self.rule, n + 1, self.max_steps, x, x, self.early_exit_gate.weight,
                                    self.early_exit_gate.bias, state, every))
            out = torch.where((gone & ~picked).unsqueeze(-1), x, out)   # the last loop picks every token left
            picked = picked | gone
        return out

    def _frozen(self, positions: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The loops on the running tokens' rows only (looped.py's "act",
        with the gate's hard exit in place of ACT's mean field): v holds
        every token's state, a token's rows stop changing at its exit."""
        tokens = v.shape[0]
        running = torch.ones(tokens, dtype=torch.bool, device=v.device)
        state = self.rule.new_state(tokens, v.device, v.dtype)
        for n, rows, x in running_loops(self.loops, positions, v, running):
            x = self.norm(x)
            # the gate reads s_n only (no previous state); loops count from 1 here
            gone = agreed(exits_now(self.rule, n + 1, self.max_steps, x, x, self.early_exit_gate.weight,
                                    self.early_exit_gate.bias, state, rows))
            v.index_copy_(0, rows, x)
            running.index_copy_(0, rows, ~gone)
        return v


class VLLMOuroForCausalLM(VLLMLoopedCausalLM):
    """The architecture "OuroForCausalLM" for vLLM (see the module
    docstring): looped.py's head, forward and weight loading over
    `OuroModel`, whose parameters carry the published names."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)   # the looped model's own __init__ builds its inner model from a text config
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = OuroModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self._add_head(vllm_config, prefix, config)

    @staticmethod
    def vllm_name(name: str) -> str:
        return name   # the published names are the parameters' own


__all__ = ["VLLMOuroForCausalLM", "OuroModel"]
