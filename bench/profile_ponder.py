"""Where the time goes: torch.profiler tables for the combine backward alone
and for a whole GRU ponder (forward + backward), per backend.

    python bench/profile_ponder.py [--batch 4096] [--hidden 256] [--backend cuda]

Prints, for each case, the wall time per call and the top operators by self
CPU time and by device time, so host overhead and kernel time can be told
apart.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import act_kernels as ak
from workloads import GRUPonder


def wall(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def table(fn, title, rows=18):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    print(f"\n## {title}: wall {wall(fn) * 1e3:.3f} ms per call")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    print(avg.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=48))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--backend", nargs="+", default=["cuda", "triton"])
    args = ap.parse_args()
    work = GRUPonder(args.batch, args.hidden, max_steps=20, device="cuda")
    params = [work.h0, work.weight, work.bias, *work.cell.parameters()]
    for backend in args.backend:
        def fwd_bwd():
            out = ak.ponder(work.step, work.h0, work.weight, work.bias, max_steps=20, backend=backend)
            loss = out.state.square().sum() + 0.01 * out.ponder_cost.sum()
            torch.autograd.grad(loss, params)
        table(fwd_bwd, f"{backend} GRU ponder B={args.batch} H={args.hidden}")


if __name__ == "__main__":
    main()
