"""The host floor of a transformer ponder step, as the dispatch-floor issue
measures it: B = 1, L = 8, d_model 16, 2 heads, dropout 0 in train mode,
every token running all 8 steps (halting bias -40), against the plain layer
called 8 times; forward under no_grad, and forward + backward; medians on
one thread, where sizes are so small that only host work counts.

    python bench/host_floor.py
"""
import statistics
import time

import torch
from torch import nn

import act_kernels as ak


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
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=8, halting_bias_init=-40.0)
    x = torch.randn(1, 8, 16, requires_grad=True)

    def act_forward():
        with torch.no_grad():
            enc(x)

    def plain_forward():
        with torch.no_grad():
            y = x
            for _ in range(8):
                y = layer(y)

    def act_backward():
        y = enc(x)
        (y.sum() + enc.ponder_cost.sum()).backward()

    def plain_backward():
        y = x
        for _ in range(8):
            y = layer(y)
        y.sum().backward()

    for what, act, plain, rounds in (("forward (no_grad)", act_forward, plain_forward, 200),
                                     ("forward + backward", act_backward, plain_backward, 100)):
        a, p = median_seconds([act, plain], rounds)
        print(f"{what}: per ponder step {a / 8 * 1e6:.0f} us for the ACT encoder, {p / 8 * 1e6:.0f} us for the "
              f"plain layer: {a / p:.2f}x")


if __name__ == "__main__":
    main()
