"""An independent padded PonderNet, as its public implementations unroll it:
every row is stepped for every step until the whole batch has halted, and
masks keep what the halted rows compute out of p, kl and the states. It
shares no code with the package. Deterministic halting modes only."""
import math

import torch


def padded_pondernet(step, s0, w, c, max_steps, eps=0.01, prior=0.2, halting="train", threshold=0.5):
    """Returns p (B, n), kl (B,), steps (B,), states (B, n, H); n = max N."""
    batch = s0.shape[0]
    acc = torch.float64 if s0.dtype == torch.float64 else torch.float32
    everyone = torch.arange(batch, device=s0.device)
    s, u = s0, torch.ones(batch, dtype=acc, device=s0.device)
    running = torch.ones(batch, dtype=torch.bool, device=s0.device)
    steps = torch.zeros(batch, dtype=torch.int64, device=s0.device)
    ps, ss = [], []
    for n in range(1, max_steps + 1):
        s = step(s, n, everyone)
        lam = torch.sigmoid(s.to(acc) @ w.reshape(-1).to(acc) + c.reshape(()).to(acc))
        u_next = u * (1 - lam)
        if halting == "train":
            halt = u_next < eps
        else:
            halt = 1 - u_next >= threshold
        halt = (halt | (n == max_steps)) & running
        p = torch.where(halt, u, lam * u) * running
        steps = torch.where(halt, torch.full_like(steps, n), steps)
        u = torch.where(running, u_next, u)
        running = running & ~halt
        ps.append(p)
        ss.append(s)
        if not bool(running.any()):
            break
    p = torch.stack(ps, 1)
    n = torch.arange(1, p.shape[1] + 1, device=s0.device, dtype=acc)[None]
    log_g = torch.where(n == steps[:, None], (n - 1) * math.log(1 - prior),
                        math.log(prior) + (n - 1) * math.log(1 - prior))
    inside = n <= steps[:, None]
    safe_p = torch.where(inside & (p > 0), p, torch.ones_like(p))
    kl = torch.where(inside, p * (torch.log(safe_p) - log_g), torch.zeros_like(p)).sum(1)
    return p, kl, steps, torch.stack(ss, 1)
