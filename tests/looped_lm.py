"""Prompts of different lengths through a looped LM's batched generate
(ACTLanguageModel, LoopedCausalLM): `padded` lays 1-D prompts out as the
(B, L) input_ids and attention_mask generate takes (left padding, as
transformers pads, or right padding), `per_sequence` reads each sequence's
tokens, steps and scores back from the padded output, and `generate` does
both: per prompt, its tokens then the new ones, every token's steps, the new
tokens' scores (n_new, V)."""
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class PerSequence(NamedTuple):
    sequences: List[Tensor]            # the prompt's tokens, then its new tokens
    steps: List[Tensor]                # every token's steps, the same shape
    scores: Optional[List[Tensor]]     # (n_new, V): the scores that chose each new token
    iterations: int


def padded(prompts: Sequence[Tensor], left: bool = True, pad: int = 0):
    """(input_ids (B, L) int64, attention_mask (B, L) int64) for 1-D prompts."""
    width = max(p.numel() for p in prompts)
    device = prompts[0].device
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        at = slice(width - p.numel(), width) if left else slice(0, p.numel())
        ids[i, at], mask[i, at] = p, 1
    return ids, mask


def padded_batch(left: bool, vocab: int = 61, seed: int = 3):
    """(input_ids (3, 10), attention_mask (3, 10)): rows 0 and 2 padded by 3
    and 5 tokens (left or right), random ids under the padding too (what a
    model reads there must not matter)."""
    ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in ((0, 3), (2, 5)):
        if left:
            mask[row, :pad] = 0
        else:
            mask[row, -pad:] = 0
    return ids, mask


def per_sequence(out, input_ids: Tensor, attention_mask: Tensor) -> PerSequence:
    """Each sequence's real tokens, steps and scores from generate's
    return_dict_in_generate output: the input's real tokens, then the new
    tokens (a real token has steps >= 1, padding 0). Checks the layout: the
    input as given, each row's new tokens one run from the input's end."""
    length = input_ids.shape[1]
    assert torch.equal(out.sequences[:, :length], input_ids)
    assert torch.equal(out.steps[:, :length] > 0, attention_mask.bool())
    new = out.steps[:, length:] > 0
    counts = new.sum(1)
    assert torch.equal(new, torch.arange(new.shape[1], device=new.device)[None] < counts[:, None]), out.steps
    keep = torch.cat([attention_mask.bool(), new], 1)
    sequences = [s[k] for s, k in zip(out.sequences, keep)]
    steps = [s[k] for s, k in zip(out.steps, keep)]
    scores = None
    if out.scores is not None:
        assert len(out.scores) == new.shape[1]
        if out.scores:
            stacked = torch.stack(out.scores, 1)                       # (B, new, V)
            ended = torch.isinf(stacked).all(-1) & (stacked < 0).all(-1)
            assert torch.equal(ended, ~new)                            # -inf once a sequence has ended
            scores = [stacked[i, :n] for i, n in enumerate(counts.tolist())]
        else:
            scores = [out.sequences.new_zeros(0, 0, dtype=torch.float32) for _ in range(len(sequences))]
    return PerSequence(sequences, steps, scores, out.iterations)


def generate(model, prompts: Sequence[Tensor], max_new_tokens: int, *, left: bool = True, **kw) -> PerSequence:
    """model.generate on the prompts, padded (left or right), read back per sequence."""
    ids, mask = padded(prompts, left)
    out = model.generate(ids, mask, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True,
                         **kw)
    return per_sequence(out, ids, mask)


def decoded_token_by_token(model, ids: Tensor, mask: Tensor, rule):
    """Each row alone through a fresh cache, its real tokens fed one at a
    time as decoded tokens (`extend(..., decode=True)`) under the checked
    exit rule: logits (B, L, V) in the model's output dtype and steps
    (B, L), zero at padding."""
    logits, steps = None, torch.zeros(ids.shape, dtype=torch.int64)
    for row in range(ids.shape[0]):
        caches = model.new_cache(1)
        for j in mask[row].nonzero().flatten().tolist():
            out = model.extend(caches, ids[row, j:j + 1], [0, 1], [0], exit=rule, decode=True)[0]
            if logits is None:
                logits = out.new_zeros(*ids.shape, out.shape[-1])
            logits[row, j] = out
            steps[row, j] = model.block.steps[0]
    return logits, steps
