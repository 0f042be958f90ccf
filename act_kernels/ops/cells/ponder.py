"""A GRU or LSTM cell's whole ponder (one time step of an ACT layer) as one
autograd Function: what the layers run on every fused backend (cpu, triton,
cuda).

Driven step by step through autograd, a ponder step leaves about ten graph
nodes behind (the row gathers, the hidden GEMM, the fused step, the
survivors' compaction), and their backward issues about 26 ATen ops per
step: gradient accumulation adds, zero-filled index_select backwards, the
GEMM's transposes. On the CPU at small sizes each op costs more than its
arithmetic, and on a GPU each is a launch. Here the forward runs the loop
without autograd (one gates-and-halting kernel call per step), and the
backward walks the steps in reverse itself:

    g_h'   = (combine backward's gs rows of step n) + (carry from step n+1)
    d gi, d gh, d h_gates = the gate kernel's recomputing backward
    d h    = d h_gates + d gh W_hh        (one addmm)
    d W_hh += d gh^T h,  d b_hh += sum d gh
    d later[active_n] += d gi             (one index_add_ into one buffer)
    carry to step n-1: d h scattered to the survivors' positions

about 8 ops per step. The combine backward (the halting unit's and the mean
field's part) is the kernel driver's, run once over all packed rows.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..state import accumulation_dtype
from ..launch import as_dtype
from ..ragged import packed_step_index
from ..output import HaltingProbs, PonderOutput


class _Meta(NamedTuple):
    kind: str                 # "gru" or "lstm"
    impl: object              # the gate kernels (ops.cells cpu_kernels / reference / ...)
    combine_backward: object  # the ACT combine-backward kernel
    max_steps: int
    eps: float


class _CellPonder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, later, flag_column, h0, c0, weight_hh, bias_hh, halt_weight, halt_bias, meta: _Meta):
        ctx.set_materialize_grads(False)
        lstm = meta.kind == "lstm"
        batch, hidden = h0.shape
        dtype, device = h0.dtype, h0.device
        acc = accumulation_dtype(dtype)
        w = as_dtype(halt_weight.detach().reshape(-1), acc).contiguous()
        c = as_dtype(halt_bias.detach().reshape(1), acc)
        threshold = torch.full((1,), 1.0 - meta.eps, dtype=acc, device=device)
        running_sum = torch.zeros(batch, dtype=acc, device=device)
        steps = torch.zeros(batch, dtype=torch.int64, device=device)
        remainder = torch.zeros(batch, dtype=acc, device=device)
        mean_h = torch.zeros(batch, hidden, dtype=acc, device=device)
        mean_c = torch.zeros(batch, hidden, dtype=acc, device=device) if lstm else None
        accumulators = (mean_h, mean_c) if lstm else (mean_h,)
        step_fn = meta.impl.lstm_halting_step if lstm else meta.impl.gru_halting_step
        w_hh_t = weight_hh.t()

        active = torch.arange(batch, device=device)
        h, cell = h0, c0
        gi = later + flag_column                      # step 1: every row, with the flag
        saved: List[Tensor] = []                      # per step: gi, gh, h_prev, (c_prev), h', (c')
        rows, keeps, ps, hs, counts = [], [], [], [], []
        for n in range(1, meta.max_steps + 1):
            gh = torch.addmm(bias_hh, h, w_hh_t) if bias_hh is not None else h @ w_hh_t
            new, p, hh, halted = step_fn(gi, gh, cell if lstm else h, active, w, c, threshold, running_sum,
                                         accumulators, steps, remainder, n, meta.max_steps)
            saved.extend((gi, gh, h) + ((cell,) if lstm else ()) + tuple(new))
            rows.append(active)
            ps.append(p)
            hs.append(hh)
            counts.append(active.numel())
            keep = torch.nonzero(~halted).squeeze(1)  # the one host sync per step
            if keep.numel() == 0:
                break
            if keep.numel() == active.numel():        # nobody halted: the same rows run on
                keeps.append(None)
                h, cell = new[0], (new[1] if lstm else None)
                if n == 1:
                    gi = later                        # every row, now without the flag
                continue
            keeps.append(keep)
            active = active.index_select(0, keep)
            h = new[0].index_select(0, keep)
            cell = new[1].index_select(0, keep) if lstm else None
            gi = later.index_select(0, active)

        p_all, h_all, batch_index = torch.cat(ps), torch.cat(hs), torch.cat(rows)
        step_index = packed_step_index(counts, device)
        ponder_cost = steps.to(acc) + remainder
        ctx.meta, ctx.counts, ctx.keeps, ctx.dtype = meta, counts, keeps, dtype
        ctx.has_bias = bias_hh is not None
        ctx.later_shape, ctx.later_dtype = later.shape, later.dtype
        ctx.halt_weight = (halt_weight.shape, halt_weight.dtype)
        ctx.halt_bias = (halt_bias.shape, halt_bias.dtype)
        ctx.save_for_backward(weight_hh, w, p_all, h_all, batch_index, steps, *rows, *saved)
        ctx.mark_non_differentiable(steps, remainder, p_all, batch_index, step_index)
        out_h = mean_h.to(dtype)
        out_c = mean_c.to(dtype) if lstm else torch.zeros(0, dtype=dtype, device=device)
        return out_h, out_c, ponder_cost, steps, remainder, p_all, batch_index, step_index

    @staticmethod
    @once_differentiable   # the kernels' backward is not itself differentiable: say so, not a wrong answer
    def backward(ctx, g_out_h, g_out_c, g_cost, *_):
        # outputs unused by the loss arrive as None (no materialized zeros)
        meta, counts, keeps = ctx.meta, ctx.counts, ctx.keeps
        lstm = meta.kind == "lstm"
        n_steps = len(counts)
        weight_hh, w, p_all, h_all, batch_index, steps, *rest = ctx.saved_tensors
        rows, saved = rest[:n_steps], rest[n_steps:]
        per = 6 if lstm else 4                        # gi, gh, h_prev, (c_prev), h', (c')
        acc = p_all.dtype
        batch, hidden = steps.shape[0], weight_hh.shape[1]
        device = p_all.device
        g_s = torch.zeros(batch, hidden, dtype=ctx.dtype, device=device) if g_out_h is None else g_out_h
        g_rho = torch.zeros(batch, dtype=acc, device=device) if g_cost is None else g_cost.contiguous()
        new_h = [saved[k * per + (4 if lstm else 3)] for k in range(n_steps)]

        extra_dot, g_c_rows = None, None
        if lstm:
            new_c = torch.cat([saved[k * per + 5] for k in range(n_steps)])
            g_sc = torch.zeros(p_all.shape[0], hidden, dtype=acc, device=device) if g_out_c is None \
                else as_dtype(g_out_c, acc).index_select(0, batch_index)
            extra_dot = (g_sc * new_c.to(acc)).sum(-1)
            g_c_rows = torch.split((p_all[:, None] * g_sc).to(ctx.dtype), counts)
        gs, gw, gc = meta.combine_backward(new_h, batch_index, p_all, h_all, steps, g_s, g_rho, w, extra_dot)
        gs_rows = torch.split(gs, counts)

        d_later = torch.zeros(ctx.later_shape, dtype=ctx.later_dtype, device=device)
        d_weight = torch.zeros_like(weight_hh)
        d_bias = torch.zeros(weight_hh.shape[0], dtype=weight_hh.dtype, device=device) if ctx.has_bias else None
        d_flag = None
        carry_h: Optional[Tensor] = None
        carry_c: Optional[Tensor] = None
        d_h0 = d_c0 = None
        for k in reversed(range(n_steps)):
            gi, gh, h_prev = saved[k * per], saved[k * per + 1], saved[k * per + 2]
            g_h = gs_rows[k] if carry_h is None else gs_rows[k] + carry_h
            if lstm:
                c_prev = saved[k * per + 3]
                g_c = g_c_rows[k] if carry_c is None else g_c_rows[k] + carry_c
                d_gi, d_cprev = meta.impl.lstm_gates_backward(g_h, g_c, gi, gh, c_prev)
                d_gh = as_dtype(d_gi, weight_hh.dtype)
                d_hprev = d_gh @ weight_hh
            else:
                d_gi, d_gh, d_hg = meta.impl.gru_gates_backward(g_h, gi, gh, h_prev)
                d_gh = as_dtype(d_gh, weight_hh.dtype)
                d_hprev = torch.addmm(as_dtype(d_hg, weight_hh.dtype), d_gh, weight_hh)
                d_cprev = None
            d_weight.addmm_(d_gh.t(), as_dtype(h_prev, weight_hh.dtype))
            if d_bias is not None:
                d_bias += d_gh.sum(0)
            d_gi = as_dtype(d_gi, ctx.later_dtype)
            if k == 0:
                d_later += d_gi
                d_flag = d_gi.sum(0)
                d_h0, d_c0 = d_hprev, d_cprev
                break
            d_later.index_add_(0, rows[k], d_gi)
            # carry to step k-1: its rows that survived, at their positions there
            keep = keeps[k - 1]
            if keep is None:
                carry_h, carry_c = d_hprev, d_cprev
            else:
                carry_h = torch.zeros(counts[k - 1], hidden, dtype=d_hprev.dtype, device=device)
                carry_h.index_add_(0, keep, d_hprev)
                if lstm:
                    carry_c = torch.zeros(counts[k - 1], hidden, dtype=d_cprev.dtype, device=device)
                    carry_c.index_add_(0, keep, d_cprev)
        d_h0 = as_dtype(d_h0, ctx.dtype)
        d_c0 = as_dtype(d_c0, ctx.dtype) if lstm else None
        (w_shape, w_dtype), (b_shape, b_dtype) = ctx.halt_weight, ctx.halt_bias
        return (d_later, d_flag, d_h0, d_c0, d_weight, d_bias,
                gw.reshape(w_shape).to(w_dtype), gc.reshape(b_shape).to(b_dtype), None)


def cell_ponder(kind: str, impl, combine_backward, later: Tensor, flag_column: Tensor, state, weight_hh: Tensor,
                bias_hh: Optional[Tensor], halt_weight: Tensor, halt_bias: Tensor, *, max_steps: int,
                eps: float) -> PonderOutput:
    """One ponder of a GRU/LSTM cell over every row of `later` (B, G), the
    hoisted input projection x W_ih^T + b_ih; the first step adds
    `flag_column` (G,). state: h (B, H), or (h, c) for an LSTM. Same results
    and gradients as `ponder` over the cell's step; see the module doc."""
    lstm = kind == "lstm"
    h0, c0 = (state[0], state[1]) if lstm else (state, None)
    meta = _Meta(kind, impl, combine_backward, max_steps, eps)
    out_h, out_c, cost, steps, remainder, p_all, batch_index, step_index = _CellPonder.apply(
        later, flag_column, h0, c0, weight_hh, bias_hh, halt_weight, halt_bias, meta)
    return PonderOutput(
        state=(out_h, out_c) if lstm else out_h,
        ponder_cost=cost,
        steps=steps,
        remainder=remainder,
        halting_probs=HaltingProbs(p_all, batch_index, step_index, h0.shape[0]),
    )
