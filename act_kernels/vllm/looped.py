"""`VLLMLoopedCausalLM`: a saved `act_kernels.hf.LoopedCausalLM` built from
vLLM's own layers (design §15's composition):

    embed -> prelude layers [0, start) once -> the block [start, stop)
    looped max_steps times -> coda layers [stop, L) once -> final norm -> head

The decoder layers are vLLM's own for the inner model's family (Llama,
Qwen2, Qwen3: fused qkv / gate-up projections, RMSNorm with a fused
residual, vLLM's rotary embedding and paged `Attention`). Every loop of the
block has its own paged KV cache: each block layer is built max_steps times
and the copies of loops 2.. share every submodule of loop 1's layer (so every
weight) except their `Attention`, which vLLM registers under a prefix of its
own, `model.loop_layers.{u}.self_attn.attn`, u counting on from the inner
model's L layers (vLLM's KV binding reads one distinct integer per attention
layer name). So the engine keeps L + (max_steps - 1) · (stop - start) layers
of KV cache per token, as the unrolled model would.

The exit rule (`act_exit` in the config, or `hf_overrides`; checks.py):

- "fixed": every token runs max_steps loops, the model with its block
  unrolled: `looped(ids, exit="fixed")` and `looped.generate(...,
  exit="fixed")`.
- "act" (LoopedCausalLM's default): ACT's mean field (design §1, §9). Per
  token the halting unit reads each loop's output s_n (after the final
  norm with step_norm), h_n = σ(w·s_n + c) in float32, N the first n with
  h_1 + … + h_n ≥ 1 − eps (or max_steps), p_n = h_n before N and the
  remainder at N; the block's output is S = Σ p_n s_n. A token that halted
  leaves every later loop: the output projection, the residual, the
  post-attention norm and the MLP of each block layer, the final norm
  (step_norm) and the halting unit run on the running tokens' rows only,
  its keys and values there frozen (rows.py), its query left out of the
  loop's attention where the backend allows it (attention_cut.py). The
  row counts depend on the data (a host sync per loop), so under "act"
  the model is left out of vLLM's torch.compile and CUDA graphs are off
  (config.py): it runs eager; "fixed" compiles as vLLM's own models.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from .causal_lm import LoopedForCausalLM
from .checks import check_config, exit_rule
from .rows import agreed, running_loops, share_weights

# checkpoint name piece -> (vLLM parameter piece, shard id), as vLLM's Llama and Qwen loaders stack them
STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]


def _decoder_layer(vllm_config: VllmConfig, text, prefix: str) -> nn.Module:
    """vLLM's decoder layer of the inner model's family, built from its text config."""
    family = text.model_type
    if family == "llama":
        from vllm.model_executor.models.llama import LlamaDecoderLayer
        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=text)
    if family == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
        return Qwen2DecoderLayer(config=text, cache_config=vllm_config.cache_config,
                                 quant_config=vllm_config.quant_config, prefix=prefix)
    if family == "qwen3":
        from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
        return Qwen3DecoderLayer(config=text, cache_config=vllm_config.cache_config,
                                 quant_config=vllm_config.quant_config, prefix=prefix)
    raise ValueError(f"text_config.model_type = {family!r} is not served")   # check_config refused it already



def _compiled(vllm_config: VllmConfig) -> bool:
    """Whether vLLM's torch.compile takes the model: not under "act", whose
    row counts depend on the data (a host sync per loop, shapes no graph
    holds); "fixed" compiles as vLLM's own models do."""
    return exit_rule(vllm_config.model_config.hf_config) != "act"


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0}, enable_if=_compiled)
class LoopedModel(nn.Module):
    """Embedding, decoder layers (loop 1's), the loops' attention copies,
    final norm and the halting unit; forward returns the final hidden states."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        start, stop = check_config(config)
        text = config.text_config
        self.exit = exit_rule(config)
        self.max_steps, self.eps = int(config.max_steps), float(config.eps)
        self.step_norm = bool(config.step_norm)
        num_layers = text.num_hidden_layers
        self.block_range = (start, stop)
        width = stop - start
        unrolled = num_layers + (self.max_steps - 1) * width
        # vLLM's Llama attention reads config.layer_types[its layer index] where the config has them: give the
        # layers a config whose list covers the loop copies' indices too (all full attention: check_config)
        layer_text = text
        if getattr(text, "layer_types", None):
            layer_text = copy.copy(text)
            layer_text.layer_types = ["full_attention"] * unrolled
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList([_decoder_layer(vllm_config, layer_text, f"{prefix}.layers.{i}")
                                     for i in range(num_layers)])
        copies = {}
        for u in range(num_layers, unrolled):
            layer = _decoder_layer(vllm_config, layer_text, f"{prefix}.loop_layers.{u}")
            share_weights(layer, self.layers[start + (u - num_layers) % width])
            copies[str(u)] = layer
        self.loop_layers = nn.ModuleDict(copies)
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.halting = nn.Linear(text.hidden_size, 1)
        # the layers each loop runs, in order (plain lists: the modules are registered above)
        loops = [list(self.layers[start:stop])]
        for t in range(1, self.max_steps):
            first = num_layers + (t - 1) * width
            loops.append([self.loop_layers[str(u)] for u in range(first, first + width)])
        self.loops = loops
        self.prelude, self.coda = list(self.layers[:start]), list(self.layers[stop:])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.prelude:
            h, residual = layer(positions, h, residual)
        if self.exit == "fixed":
            h, residual = self._fixed(positions, h, residual)
        else:
            h, residual = self._act(positions, h if residual is None else h + residual), None
        for layer in self.coda:
            h, residual = layer(positions, h, residual)
        if self.step_norm and not self.coda:   # the head reads the block's output: normed at every step
            return h if residual is None else h + residual
        return self.norm(h) if residual is None else self.norm(h, residual)[0]

    def _fixed(self, positions, h, residual):
        """Every token every loop: the unrolled model, vLLM's fused residual kept."""
        for layers in self.loops:
            for layer in layers:
                h, residual = layer(positions, h, residual)
            if self.step_norm:
                h = self.norm(h) if residual is None else self.norm(h, residual)[0]
                residual = None
        return h, residual

    def _act(self, positions, v):
        """ACT's mean field over the loops, v the block's input (T, D): each
        loop runs the block's MLP, output projection and norms on the tokens
        still running only; halted tokens are frozen (module docstring) and
        their keys and values at the later loops come from the rows kept per
        block layer. Eager only (data-dependent row counts)."""
        tokens = v.shape[0]
        accumulate = torch.float64 if v.dtype == torch.float64 else torch.float32
        running = torch.ones(tokens, dtype=torch.bool, device=v.device)
        total = torch.zeros(tokens, dtype=accumulate, device=v.device)
        out = torch.zeros(v.shape, dtype=accumulate, device=v.device)
        weight = self.halting.weight.to(accumulate)
        bias = self.halting.bias.to(accumulate)
        v = v.clone()                               # the tokens' states, written row-wise below
        for n, rows, x in running_loops(self.loops, positions, v, running):
            if self.step_norm:
                x = self.norm(x)
            s = x.to(accumulate)
            h = torch.sigmoid(F.linear(s, weight, bias)).squeeze(-1)
            before = total.index_select(0, rows)
            added = before + h
            last = n == len(self.loops) - 1
            halts = torch.ones_like(added, dtype=torch.bool) if last else agreed(added >= 1 - self.eps)
            p = torch.where(halts, 1 - before, h)
            out.index_copy_(0, rows, out.index_select(0, rows) + p.unsqueeze(-1) * s)
            total.index_copy_(0, rows, added)
            v.index_copy_(0, rows, x)
            running.index_copy_(0, rows, ~halts)
        return out.to(v.dtype)

















class VLLMLoopedCausalLM(LoopedForCausalLM):
    """The architecture "LoopedCausalLM" for vLLM (see the module docstring).
    Weights: the checkpoint of LoopedCausalLM.save_pretrained, `model.model.*`
    (the inner model), `model.lm_head.*` and `block.halting.*`."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        text = config.text_config
        self.config = config
        self.model = LoopedModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self._add_head(vllm_config, prefix, text)

    def _add_head(self, vllm_config: VllmConfig, prefix: str, text) -> None:
        """The head from a transformers text config (vocabulary and hidden
        sizes, tie_word_embeddings, logit_scale)."""
        self.add_head(vllm_config, prefix, vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                      tied=bool(getattr(text, "tie_word_embeddings", False)),
                      scale=getattr(text, "logit_scale", 1.0))

    @staticmethod
    def vllm_name(name: str) -> str:
        """A checkpoint name as a parameter name here (before stacking)."""
        if name.startswith("block.halting."):
            return "model.halting." + name[len("block.halting."):]
        if name.startswith("model.lm_head."):
            return name[len("model."):]
        if name.startswith("model.model."):
            return name[len("model."):]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for checkpoint_name, tensor in weights:
            name = self.vllm_name(checkpoint_name)
            if "rotary_emb.inv_freq" in name or (self.tied and name.startswith("lm_head.")):
                continue
            for param_piece, weight_piece, shard in STACKED:
                if weight_piece in name:
                    name = name.replace(weight_piece, param_piece)
                    param = params[name]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint weight {checkpoint_name!r} (as {name!r}) has no parameter here")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


__all__ = ["VLLMLoopedCausalLM", "LoopedModel"]
