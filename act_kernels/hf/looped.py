"""`LoopedCausalLM`: per-token ACT over a transformers causal LM's own decoder
layers (design §15). Composition:

    embed -> prelude layers [0, start) once -> the block [start, stop),
    pondered per token with ACT -> coda layers [stop, L) once -> final norm -> head

on the package's one engine (nn/transformer.py over nn/layers'
`DecoderLayers`): padding is never a row, each token halts on its own, the
work is Σ N rows at the block's layers (and the keys and values of a token
that has just halted at its first layer), keys and values stay at the
model's kv heads (grouped-query attention, never repeated), and generation
runs batched over the ragged cache of design §14.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ACTTransformerEncoder, CausalStack
from ..nn.cache import ChunkLayout
from ..nn.checks import check_layer_options
from ..nn.depthwise import check_schedule
from ..nn.exits import ExitRule, check_pondernet_args, make_exit_rule, token_pondernet_loss
from ..nn.generation import SequenceDraws, eos_ids, generate_slots
from ..nn.layers import DecoderLayers
from .attention import ours
from .checks import check_block, check_model, check_routes_attention

SETTINGS_FILE = "act_kernels_loop.json"
HALTING_FILE = "act_kernels_halting.pt"


@dataclass
class LoopedOutput:
    """logits (B, L, V); loss: transformers' shifted causal-LM loss (None
    without labels); ponder_cost (B, L) float32, differentiable, and steps
    (B, L) int64, both 0 at padding."""

    logits: Tensor
    loss: Optional[Tensor]
    ponder_cost: Tensor
    steps: Tensor


@dataclass
class LoopedPonderNet:
    """The per-token PonderNet objective (design §10 per token, §16):
    loss = expected_loss + beta * kl (or − beta * entropy for Ouro's
    variant), each a mean over the tokens with a target; steps (B, L)
    int64, 0 at padding; p: every computed (token, step)'s halting
    probability, packed step-major."""

    loss: Tensor
    expected_loss: Tensor
    regularizer: Tensor
    steps: Tensor
    p: Tensor


@dataclass
class LoopedGeneration:
    """sequences (B, L + new) int64 laid out as transformers' generate lays
    them out; steps (same shape): every token's ponder steps, 0 at padding."""

    sequences: Tensor
    steps: Tensor
    iterations: int = 0


def _packed(valid: Tensor):
    """The real tokens of a (B, L) mask packed row after row: cu_seqlens
    (B + 1,) int32, the rows' lengths (a list: one read of the device),
    every real token's position."""
    counts = valid.sum(1)
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return cu, counts.tolist(), _positions(valid)[valid]


def _positions(mask: Tensor) -> Tensor:
    """(B, L): each real token's position, counted from its row's first real token."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


class LoopedCausalLM(nn.Module):
    """A transformers causal LM whose decoder layers [start, stop) ponder per
    token with ACT (Graves 2016; design §9, §14, §15).

    model: a transformers causal LM whose decoder layers take
        `position_embeddings` and route attention through transformers'
        attention interface (Llama, Qwen2, Qwen3, Mistral without a sliding
        window, and the like). Its own modules and parameters are used,
        never copied: `.model` is the model given, and it keeps working as
        itself (its own forward and generate are unchanged).
    block: (start, stop), the layers one ponder step applies in order; the
        layers before are the prelude, those after the coda, each run once.
    max_steps, eps: ACT's M and epsilon (design §1); halting_bias_init: the
        halting unit's bias (`.halting`, nn.Linear(hidden_size, 1)).
    step_norm: apply the model's final norm at the end of every step (as
        Ouro does); with no coda the head then reads the ponder's output
        directly (it went through the norm at every step).
    backend: "auto" | "reference" | "triton" | "cuda", as the encoder's.

    Refused with an error naming the setting: sliding-window or chunked
    attention, attention sinks, logit softcapping, ALiBi, non-causal
    layers, encoder-decoders, cross-attention, a block outside the layers or
    empty, layers that do not route attention through the interface.
    """

    def __init__(self, model: nn.Module, block=(0, 1), *, max_steps: int = 8, eps: float = 0.01,
                 halting_bias_init: float = 1.0, step_norm: bool = False, backend: str = "auto"):
        super().__init__()
        check_layer_options(max_steps, eps, backend)
        check_model(model)
        layers = list(model.model.layers)
        start, stop = check_block(block, len(layers))
        check_routes_attention(model)
        self.model = model
        self.block_range, self.step_norm = (start, stop), bool(step_norm)
        self.halting_bias_init, self.backend = float(halting_bias_init), backend
        inner, config = model.model, model.config
        kind = DecoderLayers(layers[start:stop], inner.rotary_emb, config, inner.norm if step_norm else None)
        self.block = ACTTransformerEncoder(kind, max_steps=max_steps, eps=eps, halting_bias_init=halting_bias_init,
                                           backend=backend)
        self.prelude = CausalStack(DecoderLayers(layers[:start], inner.rotary_emb, config), backend) if start else None
        self.coda = CausalStack(DecoderLayers(layers[stop:], inner.rotary_emb, config), backend) \
            if stop < len(layers) else None
        self.max_steps, self.eps = max_steps, float(eps)

    @property
    def halting(self) -> nn.Linear:
        """The halting unit, nn.Linear(hidden_size, 1)."""
        return self.block.halting

    @property
    def config(self):
        return self.model.config

    def extra_repr(self) -> str:
        return (f"block={self.block_range}, max_steps={self.max_steps}, eps={self.eps}, "
                f"step_norm={self.step_norm}, backend={self.backend!r}")

    def _stacks(self):
        return [m for m in (self.prelude, self.block, self.coda) if m is not None]

    def _head(self, h: Tensor) -> Tensor:
        if not (self.step_norm and self.coda is None):
            h = self.model.model.norm(h)
        return self.model.lm_head(h)

    def _check_ids(self, input_ids, attention_mask):
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError("input_ids must be a (B, L) int64 tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}"
                             f"{' ' + str(input_ids.dtype) if isinstance(input_ids, Tensor) else ''}")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (1 at real tokens)")
        return attention_mask.to(device=input_ids.device, dtype=torch.bool)

    # -- training: the parallel forward ---------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, *, exit: Optional[str] = None, threshold: Optional[float] = None,
                min_steps: int = 1, every_loop: bool = False) -> LoopedOutput:
        """input_ids (B, L) int64; attention_mask as in transformers (1 at real
        tokens, left or right padding); labels (B, L), -100 ignored, shifted
        inside as transformers does. Positions count from each sequence's
        first real token; padding is never a row.

        exit (inference only: under no_grad or in eval, design §16): "act"
        (ACT's mean field, the default), "gate" (the halting unit read as an
        exit gate, exit once the exit mass reaches threshold), "latent"
        (exit once ||s_t - s_t-1|| / ||s_t|| < threshold) or "fixed" (every
        token max_steps: the model with its block unrolled), each a hard
        exit at or after min_steps whose output is the state at the exit;
        "kl" reads the coda at every step and runs in `generate` only.
        `.steps` are then the exit steps, `.ponder_cost` the steps run.
        every_loop: the reference mode that computes every loop for every
        token and picks each token's exit afterwards (no token freezes)."""
        rule = make_exit_rule(exit, threshold, min_steps, self.max_steps,
                              training=self.training and torch.is_grad_enabled(), every_loop=every_loop)
        if rule is not None and rule.reads_coda:
            raise ValueError("exit='kl' reads the coda at every step: it runs in generate only")
        valid = self._check_ids(input_ids, attention_mask)
        batch, length = input_ids.shape
        cu, lengths, positions = _packed(valid)
        h, cost, steps = self._layers(self.model.model.embed_tokens(input_ids[valid]), cu, lengths, positions, rule)
        logits = self._head(h)
        out = logits.new_zeros(batch, length, logits.shape[-1]).index_put((valid,), logits)
        ponder_cost = cost.new_zeros(batch, length).index_put((valid,), cost)
        token_steps = steps.new_zeros(batch, length).index_put((valid,), steps)
        loss = None
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
                raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}")
            loss = self.model.loss_function(out, labels, vocab_size=self.config.vocab_size)
        return LoopedOutput(out, loss, ponder_cost, token_steps)

    def pondernet(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, *, beta: float = 0.01, prior: float = 0.2,
                  entropy: bool = False) -> LoopedPonderNet:
        """The per-token PonderNet objective, for training the halting unit as
        an exit gate (design §16; read it at inference with exit="gate"):
        λ_n = σ(halting(s_n)), p_n = λ_n Π_{j<n}(1 − λ_j), every token stopping
        at the first step whose unhalted mass drops below eps (or at
        max_steps, which takes the rest), the stopped tokens frozen for the
        others. Per token: Σ_n p_n L_n, L_n the cross-entropy of the head on
        s_n against the token's next-token target (transformers' shift;
        labels default to input_ids, -100 ignored), plus beta times
        KL(p ‖ truncated geometric prior(prior)), or, with entropy=True,
        minus beta times the entropy of p (Ouro's variant, a uniform prior);
        means over the tokens with a target. The per-step logits are computed
        on the packed (token, step) rows, never a (max_steps, B, L, V)
        tensor. Needs the block to be the model's last layers (no coda)."""
        if self.coda is not None:
            raise ValueError(f"the PonderNet objective reads the head on every step's state, so the block must be "
                             f"the model's last layers (no coda, as in Ouro); this block is layers "
                             f"[{self.block_range[0]}, {self.block_range[1]}) of {len(self.model.model.layers)}")
        check_pondernet_args(beta, prior)
        valid = self._check_ids(input_ids, attention_mask)
        if labels is None:
            labels = input_ids
        elif not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}")
        labels = labels.masked_fill(~valid, -100)           # padding is never a target
        batch, length = input_ids.shape
        cu, lengths, positions = _packed(valid)
        if not positions.numel():
            raise ValueError("the PonderNet objective needs at least one real token")
        target = F.pad(labels[:, 1:], (0, 1), value=-100)[valid]        # each real token's next-token target
        out = self._pondernet_block(self.model.model.embed_tokens(input_ids[valid]), cu, lengths, positions, prior)
        loss, expected, regularizer = token_pondernet_loss(out, self._head(out.states), target, beta, entropy)
        steps = out.steps.new_zeros(batch, length).index_put((valid,), out.steps)
        return LoopedPonderNet(loss, expected, regularizer, steps, out.p)

    @torch.compiler.disable   # a data-dependent loop with a host read per step: runs eagerly under torch.compile
    def _pondernet_block(self, h: Tensor, cu: Tensor, lengths: List[int], positions: Tensor, prior: float):
        longest = max(lengths)
        with ours(self.config):
            if self.prelude is not None:
                h = self.prelude.forward_packed(h, cu, longest, positions, lengths)
            return self.block.pondernet_packed(h, cu, is_causal=True, max_seqlen=longest, positions=positions,
                                               prior=prior)

    @torch.compiler.disable   # a data-dependent loop with a host read per step: runs eagerly under torch.compile
    def _layers(self, h: Tensor, cu: Tensor, lengths: List[int], positions: Tensor, rule: Optional[ExitRule] = None):
        """Prelude, pondered block and coda on the packed rows h (T_tok, D)."""
        if not h.shape[0]:
            return h, h.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.int64, device=h.device)
        longest = max(lengths)
        with ours(self.config):
            if self.prelude is not None:
                h = self.prelude.forward_packed(h, cu, longest, positions, lengths)
            h = self.block.forward_packed(h, cu, is_causal=True, max_seqlen=longest, positions=positions, exit=rule)
            cost, steps = self.block.ponder_cost, self.block.steps
            if self.coda is not None:
                h = self.coda.forward_packed(h, cu, longest, positions, lengths)
        return h, cost, steps

    # -- generation over the ragged cache ------------------------------------------------

    def new_cache(self, batch_size: int):
        """One cache per stack (prelude, block, coda) for `batch_size` sequences."""
        return [m.new_cache(batch_size) for m in self._stacks()]

    @torch.no_grad()
    def extend(self, caches, tokens: Tensor, cu_seqlens: Sequence[int], sequences: Sequence[int], *,
               exit: Optional[ExitRule] = None) -> Tensor:
        """Appends chunks of tokens (T_new,) to cache `sequences` and returns
        their logits (T_new, V); `.block.steps` becomes (T_new,). Exactly the
        causal forward's, for any chunking (design §14). exit: a checked
        exit rule (nn/exits.py) for the block."""
        offsets, sequences = list(cu_seqlens), list(sequences)
        new_lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        layout = ChunkLayout([caches[0].lengths[s] for s in sequences], new_lengths, tokens.device)
        positions = layout.new_positions - torch.repeat_interleave(
            layout.cu_seqlens[:-1].to(torch.int64), layout.new_counts, output_size=layout.new_positions.numel())
        h = self.model.model.embed_tokens(tokens)
        with ours(self.config):
            for stack, cache in zip(self._stacks(), caches):
                rule = dict(exit=exit) if stack is self.block else {}
                h = stack.extend(cache, h, offsets, sequences, layout=layout, positions=positions, **rule)
        return self._head(h)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_batch_size: Optional[int] = None,
                 schedule: str = "depthwise", fixed_rows: bool = False, exit: Optional[str] = None,
                 threshold: Optional[float] = None, min_steps: int = 1, prefill_steps: Optional[int] = None,
                 every_loop: bool = False) -> LoopedGeneration:
        """Batched generation with transformers' conventions: greedy unless
        do_sample (then softmax(logits / temperature) over the top_k logits and
        the top_p nucleus; row i draws its tokens from its own generator,
        seeded by the i-th of B seeds drawn from `generator` at the start, so
        a fixed generator repeats them whatever the schedule); eos_token_id
        and pad_token_id default to the model's generation config. Each prompt is its row's real tokens
        (attention_mask); every token ponders on its own over one ragged cache,
        and with max_batch_size at most that many sequences run at once, a
        finished sequence's slot taking the next prompt (continuous batching).

        Returns `.sequences` as transformers lays them out: the input as
        given (its padding kept), then the new tokens, pad_token_id after a
        sequence's eos; as in transformers, when every sequence has ended
        before max_new_tokens the columns after the last new token are left
        out. `.steps` (same shape): every token's ponder steps, 0 at padding.
        The model runs in eval mode for the call. schedule: "depthwise"
        (every sequence advances on its own, design §17) or "synchronous"
        (one decode call per new token of every sequence); the same output.
        fixed_rows (depthwise only): every block iteration runs one row per
        slot, idle slots included, so the block's shapes never change.
        `.iterations`: how many times the block ran.

        exit, threshold, min_steps, every_loop: the exit rule, as in
        `forward`, and "kl" (Huginn's criterion): a token exits at the first
        step t >= max(2, min_steps) whose next-token distribution (the coda
        and head run on the in-flight tokens at every step) is within KL
        threshold of step t - 1's; prompt tokens run prefill_steps (default
        max_steps). "kl" needs schedule="depthwise"."""
        valid = self._check_ids(input_ids, attention_mask)
        eos, pad = self._generation_ids(eos_token_id, pad_token_id)
        self._check_generate(valid, max_new_tokens, do_sample, temperature, top_k, top_p, generator, max_batch_size)
        check_schedule(schedule, fixed_rows)
        rule = make_exit_rule(exit, threshold, min_steps, self.max_steps, training=False,
                              prefill_steps=prefill_steps, every_loop=every_loop)
        if rule is not None and rule.reads_coda and schedule != "depthwise":
            raise ValueError("exit='kl' runs under schedule='depthwise' only")
        prompts = [row[keep] for row, keep in zip(input_ids, valid)]
        slots = min(max_batch_size or len(prompts), len(prompts))
        was_training = self.training
        self.eval()
        draws = SequenceDraws(generator, len(prompts)) if do_sample else None

        def choose(logits, sequences, histories):
            return self._choose(logits, do_sample, temperature, top_k, top_p, draws, sequences), logits

        self.block.iterations = 0
        try:
            with ours(self.config):
                sequences, steps, _, depthwise_iterations = generate_slots(
                    schedule, prefill=lambda c, t, o, s: (self.extend(c, t, o, s, exit=rule), self.block.steps),
                    caches=self.new_cache(slots), prompts=prompts, max_new_tokens=max_new_tokens, choose=choose,
                    stop=None if eos is None else lambda i, history: history[-1] in eos,
                    embed=lambda t, pos: self.model.model.embed_tokens(t), prelude=self.prelude,
                    block=self.block, coda=self.coda, head=self._head,
                    attention=self.block.attention_backend(self.halting.weight), fixed_rows=fixed_rows, exit=rule)
        finally:
            self.train(was_training)
        out = self._lay_out(input_ids, valid, prompts, sequences, steps, pad)
        out.iterations = self.block.iterations + depthwise_iterations
        return out

    def _generation_ids(self, eos, pad):
        config = getattr(self.model, "generation_config", None)
        if eos is None and config is not None:
            eos = config.eos_token_id
        if pad is None and config is not None:
            pad = config.pad_token_id
        ends = eos_ids(eos)
        if any(isinstance(e, bool) or not isinstance(e, int) for e in ends):
            raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
        if pad is None:
            pad = ends[0] if ends else 0
        return (ends or None), int(pad)

    @staticmethod
    def _check_generate(valid, max_new_tokens, do_sample, temperature, top_k, top_p, generator, max_batch_size):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if valid.shape[0] == 0 or not bool(valid.any(1).all()):
            raise ValueError("every row of input_ids needs at least one real token (attention_mask)")
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {max_batch_size!r}")

    @staticmethod
    def _choose(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                draws, sequences) -> Tensor:
        """The next token of every row of logits (S, V): argmax, or a draw
        (temperature, then top_k, then top_p, as transformers' warpers order
        them)."""
        if not do_sample:
            return logits.argmax(-1)
        scaled = logits.double() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            cut = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < cut, -math.inf)
        if top_p is not None and top_p < 1.0:
            ordered, order = torch.sort(scaled, descending=False, dim=-1)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -1] = False   # the likeliest token always stays
            scaled = scaled.masked_fill(drop.scatter(1, order, drop), -math.inf)
        return draws(torch.softmax(scaled, -1), sequences)

    @staticmethod
    def _lay_out(input_ids, valid, prompts, sequences, steps, pad) -> LoopedGeneration:
        batch, length = input_ids.shape
        new = [seq[p.numel():] for seq, p in zip(sequences, prompts)]
        width = max(n.numel() for n in new)
        out = torch.full((batch, length + width), pad, dtype=torch.int64, device=input_ids.device)
        out_steps = torch.zeros(batch, length + width, dtype=torch.int64, device=input_ids.device)
        out[:, :length] = input_ids
        for b in range(batch):
            token_steps = torch.cat(steps[b]).to(input_ids.device)
            out_steps[b, :length][valid[b]] = token_steps[:prompts[b].numel()]
            out[b, length:length + new[b].numel()] = new[b]
            out_steps[b, length:length + new[b].numel()] = token_steps[prompts[b].numel():]
        return LoopedGeneration(out, out_steps)

    # -- save and load ---------------------------------------------------------------------

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """The model's own save_pretrained, plus the loop's settings
        (act_kernels_loop.json) and the halting unit (act_kernels_halting.pt)."""
        self.model.save_pretrained(directory, **kwargs)
        settings = dict(block=list(self.block_range), max_steps=self.max_steps, eps=self.eps,
                        halting_bias_init=self.halting_bias_init, step_norm=self.step_norm, backend=self.backend,
                        dtype=str(self.halting.weight.dtype).replace("torch.", ""))
        with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
            json.dump(settings, f, indent=2)
        torch.save({k: v.detach().cpu() for k, v in self.halting.state_dict().items()},
                   os.path.join(directory, HALTING_FILE))

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs) -> "LoopedCausalLM":
        """Loads what `save_pretrained` wrote, offline (a local folder);
        kwargs go to transformers' AutoModelForCausalLM.from_pretrained."""
        from transformers import AutoModelForCausalLM

        path = os.path.join(directory, SETTINGS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} holds no {SETTINGS_FILE}: save it with LoopedCausalLM.save_pretrained")
        with open(path) as f:
            settings = json.load(f)
        kwargs.setdefault("dtype", getattr(torch, settings["dtype"]))
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs)
        looped = cls(model, tuple(settings["block"]), max_steps=settings["max_steps"], eps=settings["eps"],
                     halting_bias_init=settings["halting_bias_init"], step_norm=settings["step_norm"],
                     backend=settings["backend"])
        state = torch.load(os.path.join(directory, HALTING_FILE), map_location="cpu", weights_only=True)
        looped.halting.load_state_dict(state)
        return looped


__all__ = ["LoopedCausalLM", "LoopedOutput", "LoopedGeneration", "LoopedPonderNet"]
