"""Triton helpers shared by the op families: the block and warp count of a
row-per-program kernel, and ACT's halting row logic (design §3), which ACT's
halting kernel and the fused cell-and-halting kernels both run on a state
row already held in registers."""
from __future__ import annotations

from typing import Tuple

import triton
import triton.language as tl

MAX_HIDDEN = 32768


def block_and_warps(hidden: int) -> Tuple[int, int]:
    """BLOCK_H (the next power of two of H: a whole row in registers) and the
    warps of one row's program."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"the triton backend supports H <= {MAX_HIDDEN}, got H = {hidden}")
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // 256, 1), 16)


@triton.jit
def halt_row(
    b_s, o_h, m_h, i_a, active_ptr, w_ptr, c_ptr, thr_ptr,
    running_ptr, acc_ptr, stride_acc, steps_ptr, rem_ptr, p_ptr, h_ptr, halted_ptr,
    H, step, max_steps,
):
    """The halting step of active row i_a, whose new state b_s (in ACC, zero
    past H) is already in registers: halting unit, decision, running sum,
    steps and remainder, accumulator row += p s. Returns (i_b, p) so that a
    caller can accumulate further state tensors with the same p. Shared by
    the halting kernel below and the fused cell-and-halting kernels
    (ops/cells), which compute b_s themselves."""
    ACC = running_ptr.dtype.element_ty
    i_b = tl.load(active_ptr + i_a)
    # Every warp of the program reads the running sum before the barrier
    # below; only then is the new sum stored. Read after the store, a slow
    # warp would decide (and accumulate) with the updated sum and a wrong p.
    b_r = tl.load(running_ptr + i_b)
    b_w = tl.load(w_ptr + o_h, mask=m_h, other=0.0).to(ACC)
    b_z = tl.sum(b_s * b_w, axis=0) + tl.load(c_ptr).to(ACC)
    b_h = 1.0 / (1.0 + tl.exp(-b_z))

    # Halting test of design §1: running sum of the earlier h plus this h, in ACC.
    b_halt = (b_r + b_h >= tl.load(thr_ptr)) | (step >= max_steps)
    tl.debug_barrier()
    b_p = tl.where(b_halt, 1.0 - b_r, b_h)
    tl.store(running_ptr + i_b, tl.where(b_halt, b_r, b_r + b_h))
    tl.store(steps_ptr + i_b, step.to(tl.int64), mask=b_halt)
    tl.store(rem_ptr + i_b, b_p, mask=b_halt)

    p_acc = acc_ptr + i_b * stride_acc + o_h
    tl.store(p_acc, tl.load(p_acc, mask=m_h, other=0.0) + b_p * b_s, mask=m_h)
    tl.store(p_ptr + i_a, b_p)
    tl.store(h_ptr + i_a, b_h)
    tl.store(halted_ptr + i_a, b_halt)
    return i_b, b_p


@triton.jit
def accumulate_row(x_ptr, stride_x, xacc_ptr, stride_xacc, i_a, i_b, b_p, HX, BLOCK_X: tl.constexpr):
    """xacc[i_b] += p x[i_a]: a further mean-fielded state tensor (an LSTM's c)."""
    ACC = xacc_ptr.dtype.element_ty
    o_x = tl.arange(0, BLOCK_X)
    m_x = o_x < HX
    b_x = tl.load(x_ptr + i_a * stride_x + o_x, mask=m_x, other=0.0).to(ACC)
    p_xacc = xacc_ptr + i_b * stride_xacc + o_x
    tl.store(p_xacc, tl.load(p_xacc, mask=m_x, other=0.0) + b_p * b_x, mask=m_x)
