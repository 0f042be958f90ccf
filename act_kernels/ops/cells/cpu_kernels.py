"""The CPU gate kernels (csrc/cells/gates_cpu.cpp, in the compiled extension)
behind the contracts of `reference`, with the same signatures: float32 and
float64 CPU tensors, one thread. One call does what the twin does in a dozen
ATen ops, each of which would allocate and write a temporary of the gates'
size. gi and gh are cast to the state's dtype first (they differ only under
autocast), and the gradients are cast back."""
from __future__ import annotations

import torch

from ..extension import DTYPE_CODES, extension
from ..launch import as_dtype, cell_step_buffers, dense, halting_outputs, unit_columns

CPU_DTYPES = (torch.float32, torch.float64)
_GRU, _LSTM = 0, 1


def _inputs(state, *tensors):
    if state.dtype not in CPU_DTYPES:
        raise TypeError(f"the CPU gate kernels take float32 or float64 states, got {state.dtype}")
    for t in (state, *tensors):
        if t.device.type != "cpu":
            raise ValueError(f"the CPU gate kernels take CPU tensors, got one on {t.device}")
    return unit_columns(state), [unit_columns(as_dtype(t, state.dtype)) for t in tensors]


def _forward(kind, gi, gh, prev, halting=None):
    prev, (gi_, gh_) = _inputs(prev, gi, gh)
    rows, hidden = prev.shape
    h_new = torch.empty((rows, hidden), dtype=prev.dtype)
    c_new = torch.empty((rows, hidden), dtype=prev.dtype) if kind == _LSTM else None
    new = (h_new,) if c_new is None else (h_new, c_new)
    args = (kind, gi_.data_ptr(), gi_.stride(0), gh_.data_ptr(), gh_.stride(0), prev.data_ptr(), prev.stride(0),
            h_new.data_ptr(), 0 if c_new is None else c_new.data_ptr(), rows, hidden)
    if halting is None:
        if rows and hidden:
            extension().cpu_cell_forward(*args, *([0] * 14), 0, 0, DTYPE_CODES[prev.dtype])
        return new
    active, weight, bias, threshold, running_sum, accumulators, steps, remainder, step, max_steps = halting
    acc = running_sum.dtype
    if acc != prev.dtype or any(a.dtype != acc for a in accumulators) or remainder.dtype != acc:
        raise TypeError("the CPU kernels accumulate in the state's dtype: running_sum, the accumulators and "
                        "remainder must be " + str(prev.dtype))
    p, hh, halted = halting_outputs(rows, acc, prev.device)
    if rows == 0 or hidden == 0:
        return new, p, hh, halted
    out = cell_step_buffers(running_sum, steps, remainder, accumulators)
    acc_c = out["acc_c"] if kind == _LSTM else None
    weight, bias, threshold = (dense(as_dtype(t, acc)) for t in (weight, bias, threshold))
    active = dense(active)
    extension().cpu_cell_forward(
        *args, active.data_ptr(), weight.data_ptr(), bias.data_ptr(), threshold.data_ptr(),
        out["running_sum"].data_ptr(), out["acc_h"].data_ptr(), out["acc_h"].stride(0),
        0 if acc_c is None else acc_c.data_ptr(), 0 if acc_c is None else acc_c.stride(0),
        out["steps"].data_ptr(), out["remainder"].data_ptr(), p.data_ptr(), hh.data_ptr(), halted.data_ptr(),
        max(int(step), 1), int(max_steps), DTYPE_CODES[prev.dtype])
    out.finish()
    return new, p, hh, halted


def gru_gates_forward(gi, gh, h):
    return _forward(_GRU, gi, gh, h)[0]


def lstm_gates_forward(gi, gh, c):
    return _forward(_LSTM, gi, gh, c)


def gru_halting_step(gi, gh, h, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                     step, max_steps):
    """CPU twin of `reference.gru_halting_step` (same contract): one call."""
    return _forward(_GRU, gi, gh, h, (active, weight, bias, threshold, running_sum, tuple(accumulators[:1]),
                                      steps, remainder, step, max_steps))


def lstm_halting_step(gi, gh, c, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                      step, max_steps):
    """CPU twin of `reference.lstm_halting_step` (same contract): one call."""
    return _forward(_LSTM, gi, gh, c, (active, weight, bias, threshold, running_sum, tuple(accumulators[:2]),
                                       steps, remainder, step, max_steps))


def gru_gates_backward(grad, gi, gh, h):
    h, (gi_, gh_, grad_) = _inputs(h, gi, gh, grad)
    rows, hidden = h.shape
    d_gi = torch.empty(gi_.shape, dtype=h.dtype)
    d_gh = torch.empty(gh_.shape, dtype=h.dtype)
    d_h = torch.empty(h.shape, dtype=h.dtype)
    if rows and hidden:
        extension().cpu_cell_backward(_GRU, grad_.data_ptr(), grad_.stride(0), 0, 0, gi_.data_ptr(), gi_.stride(0),
                                       gh_.data_ptr(), gh_.stride(0), h.data_ptr(), h.stride(0), d_gi.data_ptr(),
                                       d_gh.data_ptr(), d_h.data_ptr(), rows, hidden, DTYPE_CODES[h.dtype])
    return as_dtype(d_gi, gi.dtype), as_dtype(d_gh, gh.dtype), d_h


def lstm_gates_backward(grad_h, grad_c, gi, gh, c):
    c, (gi_, gh_, grad_h_, grad_c_) = _inputs(c, gi, gh, grad_h, grad_c)
    rows, hidden = c.shape
    d_a = torch.empty(gi_.shape, dtype=c.dtype)
    d_c = torch.empty(c.shape, dtype=c.dtype)
    if rows and hidden:
        extension().cpu_cell_backward(_LSTM, grad_h_.data_ptr(), grad_h_.stride(0), grad_c_.data_ptr(),
                                       grad_c_.stride(0), gi_.data_ptr(), gi_.stride(0), gh_.data_ptr(),
                                       gh_.stride(0), c.data_ptr(), c.stride(0), d_a.data_ptr(), 0, d_c.data_ptr(),
                                       rows, hidden, DTYPE_CODES[c.dtype])
    return as_dtype(d_a, gi.dtype), d_c
