"""Continuous depth-wise batching for generation (design §17): each sequence
advances on its own, so one block iteration holds tokens of different
sequences at different ponder steps, and the block runs about mean-N times
per generated token instead of the batch's max-N.

State per slot (one sequence each): its in-flight token, that token's step n,
its visible state s^(n-1), ACT's running sum and mean-field accumulator, and
the token's key/value rows so far in a fixed place per slot (M + 1 rows at
the block's first layer, M at the others) in a tail the cache's buffers
reserve, so that the attention reads the cache and them as one tensor. One
iteration:

- entering tokens (sampled at the previous iteration) run the prelude: s^0;
- the block once over every in-flight token, each at its own step n: the
  attention reads its sequence's cached tokens through the index, first layer
  row min(n - 1, N_j), later layers min(n, N_j) (design §14), each row's n
  taken from a tensor, and the token's own rows in the tail;
- ACT's halting (§1), one kernel call with each row's own step; one device
  read: which rows halted;
- the tokens that halted get their first-layer row of s^N, move their rows
  into the block's cache (N + 1 and N rows: never M), and go through the
  coda, final norm, head and sampling; their sequences feed the sampled token
  at the next iteration. A finished sequence frees its slot for the next
  prompt, which is prefilled as one chunk through the parallel path (the
  slot scheduler of generation/scheduler.py drives this block).

Causality makes every interleaving exact: a token's states depend only on the
earlier tokens of its own sequence, all in the cache before it enters.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..backends import resolve_encoder
from ..ops.act import get_kernels
from ..ops.state import accumulation_dtype
from ..layers.cache import SlotLayout
from ..layers.rows import BufferStep
from ..layers.exits import ExitRule, LatestLogits, exits_now


class DepthwiseBlock:
    """The pondered block's in-flight tokens, one per slot, stepped one ponder
    step per `iterate` call. `block` is an ACTTransformerEncoder (any layer
    kind), `cache` its ACTCache, `attention` the concrete attention backend.
    exit: an inference exit rule (design §16) in place of ACT's halting; a
    rule that reads the coda needs peek(states (R, D), slots) -> their
    next-token logits, without touching the coda's cache."""

    def __init__(self, block, cache, attention: str, exit: Optional[ExitRule] = None,
                 peek: Optional[Callable] = None):
        kind = block.kind
        self.exit, self.peek = exit, peek
        # the gate's per-row exit mass and survival (the other rules keep nothing between steps)
        self.exit_state = exit.new_state(cache.batch_size, cache.device, cache.dtype) if exit is not None else None
        if exit is not None and exit.every_loop:
            self.picked = torch.zeros(cache.batch_size, dtype=torch.bool, device=cache.device)
            self.picked_state = torch.zeros(cache.batch_size, block.kind.d_model, device=cache.device,
                                            dtype=cache.dtype)
            self.picked_step = torch.zeros(cache.batch_size, dtype=torch.int64, device=cache.device)
        # under a rule that reads the coda: each slot's logits at its latest step (`LatestLogits`)
        self.latest = LatestLogits(cache.batch_size)
        self.block, self.cache, self.kind, self.attention = block, cache, kind, attention
        self.max_steps = block.max_steps
        slots, device, dtype = cache.batch_size, cache.device, cache.dtype
        self.acc = accumulation_dtype(dtype)
        self.dtype, self.device = dtype, device
        self.width = [self.max_steps + 1] + [self.max_steps] * (len(kind) - 1)   # tail rows per slot and layer
        # the in-flight rows live in a tail the cache's buffers reserve: the
        # attention reads the cache and them as one tensor, through one index
        for layer, w in zip(cache.layers, self.width):
            layer.reserve_tail(slots * w)
        self.state = torch.zeros(slots, kind.d_model, device=device, dtype=dtype)
        self.mean = torch.zeros(slots, kind.d_model, device=device, dtype=self.acc)
        self.running_sum = torch.zeros(slots, device=device, dtype=self.acc)
        self.step = torch.zeros(slots, dtype=torch.int64, device=device)
        self.host_step = [0] * slots
        weight = block.halting.weight
        self.halt_w, self.halt_b = weight.reshape(-1), block.halting.bias.reshape(())
        # ACT's halting step, one fused call with a step per row, from the
        # kernels the block's backend resolves to (Triton, CUDA, the
        # extension's CPU step, or the twins)
        self.halting_step = get_kernels(resolve_encoder(block.backend, device, dtype).kernels).halting_step
        self.halt_threshold = torch.full((1,), 1.0 - block.eps, dtype=self.acc, device=device)
        # the kernel's steps and remainder outputs: the host keeps the steps, S needs no R
        self.halted_at = torch.zeros(slots, dtype=torch.int64, device=device)
        self.remainder = torch.zeros(slots, device=device, dtype=self.acc)
        self.iterations = 0

    def enter(self, slots: Sequence[int], s0: Tensor) -> None:
        """New tokens of these slots, with their prelude outputs s^0."""
        index = torch.tensor(list(slots), dtype=torch.int64).to(self.device)
        self.state.index_copy_(0, index, s0.to(self.dtype))
        self.mean.index_fill_(0, index, 0)
        self.running_sum.index_fill_(0, index, 0)
        self.step.index_fill_(0, index, 0)
        if self.exit_state is not None:
            self.exit_state.reset(index)
        if self.exit is not None and self.exit.every_loop:
            self.picked.index_fill_(0, index, False)
        for s in slots:
            self.host_step[s] = 0

    @torch.no_grad()
    def iterate(self, slots: Sequence[int], positions: Tensor, active: Optional[Sequence[bool]] = None,
                read_with: Optional[Tensor] = None):
        """One ponder step of the in-flight tokens of `slots` (ascending);
        positions (R,): each token's position in its sequence, which is
        its place in the cache (its sequence's cached length). `active`
        (fixed rows, design §17): a flag per slot listed, False for a slot
        with no token in flight, whose row runs with the others and is
        ignored (it never halts and its state is reset when a token enters).
        read_with: int64 values the caller needs on the host, read together
        with the halting flags (one device read per iteration). Returns the
        halted slots (a host list), their outputs (ACT's mean field S, or
        the state at the exit), their steps (host ints, or under every_loop
        the steps the rule picked, on the device) and read_with's values (a
        host list)."""
        self.iterations += 1
        slots = list(slots)
        count = len(slots)
        cache = self.cache
        index = torch.tensor(slots, dtype=torch.int64).to(self.device)
        if active is None:
            live = None
            for s in slots:
                self.host_step[s] += 1
            self.step.index_add_(0, index, torch.ones_like(index))
        else:
            live = torch.tensor(list(active), dtype=torch.bool).to(self.device)
            for s, flag in zip(slots, active):
                self.host_step[s] += int(flag)
            self.step.index_add_(0, index, live.long())
        cache.widen(max(cache.lengths[s] for s in slots) + 1)     # room for every in-flight token's place
        n = self.step[index]                                       # (R,) every row's own step
        if live is not None:
            n = n.clamp(min=1)                                     # an idle row reads like a first step
        # every slot's cached tokens through the cache's own tables, each slot
        # at its in-flight token's step (a free slot's rows are never read)
        layout = SlotLayout(cache, index, positions)
        reached = layout.reached(cache, self.step.clamp(min=1))
        # this step's buffer row of every slot, in the tail that follows the cache's rows
        own = [index * width + (n + (layer.tail_start - 1)) for layer, width in zip(cache.layers, self.width)]
        tables = [layout.table(rows, mine) for rows, mine in zip(reached, own)]
        step = BufferStep(self.kind, self.state[index], positions, cache.layers, own, tables, layout, self.attention)
        x = step(step.changed, n, index)
        if self.exit is None:
            halt = self._act_halting(index, n, x)
        else:
            halt = self._exit_rule(index, n, x, slots)
        if live is not None:
            halt = halt & live
        self.state.index_copy_(0, index, x)
        if read_with is None:
            flags, values = halt.tolist(), []                      # the iteration's one device read
        else:
            both = torch.cat([halt.long(), read_with]).tolist()
            flags, values = both[:count], both[count:]
        halted_local = [i for i, flag in enumerate(flags) if flag]
        self.halted_local = halted_local
        if not halted_local:
            return [], None, [], values
        halted = [slots[i] for i in halted_local]
        steps = [self.host_step[s] for s in halted]
        # what the host knows, made into index tensors in one go: the halted
        # rows, their slots and the tail row of each one's s^N
        width = self.width[0]
        base = self.cache.layers[0].tail_start
        small = torch.tensor([halted_local, halted, [base + s * width + n for s, n in zip(halted, steps)]],
                             dtype=torch.int64).to(self.device)
        local, h_index = small[0], small[1]
        # s^N's first-layer row: later tokens read it (design §14)
        step.write(0, step.math[0].key_values(x[local], local), small[2])
        self._commit(halted, steps)
        if self.exit is None:
            return halted, self.mean[h_index].to(self.dtype), steps, values
        if self.exit.every_loop:   # the state and step the rule picked on the way
            return halted, self.picked_state[h_index], self.picked_step[h_index], values
        return halted, x[local], steps, values

    def _act_halting(self, index: Tensor, n: Tensor, x: Tensor) -> Tensor:
        """ACT's halting (design §1) on the rows `index` (ascending slots),
        each at its own step n: the running sums and the mean field S
        updated in one kernel call."""
        _, _, halt = self.halting_step(x, index, self.halt_w, self.block.halting.bias, self.halt_threshold,
                                       self.running_sum, self.mean, self.halted_at, self.remainder, n,
                                       self.max_steps)
        return halt

    def _exit_rule(self, index: Tensor, n: Tensor, x: Tensor, slots: List[int]) -> Tensor:
        """An inference exit rule (design §16) on the rows, each at its own step."""
        logits = previous = None
        if self.exit.reads_coda:
            logits = self.peek(x, slots)
            previous = self.latest.update(index, logits)
        fired = exits_now(self.exit, n, self.max_steps, x, self.state[index], self.halt_w, self.halt_b,
                          self.exit_state, index, logits, previous)
        if not self.exit.every_loop:
            return fired
        fresh = fired & ~self.picked[index]
        where = index[fresh]
        self.picked.index_fill_(0, where, True)
        self.picked_state.index_copy_(0, where, x[fresh])
        self.picked_step.index_copy_(0, where, n[fresh])
        return n >= self.max_steps                   # every token runs every loop

    @property
    def latest_logits(self) -> Optional[Tensor]:
        """(slots, V): each slot's next-token logits at its latest step (the
        step before, once its next step runs): a halted token's logits at its
        exit step, which the scheduler reads under `peeked_exit`."""
        return self.latest.logits

    @property
    def peeked_exit(self) -> bool:
        """Whether a halted token's output is the state the rule peeked at
        through the coda at its exit step (so its next-token logits and coda
        rows are those of the peek): a rule that reads the coda, without
        every_loop (which runs on past the exit)."""
        return self.exit is not None and self.exit.reads_coda and not self.exit.every_loop

    def _commit(self, halted: List[int], steps: List[int]) -> None:
        """The halted tokens' rows into the cache, token by token: N + 1 at the
        first layer, N at the others. Which tail rows those are is host
        arithmetic on slots and steps (a few dozen numbers), made into one
        index tensor per layer."""
        counts = [[n + 1 for n in steps]] + [list(steps)] * (len(self.width) - 1)
        picked = [[layer.tail_start + slot * width + j for slot, count in zip(halted, per_token) for j in range(count)]
                  for layer, width, per_token in zip(self.cache.layers, self.width, counts)]
        sizes = [len(p) for p in picked]
        flat = torch.tensor([j for p in picked for j in p], dtype=torch.int64).to(self.device).split(sizes)
        rows = [(layer.k[at], layer.v[at]) for layer, at in zip(self.cache.layers, flat)]
        self.cache.append_tokens(halted, rows, counts, steps)


SCHEDULES = ("depthwise", "synchronous")


def check_schedule(schedule, fixed_rows=False) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(fixed_rows, bool):
        raise TypeError(f"fixed_rows must be a bool, got {type(fixed_rows).__name__}")
    if fixed_rows and schedule != "depthwise":
        raise ValueError("fixed_rows applies to schedule='depthwise' only")


__all__ = ["DepthwiseBlock", "check_schedule", "SCHEDULES"]
