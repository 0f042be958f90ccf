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
  (step_norm) and the halting unit run on the running tokens' rows only.
  Its keys and values there follow the frozen-token rule of design §9 and
  §14 (its state stays s^N: block layer 1 reads s^N at every loop n > N,
  every other block layer its own input at step N), so later tokens read
  exactly what our engine's ragged cache gives them. Those keys and values
  are constants: each block layer keeps every token's last (q, k, v) rows,
  post-rotary; at each loop only the running tokens' rows are recomputed
  (norm, qkv projection, q/k norms, rotary), plus, at block layer 1, the
  rows of the tokens that halted at the loop before (their input moved to
  s^N once). vLLM's attention still runs on every token of the batch: it
  writes every token's keys and values into this loop's cache (the later
  tokens need them) in the same call as it attends, and its metadata
  (query offsets, sequence lengths, slots) is built once per batch by the
  attention backend; cutting it to the running rows would mean rebuilding
  it per loop for each backend, which the plugin does not do. So the halted
  tokens' queries are attended too and their outputs dropped: per halted
  token and loop, one attention row over its context and the cache write.
  The row counts depend on the data (a host sync per loop), so under "act"
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
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from .checks import check_config, exit_rule

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


def _share(copy_: nn.Module, original: nn.Module) -> None:
    """Make copy_ use original's submodules (so its weights) everywhere but
    in its attention layers, which keep their own paged KV cache."""
    for name, child in list(copy_.named_children()):
        if isinstance(child, AttentionLayerBase):
            continue
        if any(isinstance(m, AttentionLayerBase) for m in child.modules()):
            _share(child, getattr(original, name))
        else:
            setattr(copy_, name, getattr(original, name))
    for name, _ in list(copy_.named_parameters(recurse=False)):   # none in vLLM's layers; for safety
        setattr(copy_, name, getattr(original, name))


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
            _share(layer, self.layers[start + (u - num_layers) % width])
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
        every = torch.arange(tokens, device=v.device)
        running = torch.ones(tokens, dtype=torch.bool, device=v.device)
        total = torch.zeros(tokens, dtype=accumulate, device=v.device)
        out = torch.zeros(v.shape, dtype=accumulate, device=v.device)
        weight = self.halting.weight.to(accumulate)
        bias = self.halting.bias.to(accumulate)
        v = v.clone()                               # the tokens' states, written row-wise below
        kept = [None] * len(self.loops[0])          # each block layer's (q, k, v) rows of every token, post-rotary
        rows = every                                # the tokens running this loop
        for n, layers in enumerate(self.loops):
            last = n == len(self.loops) - 1
            # block layer 1's keys and values: the tokens that ran the previous loop read their new state (a
            # token that halted there writes s^N now and, its input fixed, the same rows at every later loop)
            fresh = rows if n else every
            rows = every[running] if n else every   # host sync: the running count sizes every product below
            x = v
            for k, layer in enumerate(layers):
                x = _layer_rows(layer, positions, kept, k, x, rows, fresh if k == 0 else rows)
            if not rows.numel():
                continue                            # keys and values written; nothing runs on
            if self.step_norm:
                x = self.norm(x)
            s = x.to(accumulate)
            h = torch.sigmoid(F.linear(s, weight, bias)).squeeze(-1)
            before = total.index_select(0, rows)
            added = before + h
            halts = torch.ones_like(added, dtype=torch.bool) if last else added >= 1 - self.eps
            p = torch.where(halts, 1 - before, h)
            out.index_copy_(0, rows, out.index_select(0, rows) + p.unsqueeze(-1) * s)
            total.index_copy_(0, rows, added)
            v.index_copy_(0, rows, x)
            running.index_copy_(0, rows, ~halts)
        return out.to(v.dtype)


def _qkv(attn: nn.Module, positions: torch.Tensor, a: torch.Tensor):
    """The family's attention forward up to its `Attention`: q, k, v of the
    normed rows a, per-head q/k norms (Qwen3, Qwen2 with qk_norm), rotary."""
    qkv, _ = attn.qkv_proj(a)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q.reshape(*q.shape[:-1], -1, attn.head_dim)).reshape(q.shape)
        k = attn.k_norm(k.reshape(*k.shape[:-1], -1, attn.head_dim)).reshape(k.shape)
    return (*attn.rotary_emb(positions, q, k), v)


def _writes_apart(attention) -> bool:
    """Whether the attention backend writes keys and values into the paged
    cache in an op of its own (vLLM's CPU, FlashAttention, Triton and Flex
    backends), so a loop where no token runs can write them and skip the
    attention itself."""
    return not attention.attn_backend.forward_includes_kv_cache_update and \
        attention.kv_sharing_target_layer_name is None


def _write_cache(attention, key: torch.Tensor, value: torch.Tensor) -> None:
    """The cache write of `attention.forward` alone (the same op, the same views)."""
    from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

    unified_kv_cache_update(key.view(-1, attention.num_kv_heads, attention.head_size),
                            value.view(-1, attention.num_kv_heads, attention.head_size_v), attention.layer_name)


def _layer_rows(layer, positions, kept, k, x, rows, fresh):
    """vLLM's decoder layer (Llama, Qwen2, Qwen3: the same attribute names)
    on the running rows of one loop: x the layer's input, the running rows
    (R, D), or, for block layer 1 (k == 0), every token's state (T, D), of
    which the rows `fresh` get new keys and values. Keys and values of the
    others are kept[k]'s, computed at their last loop; vLLM's attention runs
    on every token (its batch metadata cannot be cut to a subset), writes
    every token's keys and values into this loop's cache, and only the
    running rows' outputs go on (o_proj, residual, norm, MLP). Where no
    token runs, only the cache write runs (if the backend has it apart)."""
    attn = layer.self_attn
    every = positions.shape[0]
    a = None
    if k == 0:
        if fresh.numel():
            a = layer.input_layernorm(x if fresh.numel() == every else x.index_select(0, fresh))
        x = x.index_select(0, rows)               # the running rows' input goes on to the residual
    elif fresh.numel():
        a = layer.input_layernorm(x)
    if kept[k] is None:                           # loop 1: every token's rows are new
        kept[k] = _qkv(attn, positions, a)
    elif fresh.numel():
        for whole, part in zip(kept[k], _qkv(attn, positions.index_select(0, fresh), a)):
            whole.index_copy_(0, fresh, part)
    if not rows.numel() and _writes_apart(attn.attn):
        _write_cache(attn.attn, kept[k][1], kept[k][2])   # no query runs: this loop's cache write is all it needs
        return x
    o = attn.attn(*kept[k])
    if not rows.numel():
        return x
    if rows.numel() != every:
        o = o.index_select(0, rows)
    o, _ = attn.o_proj(o)
    h, residual = layer.post_attention_layernorm(o, x)
    return layer.mlp(h) + residual


class VLLMLoopedCausalLM(nn.Module):
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
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.tied = bool(getattr(text, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size, scale=getattr(text, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

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
