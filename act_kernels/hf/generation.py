"""transformers' generation conventions on the slot scheduler (design §15):
a GenerationConfig (the model's, or the caller's, updated by keyword
arguments), transformers' own logits processors and warpers (the model's
`_get_logits_processor`: repetition penalty, min_new_tokens, temperature,
top-k, top-p, ... and the caller's), stopping criteria and a streamer.

The scheduler asks for the next tokens of the sequences whose last token has
just halted, which need not have the same number of tokens (depth-wise
batching, continuous refill). Each row is shown to the processors exactly as
transformers' own generate would show it: the input row as given (padding
kept), then the row's generated tokens; rows of equal length go through the
processors together. Sampling draws from softmax of the processed scores,
each sequence from its own generator (`SequenceDraws`), so a draw does not
depend on the schedule or the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import MaxTimeCriteria, StopStringCriteria
from transformers.generation.logits_process import (EpsilonLogitsWarper, EtaLogitsWarper, MinPLogitsWarper,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                                    TypicalLogitsWarper)
from transformers.utils import ModelOutput

from ..generation.scheduler import SequenceDraws, eos_ids


WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper,
           EpsilonLogitsWarper, EtaLogitsWarper)


@dataclass
class LoopedGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: sequences (B, L + new)
    laid out as transformers lays them out; steps (same shape), every token's
    ponder steps, 0 at padding; scores (with output_scores=True) one (B, V)
    tensor of processed scores per new-token column, -inf in the rows of
    sequences that had already ended; iterations: how many times the block
    ran."""

    sequences: Optional[Tensor] = None
    steps: Optional[Tensor] = None
    scores: Optional[Tuple[Tensor, ...]] = None
    iterations: Optional[int] = None


def call_config(model, given: Optional[GenerationConfig], kwargs: dict):
    """The call's GenerationConfig as transformers' own generate makes it (the
    one given, else the model's, with the model's settings and transformers'
    defaults filled in, updated by the keyword arguments) and the tokenizer a
    pipeline passes for stop strings. What we do not run is refused: beam,
    contrastive, assisted and DoLa decoding, num_return_sequences > 1,
    outputs we do not produce, and unknown keywords."""
    tokenizer = kwargs.pop("tokenizer", None)
    kwargs.pop("assistant_tokenizer", None)
    config, unknown = model._prepare_generation_config(given, **kwargs)
    unknown = {k for k, v in unknown.items() if not (k in ("output_attentions", "output_hidden_states") and not v)}
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"generate runs greedy decoding and sampling, not {mode.value} (num_beams = "
                         f"{config.num_beams}, penalty_alpha = {config.penalty_alpha}, ...)")
    if (config.num_return_sequences or 1) != 1:
        raise ValueError(f"num_return_sequences must be 1, got {config.num_return_sequences}")
    for name in ("output_logits", "output_hidden_states", "output_attentions"):
        if getattr(config, name, False):
            raise ValueError(f"{name}=True is not produced: return_dict_in_generate gives sequences, steps, scores "
                             "and iterations")
    top_p = config.top_p
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        # transformers' top-p warper is skipped, not refused, at top_p >= 1
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
    return config, tokenizer


def criteria(config: GenerationConfig, given: Optional[StoppingCriteriaList], tokenizer):
    """The caller's stopping criteria, plus transformers' own for stop_strings
    and max_time (eos and the length are the scheduler's): None when there are
    none, so that a sequence's tokens are never gathered for nothing."""
    out = StoppingCriteriaList(given or [])
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=..., tokenizer=tok)")
        out.append(StopStringCriteria(stop_strings=config.stop_strings, tokenizer=tokenizer))
    if config.max_time is not None:
        out.append(MaxTimeCriteria(max_time=config.max_time))
    return out if len(out) else None


def eos_and_pad(config: GenerationConfig):
    ends = eos_ids(config.eos_token_id)
    if any(isinstance(e, bool) or not isinstance(e, int) for e in ends):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {config.eos_token_id!r}")
    pad = config.pad_token_id
    if pad is None:
        pad = ends[0] if ends else 0
    return ends, int(pad)


class Chooser:
    """The scheduler's choose / stop / on_token hooks for one generate call."""

    def __init__(self, input_ids: Tensor, valid: Tensor, config: GenerationConfig, processors: LogitsProcessorList,
                 stopping: Optional[StoppingCriteriaList], streamer, ends, generator: Optional[torch.Generator]):
        self.input_ids, self.prompt_lengths = input_ids, valid.sum(1).tolist()
        self.processors, self.stopping, self.streamer, self.ends = processors, stopping, streamer, set(ends)
        self.sample = bool(config.do_sample)
        # the warpers (temperature, top-k, top-p, ...) read only the scores; any other processor reads the sequences
        self.reads_ids = any(not isinstance(p, WARPERS) for p in processors)
        self.draws = SequenceDraws(generator, input_ids.shape[0]) if self.sample else None
        self.last_scores: dict = {}

    def _rows(self, seqs: List[int], histories: List[List[int]]) -> Tensor:
        """(S, L + n): each sequence as transformers' generate holds it (all of equal n)."""
        new = torch.tensor([h[self.prompt_lengths[i]:] for i, h in zip(seqs, histories)], dtype=torch.int64,
                           device=self.input_ids.device).view(len(seqs), -1)
        return torch.cat([self.input_ids[seqs], new], 1)

    def choose(self, logits: Tensor, seqs: List[int], histories: List[List[int]]):
        scores = logits
        if self.reads_ids:
            scores = logits.clone()
            made = [len(h) - self.prompt_lengths[i] for i, h in zip(seqs, histories)]
            for n in sorted(set(made)):            # rows of one length through the processors together
                at = [r for r, m in enumerate(made) if m == n]
                rows = self._rows([seqs[r] for r in at], [histories[r] for r in at])
                where = torch.tensor(at, device=logits.device)
                scores[where] = self.processors(rows, logits[where])
        elif len(self.processors):                 # warpers only: they never read input_ids, every row at once
            scores = self.processors(self.input_ids[:0], logits)
        if self.sample:
            tokens = self.draws(torch.softmax(scores.double(), -1), seqs)
        else:
            tokens = scores.argmax(-1)
        if self.stopping is not None:
            for i, row in zip(seqs, scores):
                self.last_scores[i] = row
        return tokens, scores

    def stop(self, i: int, history: List[int]) -> bool:
        if history[-1] in self.ends:
            return True
        if self.stopping is None:
            return False
        return bool(self.stopping(self._rows([i], [history]), self.last_scores[i][None]).any())

    def on_token(self, i: int, value: int) -> None:
        self.streamer.put(torch.tensor([value]))


__all__ = ["LoopedGenerateOutput", "Chooser", "call_config", "criteria", "eos_and_pad"]
