"""Step functions and comparison helpers shared by the tests."""
import math

import pytest
import torch

import act_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def representative(key="backend", values=("triton",), also=(), **params):
    """Mark a parametrized grid that runs Triton: where Triton runs under the
    interpreter (CPU-only machines), only the case whose parameters equal
    `params` runs by default, with those equal to a dict in `also` (edge
    cases that cost next to nothing: no rows, one row); the grid's other
    cases are marked slow and run with --run-slow (tests/conftest.py).
    Cases whose `key` parameter is not one of `values` run no Triton (the
    reference, the twins, the C++ CPU kernels) and are never tiered; a test
    without a `key` parameter runs Triton in every case. A parameter a case
    leaves out is kept whole: `kind` left out keeps that case for every
    kernel. On a GPU the whole grid runs, as before.

        @representative(dtype=torch.float32, hidden=64)
        @pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
        @pytest.mark.parametrize("dtype", DTYPES)
        @pytest.mark.parametrize("hidden", [1, 64])
        def test_x(backend, dtype, hidden): ..."""
    return pytest.mark.representative(params, *also, key=key, values=tuple(values))


TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


class TanhStep:
    """Row-independent step: s' = tanh(s W + u[active] + 0.1 n).

    Counts the rows it is asked to compute, so tests can check raggedness."""

    def __init__(self, batch, hidden, dtype=torch.float32, device=DEVICE, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.W = (torch.randn(hidden, hidden, generator=g) * scale / math.sqrt(hidden)).to(device, dtype)
        self.u = torch.randn(batch, hidden, generator=g).to(device, dtype)
        self.W.requires_grad_()
        self.u.requires_grad_()
        self.rows_seen = 0

    def params(self):
        return [self.W, self.u]

    def __call__(self, s, n, active):
        self.rows_seen += active.numel()
        return torch.tanh(s @ self.W + self.u[active] + 0.1 * n)


class PairStep(TanhStep):
    """A tuple (h, c) state of different widths, LSTM-like."""

    def __init__(self, batch, hidden, cell_width, dtype=torch.float32, device=DEVICE, seed=0):
        super().__init__(batch, hidden, dtype, device, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.V = (torch.randn(hidden, cell_width, generator=g) / math.sqrt(hidden)).to(device, dtype)
        self.Q = (torch.randn(cell_width, hidden, generator=g) / math.sqrt(cell_width)).to(device, dtype)
        self.V.requires_grad_()
        self.Q.requires_grad_()

    def params(self):
        return [self.W, self.u, self.V, self.Q]

    def __call__(self, hc, n, active):
        h, c = hc
        self.rows_seen += active.numel()
        c_new = torch.tanh(0.5 * c + h @ self.V)
        h_new = torch.tanh(h @ self.W + c_new @ self.Q + self.u[active] + 0.1 * n)
        return h_new, c_new


def make_problem(batch, hidden, dtype, bias_value, seed=0, device=DEVICE, w_scale=1.0):
    g = torch.Generator().manual_seed(seed + 100)
    s0 = torch.randn(batch, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(hidden, generator=g) * w_scale / math.sqrt(hidden)).to(device, dtype).requires_grad_()
    c = torch.tensor([bias_value], dtype=dtype, device=device).requires_grad_()
    return s0, w, c


def loss_and_grads(out, inputs, seed=0):
    """A loss that weighs every output element differently, and its gradients."""
    g = torch.Generator().manual_seed(seed + 7)
    states = out.state if isinstance(out.state, tuple) else (out.state,)
    weights = torch.rand(out.ponder_cost.shape[0], generator=g, dtype=torch.float64)
    loss = out.ponder_cost.double() @ weights.to(out.ponder_cost.device)
    for s in states:
        loss = loss + (s.double() * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device)).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, inputs)]


def assert_close(actual, expected, dtype, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def run(backend, batch, hidden, dtype, bias, max_steps, seed=0, w_scale=1.0):
    """One ak.ponder of the TanhStep problem on `backend`: (output, gradients, step)."""
    s0, w, c = make_problem(batch, hidden, dtype, bias, seed=seed, w_scale=w_scale)
    step = TanhStep(batch, hidden, dtype, seed=seed, scale=2.0)
    out = act_kernels.ponder(step, s0, w, c, max_steps=max_steps, backend=backend)
    grads = loss_and_grads(out, [s0, w, c, *step.params()], seed=seed)
    return out, grads, step


def assert_grads_match(module, x, got, expected, dtype, seed=5):
    """The gradients of a random functional of (output, ponder cost) in x and
    every parameter of `module` agree between two computations of them."""
    (y, cost), (y_d, cost_d) = got, expected
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g).to(y.device, dtype)
    params = [x, *module.parameters()]
    a_grads = torch.autograd.grad((y * wy).sum() + 0.1 * cost.sum(), params, allow_unused=True)
    b_grads = torch.autograd.grad((y_d * wy).sum() + 0.1 * cost_d.sum(), params, allow_unused=True)
    for (name, _), a, b in zip([("x", x), *module.named_parameters()], a_grads, b_grads):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert_close(a, b, dtype, f"grad {name}")
