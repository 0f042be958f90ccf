"""The torch.library ops: opcheck, fake tensors, and torch.compile."""
import pytest
import torch

import act_kernels as ak
from act_kernels import reference
from act_kernels.ops.act import library as ops
from helpers import DEVICE, TanhStep, assert_close, make_problem


def ragged_run(batch=6, hidden=8, bias=-1.0, max_steps=6, dtype=torch.float32, seed=0):
    """A reference ponder, and its per-step states and halting decisions."""
    s0, w, c = make_problem(batch, hidden, dtype, bias, seed=seed)
    step = TanhStep(batch, hidden, dtype, seed=seed, scale=2.0)
    out = reference.ponder(step, s0, w, c, max_steps=max_steps)
    hp = out.halting_probs
    states, current, active = [], s0.detach(), torch.arange(batch, device=DEVICE)
    for n in range(1, int(out.steps.max()) + 1):
        with torch.no_grad():
            current = step(current, n, active)
        states.append(current.clone().requires_grad_())
        keep = out.steps[active] > n
        active, current = active[keep], current[keep]
    acc = out.ponder_cost.dtype
    h = torch.sigmoid(torch.cat([t.detach() for t in states]).to(acc) @ w.detach().to(acc) + c.detach().to(acc))
    return out, states, w, c, hp.batch_index, hp.values, h, out.steps


def test_opcheck_combine():
    out, states, w, c, bi, p, h, steps = ragged_run()
    torch.library.opcheck(ops.combine, (states, w, c, bi, p, h, steps))


def test_opcheck_combine_backward():
    out, states, w, c, bi, p, h, steps = ragged_run()
    g = torch.randn(steps.shape[0], states[0].shape[1], device=DEVICE)
    gr = torch.randn(steps.shape[0], device=DEVICE)
    args = ([t.detach() for t in states], bi, p, h, steps, g, gr, w.detach(), None)
    torch.library.opcheck(ops.combine_backward, args)


def test_opcheck_halting_step():
    batch, hidden = 6, 8
    state = torch.randn(4, hidden, device=DEVICE)
    args = (state, torch.tensor([0, 2, 3, 5], device=DEVICE), torch.randn(hidden, device=DEVICE),
            torch.zeros(1, device=DEVICE), torch.full((1,), 0.99, device=DEVICE),
            torch.rand(batch, device=DEVICE) * 0.5, torch.zeros(batch, hidden, device=DEVICE),
            torch.zeros(batch, dtype=torch.int64, device=DEVICE), torch.zeros(batch, device=DEVICE), 2, 10)
    torch.library.opcheck(ops.halting_step, args)


def test_combine_op_gradients_match_reference():
    """The differentiable op gives the same S, rho and gradients as the
    reference ponder, for the gradient paths it owns (states, w, c)."""
    out, states, w, c, bi, p, h, steps = ragged_run(seed=3)
    S, rho = ops.combine(states, w, c, bi, p, h, steps)
    assert_close(S, out.state, torch.float32, "S")
    assert_close(rho, out.ponder_cost, torch.float32, "rho")
    gS = torch.randn_like(S)
    grho = torch.randn_like(rho)
    grads = torch.autograd.grad((S * gS).sum() + (rho * grho).sum(), [*states, w, c])
    gs, gw, gc = reference.combine_backward(
        [t.detach() for t in states], bi, p, h, steps, gS, grho, w.detach())
    for a, b in zip(grads[:-2], torch.split(gs, [t.shape[0] for t in states])):
        assert_close(a, b, torch.float32, "gs")
    assert_close(grads[-2], gw, torch.float32, "gw")
    assert_close(grads[-1].reshape(()), gc, torch.float32, "gc")


def test_combine_op_under_torch_compile_fullgraph():
    out, states, w, c, bi, p, h, steps = ragged_run(seed=5)

    def loss_fn(states, w, c):
        S, rho = ops.combine(states, w, c, bi, p, h, steps)
        return (S ** 2).sum() + 0.1 * rho.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(states, w, c)
    eager_grads = torch.autograd.grad(eager_loss, [*states, w, c])
    comp_loss = compiled(states, w, c)
    comp_grads = torch.autograd.grad(comp_loss, [*states, w, c])
    assert_close(comp_loss, eager_loss, torch.float32, "loss")
    for a, b in zip(comp_grads, eager_grads):
        assert_close(a, b, torch.float32, "grad")
