"""Mixed precision: under torch.autocast a step computes in the autocast dtype
(bfloat16 on the CPU here; fp16 and bf16 on a GPU), the halting math stays in
float32, outputs keep the initial state's dtype, and results stay close to
the float32 run, for `ponder`, `pondernet` and every layer, on every backend."""
import pytest
import torch
from torch import nn

import act_kernels as ak
from act_kernels.ops.act import get_kernels
from act_kernels.ops.act import ragged_ponder
from backends import KERNEL_BACKENDS
from helpers import DEVICE

AUTOCAST = [torch.bfloat16] if DEVICE.type == "cpu" else [torch.float16, torch.bfloat16]
BACKENDS = ["reference", "twins", *KERNEL_BACKENDS]


def linear_problem(seed=0, batch=6, hidden=16):
    torch.manual_seed(seed)
    lin = nn.Linear(hidden, hidden).to(DEVICE)
    halt = nn.Linear(hidden, 1).to(DEVICE)
    with torch.no_grad():
        halt.bias.fill_(-1.0)
    s0 = torch.randn(batch, hidden, device=DEVICE, requires_grad=True)
    return lin, halt, s0


def run_ponder(backend, lin, halt, s0, dtype):
    step = lambda s, n, idx: torch.tanh(lin(s))  # noqa: E731
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
        if backend == "twins":
            out = ragged_ponder(get_kernels("twins"), step, s0, halt.weight, halt.bias, max_steps=6)
        else:
            out = ak.ponder(step, s0, halt.weight, halt.bias, max_steps=6, backend=backend)
    loss = out.state.sum() + 0.1 * out.ponder_cost.sum()
    return out, torch.autograd.grad(loss, [s0, *lin.parameters(), *halt.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
def test_ponder_with_a_linear_step(backend, dtype):
    lin, halt, s0 = linear_problem()
    out, grads = run_ponder(backend, lin, halt, s0, dtype)
    ref, ref_grads = run_ponder(backend, lin, halt, s0, None)
    assert out.state.dtype == torch.float32 and out.ponder_cost.dtype == torch.float32
    assert out.halting_probs.values.dtype == torch.float32
    assert torch.equal(out.steps, ref.steps)
    torch.testing.assert_close(out.state, ref.state, atol=5e-2, rtol=5e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-1, rtol=1e-1)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
def test_pondernet_with_a_linear_step(backend, dtype):
    lin, halt, s0 = linear_problem(seed=1)
    step = lambda s, n, idx: torch.tanh(lin(s))  # noqa: E731
    outs = []
    for ac in (dtype, None):
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=ac is not None):
            out = ak.pondernet(step, s0, halt.weight, halt.bias, max_steps=8, eps=0.05, backend=backend)
        loss = ak.pondernet_loss(out, out.states.float().square().sum(1), beta=0.1)
        outs.append((out, torch.autograd.grad(loss, [s0, *lin.parameters()])))
    (out, grads), (ref, ref_grads) = outs
    assert out.states.dtype == torch.float32 and out.p.dtype == torch.float32
    assert torch.equal(out.steps, ref.steps)
    torch.testing.assert_close(out.p, ref.p, atol=5e-2, rtol=5e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-1, rtol=1e-1)


@pytest.mark.parametrize("layer", ["ACTRNN", "ACTGRU", "ACTLSTM"])
@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
def test_rnn_layers(layer, dtype):
    torch.manual_seed(0)
    rnn = getattr(ak.nn, layer)(5, 12, max_steps=4, halting_bias_init=2.0).to(DEVICE)
    x = torch.randn(7, 3, 5, device=DEVICE)
    ref_out, _ = rnn(x)
    ref_steps = rnn.steps
    with torch.autocast(DEVICE.type, dtype=dtype):
        out, _ = rnn(x)
    assert out.dtype == torch.float32 and rnn.ponder_cost.dtype == torch.float32
    assert torch.equal(rnn.steps, ref_steps)
    torch.testing.assert_close(out, ref_out, atol=5e-2, rtol=5e-2)
    (out.sum() + rnn.ponder_cost.sum()).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in rnn.parameters())
