"""PonderNet (Banino et al. 2021) in pure PyTorch, ragged and differentiable by
ordinary autograd: the oracle of design §10 that the kernel path is tested
against, and the reference twins of its two kernel contracts (the fused
halting step and the packed backward of p and kl), with the same arguments
and results as the Triton and CUDA kernels.

    lambda_b^n = sigmoid(w . s_b^n + c)                 (accumulation dtype)
    u_b^n      = prod_{j<=n} (1 - lambda_b^j)           (unhalted mass, step order)
    p_b^n      = lambda_b^n u_b^(n-1)  for n < N_b,   p_b^(N_b) = u_b^(N_b - 1)
    kl_b       = sum_n p_b^n (log p_b^n - log g^n)      (truncated geometric prior g)

N_b: "train" the first n with u_b^n < eps; "sample" a Bernoulli(lambda_b^n)
draw at each step; "threshold" the first n with 1 - u_b^n >= threshold; every
mode stops at max_steps. A row stops stepping when it halts.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..checks import check_step_output
from ..ragged import survivors
from ..state import accumulation_dtype, as_state_tuple
from .checks import check_pondernet_args
from .output import PonderNetOutput
from .prior import kl_per_row, log_prior


def stop_test(halting: str, u_after, lam, eps, threshold, uniform):
    """Whether each running row halts at this step (before the max_steps rule)."""
    if halting == "train":
        return u_after < eps
    if halting == "sample":
        return uniform < lam
    return 1 - u_after >= threshold


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
) -> PonderNetOutput:
    """Same contract as `act_kernels.pondernet` (see there)."""
    states, was_tuple = as_state_tuple(state)
    check_pondernet_args(states, weight, bias, max_steps, eps, prior, halting, threshold, generator)
    return pondernet_loop(step_fn, states, was_tuple, weight, bias, max_steps, eps, prior, halting, threshold,
                          generator)


def pondernet_loop(step_fn: Callable, states: Tuple[torch.Tensor, ...], was_tuple: bool, weight: torch.Tensor,
                   bias: torch.Tensor, max_steps: int, eps: float, prior: float, halting: str, threshold: float,
                   generator: Optional[torch.Generator]) -> PonderNetOutput:
    """`pondernet` on arguments already checked (`states` as `as_state_tuple` gives them)."""
    batch, device = states[0].shape[0], states[0].device
    acc = accumulation_dtype(states[0].dtype)
    w = weight.reshape(-1).to(acc)
    c = bias.reshape(()).to(acc)

    active = torch.arange(batch, device=device)
    unhalted = torch.ones(batch, dtype=acc, device=device)       # u^(n-1) of every row
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    current = states
    ps: List[torch.Tensor] = []
    rows, step_rows = [], []
    packed: List[List[torch.Tensor]] = [[] for _ in states]

    for n in range(1, max_steps + 1):
        given = current if was_tuple else current[0]
        new = check_step_output(step_fn(given, n, active), states, active.numel(), n)
        with torch.autocast(device_type=device.type, enabled=False):
            lam = torch.sigmoid(new[0].to(acc) @ w + c)
        u_before = unhalted[active]
        u_after = u_before * (1 - lam)
        uniform = None
        if halting == "sample":
            uniform = torch.rand(active.numel(), generator=generator, device=device, dtype=acc)
        halt = stop_test(halting, u_after.detach(), lam.detach(), eps, threshold, uniform)
        if n == max_steps:
            halt = torch.ones_like(halt)
        ps.append(torch.where(halt, u_before, lam * u_before))  # the last step takes the rest
        unhalted = unhalted.index_copy(0, active, u_after)
        steps = steps.index_fill(0, active[halt], n)
        rows.append(active)
        step_rows.append(torch.full_like(active, n))
        for k, t in enumerate(new):
            packed[k].append(t)
        nxt = survivors(halt, active, new)
        if nxt is None:
            break
        active, current = nxt

    p = torch.cat(ps)
    batch_index, step_index = torch.cat(rows), torch.cat(step_rows)
    last = step_index == steps[batch_index]
    kl = kl_per_row(p, log_prior(step_index, last, prior, acc), batch_index, batch)
    all_states = tuple(torch.cat(t) for t in packed)
    last_rows = torch.empty_like(steps).index_put_((batch_index[last],), torch.nonzero(last).squeeze(1))
    final = tuple(t.index_select(0, last_rows) for t in all_states)
    return PonderNetOutput(
        states=all_states if was_tuple else all_states[0], p=p, kl=kl, steps=steps,
        batch_index=batch_index, step_index=step_index,
        state=final if was_tuple else final[0], batch_size=batch,
    )


# -- the reference twins of the kernel contracts ----------------------------------

MODES = {"train": 0, "sample": 1, "threshold": 2}


def halting_step(
    state: torch.Tensor, active: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    unhalted: torch.Tensor, steps: torch.Tensor, uniform: Optional[torch.Tensor],
    step: int, max_steps: int, mode: int, eps: float, threshold: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused PonderNet halting step over the A running rows.

    state (A, H) the new states s^n; active (A,) their batch rows; weight (H,)
    and bias (1,) in the accumulation dtype. unhalted (B,) holds u^(n-1) and
    is updated in place to u^n for the active rows; steps (B,) gets n for the
    rows that halt. uniform (A,): the Bernoulli draws of mode 1 ("sample").
    mode: 0 "train" (u^n < eps), 1 "sample" (uniform < lambda), 2 "threshold"
    (1 - u^n >= threshold); every mode halts at max_steps.
    Returns p (A,), lambda (A,), u^(n-1) (A,) in the accumulation dtype and halted (A,) bool.
    """
    acc = unhalted.dtype
    with torch.no_grad():
        with torch.autocast(device_type=state.device.type, enabled=False):  # the halting math stays in acc
            lam = torch.sigmoid(state.to(acc) @ weight.to(acc) + bias.to(acc).reshape(()))
        u_before = unhalted[active]
        u_after = u_before * (1 - lam)
        if step >= max_steps:
            halt = torch.ones_like(lam, dtype=torch.bool)
        elif mode == 0:
            halt = u_after < eps
        elif mode == 1:
            halt = uniform < lam
        else:
            halt = 1 - u_after >= threshold
        p = torch.where(halt, u_before, lam * u_before)
        unhalted[active] = u_after
        steps[active[halt]] = step
    return p, lam, u_before, halt


def halting_backward(
    p: torch.Tensor, lam: torch.Tensor, u_before: torch.Tensor, batch_index: torch.Tensor,
    step_index: torch.Tensor, steps: torch.Tensor, grad_p: torch.Tensor, grad_kl: torch.Tensor, prior: float,
) -> torch.Tensor:
    """Backward of p and kl with respect to z = w.s + c, over the T packed entries.

    With gp'^n = grad_p^n + grad_kl_b (log p^n - log g^n + 1) (the KL's own
    path; 0 where p underflowed to 0) and R^k = sum_{n > k} gp'^n p^n (a
    reverse scan over each row's steps):

        dL/dz^k = lambda^k (u^k gp'^k - R^k)   for k < N,   0 for k = N

    since p^n (n > k) carries a factor (1 - lambda^k), p^k a factor lambda^k,
    and p^N = u^(N-1) does not depend on lambda^N. Returns grad_z (T,).
    """
    acc = p.dtype
    last = step_index == steps[batch_index]
    log_g = log_prior(step_index, last, prior, acc)
    kl_path = torch.where(p > 0, torch.log(p) - log_g + 1, torch.zeros_like(p))
    gp = grad_p.to(acc) + grad_kl.to(acc)[batch_index] * kl_path

    # Per-row reverse scan, written on the padded (B, max N) view of each row's steps.
    batch, max_n = steps.shape[0], int(steps.max())
    q = torch.zeros(batch, max_n, dtype=acc, device=p.device)
    q[batch_index, step_index - 1] = gp * p
    suffix = q.flip(1).cumsum(1).flip(1)                          # sum_{n >= k}, added from the last step
    after = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], 1)   # R^k = sum_{n > k}
    r = after[batch_index, step_index - 1]
    u_after = u_before * (1 - lam)
    return torch.where(last, torch.zeros_like(p), lam * (u_after * gp - r))


def halting_unit_backward(grad_z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          step_states: Sequence[torch.Tensor]):
    """The gradients of z = w.s + c from dL/dz (T,) over the per-step states
    (step n holding its A_n rows): ds = dz w per state tensor, dw = sum dz s,
    dc = sum dz; in the accumulation dtype even under autocast, then in the
    states', weight's and bias's own dtypes and shapes."""
    acc = grad_z.dtype
    w = weight.detach().reshape(-1).to(acc)
    grads, gw = [], torch.zeros_like(w)
    with torch.autocast(device_type=grad_z.device.type, enabled=False):
        for g, s in zip(torch.split(grad_z, [t.shape[0] for t in step_states]), step_states):
            grads.append((g[:, None] * w).to(s.dtype))      # dz/ds = w
            gw = gw + g @ s.to(acc)                          # dz/dw = s
    return (grads, gw.to(weight.dtype).reshape(weight.shape),
            grad_z.sum().to(bias.dtype).reshape(bias.shape))
