"""`LoopedCausalLM`: per-token ACT over a transformers causal LM's own decoder
layers (design §15), as a transformers model. Composition:

    embed -> prelude layers [0, start) once -> the block [start, stop),
    pondered per token with ACT -> coda layers [stop, L) once -> final norm -> head

on the package's looped core (models/core.py) over the decoder-layer kind
(layers/kinds/transformers_decoder.py): padding is never a row, each token
halts on its own, keys and values stay at the model's kv heads, and
generation runs batched over the ragged cache (design §14, §17). As a
PreTrainedModel with its own config (hf/config.py) it saves, loads
(AutoModelForCausalLM included), trains under transformers.Trainer (the
ponder cost is in `.loss`) and generates with transformers' generation
config, logits processors, stopping criteria and streamers (hf/generation.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..layers import ACTTransformerEncoder, CausalStack
from ..layers.checks import check_layer_options
from ..layers.kinds import decoder_kind, linear_rows
from ..models.core import LoopedCore, PonderNetTerms, check_generator, lay_out, scores_by_column
from .attention import ours
from .checks import check_block, check_model, check_routes_attention
from .config import LoopedConfig
from .generation import Chooser, LoopedGenerateOutput, call_config, criteria, eos_and_pad


@dataclass
class LoopedCausalLMOutput(ModelOutput):
    """loss: lm_loss + ponder_weight · (ponder cost summed over the real
    tokens / their number), None without labels; logits (B, L, V); lm_loss:
    transformers' shifted causal-LM loss; ponder_cost (B, L) float32,
    differentiable, and steps (B, L) int64, both 0 at padding."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    lm_loss: Optional[Tensor] = None
    ponder_cost: Optional[Tensor] = None
    steps: Optional[Tensor] = None


class LoopedCausalLM(LoopedCore, PreTrainedModel, GenerationMixin):
    """A transformers causal LM whose decoder layers [start, stop) ponder per
    token with ACT (Graves 2016; design §9, §14, §15).

    model: a transformers causal LM whose decoder layers take
        `position_embeddings` and route attention through transformers'
        attention interface (Llama, Qwen2, Qwen3, Mistral without a sliding
        window, and the like), or a `LoopedConfig` (the inner model is then
        built from its text_config, as from_pretrained does). A model's own
        modules and parameters are used, never copied: `.model` is the model
        given, and it keeps working as itself.
    block: (start, stop), the layers one ponder step applies in order; the
        layers before are the prelude, those after the coda, each run once.
    max_steps, eps: ACT's M and epsilon (design §1); halting_bias_init: the
        halting unit's bias (`.halting`, nn.Linear(hidden_size, 1)).
    step_norm: apply the model's final norm at the end of every step (as
        Ouro does); with no coda the head then reads the ponder's output
        directly (it went through the norm at every step).
    backend: "auto" | "reference" | "triton" | "cuda", as the encoder's.
    ponder_weight: τ in loss = lm_loss + τ · mean ponder cost of the real
        tokens, so that transformers.Trainer trains the halting unit too.

    Refused with an error naming the setting: sliding-window or chunked
    attention, attention sinks, logit softcapping, ALiBi, non-causal
    layers, encoder-decoders, cross-attention, a block outside the layers or
    empty, layers that do not route attention through the interface.
    """

    config_class = LoopedConfig
    main_input_name = "input_ids"
    _supports_attention_backend = True

    def __init__(self, model, block=(0, 1), *, max_steps: int = 8, eps: float = 0.01, halting_bias_init: float = 1.0,
                 step_norm: bool = False, backend: str = "auto", ponder_weight: float = 0.0):
        if isinstance(model, LoopedConfig):
            config = model
            model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            check_model(model)
            check_block(block, len(model.model.layers))
            check_layer_options(max_steps, eps, backend)
            config = LoopedConfig(model.config, block, max_steps=max_steps, eps=eps,
                                  halting_bias_init=float(halting_bias_init), step_norm=bool(step_norm),
                                  backend=backend, ponder_weight=ponder_weight)
        check_model(model)
        check_layer_options(config.max_steps, config.eps, config.backend)
        if isinstance(config.ponder_weight, bool) or not isinstance(config.ponder_weight, (int, float)) \
                or not config.ponder_weight >= 0:
            raise ValueError(f"ponder_weight must be a float >= 0, got {config.ponder_weight!r}")
        layers = list(model.model.layers)
        start, stop = check_block(tuple(config.block), len(layers))
        implementation = model.config._attn_implementation
        super().__init__(config)
        # PreTrainedModel's init sets the sub-config's attention implementation: the inner model keeps its own
        model.config._attn_implementation = implementation
        self.model = model
        self.generation_config = model.generation_config   # one generation config, shared with the inner model
        # from_pretrained builds the model on the meta device: the layers are probed at the first call instead
        self._routes_checked = False
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            check_routes_attention(model)
            self._routes_checked = True
        inner, text = model.model, model.config
        self.block_range, self.step_norm = (start, stop), bool(config.step_norm)
        self.max_steps, self.eps, self.max_len = config.max_steps, float(config.eps), None
        kind = decoder_kind(layers[start:stop], inner.rotary_emb, text, inner.norm if self.step_norm else None)
        self.block = ACTTransformerEncoder(kind, max_steps=config.max_steps, eps=config.eps,
                                           halting_bias_init=config.halting_bias_init, backend=config.backend)
        self.prelude = CausalStack(decoder_kind(layers[:start], inner.rotary_emb, text), config.backend) \
            if start else None
        self.coda = CausalStack(decoder_kind(layers[stop:], inner.rotary_emb, text), config.backend) \
            if stop < len(layers) else None
        self.post_init()

    def _init_weights(self, module):
        """Only the halting unit is ours to initialise (the inner model
        initialises its own modules, once)."""
        block = getattr(self, "block", None)
        if block is not None and module is block.halting:
            module.reset_parameters()
            with torch.no_grad():
                module.bias.fill_(self.config.halting_bias_init)

    @property
    def halting(self) -> nn.Linear:
        """The halting unit, nn.Linear(hidden_size, 1)."""
        return self.block.halting

    @property
    def backend(self) -> str:
        return self.config.backend

    def extra_repr(self) -> str:
        return (f"block={self.block_range}, max_steps={self.max_steps}, eps={self.eps}, "
                f"step_norm={self.step_norm}, backend={self.backend!r}, ponder_weight={self.config.ponder_weight}")

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def set_output_embeddings(self, value):
        self.model.set_output_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs):
        out = self.model.resize_token_embeddings(*args, **kwargs)
        self.config.vocab_size = self.model.config.vocab_size
        return out

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    # -- the core's hooks --------------------------------------------------------------------

    def _scope(self):
        if not self._routes_checked:
            check_routes_attention(self.model)
            self._routes_checked = True
        return ours(self.model.config)

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model.model.embed_tokens(tokens)      # positions reach the layers as rotary embeddings

    def _head(self, h: Tensor) -> Tensor:
        if not (self.step_norm and self.coda is None):
            h = self.model.model.norm(h)
        return linear_rows(self.model.lm_head, h)

    def _lm_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.model.loss_function(logits, labels, vocab_size=self.vocab_size)

    # -- training ---------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                exit: Optional[str] = None, threshold: Optional[float] = None, min_steps: int = 1,
                every_loop: bool = False) -> LoopedCausalLMOutput:
        """input_ids (B, L) int64; attention_mask as in transformers (1 at real
        tokens, left or right padding; anything else is refused); labels (B,
        L), -100 ignored, shifted inside as transformers does. Positions count
        from each sequence's first real token; padding is never a row.

        exit (inference only: under no_grad or in eval, design §16): "act"
        (ACT's mean field, the default), "gate" (the halting unit read as an
        exit gate, exit once the exit mass reaches threshold), "latent"
        (exit once ||s_t - s_t-1|| / ||s_t|| < threshold) or "fixed" (every
        token max_steps: the model with its block unrolled), each a hard
        exit at or after min_steps whose output is the state at the exit;
        "kl" (below, in `generate`) reads the coda at every step: here the
        tokens are fed one position at a time through a cache, every one
        exiting on its own as a decoded token does (the logits and steps of
        feeding each row token by token with `extend(..., decode=True)`; one
        call per position, not one, and no autograd graph).
        `.steps` are then the exit steps, `.ponder_cost` the steps run.
        every_loop: the reference mode that computes every loop for every
        token and picks each token's exit afterwards (no token freezes)."""
        rule = self._exit_rule(exit, threshold, min_steps, every_loop)
        valid = self._check_ids(input_ids, attention_mask)
        if labels is not None:
            self._check_labels(labels, input_ids)
        logits, cost, steps = self._forward_tokens(input_ids, valid, rule)
        loss = lm_loss = None
        if labels is not None:
            labels = labels.masked_fill(~valid, -100)        # padding is never a target (its logits are 0)
            lm_loss = loss = self._lm_loss(logits, labels)
            if self.config.ponder_weight:
                loss = lm_loss + self.config.ponder_weight * (cost.sum() / valid.sum().clamp(min=1))
        return LoopedCausalLMOutput(loss=loss, logits=logits, lm_loss=lm_loss, ponder_cost=cost, steps=steps)

    def pondernet(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, *, beta: float = 0.01, prior: float = 0.2,
                  entropy: bool = False) -> PonderNetTerms:
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
        return self._pondernet_terms(input_ids, attention_mask, labels, beta, prior, entropy)

    # -- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, generation_config=None,
                 logits_processor=None, stopping_criteria=None, streamer=None, *,
                 generator: Optional[torch.Generator] = None, max_batch_size: Optional[int] = None,
                 schedule: str = "depthwise", fixed_rows: bool = False, exit: Optional[str] = None,
                 threshold: Optional[float] = None, min_steps: int = 1, prefill_steps: Optional[int] = None,
                 every_loop: bool = False, **kwargs):
        """Batched generation with transformers' conventions. generation_config
        (default: the model's) updated by keyword arguments (max_new_tokens,
        do_sample, temperature, top_k, top_p, repetition_penalty,
        min_new_tokens, eos_token_id, pad_token_id, return_dict_in_generate,
        output_scores, ...); the scores go through transformers' own logits
        processors and warpers, then `logits_processor`; `stopping_criteria`
        and eos end a sequence; `streamer` (e.g. TextStreamer, batch size 1)
        receives the prompt and each new token. Sampling draws row i's tokens
        from its own generator, seeded by the i-th of B seeds drawn from
        `generator` at the start, so a fixed generator repeats them whatever
        the schedule or max_batch_size.

        Each prompt is its row's real tokens (attention_mask, left or right
        padding); every token ponders on its own over one ragged cache, and
        with max_batch_size at most that many sequences run at once, a
        finished sequence's slot taking the next prompt (continuous batching;
        depth-wise, the prompts that wait are prefilled ahead in calls of up
        to max_batch_size prompts, so the cache holds up to twice that many
        sequences).
        Returns the sequences (B, L + new) as transformers lays them out: the
        input as given (its padding kept), then the new tokens, pad_token_id
        after a sequence's end, no column after the last new token of any
        row. With return_dict_in_generate=True: a LoopedGenerateOutput with
        `.sequences`, `.steps` (every token's ponder steps, 0 at padding),
        `.scores` (output_scores=True) and `.iterations` (how many times the
        block ran). The model runs in eval mode for the call.

        schedule: "depthwise" (every sequence advances on its own, design
        §17) or "synchronous" (one decode call per new token of every
        sequence); the same output. fixed_rows (depthwise only): every block
        iteration runs one row per slot, idle slots included, so the block's
        shapes never change. exit, threshold, min_steps, every_loop: the exit
        rule, as in `forward`, and "kl" (Huginn's criterion): a token exits at
        the first step t >= max(2, min_steps) whose next-token distribution
        (the coda and head run on the in-flight tokens at every step) is
        within KL threshold of step t - 1's; prompt tokens run prefill_steps
        (default max_steps), under either schedule."""
        config, tokenizer = call_config(self, generation_config, kwargs)
        valid = self._check_ids(input_ids, attention_mask)
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"a streamer takes one sequence (batch size 1, as transformers' streamers), got "
                             f"{input_ids.shape[0]}")
        check_generator(generator)
        ends, pad = eos_and_pad(config)
        length = input_ids.shape[1]
        max_new = config.max_new_tokens if config.max_new_tokens is not None else max(config.max_length - length, 0)
        rule = self._exit_rule(exit, threshold, min_steps, every_loop, prefill_steps)
        # the eos and pad tensors transformers' processors read (min_new_tokens among them)
        self._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device)
        processors = self._get_logits_processor(generation_config=config, input_ids_seq_length=length,
                                                encoder_input_ids=input_ids, logits_processor=logits_processor,
                                                device=input_ids.device, model_kwargs={})
        chooser = Chooser(input_ids, valid, config, processors, criteria(config, stopping_criteria, tokenizer),
                          streamer, ends, generator)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = self._generate(input_ids, valid, max_new, choose=chooser.choose, stop=chooser.stop,
                             on_token=chooser.on_token if streamer is not None else None,
                             max_batch_size=max_batch_size, schedule=schedule, fixed_rows=fixed_rows, rule=rule)
        if streamer is not None:
            streamer.end()
        sequences, steps = lay_out(input_ids, valid, out, pad)
        if not config.return_dict_in_generate:
            return sequences
        scores = scores_by_column(out.scores, input_ids.shape[0], self.vocab_size, self.get_output_embeddings().weight) \
            if config.output_scores else None
        return LoopedGenerateOutput(sequences=sequences, steps=steps, scores=scores, iterations=out.iterations)


__all__ = ["LoopedCausalLM", "LoopedCausalLMOutput"]
