"""`act_kernels.hf.OuroForCausalLM` generating with the exit gate's exits
(the skipped loops skipped, depth-wise) against what a user runs today:
Ouro's release, every loop for every token and the exit picked afterwards,
as a dense model through transformers' generate with a DynamicCache
(bench/ouro_workloads.py: hidden 256, GQA 4 / 2 heads of 64, intermediate
688, 4 layers looped 4 times, byte vocabulary; the release written from its
math over the same parameters, checked to give our logits with the exit off
and our every-loop greedy tokens), and against our own every-loop path
(`every_loop=True`, the same threshold) and exit="fixed".

- generation, left-padded prompts of 32..128 bytes, 48 new tokens each
  (greedy), at batch 1, 16 and 64, the gate's threshold giving a mean exit loop
  of about 2.5 (`ouro_generate`); ideal: 4 loops over the mean exit loop of
  the tokens processed (the prompts' real tokens and the new ones);
- the keys and values held after generating for 16 prompts
  (`ouro_cache_bytes`): ours with the gate's exits against ours with every
  loop and the release's DynamicCache.

About six minutes on one CPU thread (batch 64 most of it):

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_ouro.py --benchmark-only \
        --benchmark-timer time.process_time
"""
from __future__ import annotations

import pytest

from conftest import median_of, synced

pytest.importorskip("transformers")

import ouro_workloads as ow  # noqa: E402

NEW_TOKENS = ow.NEW_TOKENS
TARGET = 2.5                       # the mean exit loop the threshold gives
THRESHOLD = ow.THRESHOLDS[TARGET]
BATCHES = (1, 16, 64)
ROUNDS = {1: 5, 16: 3, 64: 1}     # batch 64: one timed call after the warm-up (each takes tens of seconds)
_models = {}


def models():
    """(ours, the release over its parameters), made and checked once per session."""
    if not _models:
        model = ow.ouro_model()
        dense = ow.release(model)
        ow.check_release(model, dense, THRESHOLD)
        _models.update(model=model, dense=dense)
    return _models["model"], _models["dense"]


@pytest.mark.parametrize("impl", ["gate", "every_loop", "fixed", "release"])
@pytest.mark.parametrize("batch", BATCHES)
def test_ouro_generation_tokens_per_second(benchmark, record, timer, impl, batch):
    """`batch` left-padded prompts of 32..128 bytes, 48 new tokens each, greedy."""
    model, dense = models()
    ids, mask = ow.left_padded(batch, 32, 128)
    rounds = ROUNDS[batch]
    common = dict(batch=batch, new_tokens=NEW_TOKENS, prompt_tokens=int(mask.sum()), d_model=ow.HIDDEN,
                  layers=ow.LAYERS, loops=ow.LOOPS, threshold=THRESHOLD, timer=timer)
    if impl == "release":
        out = benchmark.pedantic(lambda: synced(lambda: ow.generate_release(dense, ids, mask, THRESHOLD)),
                                 rounds=rounds, warmup_rounds=1)
        assert out.sequences.shape == (batch, ids.shape[1] + NEW_TOKENS)
        record("ouro_generate", impl, tokens_per_s=batch * NEW_TOKENS / median_of(benchmark), **common)
        return
    threshold = None if impl == "fixed" else THRESHOLD
    out = benchmark.pedantic(lambda: synced(lambda: ow.generate_ours(model, ids, mask, impl, threshold)),
                             rounds=rounds, warmup_rounds=1)
    assert out.sequences.shape == (batch, ids.shape[1] + NEW_TOKENS)
    tokens, exits, new_mean = ow.processed(out, mask)      # every_loop: the exits picked after every loop
    if impl == "fixed":
        assert exits == ow.LOOPS * tokens
    record("ouro_generate", impl, mean_exit=exits / tokens, new_mean_exit=new_mean, iterations=out.iterations,
           ideal_speedup=ow.ideal(tokens, exits) if impl == "gate" else 1.0,      # vs every loop / the release
           tokens_per_s=batch * NEW_TOKENS / median_of(benchmark), **common)


def test_ouro_cache_bytes_after_generation(benchmark, record):
    """The keys and values held after generating 48 tokens for 16 prompts:
    ours with the gate's exits (N + 1 rows per token at the first layer, N at
    the others; in use, and allocated: the buffers grow by doubling) against
    ours with every loop (exit fixed) and the release's DynamicCache (4 x 4
    slots of every position, padding included)."""
    model, dense = models()
    batch = 16
    ids, mask = ow.left_padded(batch, 32, 128)
    c = benchmark.pedantic(lambda: ow.cache_bytes(model, dense, ids, mask, THRESHOLD), rounds=1, warmup_rounds=0)
    tokens, exits = c["tokens"], c["exits"]
    # per token (the last new one included) N + 1 rows at the first layer and N at the others; every loop: 5 and 4
    assert c["gate_rows"] == tokens + ow.LAYERS * exits, c
    assert c["fixed_rows"] == tokens * (1 + ow.LOOPS * ow.LAYERS), c
    assert c["gate_bytes"] == c["gate_rows"] * c["row_bytes"] and c["fixed_bytes"] == c["fixed_rows"] * c["row_bytes"]
    record("ouro_cache_bytes", "gate", batch=batch, new_tokens=NEW_TOKENS, threshold=THRESHOLD,
           dtype=str(model.lm_head.weight.dtype), ideal_speedup=c["fixed_bytes"] / c["gate_bytes"], **c)
