"""Training-step time of the retrofit study's trained models, measured side
by side: one Adam step (forward, backward, update) on a batch of 16 held-out
windows of 65 bytes, the models taking turns (rounds x steps each), so that other
work on the machine slows them alike. Prints the median milliseconds per
step of each and its ratio to the plain 4-layer model. The models are the
ones `bash docs/study/run.sh retrofit retrofit_deep` leaves in runs/retrofit.

    OMP_NUM_THREADS=1 python docs/study/retrofit_timing.py [rounds] [steps]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from act_kernels.hf import LoopedCausalLM
from act_kernels.train.lm import read_corpus

RUNS = Path("runs/retrofit")


def plain(name):
    model = transformers.AutoModelForCausalLM.from_pretrained(RUNS / name, local_files_only=True, dtype=torch.float32)

    def step(batch):
        return model(input_ids=batch, labels=batch, use_cache=False).loss, None
    return model, step


def looped(name, tau):
    model = LoopedCausalLM.from_pretrained(str(RUNS / name))

    def step(batch):
        out = model(batch, labels=batch)
        return out.loss + tau * out.ponder_cost[:, :-1].mean(), out.steps[:, :-1].double().mean().item()
    return model, step


def main(rounds=5, steps=20):
    torch.manual_seed(0)
    models = {"plain 4 layers": plain("plain4"), "plain 6 layers": plain("plain6"),
              "retrofit, ACT tau = 0.001": looped("act-tau0.001", 0.001),
              "retrofit, fixed 2 steps": looped("fixed2", 0.0)}
    optimizers = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-6)
                  for k, (m, _) in models.items()}
    _, held, _ = read_corpus("", 3_000_000)   # 16 windows of held-out text
    data = torch.tensor(list(held), dtype=torch.int64)
    starts = torch.randint(0, data.numel() - 65, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = torch.stack([data[s:s + 65] for s in starts])
    times = {k: [] for k in models}
    mean_steps = {}
    for r in range(rounds + 1):   # round 0 warms up
        for k, (_, step) in models.items():
            t = time.perf_counter()
            for _ in range(steps):
                loss, n = step(batch)
                optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[k].step()
            if r:
                times[k].append((time.perf_counter() - t) / steps * 1000)
            mean_steps[k] = n
    base = statistics.median(times["plain 4 layers"])
    print(f"Training-step time, {rounds} rounds of {steps} steps each, models in turn "
          f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}):\n")
    print("| model | mean steps on this batch | ms per step (median) | against plain 4 layers |")
    print("|---|---|---|---|")
    for k, ts in times.items():
        m = statistics.median(ts)
        n = "-" if mean_steps[k] is None else f"{mean_steps[k]:.2f}"
        print(f"| {k} | {n} | {m:.1f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
