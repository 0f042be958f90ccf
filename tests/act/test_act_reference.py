"""The reference against an independent padded-and-masked implementation."""
import pytest
import torch

import act_kernels as ak
from helpers import PairStep, TanhStep, assert_close, loss_and_grads, make_problem
from naive import naive_ponder

CASES = [
    # batch, hidden, bias, max_steps
    (1, 1, 0.0, 5),
    (1, 16, -20.0, 7),    # never halts before max_steps
    (7, 16, 20.0, 10),    # all rows halt at step 1
    (9, 13, -1.0, 12),    # mixed
    (32, 24, -2.0, 30),   # long, skewed
    (5, 8, 0.5, 1),       # max_steps = 1
]


@pytest.mark.parametrize("batch,hidden,bias,max_steps", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_naive(batch, hidden, bias, max_steps, dtype):
    s0, w, c = make_problem(batch, hidden, dtype, bias, device="cpu")
    step = TanhStep(batch, hidden, dtype, device="cpu", scale=2.0)
    out = ak.reference.ponder(step, s0, w, c, max_steps=max_steps, eps=0.01)
    inputs = [s0, w, c, *step.params()]
    grads = loss_and_grads(out, inputs)

    naive_step = TanhStep(batch, hidden, dtype, device="cpu", scale=2.0)
    S, rho, N, R = naive_ponder(naive_step, s0, w, c, max_steps, 0.01)

    class Out:  # the naive run in PonderOutput's shape, for loss_and_grads
        state, ponder_cost = S, rho

    naive_grads = loss_and_grads(Out, [s0, w, c, *naive_step.params()])
    assert torch.equal(out.steps, N)
    assert_close(out.state, S, dtype, "state")
    assert_close(out.ponder_cost, rho, dtype, "ponder cost")
    assert_close(out.remainder, R, dtype, "remainder")
    for name, a, b in zip(["s0", "w", "c", "W", "u"], grads, naive_grads):
        assert_close(a, b, dtype, f"grad {name}")
    # Ragged: the step function computed exactly sum(N) rows.
    assert step.rows_seen == int(out.steps.sum())
    if bias == 20.0:
        assert bool((out.steps == 1).all())
    if bias == -20.0:
        assert bool((out.steps == max_steps).all())


def test_reference_tuple_state_matches_naive():
    batch, hidden, width = 6, 10, 7
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(batch, hidden, generator=g, dtype=torch.float64).requires_grad_()
    c0 = torch.randn(batch, width, generator=g, dtype=torch.float64).requires_grad_()
    _, w, c = make_problem(batch, hidden, torch.float64, -1.5, device="cpu")
    step = PairStep(batch, hidden, width, torch.float64, device="cpu")
    out = ak.reference.ponder(step, (h0, c0), w, c, max_steps=15)
    grads = loss_and_grads(out, [h0, c0, w, c, *step.params()])
    naive_step = PairStep(batch, hidden, width, torch.float64, device="cpu")
    S, rho, N, _ = naive_ponder(naive_step, (h0, c0), w, c, 15, 0.01)

    class Out:
        state, ponder_cost = S, rho

    naive_grads = loss_and_grads(Out, [h0, c0, w, c, *naive_step.params()])
    assert torch.equal(out.steps, N)
    for a, b in zip(out.state, S):
        assert_close(a, b, torch.float64)
    for a, b in zip(grads, naive_grads):
        assert_close(a, b, torch.float64)


def test_paper_details():
    """The details public implementations get wrong (PAPER.md)."""
    batch, hidden = 4, 3
    s0, w, c = make_problem(batch, hidden, torch.float64, -20.0, device="cpu")
    out = ak.reference.ponder(TanhStep(batch, hidden, torch.float64, device="cpu"), s0, w, c, max_steps=4)
    # No halt before M: exactly M steps, the remainder is 1 - sum h, not 0,
    # the weights sum to 1 and rho = N + R.
    assert bool((out.steps == 4).all())
    padded = out.halting_probs.padded()
    torch.testing.assert_close(padded.sum(1), torch.ones(batch, dtype=torch.float64))
    assert bool((out.remainder > 0.99).all())
    torch.testing.assert_close(out.ponder_cost, out.steps.double() + out.remainder)
    assert out.ponder_cost.requires_grad


def test_halting_test_is_greater_equal_on_the_running_sum():
    """With h = 0.5 exactly (z = 0) and eps = 0.5, the threshold 0.5 is met at
    step 1 (>=, not >), with remainder 1 and ponder cost 2."""
    s0 = torch.zeros(2, 3, dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64)
    c = torch.zeros(1, dtype=torch.float64)
    out = ak.reference.ponder(lambda s, n, a: s, s0, w, c, max_steps=10, eps=0.5)
    assert out.steps.tolist() == [1, 1]
    assert out.ponder_cost.tolist() == [2.0, 2.0]
    # eps = 0.25: 0.5 + 0.5 = 1 >= 0.75 halts at step 2 with R = 0.5.
    out = ak.reference.ponder(lambda s, n, a: s, s0, w, c, max_steps=10, eps=0.25)
    assert out.steps.tolist() == [2, 2]
    assert out.remainder.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("bias", [-3.0, 0.0])
def test_reference_gradcheck(bias):
    batch, hidden = 3, 4
    s0, w, c = make_problem(batch, hidden, torch.float64, bias, device="cpu", seed=5)
    step = TanhStep(batch, hidden, torch.float64, device="cpu", seed=5)

    def f(s0, w, c, W):
        step.W = W
        out = ak.reference.ponder(step, s0, w, c, max_steps=6)
        return out.state, out.ponder_cost

    assert torch.autograd.gradcheck(f, (s0, w, c, step.W), eps=1e-6, atol=1e-6)


def test_halting_probs_views():
    s0, w, c = make_problem(5, 4, torch.float32, -1.0, device="cpu", seed=2)
    out = ak.reference.ponder(TanhStep(5, 4, device="cpu"), s0, w, c, max_steps=8)
    hp = out.halting_probs
    assert hp.values.shape[0] == int(out.steps.sum())
    padded = hp.padded()
    assert padded.shape == (5, int(out.steps.max()))
    for b in range(5):
        n = int(out.steps[b])
        assert bool((padded[b, n:] == 0).all())
        torch.testing.assert_close(padded[b, n - 1], out.remainder[b])
    # step-major: the first B packed rows are step 1 for every row, in order
    assert hp.batch_index[:5].tolist() == [0, 1, 2, 3, 4]
    assert bool((hp.step_index[:5] == 1).all())
