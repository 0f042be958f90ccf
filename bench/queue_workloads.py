"""Generation of a queue of prompts through a fixed number of slots (issue 37
item 4): `LoopedCausalLM.generate(..., max_batch_size=SLOTS)` (continuous
batching: a finished sequence's slot takes the next prompt) against
transformers' generate of the unrolled model over the same prompts in
batches of SLOTS, and optionally vLLM's CPU engine serving the unrolled
weights (bench/vllm_unrolled.py), over three depth mixes from two halting
sources. The model is bench/hf_workloads.py's (Llama, hidden 256, GQA 4 / 2
heads of 64, byte vocabulary, block (1, 3), max_steps 8; the unrolled model
18 layers).

Halting sources, each with a shallow, a middle and a deep mix:
- "controlled": hf_workloads' per-byte rule (every token halts after its
  byte's drawn N, the same under every schedule), hf_workloads.MEAN_STEPS set
  to CONTROLLED_MEAN[mix] (the mean of the skewed draw before its cap at
  max_steps) while the model is built;
- "random": a fixed random halting unit over a plain random Llama (hf_workloads'
  config, seed MODEL_SEED, no control of the residual): `looped.halting.weight`
  drawn from N(0, HALT_STD^2) (seed HALT_SEED), its bias RANDOM_BIAS[mix],
  found by bisection (`--search-bias`, at the queue's default sizes) so that
  the mean N of the generated tokens of the 64 x 48 queue is about
  RANDOM_TARGET[mix] (2.24, 3.56, 4.98 measured; the shallow target is 2.25,
  not 2: at mean 2 every token sits at N = 2, see below, and nothing
  varies; at other sizes the same bias gives a somewhat different mean N,
  each row reports its own). Depth then varies within and across
  sequences, and a token's depth depends on its context, as a trained
  model's does. ACT halts once the halting probabilities sum to 1 - eps, so
  N >= 2 unless a first step's probability is above 0.99.

Settings:
- queue: PROMPTS left-padded prompts of 32..128 random bytes
  (hf_workloads.left_padded(PROMPTS, 32, 128), seed 1), NEW new tokens each,
  sampled at temperature 1 with no top-k / top-p (top_k=0), ours through
  SLOTS slots under "depthwise" and "synchronous" (a fixed generator: the
  draws depend on neither), transformers' generate of the unrolled model over
  the same prompts in PROMPTS / SLOTS batches of SLOTS (each batch left-padded
  to its own longest prompt), also sampling (do_sample=True, temperature 1,
  top_k=0; torch.manual_seed(0) before each call). The work does not depend
  on the tokens: NEW new tokens each, no eos, on every side.
- batch: BATCH prompts at once (hf_workloads.left_padded(BATCH, 32, 128)),
  greedy (do_sample=False) on both sides. Greedy decoding of these untrained
  models soon repeats one byte per sequence, so a mix's measured N here can
  be far from its queue figure (the controlled deep mix: most new tokens at
  max_steps); read the measured mean N of each row.

Figures: tokens/s (new tokens / the call's time), the ratio to transformers
timed in alternation in the same process (hf_workloads.interleaved, medians),
the ideal (layer applications per token of the unrolled model over ours,
UNROLLED_LAYERS * T / layer_work(T, sum N), T the real tokens processed,
prompts + new, N from our own steps; the unrolled model also runs the
padding, ours never does) and the share of it reached; per mix the measured
mean N of the new tokens, the share of them at max_steps, the prompts' mean
N, the spread of the sequences' mean N, and the block iterations of each
schedule.

--vllm R (the controlled shallow mix, queue setting only): saves the unrolled
model and the queue's prompts (bench/save_unrolled.py's `prompts` and
`greedy`) to --vllm-folder, then R times: our queue run (depthwise and
synchronous, once each) and bench/vllm_unrolled.py in a subprocess of
--vllm-python (one engine start per call, its own warm-up, then
--vllm-repeats timed generate calls, median), reporting each alternation's
ratio and their range. vLLM holds 16 slots (bench/vllm_unrolled.py:SLOTS).
Its time: with --cpu-time the CPU time of its whole process tree (front end,
engine core, worker, pinned to one core by vllm_unrolled.py) against our
process's CPU time; otherwise the wall clock on both sides.

    OMP_NUM_THREADS=1 python bench/queue_workloads.py --cpu-time [--vllm 3]
    OMP_NUM_THREADS=1 python bench/queue_workloads.py --search-bias   # the random unit's biases

Writes every figure to bench/results/queue_cpu.json (--out; rewritten after
every measurement) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hf_workloads as hw  # noqa: E402
from report import queue_table  # noqa: E402

MIXES = ("shallow", "middle", "deep")
SOURCES = ("controlled", "random")
CONTROLLED_MEAN = {"shallow": 1.5, "middle": 3.0, "deep": 5.0}
MODEL_SEED, HALT_SEED, HALT_STD = 0, 0, 0.25
RANDOM_TARGET = {"shallow": 2.25, "middle": 3.5, "deep": 5.0}     # N = 2 is the floor (see above)
RANDOM_BIAS = {"shallow": 0.6, "middle": -0.1, "deep": -0.65}    # 64 x 48 queue: mean N 2.24, 3.56, 4.98
PROMPTS, SLOTS, NEW, BATCH, LOW, HIGH = 64, 16, hw.NEW_TOKENS, 16, 32, 128
RESULTS = HERE / "results" / "queue_cpu.json"
VLLM_PYTHON = "/work/vllm-venv/bin/python"
VLLM_FOLDER = "/tmp/act_unrolled_llama_queue"


# -- the models -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def mean_steps(value: float):
    """hf_workloads.MEAN_STEPS = value inside (byte_steps reads it when controlled_llama runs)."""
    old = hw.MEAN_STEPS
    hw.MEAN_STEPS = value
    try:
        yield
    finally:
        hw.MEAN_STEPS = old


def controlled(mix: str):
    """(looped, its Llama) with hf_workloads' per-byte halting at CONTROLLED_MEAN[mix]."""
    with mean_steps(CONTROLLED_MEAN[mix]):
        return hw.controlled_llama()


def random_halting(bias: float, seed: int = MODEL_SEED):
    """(looped, its Llama): a random Llama of hf_workloads' config and a fixed
    random halting unit, weight ~ N(0, HALT_STD^2) (seed HALT_SEED), the given bias."""
    import transformers

    from act_kernels.hf import LoopedCausalLM

    torch.manual_seed(seed)
    model = hw.no_eos(transformers.LlamaForCausalLM(hw.llama_config()).eval())
    looped = LoopedCausalLM(model, block=hw.BLOCK, max_steps=hw.MAX_STEPS)
    set_halting(looped, bias)
    return looped.eval(), model


def set_halting(looped, bias: float):
    weight = torch.randn(looped.halting.weight.shape, generator=torch.Generator().manual_seed(HALT_SEED))
    with torch.no_grad():
        looped.halting.weight.copy_(HALT_STD * weight)
        looped.halting.bias.fill_(bias)


def build(source: str, mix: str):
    return controlled(mix) if source == "controlled" else random_halting(RANDOM_BIAS[mix])


# -- the calls ------------------------------------------------------------------------------------------------

def ours_sampled(looped, ids, mask, schedule, slots, new):
    """Continuous batching through `slots` slots, sampling at temperature 1, no top-k, a fixed generator."""
    return looped.generate(ids, mask, max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0,
                           schedule=schedule, max_batch_size=slots, generator=torch.Generator().manual_seed(0),
                           return_dict_in_generate=True)


def ours_greedy(looped, ids, mask, schedule, new):
    return looped.generate(ids, mask, max_new_tokens=new, do_sample=False, schedule=schedule,
                           return_dict_in_generate=True)


def hf_batches(ids, mask, size):
    """The prompts in batches of `size` rows, each left-padded to its own longest prompt."""
    out = []
    for start in range(0, ids.shape[0], size):
        i, m = ids[start:start + size], mask[start:start + size]
        first = int((m.sum(0) > 0).nonzero()[0])
        out.append((i[:, first:].contiguous(), m[:, first:].contiguous()))
    return out


def hf_sampled(plain, batches, new):
    """transformers' generate over the batches one after the other: sampling at
    temperature 1, no top-k (top_k=0), DynamicCache, no eos: `new` tokens each."""
    outs = []
    for ids, mask in batches:
        torch.manual_seed(0)
        outs.append(plain.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=1.0,
                                   top_k=0, pad_token_id=hw.PAD, return_dict_in_generate=True))
    return outs


def check_hf(outs, batches, new):
    for out, (ids, _) in zip(outs, batches):
        assert out.sequences.shape == (ids.shape[0], ids.shape[1] + new), out.sequences.shape


# -- figures --------------------------------------------------------------------------------------------------

def depth_figures(looped, out, ids, mask, new, source):
    """Depth of one of our outputs: mean N and share at max_steps of the new
    tokens, the prompts' mean N, the spread of the sequences' mean N, T and
    sum N over the real tokens, and the ideal."""
    count, width = ids.shape
    assert out.sequences.shape == (count, width + new), out.sequences.shape
    valid = torch.cat([mask.bool(), torch.ones(count, new, dtype=torch.bool)], 1)
    assert int((out.steps[valid] == 0).sum()) == 0 and int(out.steps[~valid].sum()) == 0
    if source == "controlled":
        assert torch.equal(out.steps[valid], looped.token_steps[out.sequences][valid]), "tokens halted elsewhere"
    steps = out.steps[:, width:].double()
    per_seq = steps.mean(1)
    tokens, steps_sum = int(valid.sum()), int(out.steps[valid].sum())
    ideal = hw.UNROLLED_LAYERS * tokens / hw.layer_work(tokens, steps_sum)
    return dict(mean_n=float(steps.mean()), at_max=float((steps == hw.MAX_STEPS).double().mean()),
                prompt_mean_n=float(out.steps[:, :width][mask.bool()].double().mean()),
                seq_mean_n_min=float(per_seq.min()), seq_mean_n_max=float(per_seq.max()),
                seq_mean_n_std=float(per_seq.std()) if count > 1 else 0.0,
                histogram=torch.bincount(out.steps[:, width:].flatten(), minlength=hw.MAX_STEPS + 1)[1:].tolist(),
                tokens=tokens, steps_sum=steps_sum, prompt_tokens=int(mask.sum()), ideal=ideal)


def schedules(looped, outs, ids, mask, new, source):
    """Depth figures of the depthwise output, the iterations of each schedule,
    whether the schedules generated the same tokens and steps (asserted for
    the controlled source, reported for the random one, where the
    computation's order may move a halting decision)."""
    fig = depth_figures(looped, outs["depthwise"], ids, mask, new, source)
    sync = depth_figures(looped, outs["synchronous"], ids, mask, new, source)
    agree = torch.equal(outs["depthwise"].sequences, outs["synchronous"].sequences) and \
        torch.equal(outs["depthwise"].steps, outs["synchronous"].steps)
    if source == "controlled":
        assert agree, "the schedules generated different tokens"
    fig.update(schedules_agree=agree, iterations={k: int(o.iterations) for k, o in outs.items()},
               synchronous_mean_n=sync["mean_n"], synchronous_ideal=sync["ideal"])
    return fig


class Report:
    """Every figure, written to `path` after each measurement."""

    def __init__(self, path, args, timer_name):
        self.path = Path(path)
        self.data = dict(device=device(), date=now(), torch=torch.__version__, transformers=version("transformers"),
                         vllm=None, python=platform.python_version(), commit=commit(), timer=timer_name,
                         threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                         affinity=sorted(os.sched_getaffinity(0)),
                         config=dict(prompts=args.prompts, slots=args.slots, new_tokens=args.new, batch=args.batch,
                                     prompt_lengths=[LOW, HIGH], rounds=args.rounds, batch_rounds=args.batch_rounds,
                                     max_steps=hw.MAX_STEPS, unrolled_layers=hw.UNROLLED_LAYERS,
                                     controlled_mean=CONTROLLED_MEAN, random_bias=RANDOM_BIAS,
                                     random_target=RANDOM_TARGET, halt_std=HALT_STD, halt_seed=HALT_SEED,
                                     model_seed=MODEL_SEED,
                                     queue_sampling="ours and transformers: do_sample=True, temperature 1, top_k=0",
                                     batch_decoding="greedy on both sides"),
                         rows=[], vllm_runs=[])

    def add(self, row):
        self.data["rows"].append(row)
        self.write()

    def write(self):
        self.data["date"] = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def device() -> str:
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = f"{name}, {line.split(':', 1)[1].strip()}"
                break
    except OSError:
        pass
    return f"cpu-{name}, {os.cpu_count()} cores"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=HERE,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "act_kernels"], cwd=HERE.parent).returncode
        return head + ("+dirty act_kernels" if dirty else "")
    except Exception:
        return "unknown"


# -- the settings ---------------------------------------------------------------------------------------------

def queue_setting(report, source, mix, looped, plain, args, timer):
    ids, mask = hw.left_padded(args.prompts, LOW, HIGH)
    batches = hf_batches(ids, mask, args.slots)
    outs = {s: ours_sampled(looped, ids, mask, s, args.slots, args.new) for s in ("depthwise", "synchronous")}
    fig = schedules(looped, outs, ids, mask, args.new, source)
    check_hf(hf_sampled(plain, batches, args.new), batches, args.new)
    med = hw.interleaved({"depthwise": lambda: ours_sampled(looped, ids, mask, "depthwise", args.slots, args.new),
                          "synchronous": lambda: ours_sampled(looped, ids, mask, "synchronous", args.slots, args.new),
                          "transformers": lambda: hf_sampled(plain, batches, args.new)},
                         rounds=args.rounds, warmup=0, timer=timer)     # each case has just run once
    return add_rows(report, "queue", source, mix, fig, med, args.prompts * args.new,
                    dict(prompts=args.prompts, slots=args.slots, new_tokens=args.new,
                         hf_padded_tokens=sum(i.numel() for i, _ in batches)))


def batch_setting(report, source, mix, looped, plain, args, timer):
    ids, mask = hw.left_padded(args.batch, LOW, HIGH)
    outs = {s: ours_greedy(looped, ids, mask, s, args.new) for s in ("depthwise", "synchronous")}
    fig = schedules(looped, outs, ids, mask, args.new, source)
    ref = hw.generate_hf(plain, ids, mask, args.new)
    assert ref.sequences.shape == (args.batch, ids.shape[1] + args.new)
    med = hw.interleaved({"depthwise": lambda: ours_greedy(looped, ids, mask, "depthwise", args.new),
                          "synchronous": lambda: ours_greedy(looped, ids, mask, "synchronous", args.new),
                          "transformers": lambda: hw.generate_hf(plain, ids, mask, args.new)},
                         rounds=args.batch_rounds, warmup=0, timer=timer)
    return add_rows(report, "batch", source, mix, fig, med, args.batch * args.new,
                    dict(prompts=args.batch, slots=args.batch, new_tokens=args.new,
                         hf_padded_tokens=ids.numel()))


def add_rows(report, setting, source, mix, fig, med, new_tokens, sizes):
    hf_rate = new_tokens / med["transformers"]
    rows = []
    for name in ("depthwise", "synchronous"):
        speed = med["transformers"] / med[name]
        rows.append(dict(setting=setting, source=source, mix=mix, schedule=name, **sizes,
                         seconds=med[name], tokens_per_s=new_tokens / med[name], hf_seconds=med["transformers"],
                         hf_tokens_per_s=hf_rate, vs_hf=speed, pct_of_ideal=100 * speed / fig["ideal"], **fig))
    for row in rows:
        report.add(row)
    d, s = rows
    print(f"{setting} {source} {mix}: mean N {d['mean_n']:.2f} ({100 * d['at_max']:.0f} % at {hw.MAX_STEPS}), "
          f"ideal {d['ideal']:.2f}x; depthwise {d['tokens_per_s']:.0f} tok/s {d['vs_hf']:.2f}x "
          f"({d['pct_of_ideal']:.0f} %), synchronous {s['tokens_per_s']:.0f} tok/s {s['vs_hf']:.2f}x "
          f"({s['pct_of_ideal']:.0f} %), transformers {hf_rate:.0f} tok/s; iterations {d['iterations']}"
          + ("" if d["schedules_agree"] else "; the schedules' tokens differ"), flush=True)
    return rows


# -- vLLM -----------------------------------------------------------------------------------------------------

def save_for_vllm(model, folder, count, new, ids, mask):
    """The unrolled model and the queue's prompts as bench/save_unrolled.py writes them."""
    import save_unrolled as su

    plain = hw.unrolled(model).to(torch.float32).eval()
    plain.config.architectures = ["LlamaForCausalLM"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder)
    assert (su.LOW, su.HIGH) == (LOW, HIGH)
    given = su.prompts(count)
    assert given == [row[keep.bool()].tolist() for row, keep in zip(ids, mask)], "not the queue's prompts"
    with torch.no_grad():
        check = [su.greedy(plain, p, new) for p in given[:su.CHECK]]
    meta = {"prompts": given, "new_tokens": new, "source": f"bench/queue_workloads.py left_padded({count}, {LOW}, "
            f"{HIGH}), controlled shallow mix", "layers": hw.UNROLLED_LAYERS, "greedy_check": check}
    (folder / "prompts.json").write_text(json.dumps(meta))
    return folder


def run_vllm(python, folder, repeats, log):
    """One bench/vllm_unrolled.py process: its JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "a") as err:
        proc = subprocess.run([python, str(HERE / "vllm_unrolled.py"), str(folder), "--repeats", str(repeats)],
                              stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    with open(log, "a") as err:    # vLLM logs to stdout too: the result is the line that starts with {"engine"
        err.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"engine"')]
    if proc.returncode or not lines:
        raise RuntimeError(f"vllm_unrolled.py exited with {proc.returncode}, {len(lines)} result lines; its log: {log}")
    return json.loads(lines[-1])


def vllm_alternation(report, looped, model, args, timer, cpu_time):
    ids, mask = hw.left_padded(args.prompts, LOW, HIGH)
    folder = save_for_vllm(model, args.vllm_folder, args.prompts, args.new, ids, mask)
    expected = args.prompts * args.new
    log = Path(args.vllm_folder) / "vllm.log"
    print(f"vLLM: saved {folder}; its stderr goes to {log}", flush=True)
    cases = {s: (lambda s=s: ours_sampled(looped, ids, mask, s, args.slots, args.new))
             for s in ("depthwise", "synchronous")}
    for fn in cases.values():    # warm-up
        fn()
    runs = []
    for r in range(args.vllm):
        ours = hw.interleaved(cases, rounds=1, warmup=0, timer=timer)
        out = run_vllm(args.vllm_python, folder, args.vllm_repeats, log)
        made = out["prompts"] * out["new_tokens"]
        assert made == expected and out["prompts"] == args.prompts, (made, expected)
        seconds = statistics.median(out["cpu_seconds"] if cpu_time else out["seconds"])
        run = dict(round=r, ours_seconds=ours, vllm_seconds=seconds,
                   vllm_clock="process-tree CPU time (one core)" if cpu_time else "wall",
                   vllm_tokens_per_s=expected / seconds,
                   ours_tokens_per_s={k: expected / v for k, v in ours.items()},
                   vs_vllm={k: seconds / v for k, v in ours.items()}, vllm=out)
        runs.append(run)
        report.data["vllm"] = out["version"]
        report.data["vllm_runs"] = runs
        report.write()
        print(f"vLLM round {r}: vLLM {run['vllm_tokens_per_s']:.0f} tok/s ({run['vllm_clock']}; slots "
              f"{out['slots']}, {made} new tokens), ours depthwise {run['ours_tokens_per_s']['depthwise']:.0f} "
              f"tok/s = {run['vs_vllm']['depthwise']:.2f}x, synchronous "
              f"{run['ours_tokens_per_s']['synchronous']:.0f} tok/s = {run['vs_vllm']['synchronous']:.2f}x; "
              f"greedy check {out['greedy_check']['tokens_agreeing_before_first_difference']} of "
              f"{out['greedy_check']['of']}", flush=True)
    return runs


# -- the random unit's biases ---------------------------------------------------------------------------------

def search_biases(args, low=-2.0, high=2.0, iterations=8, tolerance=0.05):
    """Bisection on the bias for each RANDOM_TARGET: mean N of the new tokens
    of a depthwise queue run at the given sizes (it falls as the bias grows)."""
    ids, mask = hw.left_padded(args.prompts, LOW, HIGH)
    looped, _ = random_halting(0.0)
    found = {}

    def mean_n(bias):
        set_halting(looped, bias)
        out = ours_sampled(looped, ids, mask, "depthwise", args.slots, args.new)
        return depth_figures(looped, out, ids, mask, args.new, "random")

    for mix in MIXES:
        target, lo, hi = RANDOM_TARGET[mix], low, high
        for _ in range(iterations):
            bias = round((lo + hi) / 2, 3)
            fig = mean_n(bias)
            print(f"  {mix}: bias {bias:+.3f} -> mean N {fig['mean_n']:.2f}", flush=True)
            if abs(fig["mean_n"] - target) < tolerance:
                break
            lo, hi = (bias, hi) if fig["mean_n"] > target else (lo, bias)
        found[mix] = dict(bias=bias, mean_n=fig["mean_n"], at_max=fig["at_max"], histogram=fig["histogram"])
        print(f"{mix}: bias {bias:+.3f}, mean N {fig['mean_n']:.2f} (target {target}), "
              f"{100 * fig['at_max']:.0f} % at {hw.MAX_STEPS}, N histogram 1..{hw.MAX_STEPS} {fig['histogram']}",
              flush=True)
    return found


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-time", action="store_true", help="time with time.process_time (vLLM: its tree's CPU time)")
    p.add_argument("--prompts", type=int, default=PROMPTS)
    p.add_argument("--slots", type=int, default=SLOTS)
    p.add_argument("--new", type=int, default=NEW)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the queue setting (after one warm-up)")
    p.add_argument("--batch-rounds", type=int, default=5, help="timed rounds of the batch setting")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--mixes", default=",".join(MIXES))
    p.add_argument("--settings", default="queue,batch")
    p.add_argument("--vllm", type=int, default=0, metavar="R", help="alternations of ours and vLLM (0: none)")
    p.add_argument("--vllm-repeats", type=int, default=3, help="timed generate calls per vLLM process")
    p.add_argument("--vllm-python", default=VLLM_PYTHON)
    p.add_argument("--vllm-folder", default=VLLM_FOLDER)
    p.add_argument("--search-bias", action="store_true", help="find RANDOM_BIAS at these sizes, then stop")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    torch.set_num_threads(1)
    if args.search_bias:
        return search_biases(args)
    timer = time.process_time if args.cpu_time else time.perf_counter
    report = Report(args.out, args, timer.__name__)
    settings = args.settings.split(",")
    for source in args.sources.split(","):
        for mix in args.mixes.split(","):
            looped, model = build(source, mix)
            plain = hw.unrolled(model)
            if "queue" in settings:
                queue_setting(report, source, mix, looped, plain, args, timer)
            if "batch" in settings:
                batch_setting(report, source, mix, looped, plain, args, timer)
            if args.vllm and source == "controlled" and mix == "shallow":
                vllm_alternation(report, looped, model, args, timer, args.cpu_time)
            del looped, model, plain
    report.write()
    print()
    print(queue_table(report.data))
    runs = report.data["vllm_runs"]
    if runs:
        print()
        for name in ("depthwise", "synchronous"):
            ratios = [r["vs_vllm"][name] for r in runs]
            print(f"vLLM {runs[0]['vllm']['version']} ({runs[0]['vllm_clock']}), controlled shallow queue, {len(runs)} "
                  f"alternations: ours {name} / vLLM {min(ratios):.2f}-{max(ratios):.2f}x")
    print(f"\nwritten to {args.out}")
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
