"""Draws the PonderNet study (parity: ACT against PonderNet at the same network
size, trained on few nonzero entries and tested on all) from the runs'
summary.json files: a markdown table on stdout and pondernet.png here.

    python docs/study/pondernet.py docs/study/parity8-act-gru docs/study/parity8-pondernet
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(s):
    c = s["config"]
    if c.get("method") == "pondernet":
        return f"PonderNet ({c['cell'].upper()} {c['hidden']}, beta={c['beta']}, prior={c['prior']})"
    return f"ACT ({c['cell'].upper()} {c['hidden']}, tau={c['tau']})"


def main(run_dirs):
    runs = [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs]
    trained = runs[0]["config"]["knobs"].get("max_nonzero", runs[0]["config"]["knobs"]["size"])

    def split_error(s, inside):
        rows = [v for d, v in s["by_difficulty"].items() if (int(d) <= trained) == inside and v["error"] is not None]
        return sum(v["error"] for v in rows) / len(rows) if rows else float("nan")

    print(f"| model | iterations | train time (s) | error, 1..{trained} nonzero (trained) "
          f"| error, {trained + 1}.. nonzero (extrapolation) | mean steps |")
    print("|---|---|---|---|---|---|")
    for s in runs:
        c = s["config"]
        print(f"| {label(s)} | {c['iterations']} | {s['train_seconds']:.0f} | {100 * split_error(s, True):.1f} % "
              f"| {100 * split_error(s, False):.1f} % | {s['mean_ponder_steps']:.2f} |")
    ds = sorted({int(d) for s in runs for d in s["by_difficulty"]})
    print("\n| nonzero entries | " + " | ".join(f"{label(s)}: steps / error" for s in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for d in ds:
        cells = []
        for s in runs:
            v = s["by_difficulty"].get(str(d))
            cells.append("-" if v is None else f"{v['mean_steps']:.2f} / {100 * v['error']:.1f} %")
        print(f"| {d}{' (extrapolation)' if d > trained else ''} | " + " | ".join(cells) + " |")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, s in enumerate(runs):
        by = s["by_difficulty"]
        xs = sorted(int(d) for d in by)
        axes[0].plot(xs, [by[str(d)]["mean_steps"] for d in xs], "o-", color=f"C{i}", label=label(s))
        axes[1].plot(xs, [100 * by[str(d)]["error"] for d in xs], "o-", color=f"C{i}", label=label(s))
    for ax in axes:
        ax.axvspan(trained + 0.5, max(ds) + 0.5, color="0.9", zorder=0)
        ax.set_xlabel("nonzero entries (shaded: never seen in training)")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("mean ponder steps")
    axes[1].set_ylabel("sequence error (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Parity, size {runs[0]['config']['knobs']['size']}: ACT vs PonderNet, trained on 1..{trained} nonzero")
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "pondernet.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
