"""PonderNet forward + backward: the ragged implementation against the padded
unroll its public implementations use (every row stepped until the whole
batch halts, masks afterwards), on a skewed halting distribution.

    pytest bench/test_bench_pondernet.py --benchmark-only

Ideal speedup: B * max N / sum N (the padded rows over the ragged rows).
"""
from __future__ import annotations

import pytest
import torch

import act_kernels as ak
from act_kernels.backends import why_unavailable
from conftest import sync
from naive_pondernet import padded_pondernet
from workloads import GRUPonderNet

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROUNDS = 20 if GPU else 5
SIZES = [(4096, 256), (4096, 1024), (256, 256)] if GPU else [(256, 64), (1024, 128), (4096, 256)]


def impl_marks(impl):
    if impl in ("triton", "cuda"):
        reason = why_unavailable(impl, DEVICE) if GPU else "GPU-only benchmark row"
        return pytest.mark.skipif(bool(reason), reason=reason or "available")
    return []


@pytest.mark.parametrize("impl", [pytest.param(i, marks=impl_marks(i))
                                  for i in ("padded", "reference", "triton", "cuda")])
@pytest.mark.parametrize("batch,hidden", SIZES)
def test_pondernet_fwd_bwd(benchmark, record, impl, batch, hidden):
    work = GRUPonderNet(batch, hidden, max_steps=20, device=DEVICE)
    readout = torch.randn(hidden, device=DEVICE)
    params = [work.h0, work.weight, work.bias, *work.cell.parameters()]

    def run():
        if impl == "padded":
            p, kl, steps, states = padded_pondernet(work.step, work.h0, work.weight, work.bias, 20, work.eps)
            step_loss = (states.float() @ readout).square()
            loss = (p * step_loss).sum(1).mean() + 0.01 * kl.mean()
        else:
            out = ak.pondernet(work.step, work.h0, work.weight, work.bias, max_steps=20, eps=work.eps,
                               backend=impl)
            loss = ak.pondernet_loss(out, (out.states.float() @ readout).square(), beta=0.01)
        torch.autograd.grad(loss, params)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    if impl != "padded":
        out = ak.pondernet(work.step, work.h0, work.weight, work.bias, max_steps=20, eps=work.eps, backend=impl)
        assert torch.equal(out.steps, work.target), "the workload did not halt where it should"
    record("pondernet", impl, batch=batch, hidden=hidden, max_steps=20, ragged_rows=work.ragged_rows,
           padded_rows=work.padded_rows, ideal_speedup=work.padded_rows / work.ragged_rows)
