"""Draws a time-penalty sweep (the ACT paper's sweep figures: sequence error
and mean ponder steps against tau) from the runs' summary.json files: a
markdown table on stdout and sweep-<task>.png here.

    python docs/study/sweep.py docs/study/sweep-addition-tau*
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run_dirs):
    runs = sorted((json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs),
                  key=lambda s: s["config"]["tau"])
    task = runs[0]["config"]["task"]
    c0 = runs[0]["config"]
    print(f"{task}, knobs {c0['knobs']}, {c0['cell'].upper()} {c0['hidden']}, M = {c0['max_steps']}, "
          f"{c0['iterations']} iterations\n")
    print("| tau | sequence error | mean ponder steps (per output) | Spearman rho (steps, difficulty) "
          "| wall time (s) | machine |")
    print("|---|---|---|---|---|---|")
    for s in runs:
        rho = s.get("spearman_steps_difficulty")
        m = s.get("machine") or {}
        print(f"| {s['config']['tau']:g} | {100 * s['final_sequence_error']:.1f} % "
              f"| {s.get('mean_steps_per_output', s['mean_ponder_steps']):.2f} "
              f"| {'-' if rho is None else f'{rho:+.2f}'} | {s.get('wall_seconds', s['train_seconds']):.0f} "
              f"| {m.get('gpu') or m.get('processor', '-')}, {m.get('torch_threads', '?')} thread(s) |")
    taus = [s["config"]["tau"] for s in runs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].semilogx(taus, [100 * s["final_sequence_error"] for s in runs], "o-", color="C3")
    axes[0].set_ylabel("sequence error (%)")
    axes[1].semilogx(taus, [s.get("mean_steps_per_output", s["mean_ponder_steps"]) for s in runs], "o-")
    axes[1].set_ylabel("mean ponder steps")
    for ax in axes:
        ax.set_xlabel("time penalty tau")
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{task}: time-penalty sweep (reduced size)")
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / f"sweep-{task}.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
