"""Redraws every study figure and table from the runs' summary.json files in
this folder and rewrites the tables of docs/study/README.md: every block
between `<!-- redraw:NAME -->` and `<!-- /redraw -->` (the block "tables"
holds all of them; the others sit inside the studies' prose). Runs that are
missing are listed, not invented. The runs themselves: docs/study/run.sh.

    python docs/study/redraw.py
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import lm  # noqa: E402
import pointer  # noqa: E402
import pondernet  # noqa: E402
import sweep  # noqa: E402

TAUS = ("0.001", "0.003", "0.01", "0.03", "0.1", "0.3")


def load(name):
    path = HERE / name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def have(*names):
    missing = [n for n in names if load(n) is None]
    if missing:
        print(f"(not drawn: missing runs {', '.join(missing)}; see docs/study/run.sh)\n")
    return not missing


def steps_per_output(s):
    """Mean steps per scored output; older summaries only have the mean of the
    per-difficulty means (marked *)."""
    if "mean_steps_per_output" in s:
        return f"{s['mean_steps_per_output']:.2f}"
    return f"{s['mean_ponder_steps']:.2f}*"


def where(s):
    m = s.get("machine")
    if not m:
        return "this CPU (not recorded)"
    return f"{m.get('gpu') or m['processor']}, {m['torch_threads']} thread{'s' if m['torch_threads'] > 1 else ''}"


def wall(s):
    return f"{s.get('wall_seconds', s['train_seconds']):.0f}"


def sweep_runs(task):
    return [f"sweep-{task}-tau{t}" for t in TAUS if load(f"sweep-{task}-tau{t}")]


def best_sweep_run(task):
    runs = sweep_runs(task)
    return min(runs, key=lambda r: (load(r)["final_sequence_error"], load(r)["mean_steps_per_output"])) if runs else None


def equal_compute_table():
    """ACT against the same network with one fixed step and with K fixed steps,
    K = ACT's mean steps per output rounded."""
    print("| task | run | sequence error | steps per output | wall time (s) | machine |")
    print("|---|---|---|---|---|---|")
    sets = {
        "parity (size 8)": ["parity8-act", "parity8-fixed", "parity8-fixed3"],
        "logic": [best_sweep_run("logic"), "logic-fixed1", None],
        "addition": [best_sweep_run("addition"), "addition-fixed1", None],
        "sort": ["sort-act", "sort-fixed", "sort-fixed3"],
        "pointer (per token)": ["pointer-act", "pointer-fixed1", "pointer-fixed3"],
    }
    for task, (act, one, k_run) in sets.items():
        if act is None or load(act) is None:
            print(f"| {task} | (ACT run missing) | | | | |")
            continue
        s = load(act)
        k = max(1, round(s.get("mean_steps_per_output", s["mean_ponder_steps"])))
        if k_run is None:
            k_run = f"{task}-fixed{k}"
        for name, label in ((act, f"ACT, tau {s['config']['tau']:g}"), (one, "1 fixed step"),
                            (k_run, f"{load(k_run)['config']['fixed_steps'] if load(k_run) else k} fixed steps")):
            r = load(name)
            if r is None:
                print(f"| {task} | {label}: missing (`{name}`) | | | | |")
                continue
            print(f"| {task} | {label} | {100 * r['final_sequence_error']:.1f} % | {steps_per_output(r)} "
                  f"| {wall(r)} | {where(r)} |")


def parity_runs_table():
    """The parity runs at input sizes 32, 16 and 8, ACT and one fixed step."""
    print("| run | input size | tau | M | iterations | train time (s) | sequence error | steps per output |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("parity32-act", "parity16-act", "parity16-fixed", "parity8-act", "parity8-act-tau1e-2",
                 "parity8-fixed", "parity8-fixed3"):
        r = load(name)
        if r is None:
            print(f"| {name}: missing | | | | | | | |")
            continue
        c = r["config"]
        fixed = int(c["fixed_steps"])   # older summaries store True for one step
        kind = f"fixed {fixed}" if fixed else "ACT"
        tau = "-" if fixed else f"{c['tau']:g}"
        print(f"| {kind} | {c['knobs'].get('size')} | {tau} | {c['max_steps']} | {c['iterations']} "
              f"| {r['train_seconds']:.0f} | {100 * r['final_sequence_error']:.1f} % | {steps_per_output(r)} |")


def parity16_difficulty_table():
    """Ponder steps and error by nonzero entries at input size 16, ACT and one fixed step."""
    act, fixed = load("parity16-act"), load("parity16-fixed")
    if act is None or fixed is None:
        print("(not drawn: missing parity16-act or parity16-fixed)")
        return
    cols = ["1", "2", "3", "4", "6", "8", "12", "16"]
    print("| nonzero entries | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    print("| ACT mean N | " + " | ".join(f"{act['by_difficulty'][c]['mean_steps']:.2f}" for c in cols) + " |")
    print("| ACT error | " + " | ".join(f"{100 * act['by_difficulty'][c]['error']:.1f} %" for c in cols) + " |")
    print("| fixed error | " + " | ".join(f"{100 * fixed['by_difficulty'][c]['error']:.1f} %" for c in cols) + " |")


def difficulty_figure():
    """Ponder steps against difficulty, with Spearman's rho over every scored output."""
    panels = [("addition", sweep_runs("addition"), "digits"), ("logic", sweep_runs("logic"), "gates"),
              ("parity, size 32", [r for r in ("parity32-act",) if load(r)], "nonzero entries")]
    print("| run | Spearman rho (steps, difficulty) | mean steps by difficulty |")
    print("|---|---|---|")
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for ax, (title, runs, xlabel) in zip(axes, panels):
        for name in runs:
            s = load(name)
            table = s["by_difficulty"]
            ds = sorted(int(d) for d in table)
            rho = s.get("spearman_steps_difficulty")
            rho_text = "undefined (constant steps)" if rho is None else f"{rho:+.2f}"
            label = f"tau {s['config']['tau']:g} (rho {rho_text.split(' ')[0]})"
            ax.plot(ds, [table[str(d)]["mean_steps"] for d in ds], "o-", label=label, markersize=3)
            bins = ", ".join(f"{d}: {table[str(d)]['mean_steps']:.2f}" for d in ds)
            print(f"| {name} | {rho_text} | {bins} |")
        ticks = sorted({int(d) for name in runs for d in load(name)["by_difficulty"]})
        if ticks:
            ax.set_xticks(ticks if len(ticks) <= 12 else ticks[::max(1, len(ticks) // 8)])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean ponder steps")
        ax.set_ylim(bottom=0)
        if runs:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "difficulty.png", dpi=110)
    plt.close(fig)


def lm_study():
    runs = sorted(HERE.glob("lm-*"), key=lambda p: p.name)
    if not runs:
        print("No byte-LM runs yet (docs/study/run.sh lm lm_sweep lm_deep).")
        return
    lm.main(runs)


def capture(draw) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        draw()
    return out.getvalue().strip()


def section(title, draw):
    return f"## {title}\n\n{capture(draw)}\n"


def tables_only(draw) -> str:
    """The markdown tables a drawer prints, without its other lines."""
    lines = capture(draw).splitlines()
    return "\n".join(line for line in lines if line.startswith("|") or not line.strip()).strip()


def update_readme(blocks) -> None:
    """Rewrites the blocks between `<!-- redraw:NAME -->` and `<!-- /redraw -->`
    in this folder's README.md; the prose around them stays."""
    readme = HERE / "README.md"
    text = readme.read_text()
    for name, body in blocks.items():
        start, end = f"<!-- redraw:{name} -->", "<!-- /redraw -->"
        if start not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    readme.write_text(text)


def main():
    d = HERE
    parts = [
        section("Time-penalty sweep: addition (sweep-addition.png)",
                lambda: have(*sweep_runs("addition")[:1] or ["sweep-addition-tau0.001"])
                and sweep.main([d / r for r in sweep_runs("addition")])),
        section("Time-penalty sweep: logic (sweep-logic.png)",
                lambda: have(*sweep_runs("logic")[:1] or ["sweep-logic-tau0.001"])
                and sweep.main([d / r for r in sweep_runs("logic")])),
        section("Ponder steps against difficulty (difficulty.png)", difficulty_figure),
        section("ACT against fixed depth at equal compute", equal_compute_table),
        section("Parity: ACT against one fixed step, size 16 (compare-parity16-act.png)",
                lambda: have("parity16-act", "parity16-fixed")
                and compare.main([d / "parity16-act", d / "parity16-fixed"])),
        section("Parity: ACT against one fixed step, size 8 (compare-parity8-act.png)",
                lambda: have("parity8-act", "parity8-fixed")
                and compare.main([d / "parity8-act", d / "parity8-fixed"])),
        section("Per-token pondering: pointer chasing (pointer.png)",
                lambda: have("pointer-act", "pointer-fixed1", "pointer-fixed3", "pointer-fixed8")
                and pointer.main([d / f"pointer-{r}" for r in ("act", "fixed1", "fixed3", "fixed8")])),
        section("A looped ACT byte LM on the Python standard library (lm.png)", lm_study),
        section("ACT against PonderNet on parity (pondernet.png)",
                lambda: have("parity8-act-gru", "parity8-pondernet")
                and pondernet.main([d / "parity8-act-gru", d / "parity8-pondernet"])),
    ]
    text = "\n".join(part.replace("\n## ", "\n### ").replace("## ", "### ", 1) for part in parts)
    update_readme({
        "tables": text,
        "lm": tables_only(lm_study),
        "sweep-addition": tables_only(lambda: sweep.main([d / r for r in sweep_runs("addition")])),
        "sweep-logic": tables_only(lambda: sweep.main([d / r for r in sweep_runs("logic")])),
        "difficulty": tables_only(difficulty_figure),
        "equal-compute": tables_only(equal_compute_table),
        "parity-runs": tables_only(parity_runs_table),
        "parity16-difficulty": tables_only(parity16_difficulty_table),
        "pondernet": tables_only(lambda: have("parity8-act-gru", "parity8-pondernet")
                                 and pondernet.main([d / "parity8-act-gru", d / "parity8-pondernet"])),
        "pointer": tables_only(lambda: have("pointer-act", "pointer-fixed1", "pointer-fixed3", "pointer-fixed8")
                               and pointer.main([d / f"pointer-{r}" for r in ("act", "fixed1", "fixed3", "fixed8")])),
    })
    print(text)


if __name__ == "__main__":
    main()
