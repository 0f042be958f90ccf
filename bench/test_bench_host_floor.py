"""The host floor of a transformer ponder step (design §11): the per-token
encoder and a looped LM's decode call at sizes where only host work counts,
against the same layers run as plain layers on the same rows
(`workloads.HostFloor`). A row's `per_step_s` is its median over its steps
(the ACT side's 8 ponder steps; the plain encoder layer's 8 calls, the plain
decode call's one); the ideal ratio of the two is 1.0.

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
    act, plain, plain_steps = next((a, p, n) for name, a, p, n in work.cases() if name == case)
    fn = act if side == "act" else plain

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=100, warmup_rounds=10)
    row = record("host_floor", side, case=case, steps=work.STEPS if side == "act" else plain_steps,
                 ideal_speedup=1.0, threads=1)
    row["per_step_s"] = row["median_s"] / row["steps"]
