"""Exit rules at inference (design §16): generation tokens/s of
`LoopedCausalLM.generate(exit=...)` with the gate and latent rules against
exit="fixed" (every token every loop: what a looped model costs without an
exit rule), on the same model in one process, and the every-loop reference
mode at the same exits (what Ouro's transformers code and vLLM do: compute
every loop, pick the exit afterwards). The model is bench/hf_workloads.py's
(hidden 256, GQA 4 / 2, byte vocabulary, block (1, 3) of 4 layers, M = 8);
its halting unit reads feature 0, which the embedding sets per byte, so the
gate's exit step is fixed per byte; the latent rule exits where the model's
own states converge.

16 left-padded prompts of 32..128 bytes, 32 new tokens each, sampled
(temperature 1, a fixed generator: every rule generates its own tokens), the
depth-wise scheduler. The ideal speedup is the layer applications of the
fixed rule over the rule's, prompts and new tokens together, from the steps
each run reports (the reference mode's ideal is 1: it runs every loop).

`test_decoding_throughput_against_mean_depth`: both schedulers at three gate
thresholds and at fixed depth: tokens/s and block iterations per generated
token (the depth-wise ideal: the mean N).

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_exits.py --benchmark-only \\
        --benchmark-timer time.process_time && python bench/report.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import sync

pytest.importorskip("transformers")

import hf_workloads as hw  # noqa: E402
from conftest import median_of

ROUNDS, BATCH, NEW = 3, 16, 32
RULES = {"fixed": dict(exit="fixed"), "gate": dict(exit="gate", threshold=0.7),
         "latent": dict(exit="latent", threshold=0.3),
         "gate_every_loop": dict(exit="gate", threshold=0.7, every_loop=True),
         "latent_every_loop": dict(exit="latent", threshold=0.3, every_loop=True)}
_fixed = {}
_model = []


def model():
    if not _model:
        looped, _ = hw.controlled_llama()
        _model.append(looped)
    return _model[0]


@pytest.mark.parametrize("rule", list(RULES))
def test_generation_with_an_exit_rule(benchmark, record, timer, rule):
    looped = model()
    ids, mask = hw.left_padded(BATCH, 32, 128)

    def run():
        out = looped.generate(ids, mask, max_new_tokens=NEW, do_sample=True, temperature=1.0,
                              generator=torch.Generator().manual_seed(0), return_dict_in_generate=True, **RULES[rule])
        sync()
        return out

    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    valid = torch.cat([mask.bool(), torch.ones(BATCH, NEW, dtype=torch.bool)], 1)
    tokens = int(valid.sum())
    ran = tokens * hw.MAX_STEPS if rule.endswith("every_loop") else int(out.steps[valid].sum())
    work = hw.layer_work(tokens, ran)
    median = median_of(benchmark)
    if rule == "fixed":
        _fixed.update(work=work, median=median, tokens=tokens)
    if not _fixed:
        pytest.skip("run with the fixed rule first, in the same process: it is the baseline")
    fixed_work = hw.layer_work(tokens, tokens * hw.MAX_STEPS)
    record("exit_generate", rule, batch=BATCH, new_tokens=NEW, d_model=hw.HIDDEN, max_steps=hw.MAX_STEPS,
           threshold=RULES[rule].get("threshold"), mean_steps=float(out.steps[valid].double().mean()),
           steps_run_per_token=ran / tokens, iterations=out.iterations, ideal_speedup=fixed_work / work,
           speedup_vs_fixed=_fixed["median"] / median, tokens_per_s=BATCH * NEW / median, timer=timer)


DEPTHS = {"gate0.5": dict(exit="gate", threshold=0.5), "gate0.7": dict(exit="gate", threshold=0.7),
          "gate0.9": dict(exit="gate", threshold=0.9), "fixed": dict(exit="fixed")}


@pytest.mark.parametrize("schedule", ["depthwise", "synchronous"])
@pytest.mark.parametrize("depth", list(DEPTHS))
def test_decoding_throughput_against_mean_depth(benchmark, record, timer, depth, schedule):
    """Tokens/s and block iterations per generated token of both schedulers
    as the mean depth grows (the gate's threshold sets each byte's depth),
    16 prompts, 32 new tokens. The depth-wise ideal is mean N iterations per
    generated token; the synchronous scheduler pays each decode call's
    deepest token."""
    looped = model()
    ids, mask = hw.left_padded(BATCH, 32, 128)

    def run():
        out = looped.generate(ids, mask, max_new_tokens=NEW, do_sample=True, temperature=1.0, schedule=schedule,
                              generator=torch.Generator().manual_seed(0), return_dict_in_generate=True, **DEPTHS[depth])
        sync()
        return out

    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    width = ids.shape[1]
    new_steps = out.steps[:, width:]
    prefill = int(out.steps[:, :width].max())
    record("exit_depth", f"{schedule} {depth}", schedule=schedule, batch=BATCH, new_tokens=NEW,
           mean_steps=float(new_steps.double().mean()), iterations=out.iterations,
           iterations_per_token=(out.iterations - prefill) / NEW, ideal_iterations_per_token=float(
               new_steps.double().mean()), tokens_per_s=BATCH * NEW / median_of(benchmark), timer=timer)
