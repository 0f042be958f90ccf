"""Turns bench/results/*.json into markdown tables and a plot per device
(bench/results/<device>.png). Each file is read by its kind: a device's
pytest-benchmark rows (rows with a "group"), bench/queue_workloads.py's queue
(rows with a "setting"), bench/huginn_workloads.py's alternation (rows with
a "num_steps" and no group), bench/vllm_looped.py's vLLM plugin against
vLLM unrolled (rows under "results", with a "size" and a "cpu_s") or
bench/vllm_huginn.py's (its "benchmark" field names it). It
rewrites the block between `<!-- report:tables -->` and `<!-- /report -->`
in bench/README.md (every table) and the one between `<!-- report:summary -->`
and `<!-- /report -->` in the project README (one summary table per device),
and prints both. Given another results folder (a device run's $OUT), it
only prints and plots; with --bench-only it leaves the project README alone.

    python bench/report.py [--bench-only] [results folder]
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2 ** 20


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


def exits_table(rows, columns, key, cells, exit_name, every_name, every_label, mean_header, mean, ideals):
    """A model generating with its exits (rows named `exit_name`) against our
    own path without them (`every_name`) and the release, per case
    `key(row)` (`cells(key)` gives the leading columns): tokens/s, the mean
    depth (`mean(row)`, a cell), the ratio to each baseline, and for each
    (field, header) of `ideals` the exit rows' ideal and the share of it each
    ratio reaches. The release and our path without exits do the same work
    (every loop for every token), so one ideal serves both ratios."""
    cases = defaultdict(list)
    for r in rows:
        cases[key(r)].append(r)
    if not cases:
        return ""
    header = f"| {columns} | impl | tokens/s | {mean_header} | vs {every_label} | vs release |"
    for _, label in ideals:
        header += f" {label} | % of it, vs {every_label} / vs release |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for k, case in sorted(cases.items()):
        named = {r["name"]: r for r in case}
        bases = (named.get(every_name), named.get("release"))
        for r in sorted(case, key=lambda r: (r["name"] != exit_name, r["name"] != every_name,
                                             r["name"] == "release", r["name"])):
            speeds = [base["median_s"] / r["median_s"] if base else float("nan") for base in bases]
            impl = f"{r['name']} {r['threshold']}" if r["name"] == exit_name and "threshold" in r else r["name"]
            rate = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] < 100 else f"{r['tokens_per_s']:.0f}"
            line = (f"| {cells(k)} | {impl} | {rate} | {mean(r)} | {speeds[0]:.2f} x "
                    f"| {speeds[1]:.2f} x |")
            for field, _ in ideals:
                best = r.get(field) if r["name"] == exit_name else None
                line += (f" {best:.2f} x | {100 * speeds[0] / best:.0f} % / {100 * speeds[1] / best:.0f} % |"
                         if best else " - | - |")
            lines.append(line)
    return "\n".join(lines)


def ouro_tables(data) -> str:
    """Ouro generating with its exit gate (bench/test_bench_ouro.py) against
    our every-loop path and the release, and the cache's bytes after it."""
    parts = [exits_table(
        [r for r in data["rows"] if r["group"] == "ouro_generate"], "Ouro generation, batch",
        lambda r: r["batch"], str, "gate", "every_loop", "ours every loop",
        "mean exit loop, all tokens / new",
        lambda r: f"{r['mean_exit']:.2f} / {r['new_mean_exit']:.2f}" if "mean_exit" in r else "-",
        (("ideal_speedup", "ideal (loops / mean exit, all tokens)"),))]
    for r in [r for r in data["rows"] if r["group"] == "ouro_cache_bytes"][-1:]:   # the latest run's
        parts.append(f"Ouro's cache after generating {r['new_tokens']} tokens for {r['batch']} prompts ({r['tokens']} "
                     f"tokens, mean exit loop {r['mean_exit']:.2f}, gate threshold {r['threshold']}): ours with the "
                     f"gate's exits {r['gate_rows']} rows, {r['gate_bytes'] / MIB:.1f} MiB in use, "
                     f"{r['gate_allocated_bytes'] / MIB:.1f} MiB allocated; ours with every loop (exit fixed) "
                     f"{r['fixed_rows']} rows, {r['fixed_bytes'] / MIB:.1f} MiB ({r['fixed_allocated_bytes'] / MIB:.1f} "
                     f"MiB allocated); the release's DynamicCache {r['release_bytes'] / MIB:.1f} MiB "
                     f"({r['release_unpadded_bytes'] / MIB:.1f} MiB without its padding): "
                     f"{r['fixed_bytes'] / r['gate_bytes']:.2f} x fewer bytes in use than every loop, "
                     f"{r['release_bytes'] / r['gate_bytes']:.2f} x fewer than the release.")
    return "\n\n".join(p for p in parts if p)


def huginn_generate_table(data) -> str:
    """Huginn generating with the kl exit (bench/test_bench_huginn.py) against
    our path with no exit and the release: both ideals, num_steps over the
    new tokens' mean steps and what the criterion's coda and head at every
    step leave of it."""
    return exits_table(
        [r for r in data["rows"] if r["group"] == "huginn_generate"], "Huginn generation, num_steps x batch",
        lambda r: (r["num_steps"], r["batch"]), lambda k: f"{k[0]} x {k[1]}", "kl", "fixed", "ours every step",
        "mean steps, new tokens", lambda r: f"{r['mean_steps_new']:.2f}" if "mean_steps_new" in r else "-",
        (("ideal_speedup", "ideal (num_steps / mean)"),
         ("ideal_with_criterion_coda", "ideal with the criterion's coda at every step")))


def heading(data) -> str:
    """The device, then the versions, commit and date the file names (each file kind records its own)."""
    versions = data.get("versions") or {}   # bench/vllm_looped.py keeps them under "versions"
    facts = [f"{name} {data.get(name) or versions[name]}" for name in ("torch", "triton", "transformers", "vllm")
             if data.get(name) or versions.get(name)]
    facts.append(f"commit {data.get('commit', 'unknown')}")
    if data.get("date"):
        facts.append(data["date"][:10])
    return f"{data.get('device', 'unknown device')} ({', '.join(facts)})"


def device_tables(data) -> str:
    parts = [f"### {heading(data)}\n"]
    if data.get("copy_GBps"):
        parts.append(f"Measured device copy bandwidth: {data['copy_GBps']:.0f} GB/s\n")
    parts.append(ponder_table(data) + "\n")
    for table in (layer_table, encoder_table, equal_work_table, host_floor_table, attention_table,
                  pondernet_table, lm_tables, hf_tables, exit_tables, ouro_tables, huginn_generate_table):
        text = table(data)
        if text.strip():
            parts.append(text + "\n")
    parts.append(kernel_table(data, "halting_step") + "\n")
    parts.append(kernel_table(data, "combine_backward"))
    return "\n".join(parts)


CLOCKS = {"process_time": "the process's CPU time", "perf_counter": "wall time"}


def timed_by(data, timers) -> str:
    threads = data.get("threads")
    count = "one thread" if threads == 1 else f"{threads} threads" if threads else "threads not recorded"
    return (f"Timed by {' and '.join(CLOCKS.get(t, t) for t in timers)}, {count}, the cases in alternation in one "
            "process.")


def queue_table(data) -> str:
    """bench/queue_workloads.py's rows: ours through the slots (or at a fixed
    batch) against transformers' generate of the unrolled model, and against
    vLLM where the file has its alternations (the controlled shallow queue)."""
    runs = data.get("vllm_runs") or []
    lines = ["| setting | source | mix | mean N (new) | at max_steps | schedule | tokens/s | transformers tokens/s "
             "| vs transformers | ideal | % of ideal | vLLM tokens/s | vs vLLM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        size = f"{r['prompts']} prompts, {r['slots']} slots" if r["setting"] == "queue" else f"batch {r['prompts']}"
        vllm = vs = "-"
        if runs and r["setting"] == "queue" and r["source"] == "controlled" and r["mix"] == "shallow":
            rates = [x["vllm_tokens_per_s"] for x in runs]
            ratios = [x["vs_vllm"][r["schedule"]] for x in runs]
            vllm = f"{min(rates):.0f}-{max(rates):.0f}" if len(runs) > 1 else f"{rates[0]:.0f}"
            vs = f"{min(ratios):.2f}-{max(ratios):.2f} x" if len(runs) > 1 else f"{ratios[0]:.2f} x"
        lines.append(f"| {size}, {r['new_tokens']} new | {r['source']} | {r['mix']} | {r['mean_n']:.2f} | "
                     f"{100 * r['at_max']:.0f} % | {r['schedule']} | {r['tokens_per_s']:.0f} | "
                     f"{r['hf_tokens_per_s']:.0f} | {r['vs_hf']:.2f} x | {r['ideal']:.2f} x | "
                     f"{r['pct_of_ideal']:.0f} % | {vllm} | {vs} |")
    return "\n".join(lines)


def queue_tables(data) -> str:
    return (f"### A queue through slots, bench/queue_workloads.py: {heading(data)}\n\n"
            f"{timed_by(data, [data.get('timer', 'perf_counter')])}\n\n{queue_table(data)}")


def huginn_tables(data) -> str:
    """bench/huginn_workloads.py's alternation: per num_steps and batch the
    release, ours with no exit (depth-wise and synchronous) and ours with the
    kl exit at each threshold, timed in turn in one process; the block
    iterations the kl exits leave (a depth-wise batch runs as many as its
    deepest row needs) and the cache's bytes after generation."""
    rows = data["rows"]
    timers = sorted({r.get("timer", "perf_counter") for r in rows})
    parts = [f"### Huginn in alternation, bench/huginn_workloads.py: {heading(data)}",
             f"{timed_by(data, timers)} Ours with the kl exit and with no exit run depth-wise unless named "
             "synchronous.",
             exits_table(rows, "Huginn, num_steps x batch", lambda r: (r["num_steps"], r["batch"]),
                         lambda k: f"{k[0]} x {k[1]}", "kl", "fixed_depthwise", "ours every step",
                         "mean steps, new tokens (the deepest row's)",
                         lambda r: f"{r['mean_steps_new']:.2f}" + (f" ({r['deepest_row_mean_steps']:.2f})"
                                                                  if "deepest_row_mean_steps" in r else ""),
                         (("ideal", "ideal (num_steps / mean)"),
                          ("ideal_with_criterion_coda", "ideal with the criterion's coda at every step")))]
    kl = [r for r in rows if r["name"] == "kl" and "iterations" in r]
    if kl:
        lines = ["| Huginn, num_steps x batch | kl threshold | block iterations | with no exit "
                 "| depth-wise floor (no exit / kl) |", "|---|---|---|---|---|"]
        for r in sorted(kl, key=lambda r: (r["num_steps"], r["batch"], r["threshold"])):
            lines.append(f"| {r['num_steps']} x {r['batch']} | {r['threshold']} | {r['iterations']} "
                         f"| {r['iterations_no_exit']} | {r['iteration_ideal']:.2f} x |")
        parts.append("\n".join(lines))
    for c in data.get("cache_bytes", []):
        parts.append(f"Cache after generating {c['new_tokens']} tokens for {c['batch']} prompts at num_steps "
                     f"{c['num_steps']} ({c['tokens']} tokens; kl {c['threshold']}, new tokens' mean steps "
                     f"{c['new_mean_steps']:.2f}): ours {c['kl_bytes'] / MIB:.1f} MiB in use "
                     f"({c['kl_allocated_bytes'] / MIB:.1f} MiB allocated), ours with no exit "
                     f"{c['fixed_bytes'] / MIB:.1f} MiB, the release's DynamicCache {c['release_bytes'] / MIB:.1f} MiB "
                     f"({c['release_unpadded_bytes'] / MIB:.1f} MiB without its padding): "
                     f"{c['release_bytes'] / c['kl_bytes']:.2f} x ours in use.")
    return "\n\n".join(p for p in parts if p)


VLLM_CLOCKS = {"cpu_s": "the process tree's CPU time", "wall_s": "wall time"}


def vllm_looped_tables(data) -> str:
    """bench/vllm_looped.py's rows (under "results"), one table per clock the
    file has: per concurrency, vLLM serving the looped checkpoint with the
    exit rule "act" against vLLM serving the block unrolled (its CPU default,
    compiled, and eager where the file has that engine) and against our
    depth-wise generate; the ratios are the medians of the rounds' (their
    range in brackets), the ideal is the unrolled model's layer applications
    per token over the looped engine's, the share of it the file's own."""
    results = data["results"]
    compiled = data.get("compilation", {})

    def engine(name):
        c = compiled.get(name)
        return "" if c is None else ", eager" if c.get("enforce_eager") else ", compiled"

    eager = any("vllm_unrolled_eager" in e["cpu_s"]["tokens_per_s"] for e in results)
    model = data.get("model", {})
    parts = [f"### vLLM serving the looped checkpoint, bench/vllm_looped.py: {heading(data)}",
             f"{data.get('new_tokens_each', '?')} new tokens per prompt, greedy; the {model.get('source', '?')} "
             f"model's {model.get('mix', '?')} mix (max_steps {model.get('max_steps', '?')}, unrolled "
             f"{model.get('unrolled_layers', '?')} layers); medians over {data.get('repeats', '?')} alternating "
             f"rounds; {data.get('slots', '?')} slots. Ideal: the unrolled model's layer applications per token over "
             f"the looped engine's. `{data.get('command', 'bench/vllm_looped.py')}`"]

    def ratio(r):
        return f"{r['median']:.2f} x ({r['range'][0]:.2f}-{r['range'][1]:.2f})"

    for clock in (c for c in VLLM_CLOCKS if c in results[0]):
        header = (f"| prompts in flight | mean N (new tokens) | vLLM looped, act (tok/s) "
                  f"| vLLM unrolled{engine('vllm_unrolled')} (tok/s) | act vs unrolled |")
        if eager:
            header += f" vLLM unrolled{engine('vllm_unrolled_eager')} (tok/s) | act vs unrolled eager |"
        header += " ideal | % of ideal | ours depth-wise (tok/s) | act vs ours | greedy = ours |"
        lines = [header, "|---" * (header.count("|") - 1) + "|"]
        for e in results:
            c = e[clock]
            t, ra = c["tokens_per_s"], c["ratios"]
            line = (f"| {e['size']} | {e['ours_mean_steps_new_tokens']:.2f} | {t['vllm_looped_act']:.0f} "
                    f"| {t['vllm_unrolled']:.0f} | {ratio(ra['act_vs_vllm_unrolled'])} |")
            if eager:
                line += (f" {t['vllm_unrolled_eager']:.0f} | {ratio(ra['act_vs_vllm_unrolled_eager'])} |"
                         if "vllm_unrolled_eager" in t else " - | - |")
            line += (f" {e['ideal']:.2f} x | {100 * c['share_of_ideal']:.0f} % | {t['ours_depthwise']:.0f} "
                     f"| {ratio(ra['act_vs_ours_depthwise'])} | {'yes' if e['greedy_agree'] else 'no'} |")
            lines.append(line)
        parts.append(f"Timed by {VLLM_CLOCKS[clock]} (`{clock}`):\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def vllm_huginn_table(report) -> str:
    """bench/vllm_huginn.py's CPU-time figures as a markdown table (the script prints it too)."""
    release = any("latent_vs_release" in e["cpu_s"]["ratios"] for e in report["results"])
    head = ("| prompts in flight | mean N (every token) | vLLM latent-diff (tok/s) | vLLM fixed depth (tok/s) | "
            "vs fixed | ideal | % of ideal | ours depth-wise (tok/s) | vs ours |"
            + (" release in transformers (tok/s) | vs release |" if release else "") + " greedy = ours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in report["results"]:
        t, ra = e["cpu_s"]["tokens_per_s"], e["cpu_s"]["ratios"]

        def ratio(case):
            r = ra[f"latent_vs_{case}"]
            return f"{r['median']:.2f}x ({r['range'][0]:.2f}-{r['range'][1]:.2f})"

        line = (f"| {e['size']} | {e['mean_steps']:.2f} | {t['vllm_latent']:.0f} | {t['vllm_fixed']:.0f} | "
                f"{ratio('vllm_fixed')} | {e['ideal']:.2f}x | {e['cpu_s']['share_of_ideal']:.0%} | "
                f"{t['ours_depthwise']:.0f} | {ratio('ours_depthwise')} |")
        if release:
            line += f" {t['release']:.0f} | {ratio('release')} |"
        # latent-diff: our forward's argmax on the first prompts; the fixed depth: our generate on every prompt
        agree = e.get("latent_agree_first_4") and e.get("fixed_agree_share") == 1.0
        lines.append(line + f" {'yes' if agree else 'no'} |")
    return "\n".join(lines)


def vllm_huginn_tables(data) -> str:
    """bench/vllm_huginn.py's results: vLLM serving Huginn with latent-diff
    exits against the same checkpoint at the fixed depth, our depth-wise
    generate and the release in transformers (the script's own table, CPU time)."""
    model = data.get("model", {})
    return "\n\n".join([
        f"### vLLM serving Huginn, bench/vllm_huginn.py: {heading(data)}",
        f"{data.get('new_tokens_each', '?')} new tokens per prompt, greedy; num_steps {model.get('num_steps', '?')}, "
        f"latent-diff at {model.get('threshold', '?')} (the adapter's state half scaled by "
        f"{model.get('contraction', '?')}: a contracting recurrence); medians over {data.get('repeats', '?')} "
        f"alternating rounds, process-tree CPU time. Ideal: the fixed depth's layer applications per token over "
        f"the exit engine's. `{data.get('command', 'bench/vllm_huginn.py')}`",
        vllm_huginn_table(data)])


def kind(data) -> str | None:
    """Which script wrote a results file, told by its rows' fields."""
    rows = data.get("rows") or [{}]
    if "group" in rows[0]:
        return "device"
    if "setting" in rows[0] or "vllm_runs" in data:
        return "queue"
    if "num_steps" in rows[0]:
        return "huginn"
    if data.get("benchmark") == "bench/vllm_huginn.py":
        return "vllm_huginn"
    if {"size", "cpu_s"} <= set((data.get("results") or [{}])[0]):
        return "vllm_looped"
    return None


# each kind's tables, in the order bench/README.md shows them
TABLES = {"device": device_tables, "queue": queue_tables, "huginn": huginn_tables,
          "vllm_looped": vllm_looped_tables, "vllm_huginn": vllm_huginn_tables}

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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    bench_only = "--bench-only" in argv
    folders = [a for a in argv if a != "--bench-only"]
    results = Path(folders[0]) if folders else HERE / "results"
    files = {f: json.loads(f.read_text()) for f in sorted(results.glob("*.json"))}
    kinds = {f: kind(data) for f, data in files.items()}
    for f in (f for f, k in kinds.items() if k is None):
        print(f"skipped {f}: not a results file this script reads", file=sys.stderr)
    if not any(kinds.values()):
        sys.exit(f"no results in {results}; run: pytest bench/ --benchmark-only")
    devices = [data for f, data in files.items() if kinds[f] == "device"]
    tables = "\n\n".join(TABLES[k](files[f]) for k in TABLES for f in files if kinds[f] == k)
    summary = "\n\n".join(f"**{heading(d)}**\n\n{summary_table(d)}" for d in devices)
    if results.resolve() == (HERE / "results").resolve():
        # the READMEs show the repository's own results, never another folder's
        replace_block(HERE / "README.md", "tables", tables)
        if not bench_only:
            replace_block(HERE.parent / "README.md", "summary", summary)
    for f in (f for f in files if kinds[f] == "device"):
        plot(files[f], f.with_suffix(".png"))
    print("\n\n".join(text for text in (summary, tables) if text))


if __name__ == "__main__":
    main()
