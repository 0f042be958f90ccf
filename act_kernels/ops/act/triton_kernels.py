"""Triton kernels for the two contracts of design §3, and their launchers.

Both kernels hold a whole state row in registers (BLOCK_H = next power of two
of H): the halting unit needs the full dot product w.s before it knows p, and
then needs s again for the accumulation, so keeping the row avoids a second
read from global memory. z, h, the running sum and all accumulation are done
in the accumulation dtype (float32; float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..launch import WriteBack, dense, halting_outputs, on_device, row_steps, unit_columns
from ..ragged import rows_by_batch, step_table
from ..triton_helpers import accumulate_row, block_and_warps, halt_row

@triton.jit(do_not_specialize=["step", "max_steps"])
def _halting_step_kernel(
    s_ptr, stride_s, active_ptr, w_ptr, c_ptr, thr_ptr,
    running_ptr, acc_ptr, stride_acc, steps_ptr, rem_ptr,
    p_ptr, h_ptr, halted_ptr,
    x_ptr, stride_x, xacc_ptr, stride_xacc, HX,
    H, step, max_steps, row_steps_ptr,
    BLOCK_H: tl.constexpr, BLOCK_X: tl.constexpr, HAS_X: tl.constexpr, PER_ROW_STEP: tl.constexpr,
):
    ACC = running_ptr.dtype.element_ty
    i_a = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    b_s = tl.load(s_ptr + i_a * stride_s + o_h, mask=m_h, other=0.0).to(ACC)
    if PER_ROW_STEP:   # rows at their own steps (the depth-wise scheduler, design §17)
        n = tl.load(row_steps_ptr + i_a)
    else:
        n = step.to(tl.int64)
    i_b, b_p = halt_row(b_s, o_h, m_h, i_a, active_ptr, w_ptr, c_ptr, thr_ptr,
                         running_ptr, acc_ptr, stride_acc, steps_ptr, rem_ptr, p_ptr, h_ptr, halted_ptr,
                         H, n, max_steps)
    if HAS_X:  # a second mean-fielded state tensor (an LSTM's c), with the same p
        accumulate_row(x_ptr, stride_x, xacc_ptr, stride_xacc, i_a, i_b, b_p, HX, BLOCK_X)


def halting_step(
    state: torch.Tensor,
    active: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor,
    running_sum: torch.Tensor,
    accumulator: torch.Tensor,
    steps: torch.Tensor,
    remainder: torch.Tensor,
    step,
    max_steps: int,
    extra: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
):
    """Triton twin of `act_kernels.reference.halting_step` (same contract;
    step: one int, or each row's own, an (A,) int64 tensor on the device).
    The first extra (state, accumulator) pair is accumulated in the same
    launch; any further ones (no layer has them) by index_add_."""
    num_active, hidden = state.shape
    acc = running_sum.dtype
    p, h, halted = halting_outputs(num_active, acc, state.device)
    if num_active == 0:
        return p, h, halted
    block, warps = block_and_warps(hidden)
    state = unit_columns(state)
    buffers = dict(running_sum=running_sum, steps=steps, remainder=remainder, accumulator=accumulator)
    if extra:
        x, x_acc = extra[0]
        x = unit_columns(x)
        buffers["x_acc"] = x_acc
        block_x, warps_x = block_and_warps(x.shape[1])
        warps = max(warps, warps_x)
    out = WriteBack(**buffers)
    acc_rows = out["accumulator"]
    x_args = (x, x.stride(0), out["x_acc"], out["x_acc"].stride(0), x.shape[1]) if extra else (state, 0, acc_rows, 0, 0)
    per_row = row_steps(step, num_active, state.device)
    active = dense(active)
    with on_device(state.device):
        _halting_step_kernel[(num_active,)](
            state, state.stride(0), active, dense(weight), dense(bias), dense(threshold),
            out["running_sum"], acc_rows, acc_rows.stride(0), out["steps"], out["remainder"],
            p, h, halted,
            *x_args,
            # without a step per row, `active` (int64 too) stands in for the pointer, unread
            hidden, step if per_row is None else 1, max_steps, active if per_row is None else per_row,
            BLOCK_H=block, BLOCK_X=block_x if extra else 1, HAS_X=bool(extra), PER_ROW_STEP=per_row is not None,
            num_warps=warps,
        )
    out.finish()
    for t, m in extra[1:]:
        m.index_add_(0, active, p[:, None] * t.to(acc))
    return p, h, halted


@triton.jit
def _row_offset(table_ptr, S, k, t):
    # packed row t of step k (0-based): see ops.ragged.step_table
    return tl.load(table_ptr + k) + (t - tl.load(table_ptr + 2 * S + k)) * tl.load(table_ptr + S + k)


@triton.jit
def _combine_backward_kernel(
    base_ptr, table_ptr, S, order_ptr, first_ptr, steps_ptr,
    p_ptr, h_ptr, extra_ptr, gS_ptr, stride_gS, grho_ptr, w_ptr,
    gs_ptr, gw_part_ptr, gc_part_ptr,
    B, H,
    HAS_EXTRA: tl.constexpr, BLOCK_H: tl.constexpr,
):
    ACC = p_ptr.dtype.element_ty
    i_p = tl.program_id(0)
    n_p = tl.num_programs(0)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    b_w = tl.load(w_ptr + o_h, mask=m_h, other=0.0).to(ACC)
    b_gw = tl.zeros([BLOCK_H], dtype=ACC)
    b_gc = tl.sum(tl.zeros([BLOCK_H], dtype=ACC), axis=0)

    # One program walks whole batch rows: gS_b and <gS_b, s^N_b> are loaded
    # once per batch row, not once per packed row.
    for i_b in range(i_p, B, n_p):
        bos = tl.load(first_ptr + i_b)
        n_b = tl.load(steps_ptr + i_b)
        b_g = tl.load(gS_ptr + tl.cast(i_b, tl.int64) * stride_gS + o_h, mask=m_h, other=0.0).to(ACC)
        t_last = tl.load(order_ptr + bos + n_b - 1)
        b_last = tl.load(base_ptr + _row_offset(table_ptr, S, n_b - 1, t_last) + o_h, mask=m_h, other=0.0).to(ACC)
        d_last = tl.sum(b_g * b_last, axis=0) + tl.load(grho_ptr + i_b).to(ACC)
        if HAS_EXTRA:
            d_last += tl.load(extra_ptr + t_last).to(ACC)
        for k in range(0, n_b - 1):
            t = tl.load(order_ptr + bos + k)
            # h and p are loaded with the row: one memory round trip per step
            b_hv = tl.load(h_ptr + t)
            b_pt = tl.load(p_ptr + t)
            b_s = tl.load(base_ptr + _row_offset(table_ptr, S, k, t) + o_h, mask=m_h, other=0.0).to(ACC)
            b_dot = tl.sum(b_g * b_s, axis=0)
            if HAS_EXTRA:
                b_dot += tl.load(extra_ptr + t).to(ACC)
            b_gz = (b_dot - d_last) * b_hv * (1.0 - b_hv)
            b_gs = b_pt * b_g + b_gz * b_w
            tl.store(gs_ptr + t * H + o_h, b_gs.to(gs_ptr.dtype.element_ty), mask=m_h)
            b_gw += b_gz * b_s
            b_gc += b_gz
        # The last step's weight is the remainder: no path through its h.
        b_gs_last = tl.load(p_ptr + t_last) * b_g
        tl.store(gs_ptr + t_last * H + o_h, b_gs_last.to(gs_ptr.dtype.element_ty), mask=m_h)

    tl.store(gw_part_ptr + i_p * H + o_h, b_gw, mask=m_h)
    tl.store(gc_part_ptr + i_p, b_gc)


def _num_programs(batch: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(batch, 8 * sms))
    return max(1, min(batch, 4))  # the CPU interpreter runs programs one by one


def combine_backward(
    states: Sequence[torch.Tensor],
    batch_index: torch.Tensor,
    p: torch.Tensor,
    h: torch.Tensor,
    steps: torch.Tensor,
    grad_state: torch.Tensor,
    grad_ponder: torch.Tensor,
    weight: torch.Tensor,
    extra_dot: Optional[torch.Tensor] = None,
):
    """Triton twin of `act_kernels.reference.combine_backward` (same contract).

    gw and gc are reduced deterministically: each program owns a fixed set of
    batch rows and writes its partial sum; the partials are summed in a fixed
    order afterwards, so the same inputs give bitwise the same gradients.
    """
    hidden = states[0].shape[1]
    batch = steps.shape[0]
    device = states[0].device
    acc = p.dtype
    base, table, _ = step_table([unit_columns(t) for t in states])
    p, h, steps, grad_ponder, weight, extra_dot = (dense(t) for t in (p, h, steps, grad_ponder, weight, extra_dot))
    order, first = rows_by_batch(dense(batch_index), steps)
    grad_state = unit_columns(grad_state)
    total = p.shape[0]
    gs = torch.empty(total, hidden, dtype=base.dtype, device=device)
    programs = _num_programs(batch, device)
    gw_part = torch.empty(programs, hidden, dtype=acc, device=device)
    gc_part = torch.empty(programs, dtype=acc, device=device)
    block, warps = block_and_warps(hidden)
    with on_device(device):
        _combine_backward_kernel[(programs,)](
            base, table, table.shape[1], order, first, steps,
            p, h, extra_dot if extra_dot is not None else p, grad_state, grad_state.stride(0),
            grad_ponder, weight,
            gs, gw_part, gc_part,
            batch, hidden,
            HAS_EXTRA=extra_dot is not None, BLOCK_H=block, num_warps=warps,
        )
    return gs, gw_part.sum(0), gc_part.sum()
