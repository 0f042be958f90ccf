"""The host floor of a transformer ponder step, as the dispatch-floor issue
measures it (`workloads.HostFloor`: sizes so small that only host work
counts, every token running all 8 steps, against the same layers run as
plain layers): the encoder's forward (no_grad) and forward + backward
against nn.TransformerEncoderLayer called 8 times, and a looped LM's decode
call against a plain cached stack; medians of the two sides timed in
alternation on one thread, per ponder step.

    python bench/host_floor.py            # backend "auto"
    python bench/host_floor.py reference  # the step-by-step oracle path
"""
import statistics
import sys
import time

import torch

from workloads import HostFloor


def median_seconds(fns, rounds):
    """Median seconds of each function, timed in alternation (round-robin)
    so that a slower stretch of a shared machine weighs on all of them."""
    for fn in fns:
        for _ in range(10):
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    torch.set_num_threads(1)
    work = HostFloor(sys.argv[1] if len(sys.argv) > 1 else "auto")
    for what, act, plain, plain_steps in work.cases():
        a, p = median_seconds([act, plain], 200)
        a, p = a / work.STEPS, p / plain_steps
        print(f"{what}: per ponder step {a * 1e6:.0f} us for ACT, {p * 1e6:.0f} us for the plain layers: "
              f"{a / p:.2f}x")


if __name__ == "__main__":
    main()
