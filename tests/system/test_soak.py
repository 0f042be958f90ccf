"""Memory soak: 10k ACTGRU training iterations. Resident memory stays flat
after warm-up (and allocated CUDA memory, on a GPU). Slow: run with
`python -m pytest tests/system/test_soak.py --run-slow`."""
import gc

import pytest
import torch

import act_kernels as ak
from helpers import DEVICE

ITERATIONS, WARMUP = 10_000, 1_000


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_actgru_training_memory_is_flat():
    torch.manual_seed(0)
    rnn = ak.nn.ACTGRU(6, 32, max_steps=8).to(DEVICE)
    head = torch.nn.Linear(32, 2).to(DEVICE)
    opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    samples = []
    for it in range(ITERATIONS):
        x = torch.randn(7, 16, 6, generator=g).to(DEVICE)     # lengths and steps vary every iteration
        y = (x.sum((0, 2)) > 0).long()
        out, _ = rnn(x)
        loss = torch.nn.functional.cross_entropy(head(out[-1]), y) + 1e-3 * rnn.ponder_cost.sum(0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it + 1 in (WARMUP, ITERATIONS // 2, ITERATIONS):
            gc.collect()
            cuda = torch.cuda.memory_allocated() / 2 ** 20 if DEVICE.type == "cuda" else 0.0
            samples.append((it + 1, resident_mib(), cuda))
    print("iteration, resident MiB, CUDA MiB:", samples)
    (_, rss_warm, cuda_warm), _, (_, rss_end, cuda_end) = samples
    assert rss_end - rss_warm < 32, samples      # a leak of even 4 KiB per iteration would show 35 MiB
    assert cuda_end - cuda_warm < 1, samples
