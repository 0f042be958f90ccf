"""`ACTLanguageModel`: a looped language model with per-token adaptive depth
(design §14) over torch encoder layers, on the looped core (models/core.py): a
prelude of plain causal layers, one shared block of layers applied again
and again with ACT halting per token, a coda, a final norm and an output
head; batched generation over the ragged key/value cache, exact against the
parallel forward. It takes and returns what `act_kernels.hf.LoopedCausalLM`
does (input_ids and attention_mask; outputs with .loss, .logits,
.ponder_cost, .steps), without importing transformers.
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.checks import check_layer_options
from ..generation.scheduler import SequenceDraws, eos_ids
from .core import LoopedCore, PonderNetTerms, check_generator, lay_out, scores_by_column, stop_at
from ..layers.transformer import ACTTransformerEncoder, CausalStack


class _Fields:
    """transformers' ModelOutput access on a dataclass: out["loss"], out.to_tuple()."""

    def __getitem__(self, name: str):
        return getattr(self, name)

    def to_tuple(self) -> tuple:
        return tuple(v for v in astuple(self) if v is not None)


@dataclass
class LanguageModelOutput(_Fields):
    """loss: lm_loss + ponder_weight · mean ponder cost of the real tokens
    (None without labels); logits (B, L, V), 0 at padding; lm_loss: the
    shifted next-token cross-entropy (mean over targets, -100 and padding
    ignored); ponder_cost (B, L) float32, differentiable, and steps (B, L)
    int64, both 0 at padding."""
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    lm_loss: Optional[Tensor] = None
    ponder_cost: Optional[Tensor] = None
    steps: Optional[Tensor] = None


@dataclass
class GenerateOutput(_Fields):
    """`generate(..., return_dict_in_generate=True)`: sequences (B, L + new),
    the input as given then the new tokens, pad after a sequence's end; steps
    (same shape), 0 at padding; scores (output_scores=True): one (B, V) per
    new-token column, -inf in rows whose sequence had ended; iterations: how
    many times the block ran (the prompts' prefill included)."""
    sequences: Optional[Tensor] = None
    steps: Optional[Tensor] = None
    scores: Optional[Tuple[Tensor, ...]] = None
    iterations: int = 0


def _layers(d_model, nhead, dim_feedforward, dropout, count) -> Optional[nn.Module]:
    if count == 0:
        return None
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return layer if count == 1 else nn.TransformerEncoder(layer, count, enable_nested_tensor=False)


def _mask_from(input_ids: Tensor, attention_mask: Optional[Tensor], lengths) -> Optional[Tensor]:
    """`lengths` (B,): right padding past each length, as an attention_mask."""
    if lengths is None:
        return attention_mask
    if attention_mask is not None:
        raise ValueError("give attention_mask or lengths, not both")
    batch, length = input_ids.shape
    lengths = torch.as_tensor(lengths, device=input_ids.device)
    if lengths.shape != (batch,) or (batch and (int(lengths.min()) < 1 or int(lengths.max()) > length)):
        raise ValueError(f"lengths must be (B,) = ({batch},) values in [1, {length}]")
    return torch.arange(length, device=input_ids.device)[None] < lengths[:, None]


class ACTLanguageModel(LoopedCore, nn.Module):
    """A looped causal LM whose every token decides how many times the shared
    block runs on it (ACT, Graves 2016), with no padding waste in training
    or in batched generation.

        model = ak.nn.ACTLanguageModel(256, 256, 4, block_layers=2, max_steps=8, ponder_weight=0.01)
        out = model(input_ids, attention_mask, labels=input_ids)       # out.loss, out.logits, out.steps
        sequences = model.generate(input_ids, attention_mask, max_new_tokens=64)

    Token embedding plus learned absolute positions (max_len; counted from
    each row's first real token), pre-norm causal GELU layers
    (prelude_layers, the pondered block of block_layers, coda_layers;
    dim_feedforward defaults to 4 d_model), a final LayerNorm and a linear
    head. The block is an `ACTTransformerEncoder` over an
    `nn.TransformerEncoder` (`.block`), with max_steps, eps and
    halting_bias_init; `.prelude` and `.coda` are `CausalStack`s (or None).
    ponder_weight: τ in loss = lm_loss + τ · mean ponder cost.
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, dim_feedforward: Optional[int] = None, *,
                 prelude_layers: int = 1, block_layers: int = 2, coda_layers: int = 1, max_steps: int = 8,
                 eps: float = 0.01, halting_bias_init: float = 1.0, dropout: float = 0.0, max_len: int = 2048,
                 backend: str = "auto", ponder_weight: float = 0.0):
        super().__init__()
        for name, value, low in (("vocab_size", vocab_size, 1), ("d_model", d_model, 1), ("nhead", nhead, 1),
                                 ("prelude_layers", prelude_layers, 0), ("block_layers", block_layers, 1),
                                 ("coda_layers", coda_layers, 0), ("max_len", max_len, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be a multiple of nhead ({nhead})")
        if isinstance(ponder_weight, bool) or not isinstance(ponder_weight, (int, float)) or not ponder_weight >= 0:
            raise ValueError(f"ponder_weight must be a float >= 0, got {ponder_weight!r}")
        check_layer_options(max_steps, eps, backend)
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.max_steps, self.ponder_weight = max_steps, float(ponder_weight)
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

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.embed(tokens) + self.position(positions)

    def _head(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    # -- training: the parallel forward -------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                lengths: Optional[Tensor] = None, exit: Optional[str] = None, threshold: Optional[float] = None,
                min_steps: int = 1, every_loop: bool = False) -> LanguageModelOutput:
        """input_ids (B, L) int64; attention_mask (B, L), 1 at real tokens,
        left or right padding (or lengths (B,): right padding past each);
        labels (B, L) next-token targets shifted inside, -100 and padding
        ignored. Logits are 0 at padding.

        exit (inference only: under no_grad or in eval): "act" (ACT's mean
        field, the default), "gate", "latent" or "fixed", each a hard exit
        per token that returns its state at its exit (design §16), or "kl",
        which reads the coda at every step: its forward feeds the tokens one
        position at a time through a cache, every token exiting on its own as
        a decoded token does (one call per position, not one); `.steps` are
        then the exit steps and `.ponder_cost` the steps run. every_loop:
        the reference mode of computing every loop for every token and
        picking each token's exit afterwards (no token freezes; every token
        runs max_steps)."""
        rule = self._exit_rule(exit, threshold, min_steps, every_loop)
        valid = self._check_ids(input_ids, _mask_from(input_ids, attention_mask, lengths))
        if labels is not None:
            self._check_labels(labels, input_ids)
        logits, cost, steps = self._forward_tokens(input_ids, valid, rule)
        loss = lm_loss = None
        if labels is not None:
            target = labels.masked_fill(~valid, -100)[:, 1:]
            lm_loss = loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab_size), target.reshape(-1),
                                             ignore_index=-100)
            if self.ponder_weight:
                loss = lm_loss + self.ponder_weight * (cost.sum() / valid.sum())
        return LanguageModelOutput(loss=loss, logits=logits, lm_loss=lm_loss, ponder_cost=cost, steps=steps)

    def pondernet(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                  *, lengths: Optional[Tensor] = None, beta: float = 0.01, prior: float = 0.2,
                  entropy: bool = False) -> PonderNetTerms:
        """The per-token PonderNet objective (design §16), training the halting
        unit as an exit gate (read it with exit="gate"): every token steps
        until its unhalted mass drops below eps, each step's state through
        the final norm and head against the token's next token (labels
        default to input_ids); Σ_n p_n L_n + beta KL(p ‖ truncated geometric
        prior), or − beta times the entropy of p with entropy=True (Ouro's
        variant); means over the tokens that have a next token. Needs
        coda_layers=0: the head reads every step."""
        return self._pondernet_terms(input_ids, _mask_from(input_ids, attention_mask, lengths), labels, beta, prior,
                                     entropy)

    # -- generation over the ragged cache ------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 eos_token_id=None, pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 max_batch_size: Optional[int] = None, schedule: str = "depthwise", fixed_rows: bool = False,
                 exit: Optional[str] = None, threshold: Optional[float] = None, min_steps: int = 1,
                 prefill_steps: Optional[int] = None, every_loop: bool = False,
                 return_dict_in_generate: bool = False, output_scores: bool = False):
        """Batched generation over one ragged cache, with the names, return kinds
        and options of `act_kernels.hf.LoopedCausalLM.generate` (every row's
        real tokens a prompt; schedule, fixed_rows, max_batch_size, exit rules;
        design §14, §16, §17), without transformers: greedy unless do_sample,
        then softmax(logits / temperature) over the top_k logits when given,
        row i drawing from its own generator seeded by the i-th of B seeds
        drawn from `generator`. A sequence ends after eos_token_id (one or
        several), after max_new_tokens new tokens, or at max_len tokens;
        pad_token_id (default: the first eos, else 0) follows its end."""
        valid = self._check_ids(input_ids, attention_mask)
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        ends = eos_ids(eos_token_id)
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.vocab_size for e in ends):
            raise ValueError(f"eos_token_id must be None, a token or tokens in [0, {self.vocab_size}), "
                             f"got {eos_token_id!r}")
        check_generator(generator)
        draws = SequenceDraws(generator, input_ids.shape[0]) if do_sample else None

        def choose(logits, seqs, histories):
            if not do_sample:
                return logits.argmax(-1), logits
            scaled = logits.double() / temperature
            if top_k is not None and top_k < scaled.shape[-1]:
                cut = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
                scaled = scaled.masked_fill(scaled < cut, -math.inf)
            return draws(torch.softmax(scaled, -1), seqs), logits

        rule = self._exit_rule(exit, threshold, min_steps, every_loop, prefill_steps)
        out = self._generate(input_ids, valid, max_new_tokens, choose=choose, stop=stop_at(ends),
                             max_batch_size=max_batch_size, schedule=schedule, fixed_rows=fixed_rows, rule=rule)
        pad = pad_token_id if pad_token_id is not None else (ends[0] if ends else 0)
        sequences, steps = lay_out(input_ids, valid, out, pad)
        if not return_dict_in_generate:
            return sequences
        scores = scores_by_column(out.scores, input_ids.shape[0], self.vocab_size, self.head.weight) \
            if output_scores else None
        return GenerateOutput(sequences=sequences, steps=steps, scores=scores, iterations=out.iterations)


__all__ = ["ACTLanguageModel", "LanguageModelOutput", "GenerateOutput"]
