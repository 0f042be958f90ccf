"""Draws the byte-LM study (the looped ACT language model on the Python
standard library's sources, docs/study/run.sh groups lm, lm_sweep, lm_deep)
from the runs' summary.json files: markdown tables on stdout and lm.png next
to this script (mean ponder steps by byte class, per tau).

    python docs/study/lm.py docs/study/lm-*
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def label(s):
    c = s["config"]
    return f"fixed depth {c['fixed_steps']}" if c["fixed_steps"] else f"ACT, tau = {c['tau']}"


def layers_per_byte(s):
    """Layer applications per byte: prelude + coda + block layers x mean steps."""
    c = s["config"]
    return 2 + c["block_layers"] * s["mean_steps"]


def main(run_dirs):
    runs = [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs
            if (Path(d) / "summary.json").exists()]
    missing = [str(d) for d in run_dirs if not (Path(d) / "summary.json").exists()]
    if missing:
        print("Runs not there (not invented): " + ", ".join(missing) + "\n")
    if not runs:
        return
    act = sorted((s for s in runs if not s["config"]["fixed_steps"]), key=lambda s: s["config"]["tau"])
    fixed = sorted((s for s in runs if s["config"]["fixed_steps"]), key=lambda s: s["config"]["fixed_steps"])
    c0 = runs[0]["config"]
    print(f"Byte LM on {c0['corpus']}: d_model {c0['d_model']}, {c0['heads']} heads, prelude 1 + block "
          f"{c0['block_layers']} + coda 1 layers, M = {c0['max_steps']}, context {c0['context']} bytes, batch "
          f"{c0['batch_size']}, {c0['iterations']} iterations, Adam lr {c0['lr']}; held-out bits per byte on "
          f"{c0['eval_windows']} fixed windows of every tenth file.\n")
    print("| model | held-out bits per byte | mean steps | layer applications per byte | train time (s) |")
    print("|---|---|---|---|---|")
    for s in [*act, *fixed]:
        print(f"| {label(s)} | {s['bits_per_byte']:.3f} | {s['mean_steps']:.2f} | {layers_per_byte(s):.2f} "
              f"| {s['train_seconds']:.0f} |")
    classes = list(runs[0]["steps_by_class"])
    if act:
        print("\nMean ponder steps by byte class (the byte the step reads; held-out bytes of each class in "
              "brackets):\n")
        counts = act[0]["bytes_by_class"]
        print("| byte class | " + " | ".join(label(s) for s in act) + " |")
        print("|---|" + "---|" * len(act))
        for name in classes:
            cells = [("-" if s["steps_by_class"][name] is None else f"{s['steps_by_class'][name]:.2f}") for s in act]
            print(f"| {name} ({counts[name]}) | " + " | ".join(cells) + " |")
        fig, ax = plt.subplots(figsize=(8, 3.4))
        width = 0.8 / len(act)
        for k, s in enumerate(act):
            ys = [s["steps_by_class"][n] or 0 for n in classes]
            ax.bar([i + k * width for i in range(len(classes))], ys, width, label=label(s))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))])
        ax.set_xticklabels(classes, rotation=20, fontsize=8)
        ax.set_ylabel("mean ponder steps")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.set_title("byte LM on the Python standard library: where it ponders", fontsize=9)
        fig.tight_layout()
        fig.savefig(HERE / "lm.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
