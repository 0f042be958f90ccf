"""The ragged key/value cache of a per-token ACT block, for causal incremental
evaluation (design §14): every token keeps N + 1 rows at the block's first
layer (the keys and values of its states s^0 .. s^N) and N rows at every
other layer (those of its inputs there at steps 1 .. N), token by token in
one growing buffer per layer; never max_steps rows.

A later token at ponder step n reads an earlier token j through the index,
in the attention kernel, with no copy: at the first layer the row of
s^min(n-1, N_j) (j's visible state after step n - 1), at layer k > 1 the
row of j's step min(n, N_j). That is exactly what the causal forward over
the whole sequence reads, so a sequence evaluated chunk by chunk gives the
outputs, steps and ponder costs of one causal forward.
"""
from __future__ import annotations

import itertools
import weakref
from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def split_key_values(kv: Tensor, heads: int, dim: int) -> Tuple[Tensor, Tensor]:
    """(R, 2 heads dim) rows, a row's key then its value (what a layer kind's
    key_values and its attention's kv() give), as keys and values (R, heads,
    dim): views, no copy."""
    rows, width = kv.shape[0], heads * dim
    return kv[:, :width].view(rows, heads, dim), kv[:, width:].view(rows, heads, dim)


class _LayerRows:
    """One layer's key and value rows, token by token, in buffers that grow
    by doubling. A tail of rows can be reserved at the buffers' end (the
    depth-wise scheduler's in-flight rows, design §17), so that the cache
    and those rows are one tensor the attention reads with one index; it
    moves with the buffers when they grow."""

    def __init__(self, heads: int, dim: int, device, dtype):
        self.k = torch.zeros(0, heads, dim, device=device, dtype=dtype)
        self.v = torch.zeros(0, heads, dim, device=device, dtype=dtype)
        self.size = 0
        self.tail = 0

    def view(self) -> Tuple[Tensor, Tensor]:
        return self.k[:self.size], self.v[:self.size]

    @property
    def tail_start(self) -> int:
        """The index of the tail's first row in the buffers."""
        return self.k.shape[0] - self.tail

    def reserve_tail(self, rows: int) -> None:
        """Keeps `rows` rows at the buffers' end out of the cache's way (0: none)."""
        self.tail = 0
        self._grow(self.size + rows)
        self.tail = rows

    def _grow(self, need: int) -> None:
        if need + self.tail <= self.k.shape[0]:
            return
        capacity = max(need + self.tail, 2 * self.k.shape[0], 16)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = old.new_zeros(capacity, *old.shape[1:])
            grown[:self.size] = old[:self.size]
            if self.tail:
                grown[capacity - self.tail:] = old[old.shape[0] - self.tail:]
            setattr(self, name, grown)

    def claim(self, rows: int) -> int:
        """Makes room for `rows` rows the caller writes; returns the first one's index."""
        first = self.size
        self._grow(first + rows)
        self.size = first + rows
        return first

    def scratch(self, rows: int) -> int:
        """Makes room for `rows` rows past the cache's own without taking them
        (the next claim reuses them); returns the first one's index."""
        self._grow(self.size + rows)
        return self.size

    def append(self, k: Tensor, v: Tensor) -> int:
        """Stores the rows; returns the first one's index."""
        first = self.claim(k.shape[0])
        self.k[first:self.size] = k
        self.v[first:self.size] = v
        return first


class ACTCache:
    """What `ACTTransformerEncoder.extend` keeps between calls for
    `batch_size` sequences: per layer the rows of every token, per token its
    steps N and its first row at each layer, per sequence its tokens in
    order. Made by `encoder.new_cache(batch_size)`; tied to that encoder,
    its device and dtype. Memory grows with the tokens' Σ (N + 1) rows at
    the first layer and Σ N at every other layer."""

    def __init__(self, encoder, batch_size: int, device, dtype):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._owner = weakref.ref(encoder)
        self.device, self.dtype = torch.device(device), dtype
        kind = encoder.kind
        self.layers = [_LayerRows(kind.kv_heads, kind.head_dim, device, dtype) for _ in range(len(kind))]
        self.batch_size = batch_size
        self.lengths: List[int] = [0] * batch_size
        # per sequence and place in it: each token's first row at every layer
        # and its steps N (row s holds sequence s's tokens in order, its first
        # lengths[s] entries), grown by doubling. Places no token holds read
        # row 0 at every step (steps 1, first row 0), so that a table built
        # from them over every place (`SlotLayout`) points inside the buffers.
        self.first_rows = [torch.zeros(batch_size, 16, dtype=torch.int64, device=device) for _ in self.layers]
        self.steps = torch.ones(batch_size, 16, dtype=torch.int64, device=device)
        self._offsets, self._offsets_width = None, 0
        # a plain stack's last decode call without commit: its rows' scratch places per layer and the
        # cache's row counts then (CausalStack.commit_peeked takes rows from it while those still hold)
        self.peeked = None

    @property
    def width(self) -> int:
        """Places per sequence the tables hold now."""
        return self.steps.shape[1]

    def widen(self, longest: int) -> None:
        """Makes room for `longest` tokens in every sequence's row of the tables."""
        if longest <= self.width:
            return
        width = max(longest, 2 * self.width)
        for k, first in enumerate(self.first_rows):
            self.first_rows[k] = torch.cat([first, first.new_zeros(self.batch_size, width - first.shape[1])], 1)
        self.steps = torch.cat([self.steps, self.steps.new_ones(self.batch_size, width - self.steps.shape[1])], 1)

    def next_places(self, sequences: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """The listed sequences and each one's next place (its length), as
        int64 tensors on the cache's device, with the tables widened to hold
        a token there: what a call with one new token per sequence needs."""
        self.widen(max(self.lengths[s] for s in sequences) + 1)
        small = torch.tensor([list(sequences), [self.lengths[s] for s in sequences]], dtype=torch.int64)
        small = small.to(self.device)
        return small[0], small[1]

    def place(self, sequences: Tensor, places: Tensor, firsts: Sequence[Tensor], steps) -> None:
        """Records tokens at (sequence, place): their first row at each layer and their steps."""
        for first_rows, first in zip(self.first_rows, firsts):
            first_rows[sequences, places] = first
        self.steps[sequences, places] = steps

    def offsets(self) -> Tensor:
        """(batch_size + 1,) int32: where each sequence's row of the tables starts, flattened."""
        if self._offsets_width != self.width:
            self._offsets_width = self.width
            self._offsets = (torch.arange(self.batch_size + 1, dtype=torch.int32) * self.width).to(self.device)
        return self._offsets

    def reset(self, sequence: int) -> None:
        """Empties one sequence, for a new one in its place. (Its rows stay in
        the buffers until the cache is dropped.)"""
        self.lengths[sequence] = 0

    def owner(self):
        return self._owner()

    def rows(self) -> List[int]:
        """The key/value rows held at each layer of the block."""
        return [layer.size for layer in self.layers]

    def append_tokens(self, sequences: Sequence[int], rows: Sequence[Tuple[Tensor, Tensor]],
                      counts: Sequence[Sequence[int]], steps: Sequence[int]) -> None:
        """Appends one finished token to each of `sequences` (depth-wise
        decoding, design §17): rows[k] = (k, v) of layer k, the tokens' rows
        back to back in step order, counts[k][i] of them for token i (N + 1
        at the first layer, N at the others); steps: the tokens' N (host
        ints). Every index it records is host arithmetic, made into one
        tensor."""
        starts = []
        for k, ((k_rows, v_rows), per_token) in enumerate(zip(rows, counts)):
            first = self.layers[k].append(k_rows, v_rows)
            starts.append(list(itertools.accumulate(per_token, initial=first))[:-1])
        self.widen(max(self.lengths[s] for s in sequences) + 1)
        table = torch.tensor([*starts, list(sequences), [self.lengths[s] for s in sequences], list(steps)],
                             dtype=torch.int64).to(self.device)
        layers = len(self.layers)
        self.place(table[layers], table[layers + 1], table[:layers], table[layers + 2])
        for s in sequences:
            self.lengths[s] += 1

    def sequence_steps(self, sequence: int) -> Tensor:
        """(length,) int64: the ponder steps of the sequence's tokens so far."""
        return self.steps[sequence, :self.lengths[sequence]].clone()


class ChunkLayout:
    """The packed layout of one incremental call: per listed sequence, its
    cached tokens, then its new ones, back to back. It depends only on the
    lengths, so a model whose stacks keep caches of the same sequences (a
    language model's prelude, block and coda) makes it once per call. Built
    from per-sequence numbers the host already knows, with no device read and
    host work that grows with the sequences listed, not their tokens."""

    def __init__(self, cached_lengths: Sequence[int], new_lengths: Sequence[int], device):
        self.cached_lengths, self.new_lengths = list(cached_lengths), list(new_lengths)
        totals = [c + n for c, n in zip(cached_lengths, new_lengths)]
        starts = list(itertools.accumulate(totals, initial=0))
        self.num_cached, num_new = sum(cached_lengths), sum(new_lengths)
        self.max_seqlen = max(totals)
        self.cu_seqlens = torch.tensor(starts, dtype=torch.int32).to(device)
        # packed position = a running index + the packed start's lead over it, per sequence
        cached_lead = [start - before for start, before in
                       zip(starts, itertools.accumulate(cached_lengths, initial=0))]
        new_lead = [start + c - before for start, c, before in
                    zip(starts, cached_lengths, itertools.accumulate(new_lengths, initial=0))]
        small = torch.tensor([list(cached_lengths), list(new_lengths), cached_lead[:-1], new_lead],
                             dtype=torch.int64).to(device)
        self.cached_positions = torch.arange(self.num_cached, device=device) + torch.repeat_interleave(
            small[2], small[0], output_size=self.num_cached)
        self.new_positions = torch.arange(num_new, device=device) + torch.repeat_interleave(
            small[3], small[1], output_size=num_new)
        self.cached_counts, self.new_counts = small[0], small[1]


class SlotLayout:
    """The layout of a decode call, one new token for each listed sequence,
    read through the cache's own tables: every sequence's row of them is one
    segment of the packed order (its places, `width` of them; the places past
    its tokens are never read, as the causal query comes first), and the new
    token sits at its sequence's next place. So the read index of a layer is
    a table the cache keeps (a plain stack's first rows, read in place) or
    one elementwise expression of it (the ponder block's reached rows), with
    no gather per cached token and no packed layout to build per call.

    sequences, places: (R,) int64 on the cache's device, the listed
    sequences and each one's new token's place (its cached length)."""

    def __init__(self, cache: ACTCache, sequences: Tensor, places: Tensor):
        self.width = cache.width
        self.cu_seqlens, self.max_seqlen = cache.offsets(), self.width
        self.sequences, self.places = sequences, places
        self.new_positions = sequences * self.width + places

    def reached(self, cache: ACTCache, n: Tensor) -> List[Tensor]:
        """Every layer's (B, width) rows for queries at step n (B,) per
        sequence (>= 1): `CacheContext.reached` on the whole tables."""
        first, later = torch.minimum(cache.steps, (n - 1)[:, None]), torch.minimum(cache.steps, n[:, None]) - 1
        return [rows + (first if k == 0 else later) for k, rows in enumerate(cache.first_rows)]

    def table(self, rows: Tensor, own: Tensor) -> Tensor:
        """A layer's read index (B * width,): `rows` (B, width) with the new
        tokens' rows `own` at their places. Writes into `rows`."""
        rows[self.sequences, self.places] = own
        return rows.view(-1)


class CacheContext:
    """One `extend` call's view of a cache: the call's packed layout, and the
    cached tokens' steps and first rows at every layer."""

    def __init__(self, cache: ACTCache, sequences: Sequence[int], layout: ChunkLayout):
        if layout.cached_lengths != [cache.lengths[s] for s in sequences]:
            raise ValueError("the layout was made for other cached lengths than this cache holds")
        self.cache, self.layout = cache, layout
        self.cu_seqlens, self.max_seqlen = layout.cu_seqlens, layout.max_seqlen
        self.cached_positions, self.new_positions = layout.cached_positions, layout.new_positions
        self.num_cached = layout.num_cached
        self.sequences = torch.tensor(list(sequences), dtype=torch.int64).to(cache.device)
        self.sequence_list = list(sequences)
        # every cached token's sequence and place in it
        cached_seq = torch.repeat_interleave(self.sequences, layout.cached_counts, output_size=layout.num_cached)
        cached_place = self._place(layout.cached_counts, layout.num_cached)
        self.cached_steps = cache.steps[cached_seq, cached_place]
        self.cached_first = [first[cached_seq, cached_place] for first in cache.first_rows]

    @staticmethod
    def _place(counts: Tensor, total: int) -> Tensor:
        """0, 1, ..., counts[i] - 1 for every i, back to back."""
        starts = counts.cumsum(0) - counts
        return torch.arange(total, device=counts.device) - torch.repeat_interleave(starts, counts, output_size=total)

    def buffers(self, layer: int) -> Tuple[Tensor, Tensor]:
        return self.cache.layers[layer].view()

    def reached(self, k: int, n) -> Tensor:
        """Every cached token's row at layer k for a query at step n (an int,
        or a tensor per cached token): see the module's docstring."""
        if isinstance(n, int):
            return self.cached_first[k] + (self.cached_steps.clamp(max=n - 1) if k == 0
                                           else self.cached_steps.clamp(max=n) - 1)
        return self.cached_first[k] + (torch.minimum(self.cached_steps, n - 1) if k == 0
                                       else torch.minimum(self.cached_steps, n) - 1)

    def table(self, k: int, n, own: Tensor) -> Tensor:
        """Layer k's read index of a call whose new tokens' rows sit at `own`:
        the cached tokens' rows for step n (`reached`), then those."""
        kv_rows = torch.empty(self.num_cached + own.shape[0], dtype=torch.int64, device=own.device)
        if self.num_cached:
            kv_rows.index_copy_(0, self.cached_positions, self.reached(k, n))
        return kv_rows.index_copy_(0, self.new_positions, own)

    def read_cached(self, pools, n: int) -> None:
        """Points the cached tokens' entries of every layer's index at the row
        they had reached by step n."""
        if not self.num_cached:
            return
        for k, pool in enumerate(pools):
            pool.kv_rows = pool.kv_rows.index_copy(0, self.cached_positions, self.reached(k, n))

    def commit(self, pools, steps: Tensor) -> None:
        """Moves the new tokens' rows from the ponder's pools into the cache,
        token by token, and records their steps, first rows and places."""
        cache, num_new = self.cache, steps.shape[0]
        firsts = []
        for k, pool in enumerate(pools):
            tokens = torch.cat([t for t, _ in pool.assigned])
            rows = torch.cat([r for _, r in pool.assigned]) - pool.first_new
            order = torch.argsort(tokens, stable=True)      # by token, each token's rows in step order
            segments = pool.k[1:] if pool.first_new else pool.k
            values = pool.v[1:] if pool.first_new else pool.v
            k_new = torch.cat(segments)[rows[order]]
            v_new = torch.cat(values)[rows[order]]
            # per-token row counts without bincount, which reads the device for its size
            counts = torch.zeros(num_new, dtype=torch.int64, device=tokens.device).index_add_(
                0, tokens, torch.ones_like(tokens))
            firsts.append(cache.layers[k].append(k_new, v_new) + counts.cumsum(0) - counts)
        self.record(firsts, steps)

    def record(self, firsts: Sequence[Tensor], steps: Tensor) -> None:
        """The new tokens, whose rows are in the cache's buffers already
        (firsts[k]: each new token's first row at layer k): their steps, first
        rows and places in their sequences."""
        cache, num_new, layout = self.cache, steps.shape[0], self.layout
        cache.widen(max(c + n for c, n in zip(layout.cached_lengths, layout.new_lengths)))
        new_seq = torch.repeat_interleave(self.sequences, layout.new_counts, output_size=num_new)
        new_place = self._place(layout.new_counts, num_new) + torch.repeat_interleave(
            layout.cached_counts, layout.new_counts, output_size=num_new)
        cache.place(new_seq, new_place, firsts, steps)
        for s, n in zip(self.sequence_list, layout.new_lengths):
            cache.lengths[s] += n


def check_sequences(cache, sequences: Sequence[int]) -> None:
    """The cache and the sequences an incremental call appends to."""
    if not isinstance(cache, ACTCache):
        raise TypeError(f"cache must be an ACTCache from encoder.new_cache(...), got {type(cache).__name__}")
    if not sequences:
        raise ValueError("extend needs at least one sequence to append to")
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < cache.batch_size for s in sequences):
        raise ValueError(f"sequences must be ints in [0, {cache.batch_size}), got {list(sequences)}")
    if len(set(sequences)) != len(sequences):
        raise ValueError(f"each sequence may appear once per call, got {list(sequences)}")


def check_extend_args(encoder, cache, x: Tensor, lengths: Sequence[int], sequences: Sequence[int],
                      is_causal: bool) -> None:
    """`extend`'s checks, before any kernel runs."""
    check_sequences(cache, sequences)
    if cache.owner() is not encoder:
        raise ValueError("this cache belongs to another encoder: make one with this encoder's new_cache(...)")
    if not is_causal:
        raise ValueError("a cache serves causal evaluation only: is_causal must be True")
    if x.device != cache.device:
        raise ValueError(f"x is on {x.device}, but the cache is on {cache.device}")
    if x.dtype != cache.dtype:
        raise TypeError(f"x has dtype {x.dtype}, but the cache holds {cache.dtype}")
    if len(sequences) != len(lengths):
        raise ValueError(f"{len(sequences)} sequences but {len(lengths)} chunk lengths")
    if any(n < 1 for n in lengths):
        raise ValueError(f"every listed sequence needs at least one new token, got chunk lengths {list(lengths)}")
    if sum(lengths) != x.shape[0]:
        raise ValueError(f"the chunk lengths add up to {sum(lengths)}, but x holds {x.shape[0]} tokens")


def chunk_lengths(cu_seqlens) -> List[int]:
    """Host chunk lengths from offsets given as a tensor or a sequence of ints."""
    offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    if not offsets or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0, got {offsets}")
    return [b - a for a, b in zip(offsets, offsets[1:])]


__all__ = ["ACTCache", "CacheContext", "ChunkLayout", "SlotLayout", "check_extend_args", "check_sequences", "chunk_lengths",
           "split_key_values"]
