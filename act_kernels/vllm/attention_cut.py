"""The attention cut of the loops 2.. on vLLM's CPU backend (rows.py's
`running_loops` asks for it once per loop): at a loop where some tokens of
the batch have halted, the loop's attention runs on the queries from each
sequence's first running token to its last only.

vLLM's attention backends take each sequence's queries as one contiguous
range with its causal offset (a query's position is the sequence length
minus the range's length plus its place in it), so the queries that can
leave are a range's halted ends: its leading ones by starting the range
later, its trailing ones by ending it earlier and shortening the
sequence's length by as many keys (only they read those keys). In a decode
batch (one query per sequence) exactly the halted tokens' queries leave; in
a prefill chunk the halted queries between two running ones stay. The
metadata is cut once per loop (query offsets, sequence lengths, block
table, slots, and the backend's scheduler plan rebuilt with its builder's
own call), the loop's layers read it through the forward context, and the
other tokens' keys and values, which later tokens read, are written into
the loop's cache apart (`write_slots`).

Other backends (vLLM's GPU ones), whose metadata holds plans and fields
this module does not rebuild, and padded batches keep the whole batch's
metadata (`Sequences.of` returns None): there the halted tokens' queries
are attended too and their outputs dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch


def writes_apart(attention) -> bool:
    """Whether the attention backend writes keys and values into the paged
    cache in an op of its own (vLLM's CPU, FlashAttention, Triton and Flex
    backends), so a loop where no token runs can write them and skip the
    attention itself."""
    return not attention.attn_backend.forward_includes_kv_cache_update and \
        attention.kv_sharing_target_layer_name is None


def write_slots(attention, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """The backend's cache write of the rows key, value into the given
    slots of this layer's paged cache (what `unified_kv_cache_update` does
    with the batch's slots)."""
    attention.impl.do_kv_cache_update(attention, key.view(-1, attention.num_kv_heads, attention.head_size),
                                      value.view(-1, attention.num_kv_heads, attention.head_size_v),
                                      attention.kv_cache, slots)


class Sequences:
    """One batch's sequences as vLLM's CPU attention backend sees them at
    the loop copies' layers (loops 2..), which share one metadata object
    and one slot mapping (one KV cache group): which sequence each token
    belongs to, so that a loop can cut the metadata to the sequences that
    still have a running token, each from its first running token to its
    last (`cut`)."""

    def __init__(self, context, metadata, slots, attention, dtype):
        self.context, self.metadata, self.slots = context, metadata, slots
        self.attention, self.dtype = attention, dtype
        starts = metadata.query_start_loc
        self.lengths = starts[1:] - starts[:-1]
        self.owner = torch.repeat_interleave(torch.arange(self.lengths.numel(), device=starts.device),
                                             self.lengths)

    @classmethod
    def of(cls, loops, tokens: int, dtype: torch.dtype) -> Sequences | None:
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
        if any(a.attn_backend.get_name() != "CPU_ATTN" or not writes_apart(a) or a.attn_type != AttentionType.DECODER
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

    def cut(self, running: torch.Tensor, rows: torch.Tensor) -> Cut | None:
        """The metadata of each sequence's queries from its first running
        token to its last (running: (T,) bool, rows: its indices; sequences
        with none left out), or None where that keeps every token. A query
        range may shrink at both ends: dropping its trailing queries drops
        the same number of keys off its sequence length, which only those
        queries read (causal), so the kept queries keep their positions."""
        from vllm import _custom_ops as ops
        from vllm import envs

        tokens, sequences = running.numel(), self.lengths.numel()
        index = torch.arange(tokens, device=running.device)
        live, owner = index[running], self.owner[running]
        first = torch.full((sequences,), tokens, device=index.device).scatter_reduce(0, owner, live, "amin")
        last = torch.full((sequences,), -1, device=index.device).scatter_reduce(0, owner, live, "amax")
        inside = (index >= first.index_select(0, self.owner)) & (index <= last.index_select(0, self.owner))
        keep = inside.nonzero().squeeze(1)        # host sync: sizes the cut
        if keep.numel() == tokens:
            return None
        rest = (~inside).nonzero().squeeze(1)
        alive = last >= 0
        count = int(alive.sum())
        first, last = first[alive], last[alive]
        lengths = (last - first + 1).to(self.lengths.dtype)
        # a query range's end moves back by the trailing queries dropped, its sequence length with it
        trailing = self.metadata.query_start_loc[1:][alive] - 1 - last
        seq_lens = self.metadata.seq_lens[alive] - trailing.to(self.metadata.seq_lens.dtype)
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
            block_table=self.metadata.block_table[:sequences][alive], slot_mapping=keep_slots,
            scheduler_metadata=plan)
        # where each running token's row sits among the kept ones (every running token is kept)
        where = torch.empty_like(running, dtype=torch.long)
        where[keep] = torch.arange(keep.numel(), device=keep.device)
        return Cut(self.context, metadata, keep, keep_slots, rest, self.slots.index_select(0, rest), where[rows])


class Cut:
    """One loop's attention on the sequences that still have a running
    token, each from its first running token to its last: those token rows
    `keep` (with their slots and the cut metadata),
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


__all__ = ["Sequences", "Cut", "writes_apart", "write_slots"]
