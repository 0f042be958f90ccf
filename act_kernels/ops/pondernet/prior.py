"""The truncated geometric prior of design §10 and the KL term against it."""
from __future__ import annotations

import math

import torch


def log_prior(step_index: torch.Tensor, last: torch.Tensor, prior: float, dtype) -> torch.Tensor:
    """log g^n for each packed entry: g^n = lp (1 - lp)^(n-1) for n < N and
    g^N = (1 - lp)^(N-1), the rest of the geometric's mass, so the truncated
    prior sums to 1 over n = 1..N (`last` marks n = N)."""
    n = step_index.to(dtype)
    log_q = math.log1p(-prior)
    return torch.where(last, (n - 1) * log_q, math.log(prior) + (n - 1) * log_q)


def kl_per_row(p: torch.Tensor, log_g: torch.Tensor, batch_index: torch.Tensor, batch: int) -> torch.Tensor:
    """kl_b = sum_n p (log p - log g), with 0 log 0 = 0 (xlogy), in p's dtype."""
    terms = torch.special.xlogy(p, p) - p * log_g
    return terms.new_zeros(batch).index_add(0, batch_index, terms)
