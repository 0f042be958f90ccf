"""`ponder`, the public entry point, and the ragged ponder loop that runs on
the fused kernels (design §2-§3).

At step n the step function sees only the A_n rows still running. After it,
one fused halting-step launch evaluates the halting unit, decides which rows
halt, and accumulates p * s into the mean-field state; the survivors are
compacted for the next step. Nothing is sized B * max_steps. (The ACT
GRU/LSTM layers run their own loop over the same kernels, with the gates in
the halting launch: `act_kernels.ops.cells.ponder`.)

Autograd: the step function's own graph carries gradients from step to step;
`_RaggedCombine` attaches the backward of S = sum p s and rho = N + R to the
per-step states, weight and bias, and runs it as one combine-backward launch
over all T packed rows.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from ...backends import implementation_module, resolve
from ..checks import check_ponder_args, check_step_output
from ..ragged import compact, packed_step_index
from ..state import accumulation_dtype, as_state_tuple
from . import reference
from ..output import HaltingProbs, PonderOutput


def ponder(
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 100,
    eps: float = 0.01,
    backend: str = "auto",
) -> PonderOutput:
    """Adaptive Computation Time (Graves 2016) with rows that halt independently.

    step_fn(state_active, step, active) -> new state for exactly those rows
        state_active (A, H) (or a tuple of (A, H_k)): the rows still running,
        step: the 1-based ponder step, active (A,) int64: their batch indices.
    state:  (B, H) initial state, or a tuple (LSTM (h, c)): halting reads the
        first tensor, every tensor is mean-fielded.
    weight: (H,) or (1, H) halting unit weight; bias: one-element tensor.
    backend: "auto" | "reference" | "triton" | "cuda" (design §4).

    Returns PonderOutput(state, ponder_cost, steps, remainder, halting_probs).

        cell, halt = torch.nn.GRUCell(I, H), torch.nn.Linear(H, 1)
        out = ak.ponder(lambda s, n, idx: cell(x[idx], s), h0, halt.weight, halt.bias)
        loss = criterion(out.state) + tau * out.ponder_cost.sum()
    """
    # checked and resolved once per call; the loops below trust their arguments
    states, was_tuple = as_state_tuple(state)
    check_ponder_args(states, weight, bias, max_steps, eps)
    chosen = resolve(backend, states[0].device)
    if chosen == "reference":
        return reference.ponder_loop(step_fn, states, was_tuple, weight, bias, max_steps, eps)
    return kernel_ponder_loop(get_kernels(chosen), step_fn, states, was_tuple, weight, bias, max_steps, eps)


class Kernels(NamedTuple):
    """One backend's implementations of the two kernel contracts."""

    halting_step: Callable
    combine_backward: Callable


def get_kernels(implementation: str) -> Kernels:
    """The (halting_step, combine_backward) pair of an implementation as
    `act_kernels.backends` names it: "triton", "cuda", "cpu" (the
    extension's CPU halting step) or "twins" (the reference twins on the
    kernel loop)."""
    mod = implementation_module(__package__, implementation, ("triton", "cuda", "cpu", "twins"), "ACT's kernels")
    return Kernels(mod.halting_step, mod.combine_backward)


class _Saved(NamedTuple):
    """What the loop produced, handed to the autograd Function."""

    mean_field: List[torch.Tensor]
    ponder_cost: torch.Tensor
    p: torch.Tensor
    h: torch.Tensor
    batch_index: torch.Tensor
    steps: torch.Tensor
    counts: List[int]
    kernels: Kernels
    dtype: torch.dtype


class _RaggedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, saved: _Saved, weight, bias, *step_states):
        # The fused forward already ran inside the ponder loop (it has to
        # interleave with the step function); this only exposes its results.
        # The outputs are not kept on ctx (that would be a reference cycle
        # through the graph): only their shapes.
        ctx.counts, ctx.kernels, ctx.dtype = saved.counts, saved.kernels, saved.dtype
        ctx.state_shapes = [m.shape for m in saved.mean_field]
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        ctx.save_for_backward(weight, saved.p, saved.h, saved.batch_index, saved.steps, *step_states)
        outs = tuple(m.to(saved.dtype) for m in saved.mean_field)
        return (*outs, saved.ponder_cost)

    @staticmethod
    @once_differentiable   # kernels autograd cannot see through: a 2nd derivative raises
    def backward(ctx, *grads):
        weight, p, h, batch_index, steps, *step_states = ctx.saved_tensors
        counts = ctx.counts
        n_comp = len(ctx.state_shapes)
        n_steps = len(counts)
        acc = p.dtype
        grad_states = list(grads[:n_comp])
        grad_ponder = grads[n_comp]
        for k, g in enumerate(grad_states):
            if g is None:
                grad_states[k] = torch.zeros(ctx.state_shapes[k], dtype=ctx.dtype, device=p.device)
        if grad_ponder is None:
            grad_ponder = torch.zeros(steps.shape, dtype=acc, device=p.device)
        grad_ponder = grad_ponder.contiguous()

        # Further tensors of a tuple state (an LSTM's c) are mean-fielded with
        # the same p: their <gS', s'> joins the halting gradient, and
        # gs' = p gS'. Computed over all T packed rows at once, with no loop
        # over steps: one gather of gS' rows and one product per tensor.
        extra_dot = None
        extra_grads: List[Sequence[torch.Tensor]] = []
        if n_comp > 1:
            extra_dot = torch.zeros(p.shape, dtype=acc, device=p.device)
            for k in range(1, n_comp):
                s_k = torch.cat(step_states[k::n_comp]).to(acc)
                g = grad_states[k].to(acc).index_select(0, batch_index)
                extra_dot += (g * s_k).sum(-1)
                extra_grads.append(torch.split((p[:, None] * g).to(ctx.dtype), counts))

        gs, gw, gc = ctx.kernels.combine_backward(
            list(step_states[0::n_comp]), batch_index, p, h, steps,
            grad_states[0], grad_ponder, weight.detach().reshape(-1).to(acc).contiguous(), extra_dot,
        )
        gs_rows = torch.split(gs, counts)
        flat = []
        for n in range(n_steps):
            flat.append(gs_rows[n])
            flat.extend(g[n] for g in extra_grads)
        gw = gw.to(ctx.weight_dtype).reshape(ctx.weight_shape)
        gc = gc.to(ctx.bias_dtype).reshape(ctx.bias_shape)
        return (None, gw, gc, *flat)


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    # Row strides are passed to the kernels; only a strided feature dim is copied.
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def ragged_ponder(
    kernels: Kernels,
    step_fn: Callable,
    state,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_steps: int = 100,
    eps: float = 0.01,
) -> PonderOutput:
    """`ponder` on the fused kernels of one backend; same contract as the reference."""
    states, was_tuple = as_state_tuple(state)
    check_ponder_args(states, weight, bias, max_steps, eps)
    return kernel_ponder_loop(kernels, step_fn, states, was_tuple, weight, bias, max_steps, eps)


def kernel_ponder_loop(kernels: Kernels, step_fn: Callable, states: Tuple[torch.Tensor, ...], was_tuple: bool,
                       weight: torch.Tensor, bias: torch.Tensor, max_steps: int, eps: float) -> PonderOutput:
    """The kernel loop on arguments already checked (`states` as `as_state_tuple` gives them)."""
    states = tuple(_unit_column_stride(s) for s in states)
    batch, device, dtype = states[0].shape[0], states[0].device, states[0].dtype
    acc = accumulation_dtype(dtype)
    # Cast once per call: every kernel reads w and c in the accumulation dtype.
    w = weight.detach().reshape(-1).to(acc).contiguous()
    c = bias.detach().reshape(1).to(acc)
    threshold = torch.full((1,), 1.0 - eps, dtype=acc, device=device)

    running_sum = torch.zeros(batch, dtype=acc, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    remainder = torch.zeros(batch, dtype=acc, device=device)
    mean_field = [torch.zeros(s.shape, dtype=acc, device=device) for s in states]
    active = torch.arange(batch, device=device)
    current: Sequence[torch.Tensor] = states
    step_states: List[torch.Tensor] = []
    ps, hs, rows, counts = [], [], [], []

    for n in range(1, max_steps + 1):
        given = tuple(current) if was_tuple else current[0]
        new = check_step_output(step_fn(given, n, active), states, active.numel(), n)
        new = tuple(_unit_column_stride(t) for t in new)
        p, h, halted = kernels.halting_step(
            new[0].detach(), active, w, c, threshold,
            running_sum, mean_field[0], steps, remainder, n, max_steps,
            extra=[(t.detach(), m) for t, m in zip(new[1:], mean_field[1:])],
        )
        step_states.extend(new)
        ps.append(p)
        hs.append(h)
        rows.append(active)
        counts.append(active.numel())

        nxt = compact(halted, active, new)  # the one host sync per step: A_{n+1}
        if nxt is None:
            break
        active, current = nxt

    p_all, h_all, batch_index = torch.cat(ps), torch.cat(hs), torch.cat(rows)
    ponder_cost = steps.to(acc) + remainder
    saved = _Saved(mean_field, ponder_cost, p_all, h_all, batch_index, steps, counts, kernels, dtype)
    *out_states, ponder_cost = _RaggedCombine.apply(saved, weight, bias, *step_states)
    step_index = packed_step_index(counts, device)
    return PonderOutput(
        state=tuple(out_states) if was_tuple else out_states[0],
        ponder_cost=ponder_cost,
        steps=steps,
        remainder=remainder,
        halting_probs=HaltingProbs(p_all, batch_index, step_index, batch),
    )
