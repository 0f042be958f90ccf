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
  s^N once). vLLM's attention backends take each sequence's queries as one
  contiguous range with its causal offset, so a sequence's queries can be
  left out only as a whole: at a loop where some sequences of the batch
  have no running token left, on vLLM's CPU backend the loop's attention
  runs on the sequences that still have one only, with attention metadata
  cut to them (query offsets, sequence lengths, block table, slots and the
  backend's scheduler plan rebuilt, once per loop, read by the loop's
  layers through the forward context), and the other tokens' keys and
  values are written into the loop's cache apart (later tokens read them).
  In a decode batch (one query per sequence) a halted token's query leaves
  exactly; a prefill chunk keeps all its queries while any of its tokens
  runs. Other backends (vLLM's GPU ones) keep the whole batch's metadata:
  there the halted tokens' queries are attended too and their outputs
  dropped, one attention row over its context per halted token and loop.
  A loop where no token runs only writes the cache (backends with a
  separate cache write). The row counts depend on the data (a host sync
  per loop), so under "act" the model is left out of vLLM's torch.compile
  and CUDA graphs are off (config.py): it runs eager; "fixed" compiles as
  vLLM's own models.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
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


def running_loops(loops, positions: torch.Tensor, v: torch.Tensor, running: torch.Tensor):
    """Runs the loops (each a list of layers) on the tokens still running:
    yields (n, rows, x) per loop where some token runs, n from 0, rows
    their indices and x their output rows. v (T, D), every token's state,
    and running (T,) bool are read at each loop: the caller updates both in
    place from x before the next one (a halted token keeps its state).
    Halted tokens' keys and values come from the rows kept per layer; a loop
    with no running token only writes them (module docstring)."""
    tokens = v.shape[0]
    every = torch.arange(tokens, device=v.device)
    kept = [None] * len(loops[0])               # each layer's (q, k, v) rows of every token, post-rotary
    rows = every                                # the tokens running this loop
    batch = _Sequences.of(loops[1:], tokens, v.dtype)
    for n, layers in enumerate(loops):
        # layer 1's keys and values: the tokens that ran the previous loop read their new state (a token that
        # halted there writes its exit state now and, its input fixed, the same rows at every later loop)
        fresh = rows if n else every
        rows = every[running] if n else every   # host sync: the running count sizes every product below
        cut = batch.cut(running, rows) if batch is not None and 0 < rows.numel() < tokens else None
        x = v
        with contextlib.nullcontext() if cut is None else cut.reading(layers):
            for k, layer in enumerate(layers):
                x = _layer_rows(layer, positions, kept, k, x, rows, fresh if k == 0 else rows, cut)
        if rows.numel():                        # else keys and values written; nothing runs on
            yield n, rows, x


def agreed(flags: torch.Tensor) -> torch.Tensor:
    """The exit flags every tensor-parallel rank takes: a token leaves where
    any rank says so. The ranks compute them from the same all-reduced
    states, so they agree but for rounding; one flag apart, the ranks would
    run different row counts into the next loop's all-reduces and hang."""
    if get_tensor_model_parallel_world_size() == 1:
        return flags
    return tensor_model_parallel_all_reduce(flags.to(torch.float32)) > 0


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


def _layer_rows(layer, positions, kept, k, x, rows, fresh, cut):
    """vLLM's decoder layer (Llama, Qwen2, Qwen3: the same attribute names)
    on the running rows of one loop: x the layer's input, the running rows
    (R, D), or, for block layer 1 (k == 0), every token's state (T, D), of
    which the rows `fresh` get new keys and values. Keys and values of the
    others are kept[k]'s, computed at their last loop. vLLM's attention
    writes every token's keys and values into this loop's cache and attends
    every query, or, with a cut (`_Cut`), the queries of the sequences that
    still have a running token; only the running rows' outputs go on
    (o_proj, residual, norm, MLP). Where no token runs, only the cache
    write runs (if the backend has it apart)."""
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
    if cut is None:
        o = attn.attn(*kept[k])
        if rows.numel() != every:
            o = o.index_select(0, rows)
    else:
        q, key, value = kept[k]
        _write_slots(attn.attn, key.index_select(0, cut.rest), value.index_select(0, cut.rest), cut.rest_slots)
        o = attn.attn(q.index_select(0, cut.keep), key.index_select(0, cut.keep), value.index_select(0, cut.keep))
        o = o.index_select(0, cut.pick)
    if not rows.numel():
        return x
    o, _ = attn.o_proj(o)
    return _after_attention(layer, o, x)


def _after_attention(layer, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's rest after the output projection o of its input x: a
    layer with its own `after_attention` (a model whose norms sit elsewhere,
    such as Huginn's sandwich) runs it; vLLM's decoder layers add the
    residual in their post-attention norm and the MLP's output to it."""
    finish = getattr(layer, "after_attention", None)
    if finish is not None:
        return finish(o, x)
    h, residual = layer.post_attention_layernorm(o, x)
    return layer.mlp(h) + residual


def _write_slots(attention, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """The backend's cache write of the rows key, value into the given
    slots of this layer's paged cache (what `unified_kv_cache_update` does
    with the batch's slots)."""
    attention.impl.do_kv_cache_update(attention, key.view(-1, attention.num_kv_heads, attention.head_size),
                                      value.view(-1, attention.num_kv_heads, attention.head_size_v),
                                      attention.kv_cache, slots)


class _Sequences:
    """One batch's sequences as vLLM's CPU attention backend sees them at
    the loop copies' layers (loops 2..), which share one metadata object
    and one slot mapping (one KV cache group): which sequence each token
    belongs to, so that a loop can cut the metadata to the sequences that
    still have a running token (`cut`)."""

    def __init__(self, context, metadata, slots, attention, dtype):
        self.context, self.metadata, self.slots = context, metadata, slots
        self.attention, self.dtype = attention, dtype
        starts = metadata.query_start_loc
        self.lengths = starts[1:] - starts[:-1]
        self.owner = torch.repeat_interleave(torch.arange(self.lengths.numel(), device=starts.device),
                                             self.lengths)

    @classmethod
    def of(cls, loops, tokens: int, dtype: torch.dtype) -> _Sequences | None:
        """The batch's sequences, or None where the metadata cannot be cut
        safely: a backend other than vLLM's CPU one (the GPU backends keep
        plans and fields the plugin does not rebuild), a cache write inside
        the attention op, encoder or dynamically causal attention, more
        than one metadata object or slot mapping over the loop copies,
        padded token rows, or no forward context (profiling runs)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available
        from vllm.v1.attention.backend import AttentionType

        attentions = [layer.self_attn.attn for layers in loops for layer in layers]
        if not attentions or not is_forward_context_available():
            return None
        if any(a.attn_backend.get_name() != "CPU_ATTN" or not _writes_apart(a) or a.attn_type != AttentionType.DECODER
               for a in attentions):
            return None
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

        context = get_forward_context()
        if not isinstance(context.attn_metadata, dict) or not isinstance(context.slot_mapping, dict):
            return None
        names = [a.layer_name for a in attentions]
        metadata = {id(context.attn_metadata.get(name)): context.attn_metadata.get(name) for name in names}
        slots = {id(context.slot_mapping.get(name)): context.slot_mapping.get(name) for name in names}
        if len(metadata) != 1 or len(slots) != 1:
            return None
        (metadata,), (slots,) = metadata.values(), slots.values()
        if not isinstance(metadata, CPUAttentionMetadata) or slots is None or metadata.dynamic_causal is not None \
                or metadata.encoder_cache is not None or metadata.use_sdpa_prefill \
                or metadata.num_actual_tokens != tokens or slots.shape[0] != tokens \
                or metadata.query_start_loc.shape[0] != metadata.seq_lens.shape[0] + 1:
            return None
        return cls(context, metadata, slots, attentions[0], dtype)

    def cut(self, running: torch.Tensor, rows: torch.Tensor) -> _Cut | None:
        """The metadata of the sequences with a running token (running: (T,)
        bool, rows: its indices), or None where every sequence has one
        (nothing to cut)."""
        from vllm import _custom_ops as ops
        from vllm import envs

        alive = torch.zeros_like(self.lengths).index_add_(0, self.owner, running.to(self.lengths.dtype)) > 0
        count = int(alive.sum())                  # host sync: sizes the cut
        if count == alive.numel():
            return None
        keep = alive.index_select(0, self.owner).nonzero().squeeze(1)
        rest = (~alive).index_select(0, self.owner).nonzero().squeeze(1)
        lengths, seq_lens = self.lengths[alive], self.metadata.seq_lens[alive]
        starts = torch.zeros(count + 1, dtype=self.metadata.query_start_loc.dtype, device=lengths.device)
        torch.cumsum(lengths, 0, out=starts[1:])
        impl = self.attention.impl
        # the backend's own builder call (CPUAttentionMetadataBuilder.build) on the cut sequences
        plan = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=count, num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=starts, causal=self.metadata.causal,
            sliding_window_size=impl.sliding_window, isa=self.attention.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype)
        keep_slots = self.slots.index_select(0, keep)
        metadata = dataclasses.replace(
            self.metadata, num_actual_tokens=keep.numel(), max_query_len=int(lengths.max()),
            query_start_loc=starts, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
            block_table=self.metadata.block_table[:alive.numel()][alive], slot_mapping=keep_slots,
            scheduler_metadata=plan)
        # where each running token's row sits among the kept ones (every running token's sequence is kept)
        where = torch.empty_like(running, dtype=torch.long)
        where[keep] = torch.arange(keep.numel(), device=keep.device)
        return _Cut(self.context, metadata, keep, keep_slots, rest, self.slots.index_select(0, rest), where[rows])


class _Cut:
    """One loop's attention on the sequences that still have a running
    token: their token rows `keep` (with their slots and the cut metadata),
    the other tokens' rows `rest` and slots (written into the cache apart),
    and `pick`, the running tokens' places among the kept rows."""

    def __init__(self, context, metadata, keep, keep_slots, rest, rest_slots, pick):
        self.context, self.metadata = context, metadata
        self.keep, self.keep_slots, self.rest, self.rest_slots, self.pick = keep, keep_slots, rest, rest_slots, pick

    @contextlib.contextmanager
    def reading(self, layers):
        """The forward context with the cut metadata and the kept rows' slots
        under the names of these layers' attention, the batch's restored after."""
        context = self.context
        names = [layer.self_attn.attn.layer_name for layer in layers]
        metadata, slots = context.attn_metadata, context.slot_mapping
        context.attn_metadata = {**metadata, **dict.fromkeys(names, self.metadata)}
        context.slot_mapping = {**slots, **dict.fromkeys(names, self.keep_slots)}
        try:
            yield
        finally:
            context.attn_metadata, context.slot_mapping = metadata, slots


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
        self._add_head(vllm_config, prefix, text)

    def _add_head(self, vllm_config: VllmConfig, prefix: str, text) -> None:
        """The head over self.model (tied to its embedding where the config
        says so) and the logits processor, from the config with the
        vocabulary and hidden sizes."""
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
