"""vLLM serving a Huginn checkpoint with Huginn's "latent-diff" exit
(act_kernels.vllm.huginn: each token leaves the recurrence on its own, its
later steps skipped) against vLLM serving the same checkpoint at the fixed
depth (every token every step: what serving it costs without exits, vLLM's
torch.compile on), against our own depth-wise `HuginnForCausalLM.generate`
with the same criterion, and against the release's behaviour in
transformers (bench/huginn_workloads.py's `ReleaseHuginn`: dense, every
token every step), on the same prompts, in one process, alternating.

The model: bench/huginn_workloads.py's tiny Huginn (n_embd 256, 4 heads of
64, 1 prelude + 2 core + 1 coda layers, byte vocabulary, zero initial
state), num_steps 8, with the adapter's weights on the state scaled by
CONTRACTION so that the recurrence contracts and its iterates settle, as a
trained Huginn's do (the random core's iterates keep moving: no token would
exit). Saved with `save_pretrained` (Huginn's published names). The
criterion: latent-diff at THRESHOLD, min_steps 0 (about 3-4 of 8 steps).

The prompts: bench/save_unrolled.py's 64 prompts of 32..128 random bytes; a
call at concurrency C sends the first C of them at once, NEW new tokens
each, greedy, no eos. Our generate and the release take the same C prompts
as one left-padded batch.

vLLM runs the criterion on every token, prompt tokens included (its forward
cannot tell them apart: act_kernels/vllm/huginn.py); our generate runs the
prompts at num_steps and the criterion on the new tokens. So the vLLM
engine's tokens are checked against our forward with the criterion (the
argmax of `forward(exit="latent-diff")` on the sequence it produced), the
fixed engine's against our generate at num_steps.

Figures per concurrency (vllm_looped.py's clocks: process-tree CPU seconds
on one core, the wall clock kept too; medians over --repeats alternating
rounds after a warm-up round): tokens/s; the exit engine's speed-up over
the fixed one against its ideal, the layer applications per token at the
fixed depth over the exit engine's, (P + K + C·8)·T / ((P + K)·T + C·ΣN),
T the tokens the engine ran and ΣN their steps as counted by MLP hooks in
an untimed call; the share of the ideal reached.

    OMP_NUM_THREADS=1 /work/vllm-venv/bin/python bench/vllm_huginn.py --repeats 3 2> vllm_huginn.log

Writes bench/results/vllm_huginn_cpu.json (--out) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import vllm_looped as worker   # the env defaults, the clocks, and the worker's hook functions (by module name)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vllm_huginn_cpu.json"
DEFAULT_FOLDER = "/tmp/act_vllm_huginn"
STEPS, CONTRACTION, THRESHOLD = 8, 0.3, 0.2


def save_model(folder: Path):
    """The benchmark's Huginn (huginn_workloads' at num_steps STEPS, the
    adapter's state half scaled by CONTRACTION), saved; returns it (float32, eval)."""
    import torch

    import huginn_workloads as hw

    model = hw.huginn_model(mean_recurrence=STEPS)
    with torch.no_grad():   # before any forward: the engine's rows cache packed weights
        model.transformer.adapter.weight[:, :model.config.n_embd] *= CONTRACTION
    model.save_pretrained(folder)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=DEFAULT_FOLDER)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-release", action="store_true", help="leave out the release in transformers")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    bind = worker.pin_to_bind()

    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import huginn_workloads as hw
    import queue_workloads as qw
    import save_unrolled

    torch.set_num_threads(1)
    assert max(args.sizes) <= worker.SLOTS
    new, folder = args.new, Path(args.folder)
    model = save_model(folder)
    prompts = save_unrolled.prompts()
    ids, mask = hw.left_padded(len(prompts), save_unrolled.LOW, save_unrolled.HIGH)
    latent = {"act_exit": "latent-diff", "exit_threshold": THRESHOLD}

    engines = {"vllm_latent": LLM(model=str(folder), hf_overrides=latent, **worker.ENGINE),
               "vllm_fixed": LLM(model=str(folder), **worker.ENGINE)}
    compilation = {name: {"mode": getattr(llm.llm_engine.vllm_config.compilation_config.mode, "name", "?"),
                          "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)}
                   for name, llm in engines.items()}
    params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
    dense = None if args.no_release else hw.release(model)

    def vllm_call(llm, size):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:size]], params, use_tqdm=False)
        made = [list(o.outputs[0].token_ids) for o in outs]
        assert [len(m) for m in made] == [new] * size
        return made

    def batch(size):
        return qw.hf_batches(ids, mask, size)[0]

    def ours_call(size):
        i, m = batch(size)
        return model.generate(i, m, max_new_tokens=new, do_sample=False, schedule="depthwise", exit="latent-diff",
                              threshold=THRESHOLD, return_dict_in_generate=True)

    def release_call(size):
        i, m = batch(size)
        return hw.generate_release(dense, i, m, STEPS, new)

    # untimed: the exit engine's work (hook counts) and both engines' agreement with ours
    checks = {}
    core = range(hw.PRELUDE, hw.PRELUDE + hw.CORE)
    for size in args.sizes:
        act = engines["vllm_latent"]
        act.apply_model(worker.install_counts)
        made = vllm_call(act, size)
        ((rows, _),) = act.apply_model(worker.take_counts)
        tokens_run, steps_sum = rows[0], rows[core[0]]
        assert all(rows[i] == steps_sum for i in core) and all(rows[i] == tokens_run for i in rows if i not in core)
        agree = []
        with torch.no_grad():
            for prompt, tokens in list(zip(prompts, made))[:4]:   # the criterion on every token: our forward
                out = model(torch.tensor([prompt + tokens]), exit="latent-diff", threshold=THRESHOLD)
                agree.append(out.logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == tokens)
        fixed = vllm_call(engines["vllm_fixed"], size)
        want = model.generate(*batch(size), max_new_tokens=new, do_sample=False, schedule="depthwise")
        fixed_agree = [want[k, -new:].tolist() == tokens for k, tokens in enumerate(fixed)]
        full = hw.PRELUDE + hw.CODA + hw.CORE * STEPS
        ours = ours_call(size)
        checks[size] = {
            "tokens_run": tokens_run, "steps_sum": steps_sum, "mean_steps": round(steps_sum / tokens_run, 3),
            "mlp_rows_by_layer": rows,
            "ideal": round(full * tokens_run / ((hw.PRELUDE + hw.CODA) * tokens_run + hw.CORE * steps_sum), 3),
            "latent_agree_first_4": all(agree), "fixed_agree_share": sum(fixed_agree) / len(fixed_agree),
            "ours_mean_steps_new_tokens": round(hw.new_mean_steps(ours, batch(size)[1]), 3),
        }
        print(json.dumps({"check": size, **{k: v for k, v in checks[size].items() if k != "mlp_rows_by_layer"}}),
              file=sys.stderr)

    calls = {name: (lambda size, llm=llm: vllm_call(llm, size)) for name, llm in engines.items()}
    calls["ours_depthwise"] = ours_call
    if dense is not None:
        calls["release"] = release_call
    rounds = worker.alternate(calls, args.sizes, args.repeats)
    results = [{"size": size, "new_tokens": new * size, **checks[size],
                **worker.summarize(rounds, size, new * size, "vllm_latent", "latent", "vllm_fixed",
                                   checks[size]["ideal"])} for size in args.sizes]
    worker.shutdown(engines)

    report = {
        "benchmark": "bench/vllm_huginn.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu {platform.machine()} ({platform.processor() or 'unknown'}), one core "
                  f"(VLLM_CPU_OMP_THREADS_BIND={bind})",
        "commit": worker.git_commit(), "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                                    "transformers": transformers.__version__,
                                                    "python": platform.python_version()},
        "model": {"hidden": hw.HIDDEN, "prelude": hw.PRELUDE, "core": hw.CORE, "coda": hw.CODA, "num_steps": STEPS,
                  "contraction": CONTRACTION, "exit": "latent-diff", "threshold": THRESHOLD},
        "prompts": len(prompts), "new_tokens_each": new, "slots": worker.SLOTS, "repeats": args.repeats,
        "clock": "cpu_s: process-tree CPU seconds (everything pinned to one core); wall_s: wall clock",
        "compilation": compilation, "results": results, "rounds": rounds,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    from report import vllm_huginn_table

    print(vllm_huginn_table(report))


if __name__ == "__main__":
    main()
