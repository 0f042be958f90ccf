"""The CUDA extension's gate kernels (csrc/cells/) behind the contracts of
`reference`, with the same signatures. The kernels read one dtype: gi and gh
are cast to the state's dtype first (they differ only under autocast), and
the gradients are cast back."""
from __future__ import annotations

import torch

from ..extension import DTYPE_CODES, check_device, extension, stream
from ..launch import as_dtype, cell_step_buffers, dense, halting_outputs, on_device, unit_columns

_GRU_FORWARD, _GRU_BACKWARD, _LSTM_FORWARD, _LSTM_BACKWARD = range(4)
_GRU_STEP, _LSTM_STEP = range(2)   # cell_halting_step's ops


def _inputs(state, *tensors):
    if state.dtype not in DTYPE_CODES:
        raise TypeError(f"state dtype {state.dtype} is not supported")
    out = []
    for name, t in zip(("gi", "gh", "grad_h", "grad_c"), tensors):
        check_device(name, t, state.device)
        out.append(unit_columns(as_dtype(t, state.dtype)))
    check_device("state", state, state.device)
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
        extension().cell_gates(op, at(gi), stride(gi), at(gh), stride(gh), at(state), stride(state),
                                at(grad_h), stride(grad_h), at(grad_c), stride(grad_c), at(out_h), at(out_c),
                                at(d_gi), at(d_gh), at(d_state), rows, hidden, DTYPE_CODES[state.dtype],
                                stream(state.device))


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
    return as_dtype(d_gi, gi.dtype), as_dtype(d_gh, gh.dtype), d_h


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
    return as_dtype(d_a, gi.dtype), d_c


def _halting_launch(op, gi, gh, prev, active, weight, bias, threshold, running_sum, accumulators, steps,
                    remainder, step, max_steps):
    """One launch of the gates (op 0 GRU, 1 LSTM) and the halting step."""
    prev, (gi_, gh_) = _inputs(prev, gi, gh)
    device, acc = prev.device, running_sum.dtype
    rows, hidden = prev.shape
    for name, t in (("active", active), ("weight", weight), ("bias", bias), ("threshold", threshold),
                    ("running_sum", running_sum), ("steps", steps), ("remainder", remainder),
                    *((f"accumulators[{k}]", a) for k, a in enumerate(accumulators))):
        check_device(name, t, device)
    if any(a.dtype != acc for a in accumulators) or remainder.dtype != acc or threshold.dtype != acc:
        raise TypeError("running_sum, the accumulators, remainder and threshold share the accumulation dtype")
    h_new = torch.empty((rows, hidden), dtype=prev.dtype, device=device)
    c_new = torch.empty((rows, hidden), dtype=prev.dtype, device=device) if op == _LSTM_STEP else None
    p, hh, halted = halting_outputs(rows, acc, device)
    new = (h_new,) if c_new is None else (h_new, c_new)
    if rows == 0 or hidden == 0:
        return new, p, hh, halted
    out = cell_step_buffers(running_sum, steps, remainder, accumulators)
    acc_c = out["acc_c"] if c_new is not None else None
    weight, bias, threshold = (dense(as_dtype(t, acc)) for t in (weight, bias, threshold))
    active = dense(active)
    with on_device(device):
        extension().cell_halting_step(
            op, gi_.data_ptr(), gi_.stride(0), gh_.data_ptr(), gh_.stride(0), prev.data_ptr(), prev.stride(0),
            h_new.data_ptr(), 0 if c_new is None else c_new.data_ptr(),
            active.data_ptr(), weight.data_ptr(), bias.data_ptr(), threshold.data_ptr(),
            out["running_sum"].data_ptr(), out["acc_h"].data_ptr(), out["acc_h"].stride(0),
            0 if acc_c is None else acc_c.data_ptr(), 0 if acc_c is None else acc_c.stride(0),
            out["steps"].data_ptr(), out["remainder"].data_ptr(), p.data_ptr(), hh.data_ptr(), halted.data_ptr(),
            rows, hidden, int(step), int(max_steps), DTYPE_CODES[prev.dtype], stream(device),
        )
    out.finish()
    return new, p, hh, halted


def gru_halting_step(gi, gh, h, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                     step, max_steps):
    """CUDA twin of `reference.gru_halting_step` (same contract): one launch."""
    return _halting_launch(_GRU_STEP, gi, gh, h, active, weight, bias, threshold, running_sum, accumulators[:1],
                           steps, remainder, step, max_steps)


def lstm_halting_step(gi, gh, c, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                      step, max_steps):
    """CUDA twin of `reference.lstm_halting_step` (same contract): one launch."""
    return _halting_launch(_LSTM_STEP, gi, gh, c, active, weight, bias, threshold, running_sum, accumulators[:2],
                           steps, remainder, step, max_steps)
