"""The CUDA extension's gate kernels (csrc/cells/) behind the contracts of
`reference`, with the same signatures. The kernels read one dtype: gi and gh
are cast to the state's dtype first (they differ only under autocast), and
the gradients are cast back."""
from __future__ import annotations

import torch

from ..act.cuda_kernels import DTYPE_CODES, _check_cuda, _extension, _stream, halting_step
from ..launch import on_device, unit_columns

_GRU_FORWARD, _GRU_BACKWARD, _LSTM_FORWARD, _LSTM_BACKWARD = range(4)


def _inputs(state, *tensors):
    if state.dtype not in DTYPE_CODES:
        raise TypeError(f"state dtype {state.dtype} is not supported")
    out = []
    for name, t in zip(("gi", "gh", "grad_h", "grad_c"), tensors):
        _check_cuda(name, t, state.device)
        out.append(unit_columns(t.to(state.dtype)))
    _check_cuda("state", state, state.device)
    return unit_columns(state), out


def _launch(op, state, gi, gh, grad_h=None, grad_c=None, out_h=None, out_c=None, d_gi=None, d_gh=None,
            d_state=None):
    def at(t):
        return 0 if t is None else t.data_ptr()

    def stride(t):
        return 0 if t is None else t.stride(0)

    rows, hidden = state.shape
    if rows == 0 or hidden == 0:
        return
    with on_device(state.device):
        _extension().cell_gates(op, at(gi), stride(gi), at(gh), stride(gh), at(state), stride(state),
                                at(grad_h), stride(grad_h), at(grad_c), stride(grad_c), at(out_h), at(out_c),
                                at(d_gi), at(d_gh), at(d_state), rows, hidden, DTYPE_CODES[state.dtype],
                                _stream(state.device))


def gru_gates_forward(gi, gh, h):
    h, (gi_, gh_) = _inputs(h, gi, gh)
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _launch(_GRU_FORWARD, h, gi_, gh_, out_h=out)
    return out


def gru_gates_backward(grad, gi, gh, h):
    h, (gi_, gh_, grad_) = _inputs(h, gi, gh, grad)
    d_gi = torch.empty(gi_.shape, dtype=h.dtype, device=h.device)
    d_gh = torch.empty(gh_.shape, dtype=h.dtype, device=h.device)
    d_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _launch(_GRU_BACKWARD, h, gi_, gh_, grad_h=grad_, d_gi=d_gi, d_gh=d_gh, d_state=d_h)
    return d_gi.to(gi.dtype), d_gh.to(gh.dtype), d_h


def lstm_gates_forward(gi, gh, c):
    c, (gi_, gh_) = _inputs(c, gi, gh)
    h_new = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    c_new = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    _launch(_LSTM_FORWARD, c, gi_, gh_, out_h=h_new, out_c=c_new)
    return h_new, c_new


def lstm_gates_backward(grad_h, grad_c, gi, gh, c):
    c, (gi_, gh_, grad_h_, grad_c_) = _inputs(c, gi, gh, grad_h, grad_c)
    d_a = torch.empty(gi_.shape, dtype=c.dtype, device=c.device)
    d_c = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    _launch(_LSTM_BACKWARD, c, gi_, gh_, grad_h=grad_h_, grad_c=grad_c_, d_gi=d_a, d_state=d_c)
    return d_a.to(gi.dtype), d_c


def gru_halting_step(gi, gh, h, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                     step, max_steps):
    """The contract of `reference.gru_halting_step` as two launches (the gate
    kernel, then the halting kernel): the CUDA extension has no fused
    gates-and-halting kernel yet."""
    h_new = gru_gates_forward(gi, gh, h)
    p, hh, halted = halting_step(h_new, active, weight, bias, threshold, running_sum, accumulators[0], steps,
                                 remainder, step, max_steps)
    return (h_new,), p, hh, halted


def lstm_halting_step(gi, gh, c, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                      step, max_steps):
    """`reference.lstm_halting_step` as two launches, like `gru_halting_step`."""
    h_new, c_new = lstm_gates_forward(gi, gh, c)
    p, hh, halted = halting_step(h_new, active, weight, bias, threshold, running_sum, accumulators[0], steps,
                                 remainder, step, max_steps, extra=[(c_new, accumulators[1])])
    return (h_new, c_new), p, hh, halted
