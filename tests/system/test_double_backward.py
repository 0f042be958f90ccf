"""Every autograd Function whose backward runs kernels autograd cannot see
through is once_differentiable: asking for a second derivative raises,
instead of returning one that silently misses terms."""
import pytest
import torch

import act_kernels as ak
from helpers import DEVICE, TanhStep, make_problem

MESSAGE = "differentiate twice a function that was marked with @once_differentiable"


def _second_derivative(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        g.square().sum().backward()


def test_ponder_on_the_kernel_driver():
    s0, w, c = make_problem(4, 8, torch.float32, 0.0)
    out = ak.ponder(TanhStep(4, 8), s0, w, c, max_steps=4, backend="triton")
    _second_derivative(out.state.square().sum() + out.ponder_cost.sum(), w)


def test_pondernet():
    s0, w, c = make_problem(4, 8, torch.float32, 0.0)
    out = ak.pondernet(TanhStep(4, 8), s0, w, c, max_steps=4, backend="triton")
    _second_derivative(out.p.square().sum(), w)


def test_ragged_attention():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(5, 2, 16, device=DEVICE)
    v = torch.randn(5, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    q_rows = torch.tensor([0, 3, 4], dtype=torch.int64, device=DEVICE)
    out = ak.ragged_attention(q, k, v, cu, q_rows, backend="reference")
    _second_derivative(out.square().sum(), q)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gate_functions(backend):
    from act_kernels.ops.cells import gru_gates

    torch.manual_seed(0)
    gi = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    gh, h = torch.randn(3, 12, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    _second_derivative(gru_gates(gi, gh, h, backend=backend).square().sum(), gi)
