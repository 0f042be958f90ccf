"""A looped language model with per-token adaptive depth (design §14): a
prelude of plain causal layers, one shared block of layers applied again
and again with ACT halting per token, a coda, a final norm and an output
head; and batched generation over the ragged key/value cache, exact
against the parallel forward.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_layer_options
from .cache import ChunkLayout, check_sequences, chunk_lengths
from .depthwise import check_schedule
from .exits import ExitRule, check_pondernet_args, make_exit_rule, token_pondernet_loss
from .generation import SequenceDraws, generate_slots
from .transformer import ACTTransformerEncoder, CausalStack


class PonderNetObjective(NamedTuple):
    """`pondernet`'s result: loss = expected_loss + beta * regularizer (KL),
    or − beta * regularizer (entropy); steps (B, L), 0 at padding; p: every
    computed (token, step)'s halting probability, packed step-major."""
    loss: Tensor
    expected_loss: Tensor
    regularizer: Tensor
    steps: Tensor
    p: Tensor


class Generation(NamedTuple):
    """What `ACTLanguageModel.generate` returns, one entry per prompt.

    sequences: each prompt followed by its generated tokens (int64), ending
               after `eos_token_id` when it came
    steps:     the ponder steps of every token of each sequence (int64, same shapes)
    scores:    (generated, vocab_size) the logits each generated token was chosen from
    iterations: how many times the block ran (the prompts' prefill included)
    """

    sequences: List[Tensor]
    steps: List[Tensor]
    scores: List[Tensor]
    iterations: int = 0     # block applications (ponder steps of the batch) the generation ran


def _layers(d_model, nhead, dim_feedforward, dropout, count) -> Optional[nn.Module]:
    if count == 0:
        return None
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return layer if count == 1 else nn.TransformerEncoder(layer, count, enable_nested_tensor=False)


class ACTLanguageModel(nn.Module):
    """A looped causal LM whose every token decides how many times the shared
    block runs on it (ACT, Graves 2016), with no padding waste in training
    or in batched generation.

        model = ak.nn.ACTLanguageModel(256, 256, 4, block_layers=2, max_steps=8)
        logits = model(tokens, lengths)                      # (B, L, 256)
        loss = F.cross_entropy(logits[:, :-1][real], tokens[:, 1:][real]) + tau * model.ponder_cost.mean()
        out = model.generate([prompt_a, prompt_b], max_new_tokens=64)

    Token embedding plus learned absolute positions (max_len), pre-norm
    causal GELU layers (prelude_layers, the pondered block of block_layers,
    coda_layers; dim_feedforward defaults to 4 d_model), a final LayerNorm
    and a linear head. The block is an `ACTTransformerEncoder` over an
    `nn.TransformerEncoder` (`.block`), with max_steps, eps and
    halting_bias_init; `.prelude` and `.coda` are `CausalStack`s (or None).
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, dim_feedforward: Optional[int] = None, *,
                 prelude_layers: int = 1, block_layers: int = 2, coda_layers: int = 1, max_steps: int = 8,
                 eps: float = 0.01, halting_bias_init: float = 1.0, dropout: float = 0.0, max_len: int = 2048,
                 backend: str = "auto"):
        super().__init__()
        for name, value, low in (("vocab_size", vocab_size, 1), ("d_model", d_model, 1), ("nhead", nhead, 1),
                                 ("prelude_layers", prelude_layers, 0), ("block_layers", block_layers, 1),
                                 ("coda_layers", coda_layers, 0), ("max_len", max_len, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be a multiple of nhead ({nhead})")
        check_layer_options(max_steps, eps, backend)
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        prelude = _layers(d_model, nhead, ff, dropout, prelude_layers)
        coda = _layers(d_model, nhead, ff, dropout, coda_layers)
        self.prelude = CausalStack(prelude, backend) if prelude is not None else None
        self.block = ACTTransformerEncoder(_layers(d_model, nhead, ff, dropout, block_layers),
                                           max_steps=max_steps, eps=eps, halting_bias_init=halting_bias_init,
                                           backend=backend)
        self.coda = CausalStack(coda, backend) if coda is not None else None
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.position.weight, std=0.02)
        self.ponder_cost: Optional[Tensor] = None
        self.steps: Optional[Tensor] = None

    def _stacks(self):
        return [m for m in (self.prelude, self.block, self.coda) if m is not None]

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def _logits(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    # -- training: the parallel forward -------------------------------------------------

    def forward(self, tokens: Tensor, lengths: Optional[Tensor] = None, *, exit: Optional[str] = None,
                threshold: Optional[float] = None, min_steps: int = 1, every_loop: bool = False) -> Tensor:
        """tokens (B, L) int64, right padding past `lengths` (B,). Returns logits
        (B, L, vocab_size), 0 at padding; `.ponder_cost` (float32,
        differentiable) and `.steps` (int64) become (B, L), 0 at padding.

        exit (inference only: under no_grad or in eval): "act" (ACT's mean
        field, the default), "gate", "latent" or "fixed", each a hard exit
        per token that returns its state at its exit (design §16; "kl" reads
        the coda at every step and runs in `generate` only); `.steps` are
        then the exit steps and `.ponder_cost` the steps run. every_loop:
        the reference mode of computing every loop for every token and
        picking each token's exit afterwards (no token freezes; every token
        runs max_steps)."""
        rule = self._exit_rule(exit, threshold, min_steps, None, every_loop)
        if rule is not None and rule.reads_coda:
            raise ValueError("exit='kl' reads the coda at every step: it runs in generate only")
        valid, cu, longest, h = self._packed(tokens, lengths, shortest=0)
        batch, length = tokens.shape
        any_token = h.shape[0] > 0
        if self.prelude is not None:
            h = self.prelude.forward_packed(h, cu, max(longest, 1))
        h = self.block.forward_packed(h, cu, is_causal=True, max_seqlen=longest if any_token else None, exit=rule)
        cost, steps = self.block.ponder_cost, self.block.steps
        if self.coda is not None:
            h = self.coda.forward_packed(h, cu, max(longest, 1))
        logits = self._logits(h)
        out = logits.new_zeros(batch, length, self.vocab_size).index_put((valid,), logits)
        self.ponder_cost = cost.new_zeros(batch, length).index_put((valid,), cost)
        self.steps = steps.new_zeros(batch, length).index_put((valid,), steps)
        return out

    def pondernet(self, tokens: Tensor, lengths: Optional[Tensor] = None, *, beta: float = 0.01,
                  prior: float = 0.2, entropy: bool = False) -> PonderNetObjective:
        """The per-token PonderNet objective (design §16), training the halting
        unit as an exit gate (read it with exit="gate"): every token steps
        until its unhalted mass drops below eps, each step's state through
        the final norm and head against the token's next token; Σ_n p_n L_n
        + beta KL(p ‖ truncated geometric prior), or − beta times the entropy
        of p with entropy=True (Ouro's variant); means over the tokens that
        have a next token. Needs coda_layers=0: the head reads every step."""
        if self.coda is not None:
            raise ValueError("the PonderNet objective reads the head on every step's state: it needs a model "
                             "whose block is its last layers (coda_layers=0)")
        check_pondernet_args(beta, prior)
        valid, cu, longest, h = self._packed(tokens, lengths, shortest=1)
        batch, length = tokens.shape
        target = F.pad(tokens[:, 1:].masked_fill(~valid[:, 1:], -100), (0, 1), value=-100)[valid]
        if self.prelude is not None:
            h = self.prelude.forward_packed(h, cu, longest)
        out = self.block.pondernet_packed(h, cu, is_causal=True, max_seqlen=longest, prior=prior)
        loss, expected, regularizer = token_pondernet_loss(out, self._logits(out.states), target, beta, entropy)
        steps = out.steps.new_zeros(batch, length).index_put((valid,), out.steps)
        return PonderNetObjective(loss, expected, regularizer, steps, out.p)

    # -- generation over the ragged cache ------------------------------------------------

    def new_cache(self, batch_size: int):
        """One cache per stack (prelude, block, coda) for `batch_size` sequences."""
        return [m.new_cache(batch_size) for m in self._stacks()]

    def _packed(self, tokens: Tensor, lengths: Optional[Tensor], shortest: int):
        """Checks tokens (B, L) and lengths (B,) (each in [shortest, L]; None: L)
        and packs the real tokens: (valid (B, L) bool, cu_seqlens, the longest
        sequence, their embeddings with positions (T_tok, D))."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"sequences of {length} tokens exceed max_len = {self.max_len}")
        positions = torch.arange(length, device=tokens.device)
        if lengths is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        else:
            lengths = torch.as_tensor(lengths, device=tokens.device)
            if lengths.shape != (batch,) or (batch and (int(lengths.min()) < shortest or int(lengths.max()) > length)):
                raise ValueError(f"lengths must be (B,) = ({batch},) values in [{shortest}, {length}]")
            valid = positions[None] < lengths[:, None]
        real = tokens[valid]
        self._check_tokens(real)
        counts = valid.sum(1)
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(counts.max()) if batch else 0
        if shortest and not real.numel():
            raise ValueError("no tokens: every sequence is empty")
        return valid, cu, longest, self.embed(real) + self.position(positions.expand(batch, length)[valid])

    def _exit_rule(self, exit, threshold, min_steps, prefill_steps, every_loop) -> Optional[ExitRule]:
        return make_exit_rule(exit, threshold, min_steps, self.block.max_steps,
                              training=self.training and torch.is_grad_enabled(), prefill_steps=prefill_steps,
                              every_loop=every_loop)

    @torch.no_grad()
    def extend(self, caches, tokens: Tensor, cu_seqlens: Sequence[int], sequences: Sequence[int], *,
               exit: Optional[ExitRule] = None) -> Tensor:
        """Appends chunks of tokens (T_new,) to cache `sequences` and returns
        their logits (T_new, vocab_size); `.steps` / `.ponder_cost` become
        (T_new,). Exactly the causal forward's, for any chunking. exit: a
        checked exit rule (nn/exits.py) for the block."""
        self._check_tokens(tokens)
        offsets, sequences = list(cu_seqlens), list(sequences)
        new_lengths = chunk_lengths(offsets)
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self._stacks()):
            raise TypeError("caches must be the list that model.new_cache(batch_size) returns")
        check_sequences(caches[0], sequences)
        cached = [caches[0].lengths[s] for s in sequences]
        if any(c + n > self.max_len for c, n in zip(cached, new_lengths)):
            raise ValueError(f"a sequence would exceed max_len = {self.max_len} tokens")
        # one packed layout for the three stacks' caches, which hold the same sequences
        layout = ChunkLayout(cached, new_lengths, tokens.device)
        h = self.embed(tokens) + self.position(self._positions(layout))
        for stack, cache in zip(self._stacks(), caches):
            if stack is self.block:
                h = stack.extend(cache, h, offsets, sequences, layout=layout, exit=exit)
            else:
                h = stack.extend(cache, h, offsets, sequences, layout=layout)
            if stack is self.block:
                self.steps, self.ponder_cost = stack.steps, stack.ponder_cost
        return self._logits(h)

    @staticmethod
    def _positions(layout: ChunkLayout) -> Tensor:
        """The position in its sequence of every new token of the call."""
        return layout.new_positions - torch.repeat_interleave(layout.cu_seqlens[:-1].to(torch.int64),
                                                               layout.new_counts,
                                                               output_size=layout.new_positions.numel())

    @torch.no_grad()
    def generate(self, prompts: Sequence[Tensor], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_batch_size: Optional[int] = None,
                 schedule: str = "depthwise", fixed_rows: bool = False, exit: Optional[str] = None,
                 threshold: Optional[float] = None, min_steps: int = 1,
                 prefill_steps: Optional[int] = None, every_loop: bool = False) -> Generation:
        """Batched generation: prompts of different lengths, each token
        pondering on its own, over one ragged cache. temperature 0 is greedy;
        otherwise softmax(logits / temperature), over the top_k logits when
        given, sampled with `generator`. A sequence ends after eos_token_id,
        after max_new_tokens new tokens, or at max_len tokens. With
        max_batch_size, at most that many sequences run at once and a slot
        is refilled with the next prompt as soon as its sequence ends
        (continuous batching). The model runs in eval mode for the call.

        schedule: "depthwise" (design §17): every sequence advances on its
        own, one block iteration holding tokens of different sequences at
        different steps, so the block runs about mean-N times per token;
        "synchronous": one decode call per new token of every sequence,
        pondered together (the batch's deepest token sets the iterations).
        Both give the same sequences, steps and scores. Sampling draws
        sequence i's tokens from its own generator, seeded by the i-th of
        len(prompts) seeds drawn from `generator` at the start, so a draw
        does not depend on the schedule or the batch. fixed_rows (depthwise
        only): every block iteration runs one row per slot, idle slots
        included, so the block's shapes do not change from one iteration to
        the next (the same results).

        exit, threshold, min_steps: an exit rule at inference (design §16),
        as in `forward`, and "kl": a token exits at the first step t >=
        max(2, min_steps) whose next-token distribution (the coda and head
        run on the in-flight tokens at every step) is within KL threshold
        of step t - 1's; prompt tokens then run prefill_steps (default
        max_steps). "kl" needs schedule="depthwise". every_loop: as in
        `forward`, every token runs every loop."""
        device = self.head.weight.device
        prompts = self._check_generate(prompts, max_new_tokens, temperature, top_k, eos_token_id, generator,
                                       max_batch_size, device)
        check_schedule(schedule, fixed_rows)
        rule = make_exit_rule(exit, threshold, min_steps, self.block.max_steps, training=False,
                              prefill_steps=prefill_steps, every_loop=every_loop)
        if rule is not None and rule.reads_coda and schedule != "depthwise":
            raise ValueError("exit='kl' runs under schedule='depthwise' only")
        slots = min(max_batch_size or len(prompts), len(prompts))
        was_training = self.training
        self.eval()
        try:
            return self._generate(prompts, max_new_tokens, temperature, top_k, eos_token_id, generator, slots,
                                  schedule, fixed_rows, rule)
        finally:
            self.train(was_training)

    def _generate(self, prompts, max_new_tokens, temperature, top_k, eos, generator, slots, schedule,
                  fixed_rows, rule) -> Generation:
        draws = SequenceDraws(generator, len(prompts)) if temperature > 0 else None

        def choose(logits, sequences, histories):
            return self._choose(logits, temperature, top_k, draws, sequences), logits

        def prefill(caches, tokens, offsets, slots):
            return self.extend(caches, tokens, offsets, slots, exit=rule), self.steps

        self.block.iterations = 0
        sequences, steps, scores, iterations = generate_slots(
            schedule, prefill=prefill, caches=self.new_cache(slots), prompts=prompts, max_new_tokens=max_new_tokens,
            choose=choose, stop=None if eos is None else lambda i, history: history[-1] == eos,
            max_len=self.max_len, embed=lambda t, pos: self.embed(t) + self.position(pos), prelude=self.prelude,
            block=self.block, coda=self.coda, head=self._logits,
            attention=self.block.attention_backend(self.head.weight), fixed_rows=fixed_rows, exit=rule)
        iterations += self.block.iterations    # the parallel calls' (prefills; every call under synchronous)
        vocab = self.vocab_size
        return Generation(
            sequences=sequences,
            steps=[torch.cat(s) if s else torch.zeros(0, dtype=torch.int64) for s in steps],
            scores=[torch.stack(s) if s else torch.zeros(0, vocab) for s in scores],
            iterations=iterations,
        )

    @staticmethod
    def _choose(logits: Tensor, temperature: float, top_k: Optional[int], draws, sequences) -> Tensor:
        """The next token of every row of logits (S, vocab): argmax at
        temperature 0, else a draw from softmax(logits / temperature),
        restricted to the top_k logits when given."""
        if temperature == 0.0:
            return logits.argmax(-1)
        scaled = logits.double() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            cut = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < cut, -math.inf)
        return draws(torch.softmax(scaled, -1), sequences)

    def _check_generate(self, prompts, max_new_tokens, temperature, top_k, eos, generator, max_batch_size,
                        device) -> List[Tensor]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of 1-D int64 tensors")
        out = []
        for k, p in enumerate(prompts):
            if not isinstance(p, Tensor) or p.dim() != 1 or p.dtype != torch.int64:
                raise TypeError(f"prompt {k} must be a 1-D int64 tensor, got "
                                f"{p.dtype if isinstance(p, Tensor) else type(p).__name__}")
            if p.numel() == 0:
                raise ValueError(f"prompt {k} is empty: a prompt needs at least one token")
            if p.numel() > self.max_len:
                raise ValueError(f"prompt {k} has {p.numel()} tokens, more than max_len = {self.max_len}")
            self._check_tokens(p)
            out.append(p.to(device))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size):
            raise ValueError(f"eos_token_id must be None or a token in [0, {self.vocab_size}), got {eos!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {max_batch_size!r}")
        return out
