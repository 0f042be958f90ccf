"""Reference twins of the fused gate kernels: the same arguments and results,
written for clarity. Gate order is torch's: GRU (r, z, n), LSTM (i, f, g, o).

    GRU:  r = sigmoid(gi_r + gh_r)   z = sigmoid(gi_z + gh_z)
          n = tanh(gi_n + r * gh_n)  h' = (1 - z) n + z h
    LSTM: a = gi + gh;  c' = sigmoid(a_f) c + sigmoid(a_i) tanh(a_g)
          h' = sigmoid(a_o) tanh(c')

gi holds x W_ih^T + b_ih, gh holds h W_hh^T + b_hh, as torch's cells compute
them. Math in float32 for half inputs (float64 stays float64); results in
the input dtype.

`gru_halting_step` and `lstm_halting_step` are a ponder step's gates and its
halting step (design §3) in one: what the fused kernels do in one launch.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..halting import halting_step
from ..state import accumulation_dtype


def _acc(t: Tensor) -> torch.dtype:
    return accumulation_dtype(t.dtype)


def gru_gates_forward(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """gi, gh (A, 3H), h (A, H) -> h' (A, H)."""
    acc = _acc(h)
    gi_r, gi_z, gi_n = gi.to(acc).chunk(3, 1)
    gh_r, gh_z, gh_n = gh.to(acc).chunk(3, 1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return ((1 - z) * n + z * h.to(acc)).to(h.dtype)


def gru_gates_backward(grad: Tensor, gi: Tensor, gh: Tensor, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Recomputes the gates from the saved inputs; returns (d gi, d gh, d h)."""
    acc = _acc(h)
    g = grad.to(acc)
    gi_r, gi_z, gi_n = gi.to(acc).chunk(3, 1)
    gh_r, gh_z, gh_n = gh.to(acc).chunk(3, 1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    d_n = g * (1 - z) * (1 - n * n)              # through tanh
    d_z = g * (h.to(acc) - n) * z * (1 - z)      # through sigmoid
    d_r = d_n * gh_n * r * (1 - r)
    d_gi = torch.cat([d_r, d_z, d_n], 1)
    d_gh = torch.cat([d_r, d_z, d_n * r], 1)
    return d_gi.to(gi.dtype), d_gh.to(gh.dtype), (g * z).to(h.dtype)


def lstm_gates_forward(gi: Tensor, gh: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """gi, gh (A, 4H), c (A, H) -> (h', c'), each (A, H)."""
    acc = _acc(c)
    a_i, a_f, a_g, a_o = (gi.to(acc) + gh.to(acc)).chunk(4, 1)
    c_new = torch.sigmoid(a_f) * c.to(acc) + torch.sigmoid(a_i) * torch.tanh(a_g)
    h_new = torch.sigmoid(a_o) * torch.tanh(c_new)
    return h_new.to(c.dtype), c_new.to(c.dtype)


def lstm_gates_backward(grad_h: Tensor, grad_c: Tensor, gi: Tensor, gh: Tensor, c: Tensor
                        ) -> Tuple[Tensor, Tensor]:
    """Recomputes the gates; returns (d a, d c) where d a = d gi = d gh (A, 4H)."""
    acc = _acc(c)
    a_i, a_f, a_g, a_o = (gi.to(acc) + gh.to(acc)).chunk(4, 1)
    i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
    c_prev = c.to(acc)
    c_new = f * c_prev + i * g
    t = torch.tanh(c_new)
    dh = grad_h.to(acc)
    dc = grad_c.to(acc) + dh * o * (1 - t * t)
    d_a = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), dh * t * o * (1 - o)], 1)
    return d_a.to(gi.dtype), (dc * f).to(c.dtype)


def gru_halting_step(gi: Tensor, gh: Tensor, h: Tensor, active: Tensor, weight: Tensor, bias: Tensor,
                     threshold: Tensor, running_sum: Tensor, accumulators: Sequence[Tensor], steps: Tensor,
                     remainder: Tensor, step: int, max_steps: int) -> Tuple[Tuple[Tensor], Tensor, Tensor, Tensor]:
    """A GRU ponder step and its halting step as one: h' = the gates, then
    `act_kernels.reference.halting_step` on h' (accumulators = (mean field of
    h,), updated in place like the other buffers). Returns ((h',), p, h, halted)."""
    h_new = gru_gates_forward(gi, gh, h)
    p, hh, halted = halting_step(h_new, active, weight, bias, threshold, running_sum, accumulators[0], steps,
                                 remainder, step, max_steps)
    return (h_new,), p, hh, halted


def lstm_halting_step(gi: Tensor, gh: Tensor, c: Tensor, active: Tensor, weight: Tensor, bias: Tensor,
                      threshold: Tensor, running_sum: Tensor, accumulators: Sequence[Tensor], steps: Tensor,
                      remainder: Tensor, step: int, max_steps: int
                      ) -> Tuple[Tuple[Tensor, Tensor], Tensor, Tensor, Tensor]:
    """An LSTM ponder step and its halting step as one: (h', c') = the gates,
    halting reads h', and both are mean-fielded with the same p
    (accumulators = (mean field of h, of c)). Returns ((h', c'), p, h, halted)."""
    h_new, c_new = lstm_gates_forward(gi, gh, c)
    p, hh, halted = halting_step(h_new, active, weight, bias, threshold, running_sum, accumulators[0], steps,
                                 remainder, step, max_steps, extra=[(c_new, accumulators[1])])
    return (h_new, c_new), p, hh, halted
