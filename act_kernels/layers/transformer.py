"""Per-token ACT over a shared transformer encoder layer (design §9): a
Universal Transformer in which every token halts on its own.

At ponder step n only the running tokens are projected, attend as queries and
go through the feed-forward block. A token's key and value are computed once
each time its visible state changes (the step after it ran). Nothing of size
(max_steps, T_tok, D) or (queries, keys) is kept for the backward.

Two paths compute it (design §9). The pool path (`token_ponder.py`: one
key/value row per token, written in place) serves every backend but
"reference" for LayerNorm layers without active dropout. The step-by-step
path here serves the rest and incremental decoding: keys and values live in
a pool of rows, one segment per step, and a halted token's frozen rows are
read through the token -> pool-row index (the Triton kernels never copy
them; the reference attention gathers them per call and keeps no copy).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.act import get_kernels, ponder
from ..ops.pondernet import PonderNetOutput, pondernet
from .cache import (ACTCache, CacheContext, ChunkLayout, SlotLayout, check_extend_args, check_sequences,
                    chunk_lengths)
from .rows import BufferStep, SegmentStep
from .checks import check_layer_input, check_layer_options
from .exits import ExitRule, FixedExit, Peek, ponder_with_exit
from ..backends import resolve_encoder
from ..ops.attention import key_table
from .kinds import DecoderLayers, EncoderLayers
from .token_ponder import pool_ponder, pool_stack


def causal_from(mask: Optional[Tensor], is_causal: bool, length: int) -> bool:
    """True for a causal mask (bool: True above the diagonal; float: -inf
    above it and 0 elsewhere) or is_causal; False for None. Anything else is
    a ValueError: the encoder supports no other attention mask."""
    if mask is None:
        return bool(is_causal)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (length, length):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be None or a causal ({length}, {length}) mask, got {got}")
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        causal = torch.equal(mask, above)
    elif mask.is_floating_point():
        causal = bool(((mask == float("-inf")) == above).all()) and bool((mask[~above] == 0).all())
    else:
        causal = False
    if not causal:
        raise ValueError("mask must be None or a causal mask (True, or -inf, strictly above the diagonal): "
                         "ACTTransformerEncoder supports no other attention mask")
    return True


def _padding_to_valid(mask: Optional[Tensor], shape: Tuple[int, int], device) -> Tensor:
    """(B, L) bool, True at real tokens, from torch's src_key_padding_mask."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"src_key_padding_mask must have shape {shape}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        is_pad = mask == float("-inf")
        if not bool((is_pad | (mask == 0)).all()):
            raise ValueError("a float src_key_padding_mask must hold only 0 and -inf")
        return ~is_pad
    raise TypeError(f"src_key_padding_mask must be bool or float, got {mask.dtype}")


class RaggedBlock(nn.Module):
    """A block of layers evaluated on packed rows: the layers' math on the
    running tokens' rows (through a layer kind's row adapters, layers/kinds),
    reading keys and values from per-layer pools through ragged attention,
    and a cache for causal incremental evaluation. `ACTTransformerEncoder`
    ponders over it; a language model's plain layers run it for one step
    (`CausalStack`).

    encoder_layer: an `nn.TransformerEncoderLayer` or `nn.TransformerEncoder`
    (registered as `.layer`), or a layer kind from `act_kernels.layers.kinds`
    (a transformers model's decoder layers: not registered here, they stay
    the model's own modules)."""

    def __init__(self, encoder_layer, backend: str):
        super().__init__()
        if isinstance(encoder_layer, (EncoderLayers, DecoderLayers)) or (
                not isinstance(encoder_layer, nn.Module) and callable(getattr(encoder_layer, "rows", None))):
            self.kind = encoder_layer        # a layer kind (layers/kinds)
        else:
            self.kind = EncoderLayers(encoder_layer)
        if isinstance(self.kind, EncoderLayers):
            self.layer = self.kind.module
        self.d_model = self.kind.d_model
        self.backend = backend
        self.iterations = 0    # block applications so far (a counter for generation's reports)

    def attention_backend(self, like: Tensor) -> str:
        """The concrete attention backend for inputs like `like`."""
        return resolve_encoder(self.backend, like.device, like.dtype).attention

    @property
    def layers(self) -> List[nn.Module]:
        """The block's layers in the order a ponder step applies them."""
        return self.kind.layers

    @property
    def final_norm(self) -> Optional[nn.Module]:
        """The norm applied at the end of every step, if any."""
        return self.kind.norm

    def new_cache(self, batch_size: int) -> ACTCache:
        """An empty key/value cache for `batch_size` sequences, on this
        encoder's device and in its dtype, for `extend`."""
        weight = self.kind.weight
        return ACTCache(self, batch_size, weight.device, weight.dtype)

    def _cache_context(self, cache: ACTCache, x: Tensor, cu_seqlens, sequences: Sequence[int], is_causal: bool,
                       layout: Optional[ChunkLayout]):
        """Checks an incremental call; returns its packed layout (the one given,
        when it fits) and its view of the cache."""
        self._check_input(x, 2)
        lengths = chunk_lengths(cu_seqlens)
        sequences = list(sequences)
        check_extend_args(self, cache, x, lengths, sequences, is_causal)
        if layout is None:
            layout = ChunkLayout([cache.lengths[s] for s in sequences], lengths, cache.device)
        elif layout.new_lengths != lengths:
            raise ValueError("the layout was made for other chunk lengths than cu_seqlens gives")
        return layout, CacheContext(cache, sequences, layout)

    def _cached_step(self, cache: ACTCache, x: Tensor, cu_seqlens, sequences: Sequence[int], is_causal: bool,
                     layout: Optional[ChunkLayout], positions: Optional[Tensor] = None):
        """Checks an incremental call and sets it up: the backends, the call's
        view of the cache and the step function that reads it. positions:
        the new tokens' positions in their sequences (layers with rotary
        embeddings need them)."""
        layout, context = self._cache_context(cache, x, cu_seqlens, sequences, is_causal, layout)
        chosen = resolve_encoder(self.backend, x.device, x.dtype)
        if positions is not None:   # the step reads rows by packed index: cached tokens first, then the new ones
            positions = positions.new_zeros(layout.num_cached + x.shape[0]).index_copy_(
                0, layout.new_positions, positions)
        step = SegmentStep(self, x, context.cu_seqlens, True, context.max_seqlen, chosen.attention, context,
                          positions)
        return chosen, context, step

    def _key_table(self, chosen, cu_seqlens: Tensor, x: Tensor, max_seqlen: int, causal: bool, lengths: List[int]):
        """The pool path's key side for one call (ops/attention/fixed_pool.py):
        a pool row holds a token's Hkv key heads, then its value heads."""
        kind = self.kind
        return key_table(chosen.attention, cu_seqlens, x.shape[0], max_seqlen, kind.kv_heads,
                         kind.kv_heads * kind.head_dim, causal, kind.head_dim ** -0.5, lengths, x.dtype)

    def _check_input(self, x: Tensor, dims: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != dims:
            raise ValueError(f"expected a {dims}-D input, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        self.kind.check_input(x)
        check_layer_input(x, self.kind.weight)


class ACTTransformerEncoder(RaggedBlock):
    """Adaptive Computation Time over one shared `nn.TransformerEncoderLayer`
    or block of them, per token (a Universal Transformer with ACT, design §9).

    encoder_layer: the layer applied at every ponder step (batch_first or not,
        norm_first or not, relu or gelu, bias on or off), or an
        `nn.TransformerEncoder` whose layers one ponder step applies in order
        (then its norm), halting read after the whole block. `.layer` is what
        was given, `.layers` the block's layers, and `.halting` is
        nn.Linear(d_model, 1), its bias set to halting_bias_init.
    max_steps, eps: ACT's M and epsilon (design §1).
    backend: "auto" | "reference" | "triton" | "cuda". It picks the halting
        kernels; ragged attention runs on Triton for "triton", "cuda" and
        "auto" on a GPU, and on its reference otherwise.

    forward(src, mask=None, src_key_padding_mask=None, is_causal=False)
    follows torch.nn.TransformerEncoder: src is (L, B, D), (B, L, D) with
    batch_first, or unbatched (L, D); `mask` may be None or a causal mask.
    Returns the mean-field output S, shaped like src, 0 at padding. After a
    call, `.ponder_cost` (float32, differentiable: add tau * ponder_cost.sum()
    to the loss) and `.steps` (int64) are shaped like src without its feature
    dim, 0 at padding.

    With dropout 0 the results equal the dense loop that applies the layer to
    whole padded sequences of visible states at every step and keeps only the
    running tokens' rows; a halted token's visible state stays at its last
    state. In training the layer's dropouts act as in torch's layer; dropout
    on the attention probabilities runs on the reference attention (the
    Triton kernel has none).

        layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
        enc = ak.nn.ACTTransformerEncoder(layer, max_steps=8)
        y = enc(x, src_key_padding_mask=pad)           # (B, L, 256)
        loss = task_loss(y) + tau * enc.ponder_cost.sum() / (~pad).sum()
    """

    def __init__(self, encoder_layer, *, max_steps: int = 8, eps: float = 0.01, halting_bias_init: float = 1.0,
                 backend: str = "auto"):
        check_layer_options(max_steps, eps, backend)
        super().__init__(encoder_layer, backend)
        weight = self.kind.weight
        self.max_steps, self.eps = max_steps, float(eps)
        self.halting = nn.Linear(self.d_model, 1, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.halting.bias.fill_(halting_bias_init)
        self.ponder_cost: Optional[Tensor] = None
        self.steps: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"max_steps={self.max_steps}, eps={self.eps}, backend={self.backend!r}"

    # -- entry points -----------------------------------------------------------

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, *, is_causal: bool = False,
                       max_seqlen: Optional[int] = None, positions: Optional[Tensor] = None,
                       exit: Optional[ExitRule] = None) -> Tensor:
        """Packed entry point: x (T_tok, D), the sequences' tokens back to back;
        cu_seqlens (B + 1,) int32. Returns (T_tok, D); `.ponder_cost` and
        `.steps` become (T_tok,). positions (T_tok,) int64: every token's
        position in its sequence, for layers with rotary embeddings. exit:
        an inference exit rule (layers/exits.py, design §16) in place of ACT's
        halting; each token returns its state at its exit, `.steps` its exit
        step and `.ponder_cost` the steps it ran (float32; max_steps under
        the every_loop reference mode)."""
        lengths = self._check_packed(x, cu_seqlens)
        if x.shape[0] == 0:
            self.ponder_cost = x.new_zeros(0, dtype=torch.float32)
            self.steps = torch.zeros(0, dtype=torch.int64, device=x.device)
            return x.clone()
        max_seqlen = self._check_max_seqlen(max_seqlen, lengths)
        chosen = resolve_encoder(self.backend, x.device, x.dtype)
        if exit is not None:
            step = SegmentStep(self, x, cu_seqlens, bool(is_causal), max_seqlen, chosen.attention, positions=positions)
            return self._ponder_with_exit(step, x, exit, decode=True)   # every token exits on its own
        if chosen.pool_path and self.kind.pool_path_supported(self.training):
            keys = self._key_table(chosen, cu_seqlens, x, max_seqlen, bool(is_causal), lengths)
            out = pool_ponder(self.kind, keys, get_kernels(chosen.kernels), x, self.halting.weight,
                              self.halting.bias, self.max_steps, self.eps, positions)
            self.ponder_cost, self.steps = out.ponder_cost, out.steps
            return out.state
        step = SegmentStep(self, x, cu_seqlens, bool(is_causal), max_seqlen, chosen.attention, positions=positions)
        out = ponder(step, x, self.halting.weight, self.halting.bias, max_steps=self.max_steps, eps=self.eps,
                     backend=chosen.halting)
        self.ponder_cost, self.steps = out.ponder_cost, out.steps
        return out.state

    def _check_packed(self, x: Tensor, cu_seqlens: Tensor) -> List[int]:
        """The packed entry points' checks; the sequences' lengths (one read of
        the device per call)."""
        self._check_input(x, 2)
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D int32 tensor of B + 1 offsets")
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, expected {x.device} like x")
        offsets = cu_seqlens.tolist()   # one read of the device per call
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if not offsets or offsets[0] != 0 or min(lengths, default=0) < 0 or offsets[-1] != x.shape[0]:
            raise ValueError(f"cu_seqlens must rise from 0 to T_tok = {x.shape[0]}")
        return lengths

    @staticmethod
    def _check_max_seqlen(max_seqlen: Optional[int], lengths: List[int]) -> int:
        longest = max(lengths)
        if max_seqlen is None:
            return longest
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < longest:
            # a smaller one would make the kernels skip query blocks and leave rows unwritten
            raise ValueError(f"max_seqlen must be an int >= the longest sequence ({longest}), got {max_seqlen!r}")
        return max_seqlen

    def pondernet_packed(self, x: Tensor, cu_seqlens: Tensor, *, is_causal: bool = False,
                         max_seqlen: Optional[int] = None, positions: Optional[Tensor] = None,
                         prior: float = 0.2) -> PonderNetOutput:
        """PonderNet per token (design §10 per token, §16) on packed rows:
        the halting unit read as λ, every token stops stepping at the first
        step whose unhalted mass drops below eps (or at max_steps), and a
        token that has stopped freezes for the others (design §9). Returns
        `ak.pondernet`'s output over the tokens: every computed (token, step)
        state packed step-major, p, the KL to the truncated geometric prior
        with parameter `prior`, steps; the caller's per-step loss reads
        `.states`. Arguments as `forward_packed`."""
        lengths = self._check_packed(x, cu_seqlens)
        if not x.shape[0]:
            raise ValueError("the PonderNet objective needs at least one token")
        max_seqlen = self._check_max_seqlen(max_seqlen, lengths)
        chosen = resolve_encoder(self.backend, x.device, x.dtype)
        step = SegmentStep(self, x, cu_seqlens, bool(is_causal), max_seqlen, chosen.attention, positions=positions)
        out = pondernet(step, x, self.halting.weight, self.halting.bias, max_steps=self.max_steps, eps=self.eps,
                        prior=prior, backend=chosen.halting)
        self.steps = out.steps
        return out

    def _ponder_with_exit(self, step: SegmentStep, x: Tensor, exit: ExitRule, *, decode: bool,
                          peek: Optional[Peek] = None) -> Tensor:
        """decode: the tokens exit on their own by the rule; False: they are
        prompt tokens, which a rule with a fixed prefill runs at its
        prefill_steps."""
        if not decode and exit.fixed_prefill:   # prompt tokens under such a rule: a fixed depth (design §16)
            exit, depth, peek = FixedExit(None, 1), exit.prefill_steps, None
        else:
            depth = self.max_steps
        if exit.reads_coda and peek is None:
            raise ValueError(f"exit={exit.name!r} reads the coda at every step: give the peek at the next-token "
                             "logits (decoded tokens in extend), or run it in forward or generate")
        state, steps, ran = ponder_with_exit(step, x, exit, self.halting.weight, self.halting.bias, depth, peek)
        self.ponder_cost, self.steps, self.steps_run = ran.to(torch.float32), steps, ran
        return state

    @torch.no_grad()
    def extend(self, cache: ACTCache, x: Tensor, cu_seqlens, sequences: Sequence[int], *,
               is_causal: bool = True, layout: Optional[ChunkLayout] = None,
               positions: Optional[Tensor] = None, exit: Optional[ExitRule] = None, decode: bool = False,
               peek: Optional[Peek] = None) -> Tensor:
        """Causal incremental evaluation (design §14): appends a chunk of new
        tokens to each of the cache's `sequences` (any subset, each once) and
        ponders them. x (T_new, D): the chunks back to back; cu_seqlens: their
        B' + 1 offsets (int tensor or ints); prefill is a whole prompt,
        decoding one token each. Returns (T_new, D); `.ponder_cost` and
        `.steps` become (T_new,). For any split of the sequences into chunks,
        the outputs, steps and ponder costs are those of
        `forward(..., is_causal=True)` on the whole sequences. Inference
        only: it records no autograd graph. `layout`: the call's
        `ChunkLayout`, when the caller made it once for several caches of the
        same sequences (a language model's stacks).

        Under an exit rule with a fixed prefill (kl, Huginn's criteria, design
        §16) the chunks are prompts, run at the rule's prefill_steps; with
        decode=True they are decoded tokens (as `LoopedCore.extend`'s flag
        of the same name), each exiting on its own by the rule, and a rule
        that reads the coda takes `peek` (layers/exits.py `Peek`) at every
        step."""
        chosen, context, step = self._cached_step(cache, x, cu_seqlens, sequences, is_causal, layout, positions)
        if exit is not None:
            state = self._ponder_with_exit(step, x, exit, decode=decode, peek=peek)
        else:
            out = ponder(step, x, self.halting.weight, self.halting.bias, max_steps=self.max_steps, eps=self.eps,
                         backend=chosen.halting)
            state, self.ponder_cost, self.steps = out.state, out.ponder_cost, out.steps
            self.steps_run = self.steps
        if self.max_steps > 1:
            # s^N of the tokens that ran the last step: later tokens read it at the first layer
            step.project_changed()
        context.commit(step.pools, self.steps_run)
        return state

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if not isinstance(src, Tensor) or src.dim() not in (2, 3):
            raise ValueError(f"src must be (L, B, D), (B, L, D) with batch_first, or (L, D); "
                             f"got {tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__}")
        self._check_input(src, src.dim())
        unbatched = src.dim() == 2
        batch_first = self.kind.batch_first
        x = src.unsqueeze(0) if unbatched else (src if batch_first else src.transpose(0, 1))  # (B, L, D)
        batch, length = x.shape[:2]
        pad = src_key_padding_mask
        if unbatched and pad is not None:
            pad = pad.unsqueeze(0)
        causal = causal_from(mask, is_causal, length)
        valid = _padding_to_valid(pad, (batch, length), x.device)
        cu_seqlens = F.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        packed = self.forward_packed(x[valid], cu_seqlens, is_causal=causal)

        out = x.new_zeros(x.shape).index_put((valid,), packed)
        cost = self.ponder_cost.new_zeros(batch, length).index_put((valid,), self.ponder_cost)
        steps = self.steps.new_zeros(batch, length).index_put((valid,), self.steps)
        if unbatched:
            out, cost, steps = out[0], cost[0], steps[0]
        elif not batch_first:
            out, cost, steps = out.transpose(0, 1), cost.t(), steps.t()
        self.ponder_cost, self.steps = cost, steps
        return out


class CausalStack(RaggedBlock):
    """Plain causal layers (a TransformerEncoderLayer or a TransformerEncoder
    of them) on packed rows, with the same key/value cache as the ponder
    block: the prelude and coda of a looped language model. Every token
    runs exactly once, so its cache holds one row per layer."""

    def __init__(self, encoder_layer, backend: str = "auto"):
        check_layer_options(1, 0.5, backend)
        super().__init__(encoder_layer, backend)

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                       positions: Optional[Tensor] = None, lengths: Optional[List[int]] = None) -> Tensor:
        """x (T_tok, D) packed sequences, cu_seqlens (B + 1,) int32: the causal
        stack's output. positions: as `ACTTransformerEncoder.forward_packed`;
        lengths: the B lengths as ints, when the caller has them (else read
        from cu_seqlens)."""
        chosen = resolve_encoder(self.backend, x.device, x.dtype)
        if chosen.pool_path and self.kind.pool_path_supported(self.training) and x.shape[0]:
            # every token once: the fixed pools of the ponder's pool path, for one step
            lengths = chunk_lengths(cu_seqlens) if lengths is None else lengths
            keys = self._key_table(chosen, cu_seqlens, x, max_seqlen, True, lengths)
            return pool_stack(self.kind, keys, x, positions)
        step = SegmentStep(self, x, cu_seqlens, True, max_seqlen, chosen.attention, positions=positions)
        return step(x, 1, torch.arange(x.shape[0], device=x.device))

    @torch.no_grad()
    def extend(self, cache: ACTCache, x: Tensor, cu_seqlens, sequences: Sequence[int], *,
               layout: Optional[ChunkLayout] = None, positions: Optional[Tensor] = None,
               commit: bool = True) -> Tensor:
        """`ACTTransformerEncoder.extend` for plain layers. Every token runs
        one step, so its rows are final as soon as its layer computes them:
        they go straight into the cache's buffers (a `BufferStep`), with no
        pool to gather and none to move afterwards (design §14).
        commit=False reads the cache and leaves it as it was (what the new
        tokens would give, for an exit rule that reads the coda at every
        step, design §16)."""
        if layout is None and x.dim() == 2 and x.shape[0] == len(sequences):   # one new token each: a decode step
            return self._decode(cache, x, chunk_lengths(cu_seqlens), list(sequences), positions, commit)
        if not commit:
            _, context, step = self._cached_step(cache, x, cu_seqlens, sequences, True, layout, positions)
            return step(x, 1, torch.arange(x.shape[0], device=x.device))
        layout, context = self._cache_context(cache, x, cu_seqlens, sequences, True, layout)
        backend = resolve_encoder(self.backend, x.device, x.dtype).attention
        new_rows = torch.arange(x.shape[0], device=x.device)
        own = [layer.claim(x.shape[0]) + new_rows for layer in cache.layers]
        tables = [context.table(k, 1, rows) for k, rows in enumerate(own)]
        h = BufferStep(self.kind, x, positions, cache.layers, own, tables, layout, backend)(x, 1, new_rows)
        context.record(own, torch.ones_like(new_rows))
        return h

    def _decode(self, cache: ACTCache, x: Tensor, lengths: List[int], sequences: List[int],
                positions: Optional[Tensor], commit: bool = True) -> Tensor:
        """`extend` with one new token per sequence, read through the cache's
        own tables (a `SlotLayout`): a plain stack's tokens have one row per
        layer, final once computed, so they are recorded before the step and
        the cache's first rows are every layer's read index as they stand.
        Without commit, the rows go to scratch rows past the cache's (the
        next call that commits overwrites them) and a copy of each table
        points at them."""
        self._check_input(x, 2)
        check_extend_args(self, cache, x, lengths, sequences, True)
        layout = SlotLayout(cache, *cache.next_places(sequences))
        new_rows = torch.arange(x.shape[0], device=x.device)
        if commit:
            own = [layer.claim(x.shape[0]) + new_rows for layer in cache.layers]
            cache.place(layout.sequences, layout.places, own, 1)
            tables = [rows.view(-1) for rows in cache.first_rows]
        else:
            own = [layer.scratch(x.shape[0]) + new_rows for layer in cache.layers]
            tables = [layout.table(rows.clone(), mine) for rows, mine in zip(cache.first_rows, own)]
            cache.peeked = (own, cache.rows())
        backend = resolve_encoder(self.backend, x.device, x.dtype).attention
        h = BufferStep(self.kind, x, positions, cache.layers, own, tables, layout, backend)(x, 1, new_rows)
        if commit:
            for s in sequences:
                cache.lengths[s] += 1
        return h

    @torch.no_grad()
    def commit_peeked(self, cache: ACTCache, sequences: List[int], rows: Tensor) -> None:
        """Commits, for `sequences`, the tokens the last decode call without
        commit on this cache computed (rows: each one's index in that call's
        rows): what a committing call on the same inputs writes, without
        running the layers again. Refused once anything was committed since."""
        own, sizes = cache.peeked or (None, None)
        if own is None or sizes != cache.rows():
            raise RuntimeError("commit_peeked needs the rows of the last decode call without commit, and the cache "
                               "has changed since (or there was none)")
        check_sequences(cache, sequences)
        if rows.shape != (len(sequences),):
            raise ValueError(f"one row per sequence: {len(sequences)} sequences, rows of shape {tuple(rows.shape)}")
        # gathered before the buffers may grow (growth keeps the cache's rows, not the scratch ones)
        kept = [(layer.k[mine[rows]], layer.v[mine[rows]]) for layer, mine in zip(cache.layers, own)]
        new_rows = torch.arange(len(sequences), device=cache.device)
        cache.place(*cache.next_places(sequences),
                    [layer.append(k, v) + new_rows for layer, (k, v) in zip(cache.layers, kept)], 1)
        for s in sequences:
            cache.lengths[s] += 1
        cache.peeked = None
