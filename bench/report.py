"""Turns bench/results/*.json into markdown tables and a plot per device
(bench/results/<device>.png). It rewrites the block between
`<!-- report:tables -->` and `<!-- /report -->` in bench/README.md (every
table) and the one between `<!-- report:summary -->` and `<!-- /report -->`
in the project README (one summary table per device), and prints both. Given
another results folder (a device run's $OUT), it only prints and plots; with
--bench-only it leaves the project README alone.

    python bench/report.py [--bench-only] [results folder]
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_ONLY = "--bench-only" in sys.argv[1:]
_folders = [a for a in sys.argv[1:] if a != "--bench-only"]
RESULTS = Path(_folders[0] if _folders else HERE / "results")


def kernel_table(data, group):
    copy = data.get("copy_GBps")
    lines = [f"| {group} | rows x H | dtype | median (us) | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for r in (r for r in data["rows"] if r["group"] == group):
        pct = f"{100 * r['GBps'] / copy:.0f} %" if copy else "n/a (no copy figure)"
        lines.append(f"| {r['name']} | {r['rows']} x {r['hidden']} | {r['dtype'].replace('torch.', '')} "
                     f"| {r['median_s'] * 1e6:.1f} | {r['GBps']:.1f} | {pct} |")
    return "\n".join(lines)


def ponder_table(data):
    by_size = defaultdict(dict)
    for r in (r for r in data["rows"] if r["group"] == "ponder_gru"):
        by_size[(r["batch"], r["hidden"])][r["name"]] = r
    lines = ["| B x H | impl | fwd+bwd (ms) | speedup vs padded | ideal (B max N / sum N) | outside the step function |",
             "|---|---|---|---|---|---|"]
    for (b, h), rows in sorted(by_size.items()):
        base = rows.get("padded")
        step_only = rows.get("step_fn_only")
        for name, r in rows.items():
            speed = f"{base['median_s'] / r['median_s']:.2f} x" if base else "-"
            outside = "-"
            if step_only and name not in ("padded", "step_fn_only"):
                outside = f"{100 * (1 - step_only['median_s'] / r['median_s']):.0f} %"
            lines.append(f"| {b} x {h} | {name} | {r['median_s'] * 1e3:.2f} | {speed} "
                         f"| {r['ideal_speedup']:.2f} x | {outside} |")
    return "\n".join(lines)


def ideal_table(data, group, key, columns, cells, ideal_header, baseline, others=(), ms_digits=2, order=None):
    """Median time, speedup over `baseline` and the share of the ideal speedup
    for every row of `group`, grouped by `key(row)`; `cells(key)` gives the
    leading columns. Rows named `baseline` or in `others` get no share."""
    groups = defaultdict(dict)
    for r in (r for r in data["rows"] if r["group"] == group):
        groups[key(r)][r["name"]] = r
    if not groups:
        return ""
    lines = [f"| {columns} | impl | fwd+bwd (ms) | speedup vs {baseline.replace('_', ' ')} | {ideal_header} "
             "| % of ideal |", "|---" * (columns.count("|") + 6) + "|"]
    for k, rows in sorted(groups.items()):
        base = rows.get(baseline)
        for name in (order or list(rows)):
            r = rows.get(name)
            if r is None:
                continue
            speed = base["median_s"] / r["median_s"] if base else float("nan")
            pct = "-" if name == baseline or name in others else f"{100 * speed / r['ideal_speedup']:.0f} %"
            lines.append(f"| {cells(k)} | {name} | {r['median_s'] * 1e3:.{ms_digits}f} | {speed:.2f} x "
                         f"| {r['ideal_speedup']:.2f} x | {pct} |")
    return "\n".join(lines)


def encoder_table(data):
    return ideal_table(data, "act_encoder", lambda r: (r["batch"], r["length"], r["d_model"]), "B x L x D",
                       lambda k: " x ".join(map(str, k)), "ideal (T max N / sum N)", "dense_loop", ("ut_t2t",),
                       ms_digits=1, order=("act_encoder", "dense_loop", "ut_t2t"))


def equal_work_table(data):
    return ideal_table(data, "act_encoder_equal_work", lambda r: (r["batch"], r["length"], r["d_model"]),
                       "B x L x D, every token 8 steps", lambda k: " x ".join(map(str, k)), "ideal", "dense_loop",
                       ms_digits=1, order=("act_encoder", "dense_loop"))


def host_floor_table(data):
    """Per ponder step: the ACT side's time over its 8 steps against the
    plain layers' call on the same rows (ideal 1.0 x)."""
    cases = defaultdict(dict)
    for r in (r for r in data["rows"] if r["group"] == "host_floor"):
        cases[r["case"]][r["name"]] = r
    lines = ["| host floor, per ponder step | ACT (us) | plain layers (us) | ACT / plain | ideal |",
             "|---|---|---|---|---|"]
    for case in ("forward (no_grad)", "forward + backward", "decode call"):
        rows = cases.get(case, {})
        if "act" in rows and "plain" in rows:
            act, plain = rows["act"]["per_step_s"], rows["plain"]["per_step_s"]
            lines.append(f"| {case} | {act * 1e6:.0f} | {plain * 1e6:.0f} | {act / plain:.2f} x | 1.00 x |")
    return "\n".join(lines) if len(lines) > 2 else ""


def attention_table(data):
    groups = defaultdict(dict)
    for r in (r for r in data["rows"] if r["group"] == "ragged_attention"):
        groups[(r["batch"], r["length"], r["heads"], r["dim"], r["causal"], r["running"])][r["name"]] = r
    if not groups:
        return ""
    lines = ["| B x L, heads x d | mask | running | impl | fwd+bwd (ms) | vs SDPA on all tokens "
             "| ideal (T / A) | useful TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for (b, length, heads, dim, causal, running), rows in sorted(groups.items()):
        base = rows.get("sdpa_dense")
        for name, r in sorted(rows.items()):
            speed = f"{base['median_s'] / r['median_s']:.2f} x" if base else "-"
            lines.append(f"| {b} x {length}, {heads} x {dim} | {'causal' if causal else 'full'} | {running:.0%} "
                         f"| {name} | {r['median_s'] * 1e3:.2f} | {speed} | {r['ideal_speedup']:.2f} x "
                         f"| {r['TFLOPs']:.3f} |")
    return "\n".join(lines)


def pondernet_table(data):
    return ideal_table(data, "pondernet", lambda r: (r["batch"], r["hidden"]), "B x H",
                       lambda k: " x ".join(map(str, k)), "ideal (B max N / sum N)", "padded")


def layer_table(data):
    return ideal_table(data, "act_layer", lambda r: (r["length"], r["batch"], r["hidden"], r["kind"]),
                       "L x B x H | workload", lambda k: f"{k[0]} x {k[1]} x {k[2]} | {k[3]}", "ideal",
                       "padded", ms_digits=1, order=("padded", "reference", "cpu", "triton", "cuda"))


def plot(data, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in data["rows"] if r["group"] == "ponder_gru"]
    if not rows:
        return
    sizes = sorted({(r["batch"], r["hidden"]) for r in rows})
    impls = sorted({r["name"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ys = [next((r["median_s"] * 1e3 for r in rows if r["name"] == impl and (r["batch"], r["hidden"]) == s), 0)
              for s in sizes]
        ax.bar([k + i * width for k in range(len(sizes))], ys, width, label=impl)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))])
    ax.set_xticklabels([f"B={b} H={h}" for b, h in sizes])
    ax.set_ylabel("fwd+bwd ms (lower is better)")
    ax.set_title(f"GRU ponder, skewed halting, {data['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def lm_tables(data) -> str:
    """The looped LM: generation against the dense per-step cache and against
    no cache, training, and the cache's bytes."""
    parts = []
    gen = {r["name"]: r for r in data["rows"] if r["group"] == "lm_generate"}
    if gen:
        lines = ["| LM generation | tokens/s | speedup vs dense per-step cache | ideal | % of ideal | mean steps |",
                 "|---|---|---|---|---|---|"]
        base = gen.get("dense_cache")
        for name in ("dense_cache", "act_cache"):
            r = gen.get(name)
            if r is None:
                continue
            speed = base["median_s"] / r["median_s"] if base else float("nan")
            pct = "-" if name == "dense_cache" else f"{100 * speed / r['ideal_speedup']:.0f} %"
            lines.append(f"| {r['prompts']} prompts, {r['new_tokens']} new, d {r['d_model']}: {name} "
                         f"| {r['tokens_per_s']:.0f} | {speed:.2f} x | {r['ideal_speedup']:.2f} x | {pct} "
                         f"| {r['mean_steps']:.2f} |")
        parts.append("\n".join(lines))
    nocache = {r["name"]: r for r in data["rows"] if r["group"] == "lm_generate_no_cache"}
    if nocache:
        lines = ["| LM generation, no cache | tokens/s | speedup vs no cache | ideal (tokens recomputed) | % of ideal |",
                 "|---|---|---|---|---|"]
        base = nocache.get("no_cache")
        for name in ("no_cache", "act_cache"):
            r = nocache.get(name)
            if r is None:
                continue
            speed = base["median_s"] / r["median_s"] if base else float("nan")
            pct = "-" if name == "no_cache" else f"{100 * speed / r['ideal_speedup']:.0f} %"
            lines.append(f"| {r['prompts']} prompts, {r['new_tokens']} new: {name} | {r['tokens_per_s']:.0f} "
                         f"| {speed:.2f} x | {r['ideal_speedup']:.2f} x | {pct} |")
        parts.append("\n".join(lines))
    if any(r["group"] == "lm_train" for r in data["rows"]):
        parts.append(ideal_table(data, "lm_train", lambda r: (r["batch"], r["length"], r["d_model"]), "B x L x D",
                                 lambda k: " x ".join(map(str, k)), "ideal (layer applications)",
                                 "every_token_max_steps", ms_digits=1, order=("every_token_max_steps", "act")))
    for r in (r for r in data["rows"] if r["group"] == "lm_cache_bytes"):
        parts.append(f"Cache after a prefill of {r['tokens']} tokens (mean steps {r['mean_steps']:.2f}): "
                     f"{r['ragged_rows']} rows, {r['ragged_bytes'] / 2**20:.1f} MiB, against {r['dense_rows']} rows, "
                     f"{r['dense_bytes'] / 2**20:.1f} MiB for a dense per-step cache ({r['ideal_speedup']:.2f} x "
                     "fewer).")
    return "\n\n".join(parts)


HF_CLOCKS = {"process_time": "CPU time of the process", "perf_counter": "wall time"}


def hf_tables(data) -> str:
    """LoopedCausalLM against transformers' own model with the block unrolled
    max_steps times: training, generation at every batch size (against the
    unrolled model, and depthwise against synchronous), the block iterations
    per generated token, and the cache after generation; one set of timed
    tables per clock the rows were timed with."""
    parts = []
    hf_rows = [r for r in data["rows"] if r["group"] in ("hf_train", "hf_generate")]
    for timer in sorted({r.get("timer", "perf_counter") for r in hf_rows}, reverse=True):
        rows = [r for r in hf_rows if r.get("timer", "perf_counter") == timer]
        parts.append(f"LoopedCausalLM against the unrolled transformers model, timed by {HF_CLOCKS.get(timer, timer)} "
                     f"(`{timer}`):")
        parts += _hf_timed_tables({**data, "rows": rows})
    parts += _hf_iterations_and_cache(data)
    return "\n\n".join(p for p in parts if p)


def _hf_timed_tables(data):
    parts = []
    if any(r["group"] == "hf_train" for r in data["rows"]):
        parts.append(ideal_table(data, "hf_train", lambda r: (r["batch"], r["length"], r["d_model"]),
                                 "LoopedCausalLM training, B x L x D", lambda k: " x ".join(map(str, k)),
                                 "ideal (layer applications)", "unrolled_hf", ms_digits=1,
                                 order=("unrolled_hf", "looped")))
    by_batch = defaultdict(dict)
    for r in (r for r in data["rows"] if r["group"] == "hf_generate"):
        by_batch[r["batch"]][r["name"]] = r
    if not by_batch:
        return parts
    lines = ["| LoopedCausalLM generation, batch | impl | tokens/s | speedup vs unrolled HF | ideal "
             "(layer applications) | % of ideal | mean N (new tokens) |", "|---|---|---|---|---|---|---|"]
    for batch, rows in sorted(by_batch.items()):
        base = rows.get("unrolled_hf")
        for name in ("unrolled_hf", "depthwise", "synchronous"):
            r = rows.get(name)
            if r is None:
                continue
            if name == "unrolled_hf":
                lines.append(f"| {batch} | {name} | {r['tokens_per_s']:.0f} | 1.00 x | - | - | - |")
                continue
            speed = base["median_s"] / r["median_s"] if base else float("nan")
            pct = f"{100 * speed / r['ideal_speedup']:.0f} %" if base else "-"
            lines.append(f"| {batch} | {name} | {r['tokens_per_s']:.0f} | {speed:.2f} x "
                         f"| {r['ideal_speedup']:.2f} x | {pct} | {r['mean_steps']:.2f} |")
    parts.append("\n".join(lines))
    lines = ["| batch | depthwise vs synchronous | ideal (synchronous / depthwise iterations) | % of ideal |",
             "|---|---|---|---|"]
    for batch, rows in sorted(by_batch.items()):
        dw, sy = rows.get("depthwise"), rows.get("synchronous")
        if dw and sy:
            speed, best = sy["median_s"] / dw["median_s"], sy["iterations"] / dw["iterations"]
            lines.append(f"| {batch} | {speed:.2f} x | {best:.2f} x | {100 * speed / best:.0f} % |")
    if len(lines) > 2:
        parts.append("\n".join(lines))
    return parts


def _hf_iterations_and_cache(data):
    """Block iterations per generated token (counted, not timed: one table
    whatever the clock) and the cache's bytes."""
    parts = []
    by_batch = defaultdict(dict)
    for r in (r for r in data["rows"] if r["group"] == "hf_generate" and r["name"] != "unrolled_hf"):
        by_batch[r["batch"]][r["name"]] = r
    if by_batch:
        lines = ["| batch | schedule | block iterations | per generated token | ideal (mean N) | % of ideal "
                 "| the schedule's floor per token | of which the prefill |", "|---|---|---|---|---|---|---|---|"]
        for batch, rows in sorted(by_batch.items()):
            for name in ("depthwise", "synchronous"):
                r = rows.get(name)
                if r is None:
                    continue
                per = r["iterations"] / r["new_tokens"]
                floor = r["depthwise_floor" if name == "depthwise" else "synchronous_floor"] / r["new_tokens"]
                lines.append(f"| {batch} | {name} | {r['iterations']} | {per:.2f} | {r['mean_steps']:.2f} "
                             f"| {100 * r['mean_steps'] / per:.0f} % | {floor:.2f} "
                             f"| {r['prefill_iterations'] / r['new_tokens']:.2f} |")
        parts.append("\n".join(lines))
    for r in [r for r in data["rows"] if r["group"] == "hf_cache_bytes"][-1:]:   # the latest run's
        mib = 2 ** 20
        parts.append(f"Cache after generating {r['new_tokens']} tokens for {r['batch']} prompts ({r['tokens']} "
                     f"tokens, mean N {r['mean_steps']:.2f}): ours {r['ragged_rows']} rows, "
                     f"{r['ragged_bytes'] / mib:.1f} MiB in use, {r['ragged_allocated_bytes'] / mib:.1f} MiB "
                     f"allocated; the unrolled model's DynamicCache {r['hf_bytes'] / mib:.1f} MiB "
                     f"({r['hf_unpadded_bytes'] / mib:.1f} MiB without its padding): "
                     f"{r['hf_bytes'] / r['ragged_bytes']:.2f} x fewer bytes in use, "
                     f"{r['hf_bytes'] / r['ragged_allocated_bytes']:.2f} x fewer allocated; rows per token, "
                     f"unrolled over ours: {r['ideal_speedup']:.2f} x.")
    return parts


def exit_tables(data) -> str:
    """Generation under the exit rules (design §16) against exit="fixed" on
    the same model, and both schedulers against mean depth."""
    parts = []
    rows = [r for r in data["rows"] if r["group"] == "exit_generate"]
    if rows:
        lines = ["| exit rule (16 prompts, 32 new tokens) | threshold | mean steps | steps run per token | tokens/s "
                 "| speedup vs fixed | ideal (layer applications) | % of ideal |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['name'].replace('_', ' ')} | {r['threshold'] if r['threshold'] is not None else '-'} "
                         f"| {r['mean_steps']:.2f} | {r['steps_run_per_token']:.2f} | {r['tokens_per_s']:.0f} "
                         f"| {r['speedup_vs_fixed']:.2f} x | {r['ideal_speedup']:.2f} x "
                         f"| {100 * r['speedup_vs_fixed'] / r['ideal_speedup']:.0f} % |")
        parts.append("\n".join(lines))
    rows = [r for r in data["rows"] if r["group"] == "exit_depth"]
    if rows:
        lines = ["| decoding against mean depth | schedule | mean N (new tokens) | block iterations per token "
                 "| ideal (mean N) | tokens/s |", "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["mean_steps"], r["schedule"])):
            lines.append(f"| {r['name'].split(' ', 1)[1]} | {r['schedule']} | {r['mean_steps']:.2f} "
                         f"| {r['iterations_per_token']:.2f} | {r['ideal_iterations_per_token']:.2f} "
                         f"| {r['tokens_per_s']:.0f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def heading(data) -> str:
    return (f"{data['device']} (torch {data['torch']}, triton {data['triton']}, "
            f"commit {data['commit']}, {data['date'][:10]})")


def device_tables(data) -> str:
    parts = [f"### {heading(data)}\n"]
    if data.get("copy_GBps"):
        parts.append(f"Measured device copy bandwidth: {data['copy_GBps']:.0f} GB/s\n")
    parts.append(ponder_table(data) + "\n")
    for table in (layer_table, encoder_table, equal_work_table, host_floor_table, attention_table,
                  pondernet_table, lm_tables, hf_tables, exit_tables):
        text = table(data)
        if text.strip():
            parts.append(text + "\n")
    parts.append(kernel_table(data, "halting_step") + "\n")
    parts.append(kernel_table(data, "combine_backward"))
    return "\n".join(parts)


# family: (result group, what a row's size is, the baseline row, its label)
SUMMARY = (
    ("ACT ponder, GRU cell (skewed halting)", "ponder_gru", lambda r: (r["batch"], r["hidden"]), "padded",
     "B x H"),
    ("ACT GRU layer", "act_layer", lambda r: (r["kind"] == "skewed", r["length"] * r["batch"] * r["hidden"]),
     "padded", "skewed, largest"),
    ("ACT transformer encoder", "act_encoder", lambda r: (r["batch"] * r["length"], r["d_model"]), "dense_loop",
     "largest"),
    ("PonderNet, GRU cell", "pondernet", lambda r: (r["batch"], r["hidden"]), "padded", "largest"),
)


def summary_table(data) -> str:
    """One row per op family: its largest workload, the fastest implementation
    there, its speedup over the baseline measured in the same process, and the
    ideal speedup (the baseline's work over the ragged work)."""
    lines = ["| family | baseline | fastest | speedup | ideal | % of ideal |", "|---|---|---|---|---|---|"]
    for family, group, size, baseline, _ in SUMMARY:
        rows = [r for r in data["rows"] if r["group"] == group]
        if not rows:
            continue
        top = max(size(r) for r in rows)
        at = {r["name"]: r for r in rows if size(r) == top}
        base = at.get(baseline)
        others = [r for name, r in at.items() if name not in (baseline, "step_fn_only", "ut_t2t")]
        if base is None or not others:
            continue
        best = min(others, key=lambda r: r["median_s"])
        speed = base["median_s"] / best["median_s"]
        lines.append(f"| {family} | {baseline.replace('_', ' ')} | {best['name']} | {speed:.2f} x "
                     f"| {best['ideal_speedup']:.2f} x | {100 * speed / best['ideal_speedup']:.0f} % |")
    gen = {r["name"]: r for r in data["rows"] if r["group"] == "lm_generate"}
    if "act_cache" in gen and "dense_cache" in gen:
        r, base = gen["act_cache"], gen["dense_cache"]
        speed = base["median_s"] / r["median_s"]
        lines.append(f"| looped LM generation | dense per-step cache | act_cache | {speed:.2f} x "
                     f"| {r['ideal_speedup']:.2f} x | {100 * speed / r['ideal_speedup']:.0f} % |")
    lines += _hf_summary(data)
    attention = [r for r in data["rows"] if r["group"] == "ragged_attention" and r["name"] != "sdpa_dense"]
    if attention:
        best = max(attention, key=lambda r: r["TFLOPs"])
        lines.append(f"| ragged attention | - | {best['name']} | {best['TFLOPs']:.3f} useful TFLOP/s | - | - |")
    return "\n".join(lines)


def _hf_summary(data):
    """Summary rows of LoopedCausalLM against transformers' unrolled model
    (the latest clock's rows) and of the exit rules against fixed depth."""
    lines = []
    hf = [r for r in data["rows"] if r["group"] in ("hf_train", "hf_generate")]
    timers = sorted({r.get("timer", "perf_counter") for r in hf})
    timed = [r for r in hf if r.get("timer", "perf_counter") == (timers[-1] if timers else None)]
    train = {r["name"]: r for r in timed if r["group"] == "hf_train"}
    if "looped" in train and "unrolled_hf" in train:
        r, speed = train["looped"], train["unrolled_hf"]["median_s"] / train["looped"]["median_s"]
        lines.append(f"| LoopedCausalLM training (Llama, GQA) | transformers, block unrolled | looped | {speed:.2f} x "
                     f"| {r['ideal_speedup']:.2f} x | {100 * speed / r['ideal_speedup']:.0f} % |")
    gen = {r["name"]: r for r in timed if r["group"] == "hf_generate" and r["batch"] == 16}
    if "depthwise" in gen and "unrolled_hf" in gen:
        r, speed = gen["depthwise"], gen["unrolled_hf"]["median_s"] / gen["depthwise"]["median_s"]
        lines.append(f"| LoopedCausalLM generation, batch 16 | transformers generate, block unrolled | depthwise "
                     f"| {speed:.2f} x | {r['ideal_speedup']:.2f} x | {100 * speed / r['ideal_speedup']:.0f} % |")
    exits = {r["name"]: r for r in data["rows"] if r["group"] == "exit_generate"}
    for name in ("gate", "latent"):
        if name in exits:
            r = exits[name]
            lines.append(f"| exit rule {name}, generation | exit fixed | {name} | {r['speedup_vs_fixed']:.2f} x "
                         f"| {r['ideal_speedup']:.2f} x | {100 * r['speedup_vs_fixed'] / r['ideal_speedup']:.0f} % |")
    return lines


def replace_block(path: Path, name: str, body: str) -> None:
    text = path.read_text()
    start, end = f"<!-- report:{name} -->", "<!-- /report -->"
    if start not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main():
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        sys.exit("no results in bench/results/; run: pytest bench/ --benchmark-only")
    devices = [json.loads(f.read_text()) for f in files]
    tables = "\n\n".join(device_tables(d) for d in devices)
    summary = "\n\n".join(f"**{heading(d)}**\n\n{summary_table(d)}" for d in devices)
    if RESULTS.resolve() == (HERE / "results").resolve():
        # the READMEs show the repository's own results, never another folder's
        replace_block(HERE / "README.md", "tables", tables)
        if not BENCH_ONLY:
            replace_block(HERE.parent / "README.md", "summary", summary)
    for f, data in zip(files, devices):
        plot(data, f.with_suffix(".png"))
    print(summary + "\n\n" + tables)


if __name__ == "__main__":
    main()
