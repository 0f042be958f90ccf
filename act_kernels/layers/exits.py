"""Exit rules at inference (design §16): when a token leaves the block, read
per token, each a hard exit that returns the token's state at its exit step
(ACT's mean field stays the training rule and the default).

    gate    λ_t = σ(w·s_t + c), p_t = λ_t Π_{j<t} (1 − λ_j) (p_M the rest);
            exit at the first t >= min_steps with Σ_{j<=t} p_j >= threshold
    latent  exit at the first t >= max(2, min_steps) with
            ||s_t − s_{t−1}|| / ||s_t|| < threshold
    kl      exit at the first t >= max(2, min_steps) with
            KL(P_t || P_{t−1}) < threshold, P_t the next-token distribution
            of s_t through the coda and head (tokens decoded one per
            sequence: `Peek`)
    fixed   every token max_steps

and at max_steps whatever the rule. An exited token freezes (design §9):
later tokens read its rows as they were at its exit, which the step
functions already do for halted tokens. The rule's arithmetic is written once
here, for a whole step's rows, with n a number or a per-row tensor, and
serves the parallel forward, the synchronous decode and the depth-wise
scheduler.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.state import accumulation_dtype

RULES = ("act", "gate", "latent", "kl", "fixed")


class ExitRule:
    """A checked hard exit rule (a strategy: one subclass per rule). Its
    threshold (None for fixed) and min_steps; prefill_steps: the fixed steps
    of prompt tokens under a rule that reads the coda (kl). every_loop: the
    reference mode (what computing every loop and picking the exit
    afterwards gives): every token runs max_steps and nobody freezes; a
    token's output is its state at the step the rule picks, and that step is
    its reported steps. A subclass says when its measure is met (`met`) and
    what it keeps per row between steps (`new_state`)."""
    name = ""
    reads_coda = False     # the rule reads each step's next-token logits (through the coda and head)
    settles = False        # the rule compares a step with the one before: no exit before step 2
    fixed_prefill = False  # prompt tokens run prefill_steps, every one; decoded and forward tokens exit on their own

    def __init__(self, threshold: Optional[float], min_steps: int, prefill_steps: Optional[int] = None,
                 every_loop: bool = False):
        self.threshold, self.min_steps = threshold, min_steps
        self.prefill_steps, self.every_loop = prefill_steps, every_loop

    @property
    def first_exit(self) -> int:
        """The first step a token may exit at (before max_steps)."""
        return max(2, self.min_steps) if self.settles else self.min_steps

    def new_state(self, rows: int, device, dtype) -> Optional["ExitState"]:
        return None

    def met(self, n, new: Tensor, old: Tensor, *, weight: Tensor, bias: Tensor, state, rows,
            logits: Optional[Tensor], previous: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold}, min_steps={self.min_steps})"


class FixedExit(ExitRule):
    """Every token runs max_steps."""
    name = "fixed"

    def met(self, n, new, old, **_):
        return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)


class GateExit(ExitRule):
    """λ_t = σ(w·s_t + c), p_t = λ_t Π_{j<t} (1 − λ_j) (p_M the rest); exit
    once Σ_{j<=t} p_j >= threshold. Keeps each row's mass and survival."""
    name = "gate"

    def new_state(self, rows, device, dtype):
        return ExitState(rows, device, dtype)

    def met(self, n, new, old, *, weight, bias, state, rows, last, **_):
        acc = accumulation_dtype(new.dtype)
        lam = torch.sigmoid(new.to(acc) @ weight.reshape(-1).to(acc) + bias.reshape(()).to(acc))
        mass, survive = state.mass[rows], state.survive[rows]
        p = torch.where(last, 1 - mass, lam * survive)
        mass = mass + p
        state.mass.index_copy_(0, rows, mass)
        state.survive.index_copy_(0, rows, survive * (1 - lam))
        return mass >= self.threshold


class LatentExit(ExitRule):
    """||s_t − s_{t−1}|| / ||s_t|| < threshold."""
    name = "latent"
    settles = True

    def met(self, n, new, old, **_):
        acc = accumulation_dtype(new.dtype)
        s, s_old = new.to(acc), old.to(acc)
        return torch.linalg.vector_norm(s - s_old, dim=-1) < self.threshold * torch.linalg.vector_norm(s, dim=-1)


class KLExit(ExitRule):
    """KL(P_t || P_{t−1}) < threshold, P_t the next-token distribution of s_t
    through the coda and head (tokens decoded one per sequence)."""
    name = "kl"
    settles = True
    reads_coda = True
    fixed_prefill = True

    def met(self, n, new, old, *, logits, previous, **_):
        return next_token_divergence(logits, previous) < self.threshold


HARD_RULES = {cls.name: cls for cls in (GateExit, LatentExit, KLExit, FixedExit)}
HARD = tuple(HARD_RULES)


def make_exit_rule(exit, threshold, min_steps, max_steps: int, *, training: bool,
                   prefill_steps=None, every_loop=False) -> Optional[ExitRule]:
    """Checks the exit arguments before anything runs; None means ACT."""
    if not isinstance(every_loop, bool):
        raise TypeError(f"every_loop must be a bool, got {type(every_loop).__name__}")
    if every_loop and exit in (None, "act"):
        raise ValueError("every_loop picks each token's exit by a hard exit rule: give exit='gate', 'latent', "
                         "'kl' or 'fixed'")
    if exit is None or exit == "act":
        if threshold is not None:
            raise ValueError("threshold applies to the exit rules gate, latent and kl, not to act")
        if min_steps != 1:
            raise ValueError("min_steps applies to the exit rules gate, latent and kl, not to act")
        return None
    if exit not in RULES:
        raise ValueError(f"exit must be one of {RULES}, got {exit!r}")
    if training:
        raise RuntimeError(f"exit={exit!r} is an inference rule: call it under torch.no_grad() or in eval mode "
                           "(training uses ACT's mean field)")
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or not 1 <= min_steps <= max_steps:
        raise ValueError(f"min_steps must be an int in [1, max_steps = {max_steps}], got {min_steps!r}")
    if exit == "fixed":
        if threshold is not None:
            raise ValueError("exit='fixed' takes no threshold: every token runs max_steps")
        return FixedExit(None, min_steps, every_loop=every_loop)
    if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise ValueError(f"exit={exit!r} needs a finite float threshold, got {threshold!r}")
    if exit == "gate" and not 0.0 < threshold <= 1.0:
        raise ValueError(f"the gate's threshold is a probability mass in (0, 1], got {threshold!r}")
    if exit in ("latent", "kl") and threshold <= 0.0:
        raise ValueError(f"exit={exit!r} needs a threshold > 0, got {threshold!r}")
    rule = HARD_RULES[exit]
    if rule.fixed_prefill:
        if prefill_steps is None:
            prefill_steps = max_steps
        if isinstance(prefill_steps, bool) or not isinstance(prefill_steps, int) \
                or not 1 <= prefill_steps <= max_steps:
            raise ValueError(f"prefill_steps must be an int in [1, max_steps = {max_steps}], got {prefill_steps!r}")
    elif prefill_steps is not None:
        raise ValueError("prefill_steps applies to exit='kl' only")
    return rule(float(threshold), min_steps, prefill_steps, every_loop)


class ExitState:
    """What the gate keeps per row between steps: its exit mass so far and
    the product of (1 − λ) (its survival), in the accumulation dtype."""

    def __init__(self, rows: int, device, dtype):
        acc = accumulation_dtype(dtype)
        self.mass = torch.zeros(rows, device=device, dtype=acc)
        self.survive = torch.ones(rows, device=device, dtype=acc)

    def reset(self, index: Tensor) -> None:
        self.mass.index_fill_(0, index, 0)
        self.survive.index_fill_(0, index, 1)


def exits_now(rule: ExitRule, n, max_steps: int, new: Tensor, old: Tensor, weight: Tensor, bias: Tensor,
              state: Optional[ExitState] = None, rows: Optional[Tensor] = None,
              logits: Optional[Tensor] = None, previous: Optional[Tensor] = None) -> Tensor:
    """(R,) bool: which of a step's rows exit after step n. new: their states
    s_n (R, D); old: s_{n−1}; n: an int or (R,) int64; state / rows: the
    rule's per-row state (`rule.new_state`), at those rows (updated in
    place); logits / previous: the rows' next-token logits at steps n and
    n − 1, for a rule that reads the coda."""
    last = torch.as_tensor(n >= max_steps, device=new.device)
    if isinstance(rule, FixedExit):
        return last.expand(new.shape[0]).clone()
    with torch.autocast(device_type=new.device.type, enabled=False):
        met = rule.met(n, new, old, weight=weight, bias=bias, state=state, rows=rows, logits=logits,
                       previous=previous, last=last)
    return (torch.as_tensor(n >= rule.first_exit, device=new.device) & met) | last


def ponder_with_exit(step, x: Tensor, rule: ExitRule, weight: Tensor, bias: Tensor, max_steps: int,
                     peek: Optional["Peek"] = None):
    """The ragged loop of design §2 with an exit rule instead of ACT's
    halting: step(state of the running rows, n, their indices ascending) ->
    their new states, as `ak.ponder` calls it. Returns (the state of every
    row at its exit, steps (T,) int64: the exit steps, and the steps run,
    which differ only under every_loop). One device read per step: how many
    rows still run (with a peek: which rows exit, read by the peek).
    peek: for a rule that reads the coda, each step's next-token logits of
    the running rows (`Peek`)."""
    rows = x.shape[0]
    out = torch.empty_like(x)
    steps = torch.zeros(rows, dtype=torch.int64, device=x.device)
    state = rule.new_state(rows, x.device, x.dtype)
    active = torch.arange(rows, device=x.device)
    picked = torch.zeros(rows, dtype=torch.bool, device=x.device)
    current = x
    for n in range(1, max_steps + 1):
        new = step(current, n, active)
        logits, previous = peek(new) if peek is not None else (None, None)
        gone = exits_now(rule, n, max_steps, new, current, weight, bias, state, active, logits, previous)
        if rule.every_loop:   # every row runs on; the rule only picks its output
            fresh = gone & ~picked
            picked.masked_fill_(fresh, True)
            out.index_copy_(0, torch.nonzero(fresh).squeeze(1), new[fresh])
            steps.masked_fill_(fresh, n)
            current = new
            continue
        out.index_copy_(0, active, new)
        steps.index_fill_(0, active, n)
        stay = torch.nonzero(~gone).squeeze(1) if peek is None else peek.settle(gone)
        if stay.numel() == 0:
            break
        active, current = active[stay], new[stay]
    ran = torch.full_like(steps, max_steps) if rule.every_loop else steps
    return out, steps, ran


class Peek:
    """What `ponder_with_exit` asks of a rule that reads the coda: at every
    step, `peek(states (R, D))` -> (their next-token logits, the same rows'
    logits at the step before), the rows being the ones still running, in
    order; and `settle(exits (R,) bool)` -> the indices of the rows that go
    on, after which only those run (one device read: which rows exit)."""

    def __call__(self, states: Tensor):
        raise NotImplementedError

    def settle(self, exits: Tensor) -> Tensor:
        raise NotImplementedError


class LatestLogits:
    """Each row's next-token logits at its latest step, for a rule that
    compares a step's next-token distribution with the step before (kl,
    Huginn's criteria that read the coda): `update(index, logits)` stores
    the logits of rows `index` and returns what those rows held, their
    logits at the step before (zeros before a row's first update; a row
    reused for a new token is not cleared: no rule's exit at a token's
    first step depends on them). `.logits` (rows, V): made at the first
    update, in its logits' dtype and device; None before. The synchronous
    decode's peek keeps one with a row per fed token (models/core.py
    `CodaPeek`), the depth-wise engine one with a row per slot
    (generation/depthwise.py)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.logits: Optional[Tensor] = None

    def update(self, index: Tensor, logits: Tensor) -> Tensor:
        if self.logits is None:
            self.logits = logits.new_zeros(self.rows, logits.shape[-1])
        previous = self.logits[index]
        self.logits.index_copy_(0, index, logits)
        return previous


class RecurrentExit(ExitRule):
    """Huginn's inference criteria (recurrent-depth LMs): from step
    min_steps + 1 on (min_steps >= 0, Huginn's count), a step's measure is
    compared with the last checked step's, kept per row in the rule's
    memory (a skipped step leaves it alone); exit when the measure is met.
    Prompt tokens run prefill_steps. `width`: the state's first features
    that are the latent (the rest is the injected input). A subclass's
    `measure` returns (met, {memory name: this step's value})."""
    fixed_prefill = True

    def __init__(self, threshold, min_steps: int, prefill_steps: int, width: int):
        super().__init__(threshold, min_steps, prefill_steps)
        self.width = width

    @property
    def first_exit(self) -> int:
        return self.min_steps + 1

    def new_state(self, rows: int, device, dtype) -> "Memory":
        return Memory(rows)

    def met(self, n, new, old, *, state, rows, logits, **_):
        count = new.shape[0]
        checked = torch.as_tensor(n >= self.first_exit, device=new.device).expand(count)
        first = torch.as_tensor(n == 1, device=new.device).expand(count)
        met, memory = self.measure(new[:, :self.width], old[:, :self.width], logits, state, rows, first)
        for name, value in memory.items():
            state.keep(name, rows, value, checked)
        return checked & met


class Memory:
    """A recurrent criterion's per-row memory: named tensors made at first
    use, each filled with its start value."""

    def __init__(self, rows: int):
        self.rows, self.values, self.starts = rows, {}, {}

    def get(self, name: str, rows: Tensor, like: Tensor, start: float) -> Tensor:
        if name not in self.values:
            self.values[name] = like.new_full((self.rows, *like.shape[1:]), start)
            self.starts[name] = start
        return self.values[name][rows]

    def keep(self, name: str, rows: Tensor, value: Tensor, where: Tensor) -> None:
        shape = (-1,) + (1,) * (value.dim() - 1)
        self.values[name].index_copy_(0, rows, torch.where(where.view(shape), value, self.values[name][rows]))

    def reset(self, index: Tensor) -> None:
        for name, value in self.values.items():
            value.index_fill_(0, index, self.starts[name])


class RecurrentKL(RecurrentExit):
    """KL(P_prev || P_n) < threshold; P_prev starts uniform."""
    name = "kl"
    reads_coda = True

    def measure(self, s, s_old, logits, state, rows, first):
        log_p = torch.log_softmax(logits.double(), -1)
        prev = state.get(self.name, rows, log_p, -math.log(log_p.shape[-1]))
        return (prev.exp() * (prev - log_p)).sum(-1) < self.threshold, {self.name: log_p}


class RecurrentEntropy(RecurrentExit):
    """|H(P_n) − H(P_prev)| < threshold, H = −Σ p log(p + 1e-10); H_prev starts at 100."""
    name = "entropy-diff"
    reads_coda = True

    def measure(self, s, s_old, logits, state, rows, first):
        p = torch.softmax(logits.double(), -1)
        entropy = -(p * torch.log(p + 1e-10)).sum(-1)
        return (entropy - state.get(self.name, rows, entropy, 100.0)).abs() < self.threshold, {self.name: entropy}


class RecurrentLatent(RecurrentExit):
    """||s_n − s_prev|| / ||s_n|| < threshold; s_prev starts at the initial state s_0."""
    name = "latent-diff"

    def measure(self, s, s_old, logits, state, rows, first):
        s = s.to(torch.promote_types(s.dtype, torch.float32))
        prev = state.get(self.name, rows, s, 0.0)
        prev = torch.where(first[:, None], s_old.to(s.dtype), prev)        # the memory starts at s_0
        state.keep(self.name, rows, prev, first)
        diff = torch.linalg.vector_norm(s - prev, dim=-1) / torch.linalg.vector_norm(s, dim=-1)
        return diff < self.threshold, {self.name: s}


class RecurrentArgmax(RecurrentExit):
    """The argmax token unchanged over `threshold` checks in a row."""
    name = "argmax-stability"
    reads_coda = True

    def measure(self, s, s_old, logits, state, rows, first):
        top = logits.argmax(-1).to(torch.float64)
        same = top == state.get(self.name, rows, top, -1.0)
        count = torch.where(same, state.get("count", rows, top, 0.0) + 1, torch.zeros_like(top))
        return count >= self.threshold, {self.name: top, "count": count}


RECURRENT_RULES = {cls.name: cls for cls in (RecurrentKL, RecurrentEntropy, RecurrentLatent, RecurrentArgmax)}


def token_pondernet_loss(out, step_logits: Tensor, target: Tensor, beta: float, entropy: bool):
    """The per-token PonderNet objective (design §16) from `ak.pondernet`'s
    output over token rows: step_logits (Σ N, V) the head on every computed
    (token, step) state, target (T,) each token's next-token target (-100:
    none). Per token Σ_n p_n L_n, and KL(p ‖ prior) (or, with entropy, the
    entropy of p); means over the tokens with a target. Returns (loss,
    expected loss, regularizer)."""
    logits = step_logits.to(torch.promote_types(step_logits.dtype, torch.float32))
    step_loss = F.cross_entropy(logits, target[out.batch_index], ignore_index=-100, reduction="none")
    tokens = out.steps.shape[0]
    p = out.p
    expected = p.new_zeros(tokens).index_add(0, out.batch_index, p * step_loss.to(p.dtype))
    if entropy:
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
        regular = -p.new_zeros(tokens).index_add(0, out.batch_index, plogp)
    else:
        regular = out.kl
    scored = target != -100
    count = scored.sum().clamp_min(1)
    expected, regular = (expected * scored).sum() / count, (regular * scored).sum() / count
    return (expected - beta * regular if entropy else expected + beta * regular), expected, regular


def check_pondernet_args(beta, prior) -> None:
    for name, value in (("beta", beta), ("prior", prior)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior is the geometric prior's λp in (0, 1), got {prior!r}")


def next_token_divergence(logits: Tensor, previous: Tensor) -> Tensor:
    """(R,) KL(P || P_prev) between softmax(logits) and softmax(previous)
    per row, in float64."""
    log_p = torch.log_softmax(logits.double(), -1)
    log_q = torch.log_softmax(previous.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


__all__ = ["RULES", "HARD", "ExitRule", "FixedExit", "GateExit", "LatentExit", "KLExit", "ExitState",
           "RecurrentExit", "RECURRENT_RULES", "Memory", "make_exit_rule", "exits_now", "ponder_with_exit", "Peek",
           "LatestLogits",
           "next_token_divergence", "token_pondernet_loss", "check_pondernet_args"]
