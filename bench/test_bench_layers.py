"""The ACT recurrent layer (ACTGRU) forward + backward against the padded-and-
masked baseline layer (every row of a time step stepped until the slowest
halts), on two workloads (bench/workloads.py:GRULayerWorkload):

- flat: every row halts at the same step, so there is nothing to skip
  (ideal 1.0x: the ragged layer should cost no more than the padded one);
- skewed: N spread from 1 to max_steps (ideal = sum_t B max N_t / sum N).

    pytest bench/test_bench_layers.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from act_kernels.backends import cuda_extension_error, why_unavailable
from conftest import sync
from workloads import GRULayerWorkload

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROUNDS = 10 if GPU else 5
SIZES = [(16, 4096, 1024), (16, 256, 256)] if GPU else [(16, 256, 64), (16, 1024, 256)]


def impl_marks(impl):
    if impl in ("triton", "cuda"):
        reason = why_unavailable(impl, DEVICE) if GPU else "GPU-only benchmark row"
        return pytest.mark.skipif(bool(reason), reason=reason or "available")
    if impl == "cpu":
        reason = "CPU-only benchmark row" if GPU else cuda_extension_error()
        return pytest.mark.skipif(bool(reason), reason=reason or "available")
    return []


# "reference": torch's GRUCell on the reference ponder; "cpu": what "auto"
# runs on the CPU (the CPU gate kernels of the compiled extension, on the
# kernel driver); "triton", "cuda": the GPU kernel backends.
IMPLS = ("padded", "reference", "cpu", "triton", "cuda")


@pytest.mark.parametrize("impl", [pytest.param(i, marks=impl_marks(i)) for i in IMPLS])
@pytest.mark.parametrize("kind", ["flat", "skewed"])
@pytest.mark.parametrize("length,batch,hidden", SIZES)
def test_actgru_layer_fwd_bwd(benchmark, record, impl, kind, length, batch, hidden):
    work = GRULayerWorkload(length, batch, hidden, max_steps=8, kind=kind, device=DEVICE)
    layer = work.layer
    if impl != "padded":
        for act in layer.acts:
            act.backend = "auto" if impl == "cpu" else impl
        if impl == "cpu":
            assert layer.acts[0].fused_gates(DEVICE) == "cpu"
    params = list(layer.parameters())

    def run():
        if impl == "padded":
            out, cost = work.padded_layer()
        else:
            out, _ = layer(work.x)
            cost = layer.ponder_cost
        torch.autograd.grad(out.float().square().mean() + 0.01 * cost.sum(), params)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    if impl != "padded":
        assert torch.equal(layer.steps[0], work.target), "the workload did not halt where it should"
    record("act_layer", impl, kind=kind, length=length, batch=batch, hidden=hidden, max_steps=8,
           ideal_speedup=work.ideal_speedup)
