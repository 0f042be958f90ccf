"""The exit-rules study (design §16): two looped transformers Llamas trained on
the byte corpus by docs/study/run.sh group `exits` (python -m
act_kernels.train lm --arch llama ...), evaluated here under every exit rule
at several thresholds:

- `exits-fixed8`: the block trained at a depth drawn per batch (1..8, as
  Huginn trains), its halting unit untrained: the latent rule's model, and
  every rule's baseline at fixed depth 8;
- `exits-gate`: the same model trained with the per-token PonderNet
  objective (the gate).

For each model, rule and threshold: held-out bits per byte and mean steps on
the training command's held-out windows (forward with the rule), the same
with every loop computed and the exit picked afterwards (`every_loop`: no
token freezes), and generation tokens/s (8 prompts, 32 new bytes, the CPU
time of one process). The kl rule reads the coda at every step and runs in
generation only: its row has mean steps and tokens/s, no bits per byte.
Writes docs/study/exits.json and exits.png; prints the tables.

    python docs/study/exits.py evaluate     # runs/exits/*/ -> docs/study/exits.json (minutes)
    python docs/study/exits.py              # exits.json -> the tables and exits.png
"""
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/exits")
MODELS = ("fixed8", "gate")
RULES = {
    "fixed": [None],
    "gate": [0.3, 0.5, 0.7, 0.9],
    "latent": [0.02, 0.05, 0.1, 0.2],
    "kl": [1e-3, 1e-2, 1e-1],
}


def evaluate(windows=128, context=64, batch=16):
    import torch
    import torch.nn.functional as F

    from act_kernels.hf import LoopedCausalLM
    from act_kernels.train.lm import read_corpus

    torch.set_num_threads(1)
    _, held, _ = read_corpus("", 3_000_000)
    held = torch.tensor(list(held), dtype=torch.int64)
    g = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, held.numel() - context - 1, (windows,), generator=g).tolist()
    chunks = [torch.stack([held[s:s + context + 1] for s in starts[i:i + batch]]) for i in range(0, windows, batch)]
    prompts = torch.stack([held[s:s + 32] for s in starts[:8]])
    results = []
    for name in MODELS:
        folder = RUNS / name
        if not (folder / "config.json").exists():
            print(f"missing {folder}: run docs/study/run.sh exits first", file=sys.stderr)
            continue
        looped = LoopedCausalLM.from_pretrained(str(folder)).eval()
        for rule, thresholds in RULES.items():
            for threshold in thresholds:
                row = dict(model=name, rule=rule, threshold=threshold)
                if rule != "kl":
                    for every_loop in (False, True):
                        if every_loop and rule == "fixed":
                            continue
                        nll = steps = count = 0.0
                        with torch.no_grad():
                            for chunk in chunks:
                                out = looped(chunk[:, :-1], exit=rule, threshold=threshold, every_loop=every_loop)
                                nll += float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).double(),
                                                             chunk[:, 1:].reshape(-1), reduction="sum"))
                                steps += float(out.steps.sum())
                                count += chunk[:, 1:].numel()
                        key = "every_loop_" if every_loop else ""
                        row[key + "bits_per_byte"] = nll / count / math.log(2)
                        row[key + "mean_steps"] = steps / count
                extra = dict(prefill_steps=looped.max_steps) if rule == "kl" else {}
                generate = lambda: looped.generate(prompts, max_new_tokens=32, do_sample=True,  # noqa: E731
                                                   temperature=0.8, top_k=40, exit=rule, threshold=threshold,
                                                   generator=torch.Generator().manual_seed(0),
                                                   return_dict_in_generate=True, **extra)
                generate()
                start = time.process_time()
                gen = generate()
                seconds = time.process_time() - start
                row["tokens_per_s"] = prompts.shape[0] * 32 / seconds
                row["generated_mean_steps"] = float(gen.steps[:, prompts.shape[1]:].double().mean())
                results.append(row)
                print(row, flush=True)
    (HERE / "exits.json").write_text(json.dumps(dict(rows=results, windows=windows, context=context), indent=1))


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def draw():
    data = json.loads((HERE / "exits.json").read_text())
    rows = data["rows"]
    fixed = {r["model"]: r for r in rows if r["rule"] == "fixed"}
    print("| model | rule | threshold | bits per byte | mean steps | every loop, then pick: bits per byte | "
          "generation tokens/s | vs fixed depth | generated mean steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = fixed.get(r["model"])
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        print(f"| {r['model']} | {r['rule']} | {r['threshold'] if r['threshold'] is not None else '-'} | "
              f"{fmt(r.get('bits_per_byte'))} | {fmt(r.get('mean_steps'), 2)} | "
              f"{fmt(r.get('every_loop_bits_per_byte'))} | {r['tokens_per_s']:.0f} | "
              f"{fmt(speed, 2)} x | {fmt(r.get('generated_mean_steps'), 2)} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no figure", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 4), sharey=True)
    for ax, model in zip(axes, MODELS):
        for rule in ("gate", "latent"):
            pts = sorted((r["mean_steps"], r["bits_per_byte"]) for r in rows
                         if r["model"] == model and r["rule"] == rule and "mean_steps" in r)
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{rule} (frozen exits)")
            ref = sorted((r["mean_steps"], r["every_loop_bits_per_byte"]) for r in rows
                         if r["model"] == model and r["rule"] == rule and "every_loop_bits_per_byte" in r)
            if ref:
                ax.plot(*zip(*ref), "x--", label=f"{rule} (every loop, then pick)")
        if model in fixed:
            ax.plot([fixed[model]["mean_steps"]], [fixed[model]["bits_per_byte"]], "k*", markersize=12,
                    label="fixed depth")
        ax.set_title(f"model trained {'at sampled depth' if model == 'fixed8' else 'with the gate objective'}")
        ax.set_xlabel("mean steps per byte")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out bits per byte")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "exits.png", dpi=110)
    print(f"wrote {HERE / 'exits.png'}", file=sys.stderr)


if __name__ == "__main__":
    evaluate() if sys.argv[1:2] == ["evaluate"] else draw()
