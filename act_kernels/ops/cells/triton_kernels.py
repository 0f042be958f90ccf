"""Triton kernels for the fused gates (same contracts as `reference`).

One program per (row, block of BLOCK_H hidden units): a row's gates for unit
j sit at j, H + j, 2H + j (and 3H + j) of gi and gh, so every program reads
its gate slices once, keeps them in registers, and writes each output element
exactly once. The backward recomputes the gates from the saved inputs rather
than saving them: it reads gi, gh and h again instead of 3-4 extra (A, H)
tensors per ponder step. Math in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..triton_helpers import block_and_warps, halt_row
from ..launch import cell_step_buffers, dense, halting_outputs, on_device, unit_columns

BLOCK_H = 256


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1, stable at both ends
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gru_gates(gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, i_a, o, m, H, ACC: tl.constexpr):
    """r, z, n, the hidden projection's n slice and h of unit block o of row i_a."""
    p_gi, p_gh = gi_ptr + i_a * s_gi + o, gh_ptr + i_a * s_gh + o
    r = _sigmoid(tl.load(p_gi, mask=m, other=0.0).to(ACC) + tl.load(p_gh, mask=m, other=0.0).to(ACC))
    z = _sigmoid(tl.load(p_gi + H, mask=m, other=0.0).to(ACC) + tl.load(p_gh + H, mask=m, other=0.0).to(ACC))
    gh_n = tl.load(p_gh + 2 * H, mask=m, other=0.0).to(ACC)
    n = _tanh(tl.load(p_gi + 2 * H, mask=m, other=0.0).to(ACC) + r * gh_n)
    h = tl.load(h_ptr + i_a * s_h + o, mask=m, other=0.0).to(ACC)
    return r, z, n, gh_n, h


@triton.jit
def _gru_fwd_kernel(gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, out_ptr, H, BLOCK: tl.constexpr):
    i_a = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < H
    ACC = tl.float64 if h_ptr.dtype.element_ty == tl.float64 else tl.float32
    r, z, n, _, h = _gru_gates(gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, i_a, o, m, H, ACC)
    tl.store(out_ptr + i_a * H + o, ((1.0 - z) * n + z * h).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gru_bwd_kernel(g_ptr, s_g, gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, dgi_ptr, dgh_ptr, dh_ptr, H,
                    BLOCK: tl.constexpr):
    i_a = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < H
    ACC = tl.float64 if h_ptr.dtype.element_ty == tl.float64 else tl.float32
    r, z, n, gh_n, h = _gru_gates(gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, i_a, o, m, H, ACC)
    g = tl.load(g_ptr + i_a * s_g + o, mask=m, other=0.0).to(ACC)
    d_n = g * (1.0 - z) * (1.0 - n * n)
    d_z = g * (h - n) * z * (1.0 - z)
    d_r = d_n * gh_n * r * (1.0 - r)
    G = dgi_ptr.dtype.element_ty
    q_gi, q_gh = dgi_ptr + i_a * 3 * H + o, dgh_ptr + i_a * 3 * H + o
    tl.store(q_gi, d_r.to(G), mask=m)
    tl.store(q_gi + H, d_z.to(G), mask=m)
    tl.store(q_gi + 2 * H, d_n.to(G), mask=m)
    tl.store(q_gh, d_r.to(G), mask=m)
    tl.store(q_gh + H, d_z.to(G), mask=m)
    tl.store(q_gh + 2 * H, (d_n * r).to(G), mask=m)
    tl.store(dh_ptr + i_a * H + o, (g * z).to(dh_ptr.dtype.element_ty), mask=m)


@triton.jit
def _lstm_gates(gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c, i_a, o, m, H, ACC: tl.constexpr):
    p_gi, p_gh = gi_ptr + i_a * s_gi + o, gh_ptr + i_a * s_gh + o
    i = _sigmoid(tl.load(p_gi, mask=m, other=0.0).to(ACC) + tl.load(p_gh, mask=m, other=0.0).to(ACC))
    f = _sigmoid(tl.load(p_gi + H, mask=m, other=0.0).to(ACC) + tl.load(p_gh + H, mask=m, other=0.0).to(ACC))
    g = _tanh(tl.load(p_gi + 2 * H, mask=m, other=0.0).to(ACC) + tl.load(p_gh + 2 * H, mask=m, other=0.0).to(ACC))
    og = _sigmoid(tl.load(p_gi + 3 * H, mask=m, other=0.0).to(ACC)
                  + tl.load(p_gh + 3 * H, mask=m, other=0.0).to(ACC))
    c = tl.load(c_ptr + i_a * s_c + o, mask=m, other=0.0).to(ACC)
    return i, f, g, og, c


@triton.jit
def _lstm_fwd_kernel(gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c, h_out, c_out, H, BLOCK: tl.constexpr):
    i_a = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < H
    ACC = tl.float64 if c_ptr.dtype.element_ty == tl.float64 else tl.float32
    i, f, g, og, c = _lstm_gates(gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c, i_a, o, m, H, ACC)
    c_new = f * c + i * g
    T = h_out.dtype.element_ty
    tl.store(c_out + i_a * H + o, c_new.to(T), mask=m)
    tl.store(h_out + i_a * H + o, (og * _tanh(c_new)).to(T), mask=m)


@triton.jit
def _lstm_bwd_kernel(gh_out_ptr, s_dh, gc_out_ptr, s_dc, gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c,
                     da_ptr, dc_ptr, H, BLOCK: tl.constexpr):
    i_a = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < H
    ACC = tl.float64 if c_ptr.dtype.element_ty == tl.float64 else tl.float32
    i, f, g, og, c = _lstm_gates(gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c, i_a, o, m, H, ACC)
    t = _tanh(f * c + i * g)
    dh = tl.load(gh_out_ptr + i_a * s_dh + o, mask=m, other=0.0).to(ACC)
    dc = tl.load(gc_out_ptr + i_a * s_dc + o, mask=m, other=0.0).to(ACC) + dh * og * (1.0 - t * t)
    G = da_ptr.dtype.element_ty
    q = da_ptr + i_a * 4 * H + o
    tl.store(q, (dc * g * i * (1.0 - i)).to(G), mask=m)
    tl.store(q + H, (dc * c * f * (1.0 - f)).to(G), mask=m)
    tl.store(q + 2 * H, (dc * i * (1.0 - g * g)).to(G), mask=m)
    tl.store(q + 3 * H, (dh * t * og * (1.0 - og)).to(G), mask=m)
    tl.store(dc_ptr + i_a * H + o, (dc * f).to(dc_ptr.dtype.element_ty), mask=m)


def _block(hidden: int) -> int:
    return min(BLOCK_H, triton.next_power_of_2(hidden))


def _grid(rows: int, hidden: int):
    return (rows, triton.cdiv(hidden, _block(hidden)))


def gru_gates_forward(gi, gh, h):
    gi, gh, h = unit_columns(gi), unit_columns(gh), unit_columns(h)
    A, H = h.shape
    out = torch.empty((A, H), dtype=h.dtype, device=h.device)
    if A:
        with on_device(h.device):
            _gru_fwd_kernel[_grid(A, H)](gi, gi.stride(0), gh, gh.stride(0), h, h.stride(0), out, H,
                                        BLOCK=_block(H))
    return out


def gru_gates_backward(grad, gi, gh, h) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad, gi, gh, h = unit_columns(grad), unit_columns(gi), unit_columns(gh), unit_columns(h)
    A, H = h.shape
    d_gi = torch.empty((A, 3 * H), dtype=gi.dtype, device=h.device)
    d_gh = torch.empty((A, 3 * H), dtype=gh.dtype, device=h.device)
    d_h = torch.empty((A, H), dtype=h.dtype, device=h.device)
    if A:
        with on_device(h.device):
            _gru_bwd_kernel[_grid(A, H)](grad, grad.stride(0), gi, gi.stride(0), gh, gh.stride(0), h, h.stride(0),
                                        d_gi, d_gh, d_h, H, BLOCK=_block(H))
    return d_gi, d_gh, d_h


def lstm_gates_forward(gi, gh, c):
    gi, gh, c = unit_columns(gi), unit_columns(gh), unit_columns(c)
    A, H = c.shape
    h_new = torch.empty((A, H), dtype=c.dtype, device=c.device)
    c_new = torch.empty((A, H), dtype=c.dtype, device=c.device)
    if A:
        with on_device(c.device):
            _lstm_fwd_kernel[_grid(A, H)](gi, gi.stride(0), gh, gh.stride(0), c, c.stride(0), h_new, c_new, H,
                                         BLOCK=_block(H))
    return h_new, c_new


def lstm_gates_backward(grad_h, grad_c, gi, gh, c):
    grad_h, grad_c = unit_columns(grad_h), unit_columns(grad_c)
    gi, gh, c = unit_columns(gi), unit_columns(gh), unit_columns(c)
    A, H = c.shape
    d_a = torch.empty((A, 4 * H), dtype=gi.dtype, device=c.device)
    d_c = torch.empty((A, H), dtype=c.dtype, device=c.device)
    if A:
        with on_device(c.device):
            _lstm_bwd_kernel[_grid(A, H)](grad_h, grad_h.stride(0), grad_c, grad_c.stride(0), gi, gi.stride(0),
                                         gh, gh.stride(0), c, c.stride(0), d_a, d_c, H, BLOCK=_block(H))
    return d_a, d_c


# ---- a ponder step's gates and its halting step in one launch ----------------
# One program per active row, holding the whole row (BLOCK = next power of two
# of H): the halting unit needs the full dot product w.h' before it knows p,
# and p before it can accumulate. h' (and c') are stored once for the next
# step and the backward, then read back from registers for the halting step,
# rounded to the state dtype first so that the fused step decides and
# accumulates exactly what the unfused one (gates, then halting) would.


@triton.jit(do_not_specialize=["step", "max_steps"])
def _gru_halting_kernel(
    gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, out_ptr,
    active_ptr, w_ptr, c_ptr, thr_ptr, running_ptr, acc_ptr, stride_acc, steps_ptr, rem_ptr,
    p_ptr, hh_ptr, halted_ptr,
    H, step, max_steps, BLOCK: tl.constexpr,
):
    ACC = running_ptr.dtype.element_ty
    i_a = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < H
    r, z, n, _, h = _gru_gates(gi_ptr, s_gi, gh_ptr, s_gh, h_ptr, s_h, i_a, o, m, H, ACC)
    b_s = ((1.0 - z) * n + z * h).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i_a * H + o, b_s, mask=m)
    halt_row(tl.where(m, b_s.to(ACC), 0.0), o, m, i_a, active_ptr, w_ptr, c_ptr, thr_ptr,
              running_ptr, acc_ptr, stride_acc, steps_ptr, rem_ptr, p_ptr, hh_ptr, halted_ptr,
              H, step, max_steps)


@triton.jit(do_not_specialize=["step", "max_steps"])
def _lstm_halting_kernel(
    gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c, h_out, c_out,
    active_ptr, w_ptr, bias_ptr, thr_ptr, running_ptr, acc_ptr, stride_acc, cacc_ptr, stride_cacc,
    steps_ptr, rem_ptr, p_ptr, hh_ptr, halted_ptr,
    H, step, max_steps, BLOCK: tl.constexpr,
):
    ACC = running_ptr.dtype.element_ty
    i_a = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < H
    i, f, g, og, c = _lstm_gates(gi_ptr, s_gi, gh_ptr, s_gh, c_ptr, s_c, i_a, o, m, H, ACC)
    T = h_out.dtype.element_ty
    c_acc = f * c + i * g          # h' reads c' before rounding, as the unfused gates do
    c_new = c_acc.to(T)
    h_new = (og * _tanh(c_acc)).to(T)
    tl.store(c_out + i_a * H + o, c_new, mask=m)
    tl.store(h_out + i_a * H + o, h_new, mask=m)
    i_b, b_p = halt_row(tl.where(m, h_new.to(ACC), 0.0), o, m, i_a, active_ptr, w_ptr, bias_ptr, thr_ptr,
                         running_ptr, acc_ptr, stride_acc, steps_ptr, rem_ptr, p_ptr, hh_ptr, halted_ptr,
                         H, step, max_steps)
    p_cacc = cacc_ptr + i_b * stride_cacc + o
    tl.store(p_cacc, tl.load(p_cacc, mask=m, other=0.0) + b_p * c_new.to(ACC), mask=m)


def gru_halting_step(gi, gh, h, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                     step, max_steps):
    """Triton twin of `reference.gru_halting_step` (same contract): one launch."""
    gi, gh, h = unit_columns(gi), unit_columns(gh), unit_columns(h)
    A, H = h.shape
    out = torch.empty((A, H), dtype=h.dtype, device=h.device)
    p, hh, halted = halting_outputs(A, running_sum.dtype, h.device)
    if A == 0:
        return (out,), p, hh, halted
    block, warps = block_and_warps(H)
    buf = cell_step_buffers(running_sum, steps, remainder, accumulators[:1])
    with on_device(h.device):
        _gru_halting_kernel[(A,)](
            gi, gi.stride(0), gh, gh.stride(0), h, h.stride(0), out,
            dense(active), dense(weight), dense(bias), dense(threshold), buf["running_sum"],
            buf["acc_h"], buf["acc_h"].stride(0), buf["steps"], buf["remainder"], p, hh, halted,
            H, step, max_steps, BLOCK=block, num_warps=warps,
        )
    buf.finish()
    return (out,), p, hh, halted


def lstm_halting_step(gi, gh, c, active, weight, bias, threshold, running_sum, accumulators, steps, remainder,
                      step, max_steps):
    """Triton twin of `reference.lstm_halting_step` (same contract): one launch."""
    gi, gh, c = unit_columns(gi), unit_columns(gh), unit_columns(c)
    A, H = c.shape
    h_new = torch.empty((A, H), dtype=c.dtype, device=c.device)
    c_new = torch.empty((A, H), dtype=c.dtype, device=c.device)
    p, hh, halted = halting_outputs(A, running_sum.dtype, c.device)
    if A == 0:
        return (h_new, c_new), p, hh, halted
    block, warps = block_and_warps(H)
    buf = cell_step_buffers(running_sum, steps, remainder, accumulators[:2])
    with on_device(c.device):
        _lstm_halting_kernel[(A,)](
            gi, gi.stride(0), gh, gh.stride(0), c, c.stride(0), h_new, c_new,
            dense(active), dense(weight), dense(bias), dense(threshold), buf["running_sum"],
            buf["acc_h"], buf["acc_h"].stride(0), buf["acc_c"], buf["acc_c"].stride(0),
            buf["steps"], buf["remainder"], p, hh, halted,
            H, step, max_steps, BLOCK=block, num_warps=warps,
        )
    buf.finish()
    return (h_new, c_new), p, hh, halted
