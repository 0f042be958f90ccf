"""`act_kernels.hf.HuginnForCausalLM` generating with Huginn's "kl" exit
criterion (each new token leaves the recurrence on its own, its later steps
skipped, depth-wise) against what a user runs today: every token all
num_steps, as the release runs a batch (bench/huginn_workloads.py: a dense
model over the same parameters, a transformers DynamicCache slot per (step,
layer), through transformers' generate; checked to give our no-exit logits
and greedy tokens) and as our engine runs with no exit.

The model: n_embd 256, 4 heads of 64, intermediate 688, 1 prelude + 2 core
+ 1 coda layers, byte vocabulary, zero initial state; num_steps 8; the kl
threshold giving the new tokens a mean of about half of num_steps (8 and 16).
Left-padded prompts of 32..128 bytes, 48 new tokens each (greedy), at batch
1 and 16. Ideal: num_steps over the new tokens' mean steps (and counting
the prelude and coda layers, (P + C + K N) / (P + C + K mean)).

About a minute and a half on one CPU thread (-n 0: pytest-benchmark times nothing under xdist):

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_huginn.py -n 0 --benchmark-only \
        --benchmark-timer time.process_time
"""
from __future__ import annotations

import pytest
import torch

from conftest import median_of, synced

pytest.importorskip("transformers")

import huginn_workloads as hw  # noqa: E402

NEW_TOKENS = hw.NEW_TOKENS
STEPS = (8, 16)
FRACTION = 0.5                     # the mean steps of the new tokens the threshold gives, as a fraction of num_steps
BATCHES = (1, 16)
_models = {}


def models():
    """(ours, the release over its parameters), made and checked once per session."""
    if not _models:
        torch.set_num_threads(1)
        model = hw.huginn_model()
        dense = hw.release(model)
        hw.check_release(model, dense, STEPS)
        _models.update(model=model, dense=dense)
    return _models["model"], _models["dense"]


@pytest.mark.parametrize("impl", ["kl", "fixed", "release"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_steps", STEPS)
def test_huginn_generation_tokens_per_second(benchmark, record, timer, impl, batch, num_steps):
    """`batch` left-padded prompts of 32..128 bytes, 48 new tokens each, greedy, num_steps 8 or 16."""
    kl_threshold = hw.THRESHOLDS[num_steps][FRACTION]
    model, dense = models()
    ids, mask = hw.left_padded(batch, 32, 128)
    rounds = 3 if batch == 1 else 2
    common = dict(batch=batch, new_tokens=NEW_TOKENS, prompt_tokens=int(mask.sum()), d_model=hw.HIDDEN,
                  num_steps=num_steps, threshold=kl_threshold, timer=timer)
    if impl == "release":
        out = benchmark.pedantic(lambda: synced(lambda: hw.generate_release(dense, ids, mask, num_steps)),
                                 rounds=rounds, warmup_rounds=1)
        assert out.sequences.shape == (batch, ids.shape[1] + NEW_TOKENS)
        record("huginn_generate", impl, tokens_per_s=batch * NEW_TOKENS / median_of(benchmark), **common)
        return
    threshold = kl_threshold if impl == "kl" else None
    out = benchmark.pedantic(lambda: synced(lambda: hw.generate_ours(model, ids, mask, num_steps, threshold)),
                             rounds=rounds, warmup_rounds=1)
    assert out.sequences.shape == (batch, ids.shape[1] + NEW_TOKENS)
    mean = hw.new_mean_steps(out, mask)
    assert bool((out.steps[:, :ids.shape[1]][mask.bool()] == num_steps).all())         # the prompts ran num_steps
    if impl == "fixed":
        assert mean == num_steps
        figures = dict(ideal_speedup=1.0)
    else:
        assert mean < num_steps
        best = hw.ideals(num_steps, mean)
        figures = dict(ideal_speedup=best["ideal"], ideal_layers=best["ideal_layers"],
                       ideal_with_criterion_coda=best["ideal_with_criterion_coda"])
    record("huginn_generate", impl, mean_steps_new=mean, iterations=out.iterations,
           tokens_per_s=batch * NEW_TOKENS / median_of(benchmark), **figures, **common)
