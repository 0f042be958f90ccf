"""Draws the retrofitted-recurrence study (docs/study/run.sh groups retrofit,
retrofit_deep) from the runs' summary.json files: markdown tables on stdout
and retrofit.png next to this script (held-out bits per byte against layer
applications per byte).

A plain 4-layer transformers Llama (bytes, d_model 64) is trained 3000 steps;
from it, 3000 more steps: plain (the control), its layers [1, 3) looped with
ACT at three time penalties, or looped at a fixed 2 steps; and a plain
6-layer Llama from scratch for 6000 steps. Layer applications per byte:
prelude + block layers x mean steps + coda.

    python docs/study/retrofit.py            # the runs docs/study/retrofit-*
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = ("plain4", "plain4-continued", "plain4-continued-seed2", "act-tau0.001", "act-tau0.001-seed2", "act-tau0.01",
        "act-tau0.03", "fixed2", "plain6")


def load(name):
    path = HERE / f"retrofit-{name}" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def label(name, s):
    c = s["config"]
    seed = f", seed {c['seed']}" if c["retrofit"] and c["seed"] != 1 else ""
    if c["plain"]:
        return f"plain {c['layers']} layers" + (", continued" if c["retrofit"] else "") + seed
    loop = f"layers [{c['block'][0]}, {c['block'][1]}) looped"
    return f"retrofit, {loop}, " + (f"fixed {c['fixed_steps']} steps" if c["fixed_steps"]
                                    else f"ACT M = {c['max_steps']}, tau = {c['tau']}") + seed


def same_work(runs):
    pair = [runs[n]["train_seconds"] for n in ("plain4-continued", "plain4-continued-seed2") if n in runs]
    return f": the same work took {min(pair):.0f} s and {max(pair):.0f} s" if len(pair) == 2 else ""


def short(s):
    c = s["config"]
    return f"ACT, tau = {c['tau']}" + (f", seed {c['seed']}" if c["seed"] != 1 else "")


def at_iteration(s, iteration):
    """Held-out bits per byte at an evaluation of the run's log (None if it has none there)."""
    for r in s["history"]:
        if r["iteration"] == iteration:
            return r["bits_per_byte"]
    return None


def main(names=RUNS):
    runs = {n: load(n) for n in names}
    missing = [n for n, s in runs.items() if s is None]
    if missing:
        print("Runs not there (not invented): " + ", ".join(f"retrofit-{n}" for n in missing) + "\n")
    runs = {n: s for n, s in runs.items() if s is not None}
    if not runs:
        return
    base = runs.get("plain4")
    c0 = next(iter(runs.values()))["config"]
    print(f"Transformers Llama on {c0['corpus']}: bytes as tokens, d_model {c0['d_model']}, {c0['heads']} query / "
          f"{c0['kv_heads']} kv heads, SwiGLU {c0['intermediate']}, context {c0['context']} bytes, batch "
          f"{c0['batch_size']}, Adam lr {c0['lr']} (fresh at the retrofit), one seed per run (a second where marked); "
          f"held-out bits per byte on {c0['eval_windows']} fixed windows of every tenth file. Train times are wall "
          "clock on two shared cores with other jobs running" + same_work(runs) + ".\n")
    print("| model | optimizer steps (base + this run) | held-out bits per byte | at the retrofit's start "
          "| mean steps | layer applications per byte | train time (s), this run |")
    print("|---|---|---|---|---|---|---|")
    for n, s in runs.items():
        c = s["config"]
        steps = f"{c['base_iterations']} + {c['iterations']}" if c.get("base_iterations") else f"{c['iterations']}"
        start = s["history"][0]["bits_per_byte"] if c["retrofit"] and s["history"][0]["iteration"] == 0 else None
        print(f"| {label(n, s)} | {steps} | {s['bits_per_byte']:.3f} | {'-' if start is None else f'{start:.3f}'} "
              f"| {s['mean_steps']:.2f} | {s['layer_applications']:.2f} | {s['train_seconds']:.0f} |")
    deep = runs.get("plain6")
    if deep and base:
        mid = at_iteration(deep, base["config"]["iterations"])
        if mid is not None:
            print(f"\nplain 6 layers after {base['config']['iterations']} steps (its log): {mid:.3f} bits per byte, "
                  f"against {base['bits_per_byte']:.3f} for plain 4 layers at the same step.")

    # equal layer applications: each looped run against the plain models interpolated at its applications
    looped = [(n, s) for n, s in runs.items() if not s["config"]["plain"]]
    shallow = [s for n, s in runs.items() if n.startswith("plain4-continued")]
    if shallow and deep and looped:
        x0, y0 = 4.0, sum(s["bits_per_byte"] for s in shallow) / len(shallow)
        x1, y1 = deep["layer_applications"], deep["bits_per_byte"]
        print(f"\nAt equal layer applications (6000 optimizer steps each): the plain models' bits per byte, "
              f"interpolated linearly between 4 layers ({y0:.3f}, the continued runs' mean) and {x1:.0f} layers "
              f"({y1:.3f}, from scratch), at each looped run's applications per byte:\n")
        print("| model | layer applications per byte | held-out bits per byte | plain, interpolated | difference |")
        print("|---|---|---|---|---|")
        for n, s in looped:
            x = s["layer_applications"]
            y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            print(f"| {label(n, s)} | {x:.2f} | {s['bits_per_byte']:.3f} | {y:.3f} | {s['bits_per_byte'] - y:+.3f} |")
    for a, b in (("plain4-continued", "plain4-continued-seed2"), ("act-tau0.001", "act-tau0.001-seed2")):
        if a in runs and b in runs:
            print(f"\nSeeds 1 and 2 of {label(a, runs[a])}: {runs[a]['bits_per_byte']:.3f} and "
                  f"{runs[b]['bits_per_byte']:.3f} ({abs(runs[a]['bits_per_byte'] - runs[b]['bits_per_byte']):.3f} "
                  "apart).")

    act = [(n, s) for n, s in looped if not s["config"]["fixed_steps"]]
    if act:
        counts = act[0][1]["bytes_by_class"]
        classes = [k for k in counts if counts[k]]
        print("\nMean ponder steps by byte class (the byte the step reads; held-out bytes of each class in "
              "brackets):\n")
        print("| byte class | " + " | ".join(short(s) for _, s in act) + " |")
        print("|---|" + "---|" * len(act))
        for k in classes:
            print(f"| {k} ({counts[k]}) | " + " | ".join(f"{s['steps_by_class'][k]:.2f}" for _, s in act) + " |")
        ref = runs.get("plain4-continued")
        if ref:
            print("\nHeld-out bits per byte by byte class (of the byte read; the byte predicted is the next):\n")
            cols = [("plain 4, continued", ref), *((short(s), s) for _, s in act)]
            if deep:
                cols.append(("plain 6", deep))
            print("| byte class | " + " | ".join(c for c, _ in cols) + " |")
            print("|---|" + "---|" * len(cols))
            for k in classes:
                print(f"| {k} | " + " | ".join(f"{s['bits_per_byte_by_class'][k]:.3f}" for _, s in cols) + " |")
    figure(runs)


def figure(runs):
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, s in runs.items():
        c = s["config"]
        marker = "s" if c["plain"] else ("^" if c["fixed_steps"] else "o")
        axes[0].plot(s["layer_applications"], s["bits_per_byte"], marker, label=label(n, s))
        offset = c.get("base_iterations") or 0
        hist = [r for r in s["history"] if r["iteration"] > 0 or c["retrofit"]]
        axes[1].plot([offset + r["iteration"] for r in hist], [r["bits_per_byte"] for r in hist],
                     marker=marker, markersize=3, label=label(n, s))
    axes[0].set_xlabel("decoder layer applications per byte")
    axes[0].set_ylabel("held-out bits per byte")
    axes[0].set_title("at the end of training", fontsize=9)
    axes[1].set_xlabel("optimizer steps (the base model's included)")
    axes[1].set_ylabel("held-out bits per byte")
    axes[1].set_ylim(top=min(2.6, axes[1].get_ylim()[1]))
    axes[1].set_title("during training", fontsize=9)
    axes[0].legend(fontsize=6, loc="upper right")
    fig.suptitle("retrofitted recurrence: a plain 4-layer Llama, then its layers [1, 3) looped", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "retrofit.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or RUNS)
