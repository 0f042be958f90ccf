"""The host floor of a transformer ponder step (design §11): the per-token
encoder and a looped LM's decode call at sizes where only host work counts,
against the same layers run as plain layers on the same rows
(`workloads.HostFloor`). A row's `per_step_s` is the ACT side's median over
its 8 ponder steps; the ideal ratio to the plain layers' call is 1.0.

    python -m pytest bench/test_bench_host_floor.py --benchmark-only && python bench/report.py

`python bench/host_floor.py` prints the same comparison, timed in alternation.
"""
from __future__ import annotations

import pytest
import torch

from conftest import sync
from workloads import HostFloor

CASES = ["forward (no_grad)", "forward + backward", "decode call"]


@pytest.fixture(scope="module")
def work():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield HostFloor()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("side", ["act", "plain"])
@pytest.mark.parametrize("case", CASES)
def test_host_floor(benchmark, record, work, case, side):
    fn = dict((name, (act, plain)) for name, act, plain in work.cases())[case][0 if side == "act" else 1]

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=100, warmup_rounds=10)
    row = record("host_floor", side, case=case, steps=work.STEPS if side == "act" else 1, ideal_speedup=1.0,
                 threads=1)
    row["per_step_s"] = row["median_s"] / row["steps"]
