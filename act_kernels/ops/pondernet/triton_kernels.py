"""Triton kernels for PonderNet's two contracts (design §10), and their launchers.

The halting step holds a state row in registers (one program per running row)
for the dot product w.s; everything after it is per-row scalar work. The
backward walks every batch row's steps in reverse order (one lane per row,
BLOCK_B rows per program), so one launch covers all T packed entries.
"""
from __future__ import annotations

import math
import torch
import triton
import triton.language as tl

from ..launch import device_constants, WriteBack, dense, on_device, unit_columns
from ..ragged import rows_by_batch
from ..triton_helpers import block_and_warps


@triton.jit(do_not_specialize=["step", "max_steps"])
def _halting_step_kernel(
    s_ptr, stride_s, active_ptr, w_ptr, c_ptr, unhalted_ptr, steps_ptr, uniform_ptr, limits_ptr,
    p_ptr, lam_ptr, u_ptr, halted_ptr,
    H, step, max_steps,
    MODE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    ACC = unhalted_ptr.dtype.element_ty
    i_a = tl.program_id(0).to(tl.int64)
    i_b = tl.load(active_ptr + i_a)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    b_u = tl.load(unhalted_ptr + i_b)
    b_s = tl.load(s_ptr + i_a * stride_s + o_h, mask=m_h, other=0.0).to(ACC)
    b_w = tl.load(w_ptr + o_h, mask=m_h, other=0.0).to(ACC)
    b_z = tl.sum(b_s * b_w, axis=0) + tl.load(c_ptr).to(ACC)
    b_lam = 1.0 / (1.0 + tl.exp(-b_z))
    b_u_after = b_u * (1.0 - b_lam)
    # eps and the threshold come in the accumulation dtype (a scalar argument would be float32)
    if MODE == 0:
        b_halt = b_u_after < tl.load(limits_ptr)
    elif MODE == 1:
        b_halt = tl.load(uniform_ptr + i_a) < b_lam
    else:
        b_halt = 1.0 - b_u_after >= tl.load(limits_ptr + 1)
    b_halt = b_halt | (step >= max_steps)
    # every warp has read u before it is overwritten
    tl.debug_barrier()
    tl.store(unhalted_ptr + i_b, b_u_after)
    tl.store(steps_ptr + i_b, step.to(tl.int64), mask=b_halt)
    tl.store(p_ptr + i_a, tl.where(b_halt, b_u, b_lam * b_u))
    tl.store(lam_ptr + i_a, b_lam)
    tl.store(u_ptr + i_a, b_u)
    tl.store(halted_ptr + i_a, b_halt)


def halting_step(state, active, weight, bias, unhalted, steps, uniform, step, max_steps, mode, eps, threshold):
    """Triton twin of `act_kernels.ops.pondernet.reference.halting_step` (same contract)."""
    num_active, hidden = state.shape
    acc = unhalted.dtype
    device = state.device
    p = torch.empty(num_active, dtype=acc, device=device)
    lam = torch.empty(num_active, dtype=acc, device=device)
    u_before = torch.empty(num_active, dtype=acc, device=device)
    halted = torch.empty(num_active, dtype=torch.bool, device=device)
    if num_active == 0:
        return p, lam, u_before, halted
    block, warps = block_and_warps(hidden)
    limits = device_constants((float(eps), float(threshold)), acc, device)
    state = unit_columns(state)
    out = WriteBack(unhalted=unhalted, steps=steps)
    with on_device(device):
        _halting_step_kernel[(num_active,)](
            state, state.stride(0), dense(active), dense(weight), dense(bias), out["unhalted"], out["steps"],
            dense(uniform) if uniform is not None else p, limits, p, lam, u_before, halted,
            hidden, step, max_steps,
            MODE=mode, BLOCK_H=block, num_warps=warps,
        )
    out.finish()
    return p, lam, u_before, halted


@triton.jit
def _halting_backward_kernel(
    order_ptr, first_ptr, steps_ptr, p_ptr, lam_ptr, u_ptr, gp_ptr, gkl_ptr, gz_ptr, logs_ptr,
    B,
    BLOCK_B: tl.constexpr,
):
    ACC = p_ptr.dtype.element_ty
    log_lp = tl.load(logs_ptr)        # log lp and log(1 - lp), in the accumulation dtype
    log_q = tl.load(logs_ptr + 1)
    o_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    b_n = tl.load(steps_ptr + o_b, mask=m_b, other=0)
    b_first = tl.load(first_ptr + o_b, mask=m_b, other=0)
    b_gkl = tl.load(gkl_ptr + o_b, mask=m_b, other=0.0).to(ACC)
    b_r = tl.zeros([BLOCK_B], dtype=ACC)          # R^k = sum_{n > k} gp'^n p^n
    n_max = tl.max(b_n, axis=0)
    for i in range(0, n_max):
        k = n_max - i                              # 1-based step, from the last down
        m_k = m_b & (k <= b_n)
        t = tl.load(order_ptr + b_first + k - 1, mask=m_k, other=0)
        b_p = tl.load(p_ptr + t, mask=m_k, other=0.0)
        b_lam = tl.load(lam_ptr + t, mask=m_k, other=0.0)
        b_u = tl.load(u_ptr + t, mask=m_k, other=0.0)
        b_last = k == b_n
        log_g = tl.where(b_last, (k - 1) * log_q, log_lp + (k - 1) * log_q)
        kl_path = tl.where(b_p > 0, tl.log(tl.where(b_p > 0, b_p, 1.0)) - log_g + 1.0, 0.0)
        b_gp = tl.load(gp_ptr + t, mask=m_k, other=0.0).to(ACC) + b_gkl * kl_path
        b_gz = tl.where(b_last, 0.0, b_lam * (b_u * (1.0 - b_lam) * b_gp - b_r))
        tl.store(gz_ptr + t, b_gz, mask=m_k)
        b_r += tl.where(m_k, b_gp * b_p, 0.0)


def halting_backward(p, lam, u_before, batch_index, step_index, steps, grad_p, grad_kl, prior):
    """Triton twin of `act_kernels.ops.pondernet.reference.halting_backward` (same contract)."""
    total, batch = p.shape[0], steps.shape[0]
    gz = torch.empty(total, dtype=p.dtype, device=p.device)
    if total == 0:
        return gz
    p, lam, u_before, steps = (dense(t) for t in (p, lam, u_before, steps))
    order, first = rows_by_batch(dense(batch_index), steps)
    block = 128 if p.device.type == "cuda" else 16
    logs = device_constants((math.log(prior), math.log1p(-prior)), p.dtype, p.device)
    with on_device(p.device):
        _halting_backward_kernel[(triton.cdiv(batch, block),)](
            order, first, steps, p, lam, u_before, grad_p.to(p.dtype).contiguous(),
            grad_kl.to(p.dtype).contiguous(), gz, logs, batch,
            BLOCK_B=block,
        )
    return gz
