"""The one looped causal-LM core every front end uses (design §14-§16):

    embed -> prelude (plain causal layers, once) -> the block (pondered per
    token with ACT) -> coda (once) -> final norm -> head

on packed tokens: padding is never a row, positions count from each
sequence's first real token, the work at the block is Σ N rows. The core
holds what a looped LM does whatever its layers are: the checks of
input_ids and attention_mask, the parallel forward, the per-token PonderNet
objective, incremental extension of a ragged cache and batched generation
through the slot scheduler. A front end (`ACTLanguageModel` over torch
encoder layers, `act_kernels.hf.LoopedCausalLM` over transformers decoder
layers, the next model kinds) is an adapter: it builds `.prelude`, `.block`
(an ACTTransformerEncoder) and `.coda` (CausalStacks or None) over its layer
kind and says how tokens become rows (`_embed`) and rows logits (`_head`).
"""
from __future__ import annotations

import contextlib
from itertools import accumulate
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.cache import ChunkLayout, check_sequences, chunk_lengths
from ..generation.depthwise import check_schedule
from ..layers.exits import (ExitRule, LatestLogits, Peek, check_pondernet_args, make_exit_rule,
                            token_pondernet_loss)
from ..generation.scheduler import eos_ids, generate_slots


class Packed(NamedTuple):
    """The real tokens of a (B, L) batch, packed row after row."""
    cu_seqlens: Tensor      # (B + 1,) int32
    lengths: List[int]      # the rows' lengths (one read of the device)
    positions: Tensor       # (T_tok,) int64: each token's position from its row's first real token


class PonderNetTerms(NamedTuple):
    """The per-token PonderNet objective: loss = expected_loss + beta *
    regularizer (KL), or − beta * regularizer (entropy); steps (B, L), 0 at
    padding; p: every computed (token, step)'s halting probability, packed
    step-major."""
    loss: Tensor
    expected_loss: Tensor
    regularizer: Tensor
    steps: Tensor
    p: Tensor


def check_attention_mask(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """The (B, L) bool mask of real tokens. A mask must be 0/1, shaped like
    input_ids, each row's real tokens one contiguous run (left or right
    padding: a hole in the middle has no meaning our positions could match)
    and at least one real token per row."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1 (1 at real tokens)")
    valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    if valid.shape[1]:
        counts = valid.sum(1)
        if not bool(counts.all()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask: rows {rows} have no real token (every row needs at least one real token)")
        # one run of ones: the mask changes value at most twice along a row, and never 1 -> 0 -> 1
        first = valid.long().argmax(1)
        runs = torch.arange(valid.shape[1], device=valid.device)[None] - first[:, None]
        contiguous = (valid == ((runs >= 0) & (runs < counts[:, None]))).all(1)
        if not bool(contiguous.all()):
            rows = (~contiguous).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask: rows {rows} are neither left- nor right-padded (a 0 between real "
                             "tokens); each row's real tokens must be one contiguous run")
    return valid


def pack(valid: Tensor) -> Packed:
    counts = valid.sum(1)
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)[valid]
    return Packed(cu, counts.tolist(), positions)


def unpack(valid: Tensor, rows: Tensor) -> Tensor:
    """Packed per-token rows (T_tok, ...) laid back on the (B, L) grid, 0 at padding."""
    return rows.new_zeros(*valid.shape, *rows.shape[1:]).index_put((valid,), rows)


class LoopedCore:
    """The looped LM's behaviour, mixed into an nn.Module that has `.prelude`,
    `.block`, `.coda`, `.vocab_size`, `.max_len` (None: no limit) and
    `.max_steps`, and defines `_embed(tokens, positions)` (T,) -> (T, D) and
    `_head(h)` (T, D) -> (T, V). `_scope()` is the context every call into
    the layers runs in (transformers' attention switch for decoder layers)."""

    def _scope(self):
        return contextlib.nullcontext()

    def _enter_block(self, h: Tensor) -> Tensor:
        """The block's input rows from the prelude's output (Huginn: the row
        [initial state, prelude output]); the identity by default."""
        return h

    def _stacks(self):
        return [m for m in (self.prelude, self.block, self.coda) if m is not None]

    # -- checks ----------------------------------------------------------------------------

    def _check_tokens(self, tokens: Tensor, name: str = "input_ids") -> None:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"{name} must lie in [0, {self.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def _check_ids(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """input_ids (B, L) int64 in the vocabulary, at most max_len long; the
        real-token mask (check_attention_mask)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            shown = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, L) int64 tensor, got {shown}")
        self._check_tokens(input_ids)
        if self.max_len is not None and input_ids.shape[1] > self.max_len:
            raise ValueError(f"sequences of {input_ids.shape[1]} tokens exceed max_len = {self.max_len}")
        return check_attention_mask(input_ids, attention_mask)

    def _check_labels(self, labels, input_ids: Tensor) -> None:
        if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}")

    # -- training: the parallel forward ---------------------------------------------------

    def _exit_rule(self, exit, threshold, min_steps, every_loop, prefill_steps=None) -> Optional[ExitRule]:
        return make_exit_rule(exit, threshold, min_steps, self.max_steps,
                              training=self.training and torch.is_grad_enabled(), prefill_steps=prefill_steps,
                              every_loop=every_loop)

    def _forward_tokens(self, input_ids: Tensor, valid: Tensor, rule: Optional[ExitRule]):
        """Logits (B, L, V), ponder cost (B, L) float32 and steps (B, L) int64,
        0 at padding."""
        if rule is not None and rule.reads_coda and valid.numel():
            return self._forward_decoded(input_ids, valid, rule)
        packed = pack(valid)
        h, cost, steps = self._layers(self._embed(input_ids[valid], packed.positions), packed, rule)
        return unpack(valid, self._head(h)), unpack(valid, cost), unpack(valid, steps)

    @torch.compiler.disable   # a loop over positions with host reads: runs eagerly under torch.compile
    @torch.no_grad()
    def _forward_decoded(self, input_ids: Tensor, valid: Tensor, rule: ExitRule):
        """`_forward_tokens` under a rule that reads the coda (design §16):
        every token is fed one position at a time through a fresh cache and
        exits on its own, as a decoded token does (the coda and head at each
        of its steps, their rows kept at its exit), so the logits and steps
        are those of feeding each row token by token with `extend(...,
        decode=True)`. One call per position for all rows (a row's padding
        is never fed): L calls, not one. Records no autograd graph."""
        batch, length = valid.shape
        caches = self.new_cache(batch)
        real = valid.tolist()
        logits = cost = steps = None
        for j in range(length):
            rows = [b for b in range(batch) if real[b][j]]
            if not rows:                  # a column of padding only
                continue
            out = self._extend(caches, input_ids[rows, j], list(range(len(rows) + 1)), rows, rule, decode=True)
            if logits is None:
                logits = out.new_zeros(batch, length, out.shape[-1])
                cost = torch.zeros(batch, length, dtype=torch.float32, device=out.device)
                steps = torch.zeros(batch, length, dtype=torch.int64, device=out.device)
            at = (torch.tensor(rows, device=out.device), j)
            logits[at], cost[at], steps[at] = out, self.block.ponder_cost, self.block.steps
        return logits, cost, steps

    @torch.compiler.disable   # a data-dependent loop with a host read per step: runs eagerly under torch.compile
    def _layers(self, h: Tensor, packed: Packed, rule: Optional[ExitRule]):
        """Prelude, pondered block and coda on the packed rows h (T_tok, D)."""
        if not h.shape[0]:
            return h, h.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.int64, device=h.device)
        cu, lengths, positions, longest = packed.cu_seqlens, packed.lengths, packed.positions, max(packed.lengths)
        with self._scope():
            if self.prelude is not None:
                h = self.prelude.forward_packed(h, cu, longest, positions, lengths)
            h = self.block.forward_packed(self._enter_block(h), cu, is_causal=True, max_seqlen=longest,
                                          positions=positions, exit=rule)
            cost, steps = self.block.ponder_cost, self.block.steps
            if self.coda is not None:
                h = self.coda.forward_packed(h, cu, longest, positions, lengths)
        return h, cost, steps

    def _pondernet_terms(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                         beta: float, prior: float, entropy: bool) -> PonderNetTerms:
        """The per-token PonderNet objective (design §16): every token steps
        until its unhalted mass drops below eps, each step's state through the
        final norm and head against the token's next-token target (labels
        default to input_ids, shifted inside, -100 ignored); Σ_n p_n L_n +
        beta KL(p ‖ truncated geometric prior), or − beta times the entropy of
        p with entropy=True (Ouro's variant); means over the tokens with a
        target. The head reads every step, so the block must be the last
        layers (no coda)."""
        if self.coda is not None:
            raise ValueError("the PonderNet objective reads the head on every step's state, so the block must be "
                             "the model's last layers (no coda, as in Ouro)")
        check_pondernet_args(beta, prior)
        valid = self._check_ids(input_ids, attention_mask)
        if labels is None:
            labels = input_ids
        self._check_labels(labels, input_ids)
        packed = pack(valid)
        if not packed.positions.numel():
            raise ValueError("the PonderNet objective needs at least one real token")
        target = F.pad(labels.masked_fill(~valid, -100)[:, 1:], (0, 1), value=-100)[valid]
        out = self._pondernet_block(self._embed(input_ids[valid], packed.positions), packed, prior)
        loss, expected, regularizer = token_pondernet_loss(out, self._head(out.states), target, beta, entropy)
        return PonderNetTerms(loss, expected, regularizer, unpack(valid, out.steps), out.p)

    @torch.compiler.disable   # a data-dependent loop with a host read per step: runs eagerly under torch.compile
    def _pondernet_block(self, h: Tensor, packed: Packed, prior: float):
        cu, positions, longest = packed.cu_seqlens, packed.positions, max(packed.lengths)
        with self._scope():
            if self.prelude is not None:
                h = self.prelude.forward_packed(h, cu, longest, positions, packed.lengths)
            return self.block.pondernet_packed(self._enter_block(h), cu, is_causal=True, max_seqlen=longest,
                                               positions=positions, prior=prior)

    # -- generation over the ragged cache ------------------------------------------------

    def new_cache(self, batch_size: int):
        """One cache per stack (prelude, block, coda) for `batch_size` sequences."""
        return [m.new_cache(batch_size) for m in self._stacks()]

    @torch.no_grad()
    def extend(self, caches, tokens: Tensor, cu_seqlens: Sequence[int], sequences: Sequence[int], *,
               exit: Optional[ExitRule] = None, decode: bool = False) -> Tensor:
        """Appends chunks of tokens (T_new,) to cache `sequences` and returns
        their logits (T_new, V); `.block.steps` becomes (T_new,). Exactly the
        causal forward's, for any chunking (design §14). exit: a checked exit
        rule (layers/exits.py) for the block. Under a rule with a fixed
        prefill (kl, Huginn's criteria) the chunks are prompts, run at its
        prefill_steps; decode=True feeds decoded tokens instead, one per
        sequence, each exiting on its own (the flag goes to the block's
        `extend` under the same name; a rule that reads the coda runs the
        coda and head at each of its steps)."""
        if not isinstance(decode, bool):
            raise TypeError(f"decode must be a bool, got {type(decode).__name__}")
        self._check_tokens(tokens, "tokens")
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self._stacks()):
            raise TypeError("caches must be the list that model.new_cache(batch_size) returns")
        offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
        chunk_lengths(offsets)                     # offsets rising from 0
        sequences = list(sequences)
        check_sequences(caches[0], sequences)
        return self._extend(caches, tokens, offsets, sequences, exit, decode)

    def _extend(self, caches, tokens: Tensor, offsets: List[int], sequences: List[int],
                exit: Optional[ExitRule], decode: bool = False) -> Tensor:
        """`extend` without the checks of its arguments (the scheduler's calls:
        tokens the model chose, caches it made; no device read for them)."""
        new_lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if decode and any(n != 1 for n in new_lengths):
            raise ValueError("decode=True feeds decoded tokens: one token per sequence")
        cached = [caches[0].lengths[s] for s in sequences]
        if self.max_len is not None and any(c + n > self.max_len for c, n in zip(cached, new_lengths)):
            raise ValueError(f"a sequence would exceed max_len = {self.max_len} tokens")
        # one packed layout for the three stacks' caches, which hold the same sequences
        layout = ChunkLayout(cached, new_lengths, tokens.device)
        positions = layout.new_positions - torch.repeat_interleave(
            layout.cu_seqlens[:-1].to(torch.int64), layout.new_counts, output_size=layout.new_positions.numel())
        h = self._embed(tokens, positions)
        given = iter(caches)       # one per stack present, in order
        prelude_cache, block_cache, coda_cache = [None if m is None else next(given)
                                                  for m in (self.prelude, self.block, self.coda)]
        peek = CodaPeek(self, coda_cache, sequences, positions) if decode and exit is not None and exit.reads_coda \
            else None
        with self._scope():
            if self.prelude is not None:
                h = self.prelude.extend(prelude_cache, h, offsets, sequences, layout=layout, positions=positions)
            h = self.block.extend(block_cache, self._enter_block(h), offsets, sequences, layout=layout,
                                  positions=positions, exit=exit, decode=decode, peek=peek)
            if peek is not None and not exit.every_loop:
                return peek.logits      # each token's at its exit step, its coda rows kept there
            if self.coda is not None:
                h = self.coda.extend(coda_cache, h, offsets, sequences, layout=layout, positions=positions)
        return self._head(h)

    def _feed(self, caches, tokens: Tensor, offsets: List[int], sequences: List[int], rule: ExitRule):
        """One scheduler feed under a rule with a fixed prefill: prompts (the
        sequences with nothing cached) run its prefill_steps, the decoded
        tokens exit on their own; a feed that holds both runs them as two
        calls. Returns the logits and steps in the feed's order."""
        decoded = [caches[0].lengths[s] > 0 for s in sequences]
        if len(set(decoded)) == 1:
            return self._extend(caches, tokens, offsets, sequences, rule, decode=decoded[0]), self.block.steps
        logits = steps = None
        for decode in (False, True):
            chunks = [j for j, d in enumerate(decoded) if d == decode]
            index = torch.tensor([i for j in chunks for i in range(offsets[j], offsets[j + 1])], device=tokens.device)
            out = self._extend(caches, tokens[index], [0, *accumulate(offsets[j + 1] - offsets[j] for j in chunks)],
                               [sequences[j] for j in chunks], rule, decode)
            if logits is None:
                logits = out.new_empty(tokens.shape[0], out.shape[-1])
                steps = torch.empty(tokens.shape[0], dtype=torch.int64, device=out.device)
            logits[index], steps[index] = out, self.block.steps
        return logits, steps

    def _generate(self, input_ids: Tensor, valid: Tensor, max_new_tokens: int, *, choose, stop, on_token=None,
                  max_batch_size: Optional[int], schedule: str, fixed_rows: bool, rule: Optional[ExitRule]):
        """Every row's real tokens as a prompt, generated over one ragged cache
        with the slot scheduler (generation/scheduler.py). Returns its `Generated`."""
        check_max_new_tokens(max_new_tokens)
        check_max_batch_size(max_batch_size)
        check_schedule(schedule, fixed_rows)
        prompts = [row[keep] for row, keep in zip(input_ids, valid)]
        slots = min(max_batch_size or len(prompts), len(prompts))
        # depth-wise: prompts that wait for a slot are prefilled in groups of up to `slots`, ahead of their slot,
        # into cache sequences of their own (one call per group, not one per freed slot; scheduler.depthwise)
        ahead = min(slots, len(prompts) - slots) if schedule == "depthwise" and not fixed_rows else 0
        was_training = self.training
        self.eval()
        try:
            def prefill(caches, tokens, offsets, slots):
                if rule is not None and rule.fixed_prefill:     # prompts at a fixed depth, new tokens on their own
                    return self._feed(caches, tokens, list(offsets), list(slots), rule)
                return self._extend(caches, tokens, list(offsets), list(slots), rule), self.block.steps

            self.block.iterations = 0
            with self._scope():
                out = generate_slots(schedule, prefill=prefill, caches=self.new_cache(slots + ahead), prompts=prompts,
                                     running=slots,
                                     max_new_tokens=max_new_tokens, choose=choose, stop=stop, on_token=on_token,
                                     max_len=self.max_len, embed=self._embed, prelude=self.prelude, block=self.block,
                                     coda=self.coda, head=self._head, enter=self._enter_block,
                                     # the layers' weight: a model without a halting unit keeps it on the meta device
                                     attention=self.block.attention_backend(self.block.kind.weight),
                                     fixed_rows=fixed_rows, exit=rule)
        finally:
            self.train(was_training)
        return out._replace(iterations=out.iterations + self.block.iterations)


class CodaPeek(Peek):
    """The coda and head on decoded tokens' states at every step of the
    block, for a rule that reads the coda (design §16), as the depth-wise
    engine peeks: one token per sequence, the coda reading the earlier
    tokens' committed rows and writing its own to scratch rows
    (`CausalStack.extend(commit=False)`). At a token's exit step the rows
    it peeked at are committed (`commit_peeked`), so the coda never runs
    twice (under every_loop nothing is committed: the coda runs after the
    block on the state the rule picked). `.logits` (T, V): each token's
    logits at its latest step, at its exit once the block is done."""

    def __init__(self, model: "LoopedCore", cache, sequences: List[int], positions: Tensor):
        self.model, self.cache, self.sequences, self.positions = model, cache, sequences, positions
        self.running = list(range(len(sequences)))      # the rows still running, ascending (host)
        self.index = torch.arange(len(sequences), device=positions.device)
        self.latest = LatestLogits(len(sequences))

    @property
    def logits(self) -> Optional[Tensor]:
        return self.latest.logits

    def __call__(self, states: Tensor):
        h = states
        if self.model.coda is not None:
            h = self.model.coda.extend(self.cache, states, list(range(len(self.running) + 1)),
                                       [self.sequences[r] for r in self.running],
                                       positions=self.positions[self.index], commit=False)
        logits = self.model._head(h)
        return logits, self.latest.update(self.index, logits)

    def settle(self, exits: Tensor) -> Tensor:
        flags = exits.tolist()
        done = [i for i, flag in enumerate(flags) if flag]
        if done and self.model.coda is not None:
            self.model.coda.commit_peeked(self.cache, [self.sequences[self.running[i]] for i in done],
                                          torch.tensor(done, device=exits.device))
        stay = [i for i, flag in enumerate(flags) if not flag]
        self.running = [self.running[i] for i in stay]
        kept = torch.tensor(stay, dtype=torch.int64, device=exits.device)
        self.index = self.index[kept]
        return kept


def lay_out(input_ids: Tensor, valid: Tensor, generated, pad: int):
    """The sequences (B, L + new) as transformers' generate lays them out (the
    input as given, its padding kept, then the new tokens, pad after a
    sequence's end; no column after the last new token of any row) and every
    token's steps (same shape, 0 at padding)."""
    batch, length = input_ids.shape
    prompt_lengths = valid.sum(1).tolist()
    new = [seq[n:] for seq, n in zip(generated.sequences, prompt_lengths)]
    width = max(n.numel() for n in new)
    sequences = torch.full((batch, length + width), pad, dtype=torch.int64, device=input_ids.device)
    steps = torch.zeros(batch, length + width, dtype=torch.int64, device=input_ids.device)
    sequences[:, :length] = input_ids
    for b in range(batch):
        token_steps = torch.cat(generated.steps[b]).to(input_ids.device)
        steps[b, :length][valid[b]] = token_steps[:prompt_lengths[b]]
        sequences[b, length:length + new[b].numel()] = new[b]
        steps[b, length:length + new[b].numel()] = token_steps[prompt_lengths[b]:]
    return sequences, steps


def scores_by_column(scores: List[List[Tensor]], batch: int, vocab: int, like: Tensor) -> Tuple[Tensor, ...]:
    """Per-sequence score rows as transformers returns them: one (B, V) per new-token column."""
    width = max((len(s) for s in scores), default=0)
    out = like.new_full((width, batch, vocab), float("-inf"))
    for b, rows in enumerate(scores):
        if rows:
            out[:len(rows), b] = torch.stack(rows)
    return tuple(out)


def stop_at(eos) -> Optional[callable]:
    """The scheduler's stop hook for end-of-sequence ids (None: never)."""
    ends = set(eos_ids(eos))
    return (lambda i, history: history[-1] in ends) if ends else None


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def check_max_batch_size(max_batch_size) -> None:
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be None or an int >= 1, got {max_batch_size!r}")


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


__all__ = ["LoopedCore", "CodaPeek", "Packed", "PonderNetTerms", "check_attention_mask", "pack", "unpack", "lay_out",
           "scores_by_column", "stop_at", "check_max_new_tokens", "check_max_batch_size", "check_generator"]
