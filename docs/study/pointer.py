"""Draws the per-token study (pointer chasing: the ACT transformer encoder
against the same layer at fixed depths) from the runs' summary.json files: a
markdown table on stdout and pointer.png next to this script.

    python docs/study/pointer.py docs/study/pointer-act docs/study/pointer-fixed1 \\
        docs/study/pointer-fixed3 docs/study/pointer-fixed8
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(summary):
    c = summary["config"]
    return f"fixed depth {c['fixed_steps']}" if c["fixed_steps"] else f"ACT (M={c['max_steps']}, tau={c['tau']})"


def main(run_dirs):
    runs = [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs]
    print("| model | iterations | train time (s) | token error | sequence error | mean steps per token |")
    print("|---|---|---|---|---|---|")
    for s in runs:
        c = s["config"]
        by = s["by_difficulty"]
        # mean over tokens: the table's per-difficulty means weighted equally (hops are uniform)
        print(f"| {label(s)} | {c['iterations']} | {s['train_seconds']:.0f} | {100 * s['final_token_error']:.1f} % "
              f"| {100 * s['final_sequence_error']:.1f} % | {sum(v['mean_steps'] for v in by.values()) / len(by):.2f} |")
    hops = sorted({int(d) for s in runs for d in s["by_difficulty"]})
    print("\n| hops | " + " | ".join(f"{label(s)}: steps / token error" for s in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for d in hops:
        cells = []
        for s in runs:
            v = s["by_difficulty"].get(str(d))
            cells.append("-" if v is None else f"{v['mean_steps']:.2f} / {100 * v['token_error']:.1f} %")
        print(f"| {d} | " + " | ".join(cells) + " |")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, s in enumerate(runs):
        by = s["by_difficulty"]
        ds = sorted(int(d) for d in by)
        style = "o-" if not s["config"]["fixed_steps"] else "s--"
        axes[0].plot(ds, [by[str(d)]["mean_steps"] for d in ds], style, color=f"C{i}", label=label(s))
        axes[1].plot(ds, [100 * by[str(d)]["token_error"] for d in ds], style, color=f"C{i}", label=label(s))
    axes[0].set_xlabel("hops (per-token difficulty)")
    axes[0].set_ylabel("mean ponder steps per token")
    axes[0].set_ylim(bottom=0)
    axes[1].set_xlabel("hops (per-token difficulty)")
    axes[1].set_ylabel("token error (%)")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xticks(hops)
    axes[1].legend(fontsize=8)
    fig.suptitle("Pointer chasing: per-token ACT encoder vs the same layer at fixed depth")
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "pointer.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
