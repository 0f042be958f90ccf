"""Reference twins of PonderNet's two kernel contracts (DESIGN §10): the same
arguments and results as the Triton kernels, written for clarity."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ...pondernet.prior import log_prior

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
