"""Draws the parity study (ACT vs the same network with one fixed step) from
the runs' summary.json files: a markdown table on stdout and compare.png.

    python docs/study/compare.py docs/study/parity8-act docs/study/parity8-fixed
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run_dirs):
    runs = [(Path(d).name, json.loads((Path(d) / "summary.json").read_text())) for d in run_dirs]
    print("| run | input size | tau | steps M | iterations | train time (s) | sequence error | mean N |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in runs:
        c = s["config"]
        print(f"| {name} | {c['knobs'].get('size')} | {c['tau'] if not c['fixed_steps'] else '-'} "
              f"| {c['max_steps']} | {c['iterations']} | {s['train_seconds']:.0f} "
              f"| {100 * s['final_sequence_error']:.1f} % | {s['mean_ponder_steps']:.2f} |")
    print("\n| nonzero entries | " + " | ".join(f"{n}: mean N / error" for n, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    difficulties = sorted({int(d) for _, s in runs for d in s["by_difficulty"]})
    for d in difficulties:
        cells = []
        for _, s in runs:
            v = s["by_difficulty"].get(str(d))
            cells.append(f"{v['mean_steps']:.2f} / {100 * v['error']:.1f} %" if v else "-")
        print(f"| {d} | " + " | ".join(cells) + " |")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, s in runs:
        ds = sorted(int(d) for d in s["by_difficulty"])
        table = s["by_difficulty"]
        axes[0].plot(ds, [table[str(d)]["mean_steps"] for d in ds], "o-", label=name)
        axes[1].plot(ds, [100 * table[str(d)]["error"] for d in ds], "o-", label=name)
    axes[0].set_xlabel("nonzero entries")
    axes[0].set_ylabel("mean ponder steps N")
    axes[1].set_xlabel("nonzero entries")
    axes[1].set_ylabel("sequence error (%)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(run_dirs[0]).parent / f"compare-{Path(run_dirs[0]).name}.png"
    fig.savefig(out, dpi=110)
    print(f"\n(figure: {out.name})")


if __name__ == "__main__":
    main(sys.argv[1:])
