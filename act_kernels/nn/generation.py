"""Batched generation over ragged caches, shared by the looped language
models (design §14): each prompt is fed as one chunk, then one token per
running sequence per call; a finished sequence's last token is fed once more
so that every token has its steps; with fewer slots than prompts, a freed
slot takes the next prompt in the next call (continuous batching).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class SequenceDraws:
    """Sampling that does not depend on the scheduling: sequence i draws its
    t-th token from its own generator, seeded by the i-th of len(prompts)
    seeds drawn from the caller's generator at the start (or from torch's
    default generator when none is given)."""

    def __init__(self, generator: Optional[torch.Generator], count: int):
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**62, (count,), generator=generator, device=device).tolist()
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.device = device

    def __call__(self, probs: Tensor, sequences: Sequence[int]) -> Tensor:
        """One draw per row of probs (S, V), row r from sequence sequences[r]'s generator."""
        rows = probs.to(self.device)
        drawn = [torch.multinomial(row, 1, generator=self.generators[i]) for row, i in zip(rows, sequences)]
        return torch.cat(drawn).to(probs.device)


def eos_ids(eos) -> Tuple[int, ...]:
    """The end-of-sequence ids as a tuple: none, one id, or several."""
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def generate_batched(extend: Callable, steps_of_call: Callable[[], Tensor], caches: Sequence, prompts: Sequence[Tensor],
                     max_new_tokens: int, eos: Optional[int], max_len: Optional[int],
                     choose: Callable[[Tensor], Tensor]) -> Tuple[List[Tensor], List[List[Tensor]], List[List[Tensor]]]:
    """extend(caches, tokens, offsets, slots) -> logits of the call's tokens;
    steps_of_call() -> their ponder steps; choose(logits (S, V), sequences)
    -> (S,) the next tokens of those sequences. Returns each sequence (prompt + generated tokens), the steps
    of every call's chunk, and the logits each generated token was chosen from."""
    slots = caches[0].batch_size
    waiting = list(range(len(prompts)))
    tokens = [p.clone() for p in prompts]                    # each sequence so far
    steps: List[List[Tensor]] = [[] for _ in prompts]
    scores: List[List[Tensor]] = [[] for _ in prompts]
    in_slot = [None] * slots                                  # the prompt a slot serves
    fed = [0] * len(prompts)                                  # tokens of each sequence already in its cache
    finished = [False] * len(prompts)
    ends = eos_ids(eos)
    while waiting or any(i is not None for i in in_slot):
        for slot in range(slots):
            if in_slot[slot] is None and waiting:
                in_slot[slot] = waiting.pop(0)
                for cache in caches:
                    cache.reset(slot)
        busy = [slot for slot in range(slots) if in_slot[slot] is not None]
        chunks = [tokens[in_slot[s]][fed[in_slot[s]]:] for s in busy]
        offsets = [0]
        for c in chunks:
            offsets.append(offsets[-1] + c.numel())
        logits = extend(caches, torch.cat(chunks), offsets, busy)
        call_steps = steps_of_call()
        choosing = []
        for j, slot in enumerate(busy):
            i = in_slot[slot]
            steps[i].append(call_steps[offsets[j]:offsets[j + 1]].clone())
            fed[i] = tokens[i].numel()
            generated = tokens[i].numel() - prompts[i].numel()
            if generated >= max_new_tokens or (max_len is not None and tokens[i].numel() >= max_len):
                finished[i] = True
            if finished[i]:
                # every token of the sequence is in the cache and has its steps: the slot is free
                in_slot[slot] = None
            else:
                choosing.append((i, offsets[j + 1] - 1))
        if not choosing:
            continue
        rows = logits[torch.tensor([r for _, r in choosing], device=logits.device)]
        # the next tokens of every running sequence, brought to the host in one read per call
        chosen = choose(rows, [i for i, _ in choosing])
        for (i, _), row, nxt, value in zip(choosing, rows, chosen, chosen.tolist()):
            scores[i].append(row)
            tokens[i] = torch.cat([tokens[i], nxt.view(1)])
            if value in ends:
                finished[i] = True    # its last token is fed next round, for its steps
    return tokens, steps, scores


__all__ = ["generate_batched", "SequenceDraws", "eos_ids"]
