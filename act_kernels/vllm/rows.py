"""The loops of a looped model in vLLM on the rows of the tokens still
running (looped.py's "act", Ouro's gate, Huginn's latent-diff), shared by
the plugin's model classes.

A token that exits at loop N leaves every later loop: each loop layer's
qkv projection, norms, output projection and MLP run on the running
tokens' rows only (`running_loops`). Its keys and values there follow the
frozen-token rule of design §9 and §14 (its state stays s^N: the loop's
first layer reads s^N at every loop n > N, every other layer its own input
at loop N), so later tokens read what our engine's ragged cache gives
them. They are constants: each loop layer keeps every token's last (q, k,
v) rows, post-rotary, and at each loop only the running tokens' rows are
recomputed, plus, at the loop's first layer, the rows of the tokens that
exited at the loop before (their input moved to s^N once). Attention runs
on the cut of attention_cut.py where the backend allows it, else on every
query with the halted ones' outputs dropped; a loop where no token runs
only writes the cache (backends with a separate cache write).

Each loop's copy of a layer has its own paged KV cache (`share_weights`:
every submodule but the attention shared with loop 1's layer), and under
tensor parallelism the exit flags are agreed across the ranks (`agreed`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

from .attention_cut import Sequences, write_slots, writes_apart


def share_weights(copy_: nn.Module, original: nn.Module) -> None:
    """Make copy_ use original's submodules (so its weights) everywhere but
    in its attention layers, which keep their own paged KV cache."""
    for name, child in list(copy_.named_children()):
        if isinstance(child, AttentionLayerBase):
            continue
        if any(isinstance(m, AttentionLayerBase) for m in child.modules()):
            share_weights(child, getattr(original, name))
        else:
            setattr(copy_, name, getattr(original, name))
    for name, _ in list(copy_.named_parameters(recurse=False)):   # none in vLLM's layers; for safety
        setattr(copy_, name, getattr(original, name))


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
    batch = Sequences.of(loops[1:], tokens, v.dtype)
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


def query_key_value(attn: nn.Module, positions: torch.Tensor, a: torch.Tensor):
    """The family's attention forward up to its `Attention`: q, k, v of the
    normed rows a, a per-head step before the rotary embedding (Qwen3's and
    Qwen2's q/k norms; an attention's own `per_head(q, k)`, such as Huginn's
    qk_bias), rotary."""
    qkv, _ = attn.qkv_proj(a)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    per_head, q_norm = getattr(attn, "per_head", None), getattr(attn, "q_norm", None)
    if per_head is not None or q_norm is not None:
        q_heads = q.reshape(*q.shape[:-1], -1, attn.head_dim)
        k_heads = k.reshape(*k.shape[:-1], -1, attn.head_dim)
        q_heads, k_heads = per_head(q_heads, k_heads) if per_head is not None else \
            (q_norm(q_heads), attn.k_norm(k_heads))
        q, k = q_heads.reshape(q.shape), k_heads.reshape(k.shape)
    return (*attn.rotary_emb(positions, q, k), v)


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
    every query, or, with a cut (attention_cut.py), the queries of the sequences that
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
        kept[k] = query_key_value(attn, positions, a)
    elif fresh.numel():
        for whole, part in zip(kept[k], query_key_value(attn, positions.index_select(0, fresh), a)):
            whole.index_copy_(0, fresh, part)
    if not rows.numel() and writes_apart(attn.attn):
        _write_cache(attn.attn, kept[k][1], kept[k][2])   # no query runs: this loop's cache write is all it needs
        return x
    if cut is None:
        o = attn.attn(*kept[k])
        if rows.numel() != every:
            o = o.index_select(0, rows)
    else:
        q, key, value = kept[k]
        write_slots(attn.attn, key.index_select(0, cut.rest), value.index_select(0, cut.rest), cut.rest_slots)
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


__all__ = ["running_loops", "agreed", "share_weights", "query_key_value"]
