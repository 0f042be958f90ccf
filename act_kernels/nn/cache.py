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


class _LayerRows:
    """One layer's key and value rows, token by token, in buffers that grow
    by doubling."""

    def __init__(self, heads: int, dim: int, device, dtype):
        self.k = torch.zeros(0, heads, dim, device=device, dtype=dtype)
        self.v = torch.zeros(0, heads, dim, device=device, dtype=dtype)
        self.size = 0

    def view(self) -> Tuple[Tensor, Tensor]:
        return self.k[:self.size], self.v[:self.size]

    def append(self, k: Tensor, v: Tensor) -> int:
        """Stores the rows; returns the first one's index."""
        first, need = self.size, self.size + k.shape[0]
        if need > self.k.shape[0]:
            capacity = max(need, 2 * self.k.shape[0], 16)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = old.new_zeros(capacity, *old.shape[1:])
                grown[:first] = old[:first]
                setattr(self, name, grown)
        self.k[first:need] = k
        self.v[first:need] = v
        self.size = need
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
        self.layers = [_LayerRows(layer.self_attn.num_heads, encoder.d_model // layer.self_attn.num_heads,
                                  device, dtype) for layer in encoder.layers]
        self.batch_size = batch_size
        self.lengths: List[int] = [0] * batch_size
        self._tokens = [torch.zeros(0, dtype=torch.int64, device=device) for _ in range(batch_size)]
        self.token_steps = torch.zeros(0, dtype=torch.int64, device=device)
        self.token_first_row = [torch.zeros(0, dtype=torch.int64, device=device) for _ in self.layers]
        self.num_tokens = 0

    def reset(self, sequence: int) -> None:
        """Empties one sequence, for a new one in its place. (Its rows stay in
        the buffers until the cache is dropped.)"""
        self._tokens[sequence] = self._tokens[sequence][:0]
        self.lengths[sequence] = 0

    def owner(self):
        return self._owner()

    def rows(self) -> List[int]:
        """The key/value rows held at each layer of the block."""
        return [layer.size for layer in self.layers]

    def sequence_steps(self, sequence: int) -> Tensor:
        """(length,) int64: the ponder steps of the sequence's tokens so far."""
        return self.token_steps[self._tokens[sequence]]


class CacheContext:
    """One `extend` call's view of the cache: which packed positions hold
    cached tokens and which hold the new ones, and the cached tokens' rows."""

    def __init__(self, cache: ACTCache, sequences: Sequence[int], new_lengths: Sequence[int]):
        self.cache = cache
        device = cache.device
        cached_lengths = [cache.lengths[s] for s in sequences]
        totals = [c + n for c, n in zip(cached_lengths, new_lengths)]
        starts = list(itertools.accumulate(totals, initial=0))
        # packed layout of the call: per sequence, its cached tokens, then its new
        # ones; made from lengths the host already knows (no device read)
        cached_pos = [p for i, c in enumerate(cached_lengths) for p in range(starts[i], starts[i] + c)]
        new_pos = [p for i, c in enumerate(cached_lengths) for p in range(starts[i] + c, starts[i + 1])]
        self.cu_seqlens = torch.tensor(starts, dtype=torch.int32).to(device)
        self.max_seqlen = max(totals)
        self.cached_positions = torch.tensor(cached_pos, dtype=torch.int64).to(device)
        self.new_positions = torch.tensor(new_pos, dtype=torch.int64).to(device)
        self.num_cached = len(cached_pos)
        ids = [cache._tokens[s] for s in sequences]
        cached_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64, device=device)
        self.cached_steps = cache.token_steps[cached_ids]
        self.cached_first = [first[cached_ids] for first in cache.token_first_row]
        self.sequences, self.new_lengths = list(sequences), list(new_lengths)

    def buffers(self, layer: int) -> Tuple[Tensor, Tensor]:
        return self.cache.layers[layer].view()

    def read_cached(self, pools, n: int) -> None:
        """Points the cached tokens' entries of every layer's index at the row
        they had reached by step n (see the module's docstring)."""
        if not self.num_cached:
            return
        for k, pool in enumerate(pools):
            reached = self.cached_steps.clamp(max=n - 1) if k == 0 else self.cached_steps.clamp(max=n) - 1
            pool.kv_rows = pool.kv_rows.index_copy(0, self.cached_positions, self.cached_first[k] + reached)

    def commit(self, pools, steps: Tensor) -> None:
        """Moves the new tokens' rows from the ponder's pools into the cache,
        token by token, and records their steps and first rows."""
        cache, num_new = self.cache, steps.shape[0]
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
            first = cache.layers[k].append(k_new, v_new) + counts.cumsum(0) - counts
            cache.token_first_row[k] = torch.cat([cache.token_first_row[k], first])
        ids = torch.arange(cache.num_tokens, cache.num_tokens + num_new, device=cache.device)
        cache.token_steps = torch.cat([cache.token_steps, steps])
        cache.num_tokens += num_new
        start = 0
        for s, n in zip(self.sequences, self.new_lengths):
            cache._tokens[s] = torch.cat([cache._tokens[s], ids[start:start + n]])
            cache.lengths[s] += n
            start += n


def check_extend_args(encoder, cache, x: Tensor, lengths: Sequence[int], sequences: Sequence[int],
                      is_causal: bool) -> None:
    """`extend`'s checks, before any kernel runs."""
    if not isinstance(cache, ACTCache):
        raise TypeError(f"cache must be an ACTCache from encoder.new_cache(...), got {type(cache).__name__}")
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
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < cache.batch_size for s in sequences):
        raise ValueError(f"sequences must be ints in [0, {cache.batch_size}), got {list(sequences)}")
    if len(set(sequences)) != len(sequences):
        raise ValueError(f"each sequence may appear once per call, got {list(sequences)}")
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


__all__ = ["ACTCache", "CacheContext", "check_extend_args", "chunk_lengths"]
