"""Batched generation over ragged caches (design §14, §17): one slot
scheduler, two policies. Each slot serves one sequence at a time: a prompt
is fed as one chunk through the parallel path, a sequence's last token is
fed once more so that every token has its steps, and a finished sequence
frees its slot for the next prompt (continuous batching). "synchronous"
feeds one token of every running sequence per parallel call, pondered
together; "depthwise" steps every sequence on its own (`DepthwiseBlock`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .depthwise import DepthwiseBlock, check_schedule


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


class Generated(NamedTuple):
    """Per prompt: prompt + generated tokens (int64, on the prompt's device),
    the steps of every feed, the scores choose returned per generated token;
    and the depth-wise engine's block iterations (0 under "synchronous")."""
    sequences: List[Tensor]
    steps: List[List[Tensor]]
    scores: List[List[Tensor]]
    iterations: int


@dataclass
class Run:
    """One sequence, from its prompt to its last token."""
    index: int                     # its prompt's position in `prompts`
    prompt: Tensor
    tokens: List[int]              # prompt + the generated tokens whose values the host knows
    feed: Tensor                   # its tokens not yet in its cache, on the device: the prompt, then
                                   # (synchronous) each chosen token; depthwise keeps those in one row per slot
    made: int = 0                  # tokens generated, values known on the host or not
    last: bool = False             # its newest token ends it: fed once more for its steps, then the slot frees
    steps: List[Tensor] = field(default_factory=list)
    scores: List[Tensor] = field(default_factory=list)


class Slots:
    """The slot table both policies share: refill, parallel feeds, choosing,
    the host learning a token's value, finishing."""

    def __init__(self, prefill, caches, prompts, max_new_tokens, choose, stop, on_token, max_len,
                 running: Optional[int] = None):
        self.prefill, self.caches, self._choose, self.stop, self.on_token = prefill, caches, choose, stop, on_token
        # at most `running` sequences step at once; cache sequences past that hold prompts prefilled ahead
        self.running = caches[0].batch_size if running is None else running
        self.max_new_tokens, self.max_len = max_new_tokens, max_len
        # the prompts' tokens are read once, here: choose and stop see every sequence on the host
        self.runs = [Run(i, p, p.tolist(), p) for i, p in enumerate(prompts)]
        for run in self.runs:
            run.last = self.out_of_room(run)       # max_new_tokens = 0, or a prompt at max_len
        self.waiting = deque(self.runs)
        self.slots: List[Optional[Run]] = [None] * caches[0].batch_size

    def out_of_room(self, run: Run) -> bool:
        return run.made >= self.max_new_tokens or (
            self.max_len is not None and run.prompt.numel() + run.made >= self.max_len)

    def occupied(self) -> List[int]:
        return [s for s, run in enumerate(self.slots) if run is not None]

    def refill(self, limit: Optional[int] = None) -> List[int]:
        """Free slots take the next prompts (at most `limit` of them); returns those slots."""
        fresh = [s for s, run in enumerate(self.slots) if run is None][:min(len(self.waiting), limit or len(self.slots))]
        for s in fresh:
            self.slots[s] = self.waiting.popleft()
            for cache in self.caches:
                cache.reset(s)
        return fresh

    def feed(self, slots: List[int]) -> Tuple[List[int], Optional[Tensor]]:
        """The slots' pending tokens in one parallel call; the sequences that
        go on choose their next tokens from their last token's logits."""
        offsets = [0, *accumulate(self.slots[s].feed.numel() for s in slots)]
        logits, steps = self.prefill(self.caches, torch.cat([self.slots[s].feed for s in slots]), offsets, slots)
        going = [j for j, s in enumerate(slots) if self.fed(s, steps[offsets[j]:offsets[j + 1]].clone())]
        if not going:
            return [], None
        rows = torch.tensor([offsets[j + 1] - 1 for j in going], device=logits.device)
        return self.choose(logits[rows], [slots[j] for j in going])

    def fed(self, slot: int, steps: Tensor) -> bool:
        """The slot's pending tokens are in its cache, with these steps. True
        when its sequence goes on; else the slot is free."""
        run = self.slots[slot]
        run.steps.append(steps)
        if run.last:
            self.slots[slot] = None
        return not run.last

    def choose(self, logits: Tensor, slots: List[int]) -> Tuple[List[int], Tensor]:
        """The slots and the next tokens of their sequences (on the device),
        from their logits (S, V); records the scores choose returns."""
        runs = [self.slots[s] for s in slots]
        tokens, scores = self._choose(logits, [r.index for r in runs], [r.tokens for r in runs])
        for run, row in zip(runs, scores):
            run.scores.append(row)
            run.made += 1
            run.last = self.out_of_room(run)
        return slots, tokens

    def known(self, slot: int, value: int) -> None:
        """The host has read the value of the slot's newest token."""
        run = self.slots[slot]
        run.tokens.append(value)
        if self.on_token is not None:
            self.on_token(run.index, value)
        if self.stop is not None and self.stop(run.index, run.tokens):
            run.last = True


def synchronous(table: Slots) -> int:
    """One parallel call per round: the new prompts and one token of every
    running sequence, pondered together."""
    while table.waiting or table.occupied():
        table.refill()
        going, chosen = table.feed(table.occupied())
        if going:   # the chosen tokens' values, brought to the host in one read per call
            for s, token, value in zip(going, chosen.split(1), chosen.tolist()):
                table.slots[s].feed = token
                table.known(s, value)
    return 0


def depthwise(table: Slots, embed: Callable, prelude, block, coda, head: Callable, attention: str,
              fixed_rows: bool, exit, enter: Optional[Callable] = None) -> int:
    """Every sequence steps on its own through one DepthwiseBlock (design
    §17). A chosen token stays on the device, in its slot's row of
    next_token: it enters the next iteration from there, and the host learns
    its value from that iteration's one read (with the halting flags), before
    the token can halt, so that choose and stop see every sequence whole.

    With more cache sequences than table.running, prompts are prefilled
    ahead: whenever no prefilled sequence waits to start, free cache
    sequences take up to table.running waiting prompts in one prefill call
    (their first tokens chosen there), and those sequences start stepping
    as running ones finish.
    A prefill call's host work and per-step passes do not grow with its
    prompts (design §17 measures a prompt alone at about twice its share of
    a call of 16), so a queue's prompts are prefilled in a few large calls,
    not one call per freed slot."""
    caches, device = iter(table.caches), table.caches[0].device     # one per stack present, in order
    prelude_cache, block_cache, coda_cache = [None if m is None else next(caches) for m in (prelude, block, coda)]
    tensor = partial(torch.tensor, dtype=torch.int64)

    def next_logits(h: Tensor, slots: List[int], commit: bool = True) -> Tensor:
        """The next-token logits of one state per slot: the coda (appending to
        its cache, or, with commit=False, leaving it as it was), then the head."""
        if coda is not None:
            where = tensor([coda_cache.lengths[s] for s in slots]).to(device)
            h = coda.extend(coda_cache, h, list(range(len(slots) + 1)), slots, positions=where, commit=commit)
        return head(h)

    engine = DepthwiseBlock(block, block_cache, attention, exit, partial(next_logits, commit=False))

    def logits_of(h: Tensor, slots: List[int]) -> Tensor:
        """Halted tokens' next-token logits from what is kept of them: their
        outputs, or the logits a rule that reads the coda peeked at."""
        return h if engine.peeked_exit else next_logits(h, slots)
    next_token = torch.zeros(len(table.slots), dtype=torch.int64, device=device)
    chosen: List[int] = []     # the slots whose next token is chosen and waits to enter
    staged: deque = deque()    # prefilled slots, their first token chosen, waiting for room to start
    held: List[int] = []       # halted slots whose coda waits: their sequences are ahead (`hold`)
    held_out: List[Tensor] = []   # their outputs (or, a rule that read the coda, their logits)

    def take(slots: List[int], tokens: Optional[Tensor], into=chosen) -> None:
        if slots:
            next_token.index_copy_(0, tensor(slots).to(device), tokens)
            into.extend(slots)

    while table.waiting or table.occupied():
        if not staged:
            fresh = table.refill(table.running)     # a prefill call holds at most max_batch_size prompts
            if fresh:
                take(*table.feed(fresh), into=staged)
        room = table.running - (len(table.occupied()) - len(staged))
        chosen.extend(staged.popleft() for _ in range(min(room, len(staged))))
        entering, entered = sorted(chosen), None
        chosen.clear()
        if entering:
            where = tensor([block_cache.lengths[s] for s in entering]).to(device)
            entered = next_token[tensor(entering).to(device)]
            h = embed(entered, where)
            if prelude is not None:
                h = prelude.extend(prelude_cache, h, list(range(len(entering) + 1)), entering, positions=where)
            engine.enter(entering, h if enter is None else enter(h))
        # every other occupied slot has a token in flight, or is staged
        running = [s for s in table.occupied() if s not in held and s not in staged]
        if not running:
            if held:                   # nothing left to wait for
                slots, h = release(held, held_out)
                take(*table.choose(logits_of(h, slots), slots))
            continue
        active = [run is not None and s not in held for s, run in enumerate(table.slots)] if fixed_rows else None
        if fixed_rows:                 # one row per slot, the free ones idle
            running = list(range(len(table.slots)))
        positions = tensor([block_cache.lengths[s] for s in running]).to(device)
        halted, out, halted_steps, values = engine.iterate(running, positions, active, entered)
        for s, value in zip(entering, values):
            table.known(s, value)
        if not halted:
            continue
        reported = torch.as_tensor(halted_steps, dtype=torch.int64, device=device)
        going = [j for j, s in enumerate(halted) if table.fed(s, reported[j:j + 1])]
        if going:
            slots = [halted[j] for j in going]
            if engine.peeked_exit:   # the rule ran the coda and head on these states at their exit step
                if coda is not None:     # its scratch rows last this iteration: committed now, held or not
                    coda.commit_peeked(coda_cache, slots, tensor([engine.halted_local[j] for j in going]).to(device))
                h = engine.latest_logits[tensor(slots).to(device)]      # their next-token logits
            else:
                h = out[tensor(going).to(device)] if len(going) < len(halted) else out
            if not staged and hold(table, slots, held):
                held.extend(slots)
                held_out.append(h)
                continue
            if held:                 # the coda (or the choice) runs now: the held tokens go with these
                slots, h = release(held, held_out, slots, h)
            take(*table.choose(logits_of(h, slots), slots))
    for layer in block_cache.layers:       # the in-flight rows' tail is no longer needed
        layer.reserve_tail(0)
    return engine.iterations


# a sequence at least this many tokens ahead of the slowest running one may wait for its coda (`hold`)
HOLD_AHEAD = 2


def hold(table: Slots, halted: List[int], held: List[int]) -> bool:
    """Whether the coda of these halted tokens (their sequences' next
    tokens, the prelude of those; under a rule that read the coda, which
    ran at the exit step, the choice and the prelude) waits for a later
    iteration. Each coda
    or prelude call reads its layers' weights whatever its rows, so an
    iteration costs about two layer calls more when tokens halt in it; a
    batch whose run is bound by its slowest sequences gains by running them
    only when one of those halts (with everything held till then). So: no
    prompt waits for a slot (a free slot would be work lost), each of
    these sequences is HOLD_AHEAD tokens or more ahead of the slowest
    running one, and some other token is still in flight to wait for."""
    if table.waiting:
        return False
    runs = [(s, run) for s, run in enumerate(table.slots) if run is not None]
    slowest = min(run.made for _, run in runs)
    if any(table.slots[s].made < slowest + HOLD_AHEAD for s in halted):
        return False
    waiting_for_coda = set(held) | set(halted)
    return any(s not in waiting_for_coda for s, _ in runs)


def release(held: List[int], held_out: List[Tensor], slots: Sequence[int] = (), h: Optional[Tensor] = None):
    """The held slots with `slots`, ascending (the order every stack's call
    takes), and their outputs in that order; empties the held lists."""
    everyone = list(held) + list(slots)
    rows = torch.cat([*held_out] + ([h] if h is not None else []))
    order = sorted(range(len(everyone)), key=everyone.__getitem__)
    held.clear()
    held_out.clear()
    return [everyone[i] for i in order], rows[torch.tensor(order, device=rows.device)]


def generate_slots(schedule: str, *, prefill: Callable, caches: Sequence, prompts: Sequence[Tensor],
                   max_new_tokens: int, choose: Callable, stop: Optional[Callable] = None,
                   on_token: Optional[Callable] = None, max_len: Optional[int] = None, embed: Optional[Callable] = None,
                   prelude=None, block=None, coda=None, head: Optional[Callable] = None,
                   attention: Optional[str] = None, fixed_rows: bool = False, exit=None,
                   enter: Optional[Callable] = None, running: Optional[int] = None) -> Generated:
    """Generates after every prompt, over caches (one per stack; their
    batch size is the number of slots).

    prefill(caches, tokens, offsets, slots) -> (logits (T, V), steps (T,)):
    the parallel path, one chunk per slot. choose(logits (S, V), seqs,
    histories) -> (tokens (S,) int64 on logits' device, scores (S, V)):
    histories[k], sequence seqs[k]'s tokens so far (a host list, read only).
    stop(i, history) -> bool and on_token(i, value): called as each
    generated token's value reaches the host, in order; stop's True ends
    sequence i after that token. max_len: a sequence ends at that length.

    "depthwise" only: embed(tokens, positions) -> rows; prelude / block /
    coda: the CausalStacks (or None) and the ACTTransformerEncoder the
    caches follow; head(h) -> logits; attention: the concrete attention
    backend; fixed_rows: one row per slot in every block iteration; exit:
    an inference exit rule (design §16) in place of ACT's halting; enter(h)
    -> the block's input rows from the prelude's (None: h itself); running:
    at most this many sequences step at once (default: every cache
    sequence), the other cache sequences take prompts prefilled ahead."""
    check_schedule(schedule, fixed_rows)
    if running is not None and not 1 <= running <= caches[0].batch_size:
        raise ValueError(f"running must be in [1, {caches[0].batch_size}] (the caches' batch size), got {running!r}")
    if running is not None and running != caches[0].batch_size and (schedule != "depthwise" or fixed_rows):
        raise ValueError("running below the caches' batch size (prompts prefilled ahead) needs schedule='depthwise' "
                         "without fixed_rows: the other modes step every cache sequence")
    table = Slots(prefill, caches, prompts, max_new_tokens, choose, stop, on_token, max_len, running)
    if schedule == "synchronous":
        iterations = synchronous(table)
    else:
        iterations = depthwise(table, embed, prelude, block, coda, head, attention, fixed_rows, exit, enter)
    runs = table.runs
    return Generated([torch.tensor(r.tokens, dtype=torch.int64, device=r.prompt.device) for r in runs],
                     [r.steps for r in runs], [r.scores for r in runs], iterations)


__all__ = ["generate_slots", "Generated", "SequenceDraws", "eos_ids"]
