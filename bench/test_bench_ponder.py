"""Benchmarks: the halting step alone, the combine backward alone, and a whole
GRU-cell ponder (forward + backward) on a skewed halting distribution.

    pytest bench/ --benchmark-only            # CPU: the GPU rows skip

Every figure is a median time next to a baseline timed in the same process;
on a GPU the kernels' bandwidth is reported against the measured
device-to-device copy bandwidth.
"""
from __future__ import annotations

import pytest
import torch

import act_kernels as ak
from act_kernels import reference
from act_kernels.backends import why_unavailable
from conftest import sync
from workloads import GRUPonder, halting_step_inputs, naive_ponder

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROUNDS = 20 if GPU else 3


def needs(backend):
    """Skips a triton/cuda row without a GPU, or when that backend cannot run."""
    reason = why_unavailable(backend, DEVICE) if GPU else "GPU-only benchmark row"
    return pytest.mark.skipif(bool(reason), reason=reason or "available")


KERNEL_IMPLS = [
    pytest.param("twins", id="reference"),
    pytest.param("triton", id="triton", marks=needs("triton")),
    pytest.param("cuda", id="cuda", marks=needs("cuda")),
]
# rows x H from 2^16 to 2^26 elements (H = 1024: a warp per row in the CUDA
# kernels), plus H = 256 and H = 4096 (a block per row) at the large end
SIZES = ([(1 << k, 1024) for k in (6, 8, 10, 12, 14, 16)] + [(1 << 16, 256), (1 << 14, 4096)]
         if GPU else [(512, 64), (2048, 128)])
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.skipif(not GPU, reason="GPU-only: device copy bandwidth")
def test_copy_bandwidth(benchmark, record, meta):
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync()

    benchmark.pedantic(copy, rounds=ROUNDS, warmup_rounds=3)
    row = record("copy", "torch.copy_", bytes=2 * src.numel() * 4)
    meta["copy_GBps"] = row["bytes"] / row["median_s"] / 1e9
    row["GBps"] = meta["copy_GBps"]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SIZES)
def test_halting_step(benchmark, record, impl, dtype, rows, hidden):
    from act_kernels.ops.act import get_kernels

    kernel = get_kernels(impl).halting_step
    args, buffers = halting_step_inputs(rows, hidden, dtype, DEVICE)

    def run():
        kernel(**args, **buffers, step=1, max_steps=100)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    # minimum traffic: read s, read + write the fp32 accumulator
    moved = rows * hidden * (args["state"].element_size() + 2 * 4)
    row = record("halting_step", "reference" if impl == "twins" else impl, rows=rows, hidden=hidden, dtype=str(dtype),
                 bytes=moved)
    row["GBps"] = moved / row["median_s"] / 1e9


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SIZES)
def test_combine_backward(benchmark, record, impl, dtype, rows, hidden):
    from act_kernels.ops.act import get_kernels

    kernel = get_kernels(impl).combine_backward
    batch = rows // 3
    counts = [batch, batch, batch - batch // 2, batch // 2 - batch // 4]
    states = [torch.randn(a, hidden, device=DEVICE, dtype=dtype) for a in counts]
    acc = torch.float32
    steps = torch.full((batch,), 2, dtype=torch.int64, device=DEVICE)
    steps[: batch - batch // 2] = 3
    steps[: counts[3]] = 4
    batch_index = torch.cat([torch.arange(a, device=DEVICE) for a in counts])
    total = batch_index.numel()
    args = dict(states=states, batch_index=batch_index,
                p=torch.rand(total, device=DEVICE, dtype=acc), h=torch.rand(total, device=DEVICE, dtype=acc),
                steps=steps, grad_state=torch.randn(batch, hidden, device=DEVICE, dtype=dtype),
                grad_ponder=torch.randn(batch, device=DEVICE, dtype=acc),
                weight=torch.randn(hidden, device=DEVICE, dtype=dtype))

    def run():
        kernel(**args)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    # minimum traffic: read every state row and gS once, write every gs row
    es = states[0].element_size()
    moved = (2 * total + batch) * hidden * es
    row = record("combine_backward", "reference" if impl == "twins" else impl, rows=total, hidden=hidden,
                 dtype=str(dtype), bytes=moved)
    row["GBps"] = moved / row["median_s"] / 1e9


PONDER_SIZES = [(256, 256), (4096, 256), (256, 1024), (4096, 1024)] if GPU else [(256, 64)]
PONDER_IMPLS = ["padded", "reference", "compiled", "triton", "cuda"]


def _ponder_fn(impl, work):
    if impl == "padded":
        return lambda: naive_ponder(work.step, work.h0, work.weight, work.bias, work.max_steps, 0.01)[:2]
    if impl == "compiled":
        compiled = torch.compile(reference.ponder, dynamic=True)
        return lambda: compiled(work.step, work.h0, work.weight, work.bias, max_steps=work.max_steps)[:2]
    return lambda: ak.ponder(work.step, work.h0, work.weight, work.bias,
                             max_steps=work.max_steps, backend=impl)[:2]


@pytest.mark.parametrize("impl", [pytest.param(i, marks=needs(i) if i in ("triton", "cuda") else [])
                                  for i in PONDER_IMPLS])
@pytest.mark.parametrize("batch,hidden", PONDER_SIZES)
def test_ponder_gru_fwd_bwd(benchmark, record, impl, batch, hidden):
    work = GRUPonder(batch, hidden, max_steps=20, device=DEVICE)
    fn = _ponder_fn(impl, work)
    params = [work.h0, work.weight, work.bias, *work.cell.parameters()]

    def run():
        state, cost = fn()
        loss = state.float().square().sum() + 0.01 * cost.sum()
        torch.autograd.grad(loss, params)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    record("ponder_gru", impl, batch=batch, hidden=hidden, max_steps=20,
           ragged_rows=work.ragged_rows, padded_rows=work.padded_rows,
           ideal_speedup=work.padded_rows / work.ragged_rows)


@pytest.mark.parametrize("batch,hidden", PONDER_SIZES)
def test_ponder_gru_step_fn_only(benchmark, record, batch, hidden):
    """The step function alone on the same ragged row counts (forward +
    backward): what a ponder costs beyond it is halting, accumulation,
    compaction and bookkeeping."""
    work = GRUPonder(batch, hidden, max_steps=20, device=DEVICE)
    actives = [torch.nonzero(work.target >= n).squeeze(1) for n in range(1, int(work.target.max()) + 1)]
    params = [work.h0, *work.cell.parameters()]

    def run():
        state, outs = work.h0, []
        for n, active in enumerate(actives, start=1):
            keep = torch.searchsorted(actives[n - 2], active) if n > 1 else active
            state = work.step(state[keep], n, active)
            outs.append(state)
        loss = sum(o.float().square().sum() for o in outs)
        torch.autograd.grad(loss, params)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    record("ponder_gru", "step_fn_only", batch=batch, hidden=hidden, max_steps=20,
           ragged_rows=work.ragged_rows, padded_rows=work.padded_rows,
           ideal_speedup=work.padded_rows / work.ragged_rows)
