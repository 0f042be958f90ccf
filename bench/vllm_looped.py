"""vLLM serving our looped checkpoint with per-token exits (act_kernels.vllm,
exit rule "act") against vLLM serving the same weights with the block
unrolled (every loop: what a vLLM user runs today), and against our own
depth-wise `LoopedCausalLM.generate`, on the same prompts, in one process,
alternating.

The model: bench/queue_workloads.py's random-halting Llama (hf_workloads'
config: hidden 256, GQA 4 / 2 heads of 64, byte vocabulary, block (1, 3),
max_steps 8, the unrolled model 18 layers) with its fixed random halting
unit at the bias of --mix (shallow: a mean N of the generated tokens
between 2 and 3). Saved to FOLDER/looped (LoopedCausalLM.save_pretrained,
float32) and FOLDER/unrolled (hf_workloads.unrolled, LlamaForCausalLM).
The prompts: bench/save_unrolled.py's 64 prompts of 32..128 random bytes;
a call at concurrency C sends the first C of them at once (C in --sizes,
the engines hold 64 slots), NEW new tokens each, greedy, no eos. Our
generate takes the same C prompts as one left-padded batch (every sequence
in flight at once, schedule "depthwise").

Engines (vLLM's CPU backend, both alive through the run): "looped" on the
looped folder, the exit rule "act" (the plugin leaves it out of
torch.compile: eager); "unrolled" on the unrolled folder with vLLM's CPU
default (torch.compile, Inductor) and, with --unrolled-eager, a third
engine with enforce_eager. One thread per worker: the whole process tree
(this process, our generate, every engine core and worker) pinned to the
CPU of VLLM_CPU_OMP_THREADS_BIND (default 1), as bench/vllm_unrolled.py
explains; a pause of PAUSE seconds after each call lets an engine core's
busy-wait end before the next call starts.

Figures per concurrency: tokens/s (new tokens / the call's process-tree CPU
seconds, the primary clock on a shared machine; the wall clock is kept
too), medians over --repeats alternating rounds after one warm-up round;
the looped engine's speed-up over the unrolled one (median of the rounds'
ratios) against its ideal, the unrolled model's layer applications per
token over the looped one's, UNROLLED_LAYERS * T / layer_work(T, sum N),
T the tokens the engine ran (prompts + new tokens but the last) and sum N
their ACT steps as counted in the looped engine (forward hooks on the MLPs
of the prelude's first layer and the block's first layer, one untimed
call); the share of the ideal reached; the looped engine against our
generate; the query rows the attention of loops 2.. received per block
layer (loop_queries, hooks in the untimed call) against the tokens running
there, sum N - T (loop_queries_per_running: 1 where every attended query
is a running token's, as in decode batches; more where a prefill chunk
keeps halted queries between two running ones). Checks: vLLM's greedy
tokens against our generate's (the first difference per prompt: they agree token for token in float32 unless a
near-tie flips), and the engine's sum N against our generate's steps.

Runs in the vLLM environment (act_kernels installed editable there):

    OMP_NUM_THREADS=1 /work/vllm-venv/bin/python bench/vllm_looped.py --repeats 5 2> vllm_looped.log

Writes bench/results/vllm_looped_cpu.json (--out) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # the row counts send functions to the worker
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_FOLDER = "/tmp/act_vllm_looped"
RESULTS = HERE / "results" / "vllm_looped_cpu.json"
SLOTS = 64
PAUSE = 1.5


# -- in the worker (llm.apply_model) ---------------------------------------------------------------------------

def install_counts(model) -> None:
    """Forward hooks counting the rows each decoder layer's MLP sees (a block
    layer's MLP serves every loop), under model.model.mlp_rows, and the query
    rows the attention of the loops 2.. receives, summed over their layers,
    under model.model.loop_queries["rows"]."""
    import functools

    def count(counts, i, module, args, output=None):
        counts[i] += args[0].shape[0]

    inner = model.model
    inner.mlp_rows = dict.fromkeys(range(len(inner.layers)), 0)
    inner.loop_queries = {"rows": 0}
    inner.count_hooks = [layer.mlp.register_forward_hook(functools.partial(count, inner.mlp_rows, i))
                         for i, layer in enumerate(inner.layers)]
    inner.count_hooks += [layer.self_attn.attn.register_forward_pre_hook(
        functools.partial(count, inner.loop_queries, "rows")) for layer in inner.loop_layers.values()]


def take_counts(model) -> tuple[dict, int]:
    """The counts, the hooks removed (the timed calls run without them)."""
    inner = model.model
    for hook in inner.count_hooks:
        hook.remove()
    return dict(inner.mlp_rows), inner.loop_queries["rows"]


# -- this process ------------------------------------------------------------------------------------------

def tree_cpu_seconds(proc) -> float:
    """User + system CPU seconds of this process and its live descendants."""
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:   # a child that exited meanwhile
            pass
    return total


def timed(proc, call):
    time.sleep(PAUSE)
    c0, t0 = tree_cpu_seconds(proc), time.perf_counter()
    out = call()
    t1, c1 = time.perf_counter(), tree_cpu_seconds(proc)
    return out, c1 - c0, t1 - t0


def save_models(folder: Path, source: str, mix: str):
    """The looped model and its unrolled twin, saved; returns the looped model (float32, eval)."""
    import torch

    import hf_workloads as hw
    import queue_workloads as qw

    looped, model = qw.build(source, mix)
    looped = looped.float().eval()
    looped.save_pretrained(folder / "looped")
    plain = hw.unrolled(model).float().eval()
    plain.config.architectures = ["LlamaForCausalLM"]
    plain.save_pretrained(folder / "unrolled")
    del plain
    torch.manual_seed(0)
    return looped


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def pin_to_bind() -> str:
    """This process (and so its children) on the CPUs of VLLM_CPU_OMP_THREADS_BIND; returns the setting."""
    bind = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if bind not in ("auto", "nobind", "all"):
        import vllm_unrolled
        os.sched_setaffinity(0, vllm_unrolled.parse_ids(bind))
    return bind


# the engines' settings: greedy token ids in and out, SLOTS sequences, no prefix cache (every call computes)
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", max_num_seqs=SLOTS, gpu_memory_utilization=0.3,
              max_model_len=512, enable_prefix_caching=False, seed=0)


def alternate(calls: dict, sizes, repeats: int) -> list:
    """Rounds of every case at every size in turn (calls: case -> call(size)),
    round 0 a warm-up left out; each row the cases' CPU and wall seconds."""
    import psutil

    me, rounds = psutil.Process(), []
    for r in range(1 + repeats):
        for size in sizes:
            row = {"round": r, "size": size}
            for case, call in calls.items():
                _, cpu, wall = timed(me, lambda: call(size))
                row[case] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}
            if r:
                rounds.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rounds


def summarize(rounds: list, size: int, tokens: int, subject: str, label: str, baseline: str, ideal: float) -> dict:
    """Per clock at one size: the cases' tokens/s (medians over the rounds),
    the subject's speed-up over each other case ("{label}_vs_{case}": median
    and range of the rounds' ratios) and its share of the ideal over the baseline."""
    mine = [row for row in rounds if row["size"] == size]
    cases = [case for case in mine[0] if case not in ("round", "size")]
    entry = {}
    for clock in ("cpu_s", "wall_s"):
        speed = {case: statistics.median(tokens / row[case][clock] for row in mine) for case in cases}
        ratio = {f"{label}_vs_{case}": [row[case][clock] / row[subject][clock] for row in mine]
                 for case in cases if case != subject}
        entry[clock] = {"tokens_per_s": {k: round(v, 1) for k, v in speed.items()},
                        "ratios": {k: {"median": round(statistics.median(v), 3),
                                       "range": [round(min(v), 3), round(max(v), 3)]} for k, v in ratio.items()},
                        "share_of_ideal": round(statistics.median(ratio[f"{label}_vs_{baseline}"]) / ideal, 3)}
    return entry


def shutdown(engines: dict) -> None:
    for llm in engines.values():
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:   # already gone
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=DEFAULT_FOLDER)
    parser.add_argument("--source", default="random", choices=("random", "controlled"))
    parser.add_argument("--mix", default="shallow", choices=("shallow", "middle", "deep"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new", type=int, default=None, help="new tokens per prompt (default hf_workloads')")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unrolled-eager", action="store_true", help="also an enforce_eager unrolled engine")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    bind = pin_to_bind()

    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import hf_workloads as hw
    import queue_workloads as qw
    import save_unrolled
    # the worker functions by their module's name: vLLM's executor pickles them again by reference, and the
    # worker's __main__ is not this script
    import vllm_looped as worker

    torch.set_num_threads(1)
    assert max(args.sizes) <= SLOTS
    new = args.new or hw.NEW_TOKENS
    folder = Path(args.folder)
    looped = save_models(folder, args.source, args.mix)
    prompts = save_unrolled.prompts()
    ids, mask = hw.left_padded(len(prompts), save_unrolled.LOW, save_unrolled.HIGH)

    engines = {"vllm_looped_act": LLM(model=str(folder / "looped"), **ENGINE),
               "vllm_unrolled": LLM(model=str(folder / "unrolled"), **ENGINE)}
    if args.unrolled_eager:
        engines["vllm_unrolled_eager"] = LLM(model=str(folder / "unrolled"), enforce_eager=True, **ENGINE)
    compilation = {}
    for name, llm in engines.items():
        c = llm.llm_engine.vllm_config.compilation_config
        compilation[name] = {"mode": getattr(c.mode, "name", str(c.mode)),
                             "enforce_eager": llm.llm_engine.vllm_config.model_config.enforce_eager}
    params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)

    def vllm_call(llm, size):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:size]], params, use_tqdm=False)
        made = [list(o.outputs[0].token_ids) for o in outs]
        assert [len(m) for m in made] == [new] * size
        return made

    def ours_call(size):
        i, m = qw.hf_batches(ids, mask, size)[0]
        return looped.generate(i, m, max_new_tokens=new, do_sample=False, schedule="depthwise",
                               return_dict_in_generate=True)

    # untimed: the looped engine's real work (hook counts) and the agreement with our generate
    checks = {}
    for size in args.sizes:
        act = engines["vllm_looped_act"]
        act.apply_model(worker.install_counts)
        made = vllm_call(act, size)
        ((rows, loop_queries),) = act.apply_model(worker.take_counts)
        ours = ours_call(size)
        width = ours.sequences.shape[1] - new
        first_difference = []
        for k, tokens in enumerate(made):
            mine = ours.sequences[k, width:].tolist()
            first_difference.append(next((j for j, (a, b) in enumerate(zip(tokens, mine)) if a != b), new))
        fed_steps = ours.steps[:, :-1]             # every token but the last new one runs a forward
        tokens_run, steps_sum = rows[0], rows[hw.BLOCK[0]]
        # the queries attended at loops 2.. per block layer, against the tokens running there (steps beyond the
        # first): equal where every attended query is a running token's (decode batches), more where a prefill
        # chunk keeps halted queries between two running ones
        loop_queries = loop_queries / (hw.BLOCK[1] - hw.BLOCK[0])
        new_steps = ours.steps[:, width:-1].double()
        checks[size] = {
            "tokens_run": tokens_run, "steps_sum": steps_sum, "mean_steps": steps_sum / tokens_run,
            "mlp_rows_by_layer": rows,
            "loop_queries": loop_queries, "loop_queries_per_running": round(loop_queries / (steps_sum - tokens_run), 3),
            "ours_tokens_run": int((fed_steps > 0).sum()), "ours_steps_sum": int(fed_steps.sum()),
            "ours_mean_steps_new_tokens": round(float(new_steps.mean()), 3),
            "share_at_max_steps": round(float((fed_steps == hw.MAX_STEPS).sum() / (fed_steps > 0).sum()), 4),
            "ideal": hw.UNROLLED_LAYERS * tokens_run / hw.layer_work(tokens_run, steps_sum),
            "greedy_first_difference": first_difference, "greedy_agree": all(d == new for d in first_difference),
        }
        print(json.dumps({"check": size, **{k: v for k, v in checks[size].items() if k != "mlp_rows_by_layer"}}),
              file=sys.stderr)

    calls = {name: (lambda size, llm=llm: vllm_call(llm, size)) for name, llm in engines.items()}
    rounds = alternate({**calls, "ours_depthwise": ours_call}, args.sizes, args.repeats)
    results = []
    for size in args.sizes:
        entry = {"size": size, "new_tokens": new * size, **{k: checks[size][k] for k in (
            "tokens_run", "steps_sum", "mean_steps", "loop_queries", "loop_queries_per_running",
            "ours_mean_steps_new_tokens", "share_at_max_steps", "ideal",
            "greedy_agree", "greedy_first_difference", "ours_steps_sum", "ours_tokens_run")}}
        entry.update(summarize(rounds, size, new * size, "vllm_looped_act", "act", "vllm_unrolled", entry["ideal"]))
        results.append(entry)
    shutdown(engines)

    report = {
        "benchmark": "bench/vllm_looped.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu {platform.machine()} ({platform.processor() or 'unknown'}), one core "
                  f"(VLLM_CPU_OMP_THREADS_BIND={bind})",
        "commit": git_commit(), "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                             "transformers": transformers.__version__,
                                             "python": platform.python_version()},
        "model": {"source": args.source, "mix": args.mix, "hidden": hw.HIDDEN, "block": list(hw.BLOCK),
                  "max_steps": hw.MAX_STEPS, "layers": hw.LAYERS, "unrolled_layers": hw.UNROLLED_LAYERS},
        "prompts": len(prompts), "new_tokens_each": new, "slots": SLOTS, "repeats": args.repeats,
        "clock": "cpu_s: process-tree CPU seconds (everything pinned to one core); wall_s: wall clock",
        "compilation": compilation, "results": results, "rounds": rounds,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


def table(report) -> str:
    head = ("| concurrent prompts | mean N (new tokens) | vLLM looped, act (tok/s) | vLLM unrolled (tok/s) | "
            "act / unrolled | ideal | share of ideal | ours depth-wise (tok/s) | act / ours | greedy = ours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in report["results"]:
        c = e["cpu_s"]
        t, ra = c["tokens_per_s"], c["ratios"]
        lines.append(
            f"| {e['size']} | {e['ours_mean_steps_new_tokens']:.2f} | {t['vllm_looped_act']:.0f} | "
            f"{t['vllm_unrolled']:.0f} | {ra['act_vs_vllm_unrolled']['median']:.2f} "
            f"({ra['act_vs_vllm_unrolled']['range'][0]:.2f}-{ra['act_vs_vllm_unrolled']['range'][1]:.2f}) | "
            f"{e['ideal']:.2f} | {c['share_of_ideal']:.0%} | {t['ours_depthwise']:.0f} | "
            f"{ra['act_vs_ours_depthwise']['median']:.2f} | {'yes' if e['greedy_agree'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
