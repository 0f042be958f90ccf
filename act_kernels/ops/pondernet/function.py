"""`pondernet` and `pondernet_loss`, the public functions, and the ragged
PonderNet loop on the fused kernels (design §10, §2).

At step n the step function sees only the rows still running; one fused
halting-step launch evaluates lambda, updates the unhalted mass, writes p and
decides which rows halt; the survivors are compacted for the next step.

Autograd: the step function's own graph carries gradients from step to step
and into `.states`; `_Halting` attaches the backward of p and kl to the
per-step states (through lambda), the halting weight and bias, as one
packed reverse-scan launch over all T entries.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ...backends import implementation_module, resolve_pondernet
from ..checks import check_step_output
from ..ragged import compact, packed_step_index
from ..state import accumulation_dtype, as_state_tuple
from . import reference
from .checks import check_pondernet_args
from .output import PonderNetOutput
from .prior import kl_per_row, log_prior
from .reference import MODES, halting_unit_backward


def pondernet(
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 20,
    eps: float = 0.01,
    prior: float = 0.2,
    halting: str = "train",
    threshold: float = 0.5,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> PonderNetOutput:
    """PonderNet with rows that stop stepping when they halt (design §10).

    step_fn, state, weight, bias: as for `ak.ponder` (the step function sees
    only the running rows; halting reads the first tensor of a tuple state).
    max_steps: M, every row halts there.
    eps: in "train" mode a row halts at the first step whose unhalted mass
        u^n = prod (1 - lambda^j) drops below eps, and that step's p takes the
        rest u^(N-1). The default 0.01 bounds the probability mass folded into
        the last step from steps never computed at 1 %, the same budget as
        ACT's eps; smaller eps runs more steps for less than 1 % of the mass.
    prior: lambda_p of the geometric prior g^n = lp (1 - lp)^(n-1), truncated at
        each row's N with the rest of its mass at N, so it sums to 1.
    halting: "train" (the rule above), "sample" (halt at step n with
        probability lambda^n, drawn from `generator` for repeatability) or
        "threshold" (halt at the first n with 1 - u^n >= threshold). Every mode
        halts at max_steps, and the step function sees exactly sum N rows.
    backend: "auto" | "reference" | "triton".

    Returns PonderNetOutput: packed per-(row, step) `states`, `p`,
    `batch_index`, `step_index`; per-row `kl`, `steps` and `state` (the state
    at the halting step); `.padded(values)` views packed values as (B, max N).
    p and kl are in the accumulation dtype (float32; float64 for float64).
    """
    # checked and resolved once per call; the loops below trust their arguments
    states, was_tuple = as_state_tuple(state)
    check_pondernet_args(states, weight, bias, max_steps, eps, prior, halting, threshold, generator)
    chosen = resolve_pondernet(backend, states[0].device)
    args = (step_fn, states, was_tuple, weight, bias, max_steps, eps, prior, halting, threshold, generator)
    if chosen == "reference":
        return reference.pondernet_loop(*args)
    return kernel_pondernet_loop(get_kernels(chosen), *args)


def pondernet_loss(out: PonderNetOutput, step_loss: torch.Tensor, beta: float = 0.01) -> torch.Tensor:
    """mean_b sum_n p_b^n L(y_b^n) + beta * mean_b kl_b.

    step_loss (T,): the task loss of every packed (row, step) output, e.g.
    `F.cross_entropy(readout(out.states), y[out.batch_index], reduction="none")`.
    """
    if step_loss.shape != out.p.shape:
        raise ValueError(f"step_loss must have one value per packed (row, step), shape {tuple(out.p.shape)}, "
                         f"got {tuple(step_loss.shape)}")
    per_row = out.p.new_zeros(out.batch_size).index_add(0, out.batch_index, out.p * step_loss.to(out.p.dtype))
    return per_row.mean() + beta * out.kl.mean()


class PonderNetKernels(NamedTuple):
    """One backend's implementations of PonderNet's two kernel contracts."""

    halting_step: Callable
    halting_backward: Callable


def get_kernels(implementation: str) -> PonderNetKernels:
    """The (halting_step, halting_backward) pair of an implementation as
    `act_kernels.backends` names it: "triton", "cuda" or "twins" (the
    reference twins on the kernel loop)."""
    mod = implementation_module(__package__, implementation, ("triton", "cuda", "twins"), "PonderNet's kernels")
    return PonderNetKernels(mod.halting_step, mod.halting_backward)


class _Saved(NamedTuple):
    p: torch.Tensor
    lam: torch.Tensor
    u_before: torch.Tensor
    kl: torch.Tensor
    batch_index: torch.Tensor
    step_index: torch.Tensor
    steps: torch.Tensor
    counts: List[int]
    prior: float
    kernels: PonderNetKernels


class _Halting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, saved: _Saved, weight, bias, *step_states):
        # The fused forward already ran inside the loop; this exposes p and kl.
        ctx.counts, ctx.prior, ctx.kernels = saved.counts, saved.prior, saved.kernels
        ctx.save_for_backward(weight, bias, saved.p, saved.lam, saved.u_before, saved.batch_index,
                              saved.step_index, saved.steps, *step_states)
        return saved.p.clone(), saved.kl.clone()

    @staticmethod
    @once_differentiable   # kernels autograd cannot see through: a 2nd derivative raises
    def backward(ctx, grad_p, grad_kl):
        weight, bias, p, lam, u_before, batch_index, step_index, steps, *step_states = ctx.saved_tensors
        acc = p.dtype
        grad_p = torch.zeros_like(p) if grad_p is None else grad_p
        grad_kl = torch.zeros(steps.shape, dtype=acc, device=p.device) if grad_kl is None else grad_kl
        gz = ctx.kernels.halting_backward(p, lam, u_before, batch_index, step_index, steps, grad_p, grad_kl,
                                          ctx.prior)
        grads, gw, gc = halting_unit_backward(gz, weight, bias, step_states)
        return (None, gw, gc, *grads)


def ragged_pondernet(
    kernels: PonderNetKernels,
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 20,
    eps: float = 0.01,
    prior: float = 0.2,
    halting: str = "train",
    threshold: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> PonderNetOutput:
    """`pondernet` on the fused kernels of one backend; same contract as the reference."""
    states, was_tuple = as_state_tuple(state)
    check_pondernet_args(states, weight, bias, max_steps, eps, prior, halting, threshold, generator)
    return kernel_pondernet_loop(kernels, step_fn, states, was_tuple, weight, bias, max_steps, eps, prior, halting,
                                 threshold, generator)


def kernel_pondernet_loop(kernels: PonderNetKernels, step_fn: Callable, states: Tuple[torch.Tensor, ...],
                          was_tuple: bool, weight: torch.Tensor, bias: torch.Tensor, max_steps: int, eps: float,
                          prior: float, halting: str, threshold: float,
                          generator: Optional[torch.Generator]) -> PonderNetOutput:
    """The kernel loop on arguments already checked (`states` as `as_state_tuple` gives them)."""
    batch, device = states[0].shape[0], states[0].device
    acc = accumulation_dtype(states[0].dtype)
    w = weight.detach().reshape(-1).to(acc).contiguous()
    c = bias.detach().reshape(1).to(acc)
    mode = MODES[halting]

    unhalted = torch.ones(batch, dtype=acc, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.arange(batch, device=device)
    current = states
    ps, lams, us, rows, counts = [], [], [], [], []
    packed: List[List[torch.Tensor]] = [[] for _ in states]

    for n in range(1, max_steps + 1):
        given = tuple(current) if was_tuple else current[0]
        new = check_step_output(step_fn(given, n, active), states, active.numel(), n)
        first = new[0] if new[0].shape[1] <= 1 or new[0].stride(1) == 1 else new[0].contiguous()
        uniform = None
        if mode == 1:
            uniform = torch.rand(active.numel(), generator=generator, device=device, dtype=acc)
        p, lam, u_before, halted = kernels.halting_step(first.detach(), active, w, c, unhalted, steps, uniform,
                                                        n, max_steps, mode, float(eps), float(threshold))
        ps.append(p)
        lams.append(lam)
        us.append(u_before)
        rows.append(active)
        counts.append(active.numel())
        for k, t in enumerate(new):
            packed[k].append(t)
        nxt = compact(halted, active, new)  # the one host sync per step
        if nxt is None:
            break
        active, current = nxt

    p_all, batch_index = torch.cat(ps), torch.cat(rows)
    step_index = packed_step_index(counts, device)
    last = step_index == steps[batch_index]
    kl = kl_per_row(p_all, log_prior(step_index, last, prior, acc), batch_index, batch)
    saved = _Saved(p_all, torch.cat(lams), torch.cat(us), kl, batch_index, step_index, steps, counts,
                   float(prior), kernels)
    p_out, kl_out = _Halting.apply(saved, weight, bias, *packed[0])
    all_states = tuple(torch.cat(t) for t in packed)
    last_rows = torch.empty_like(steps).index_put_((batch_index[last],), torch.nonzero(last).squeeze(1))
    final = tuple(t.index_select(0, last_rows) for t in all_states)
    return PonderNetOutput(
        states=all_states if was_tuple else all_states[0], p=p_out, kl=kl_out, steps=steps,
        batch_index=batch_index, step_index=step_index,
        state=final if was_tuple else final[0], batch_size=batch,
    )
