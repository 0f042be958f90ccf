"""The torch.library ops: opcheck, fake tensors, and torch.compile."""
import pytest
import torch

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


def test_combine_op_stride0_and_strided_gradients():
    """A loss such as 0.1 * rho.sum() hands the backward a stride-0 grad_ponder,
    and slicing hands it strided ones: every launcher must read them by their
    strides (on the CPU the op runs the Triton kernels under the interpreter)."""
    out, states, w, c, bi, p, h, steps = ragged_run(seed=7)
    S, rho = ops.combine(states, w, c, bi, p, h, steps)
    big = torch.randn(S.shape[0], 2 * S.shape[1], device=DEVICE)
    loss = 0.1 * rho.sum() + (S * big[:, ::2]).sum()        # stride-0 grad_ponder
    grads = torch.autograd.grad(loss, [*states, w, c])
    gs, gw, gc = reference.combine_backward(
        [t.detach() for t in states], bi, p, h, steps, big[:, ::2].contiguous(),
        torch.full_like(rho, 0.1), w.detach())
    for a, b in zip(grads[:-2], torch.split(gs, [t.shape[0] for t in states])):
        assert_close(a, b, torch.float32, "gs")
    assert_close(grads[-2], gw, torch.float32, "gw")
    assert_close(grads[-1].reshape(()), gc, torch.float32, "gc")


@pytest.mark.parametrize("impl", ["triton", pytest.param("cuda", marks=[pytest.mark.gpu])])
def test_launchers_read_strided_inputs(impl):
    """Every input of both launchers given with a stride (and the 1-D ones as
    views of wider tensors) gives the reference twin's results."""
    from act_kernels.ops.act import get_kernels
    from act_kernels.backends import why_unavailable

    if why_unavailable(impl, DEVICE):
        pytest.skip(why_unavailable(impl, DEVICE))
    out, states, w, c, bi, p, h, steps = ragged_run(seed=9)
    spread = lambda t: torch.stack([t, torch.zeros_like(t)], -1)[..., 0]  # noqa: E731  a stride-2 view
    g = torch.randn(steps.shape[0], states[0].shape[1] * 3, device=DEVICE)[:, ::3]
    gr = torch.randn(steps.shape[0], device=DEVICE)
    args = ([t.detach() for t in states], spread(bi), spread(p), spread(h), spread(steps), g, spread(gr),
            spread(w.detach().reshape(-1)))
    got = get_kernels(impl).combine_backward(*args)
    want = reference.combine_backward(*[a if isinstance(a, list) else a.contiguous() for a in args])
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32, "combine_backward")

    batch, hidden = 6, 8
    state = torch.randn(4, hidden * 2, device=DEVICE)[:, ::2]
    active = spread(torch.tensor([0, 2, 3, 5], device=DEVICE))
    bufs = dict(running_sum=torch.rand(batch, 2, device=DEVICE)[:, 0] * 0.5,
                accumulator=torch.zeros(batch, hidden * 2, device=DEVICE)[:, ::2],
                steps=torch.zeros(batch, 2, dtype=torch.int64, device=DEVICE)[:, 0],
                remainder=torch.zeros(batch, 2, device=DEVICE)[:, 0])
    ref_bufs = {k: v.clone() for k, v in bufs.items()}
    args = dict(state=state, active=active, weight=spread(torch.randn(hidden, device=DEVICE)),
                bias=torch.zeros(1, device=DEVICE), threshold=torch.full((1,), 0.99, device=DEVICE))
    got = get_kernels(impl).halting_step(**args, **bufs, step=2, max_steps=10)
    want = reference.halting_step(**args, **ref_bufs, step=2, max_steps=10)
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert_close(a, b, torch.float32, "halting step")
    for k in bufs:
        assert_close(bufs[k], ref_bufs[k], torch.float32, f"buffer {k}")
