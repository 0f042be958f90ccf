"""`act_kernels.hf.LoopedCausalLM` over a transformers Llama against what a
user would run instead: transformers' own model with the block's layers
unrolled max_steps times (bench/hf_workloads.py: hidden 256, GQA 4 / 2 heads
of 64, byte vocabulary, layers prelude 1 + block 2 + coda 1, max_steps 8;
the unrolled model has 1 + 2 x 8 + 1 = 18 layers, copies of the same
weights), run through transformers' own forward and generate (sdpa
attention, DynamicCache). Halting is controlled: every token halts after the
steps of its byte (skewed, mean about 2.3 over random bytes, some at 8).

- training forward + backward, 8 x 256 tokens (`hf_train`);
- generation, left-padded prompts of 32..128 bytes, 48 new tokens each, at
  batch 1, 4, 16 and 64 (`hf_generate`): ours with schedule="depthwise" and
  "synchronous" (sampled, temperature 1, a fixed generator) and transformers'
  generate of the unrolled model (greedy; its work does not depend on the
  tokens), with the block iterations each schedule ran per generated token;
- the cache after generation (`hf_cache_bytes`): our ragged caches against
  the unrolled model's DynamicCache for the same prompts and new-token count.

The ideal speedup is the layer applications per token of the unrolled model
over ours, 18 T / (2 T + 2 sum N) over the T tokens processed (the prompts'
real tokens and the new ones; the unrolled model also processes the
padding, ours never does). Ratios come from one process. Every row records
the clock it was timed with: on a shared machine, time it with the
process's CPU time (less exposed to the other processes than the wall
clock):

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_hf.py --benchmark-only \
        --benchmark-timer time.process_time && python bench/report.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import sync

pytest.importorskip("transformers")

import hf_workloads as hw  # noqa: E402
from conftest import median_of

ROUNDS = 5
NEW_TOKENS = hw.NEW_TOKENS
BATCHES = (1, 4, 16, 64)
_models = {}
_outputs = {}


def models():
    """(looped, its Llama, the unrolled Llama), made and checked once per session."""
    if not _models:
        looped, model = hw.controlled_llama()
        plain = hw.unrolled(model)
        check_baseline(looped, plain)
        _models.update(looped=hw.capture_caches(looped), model=model, plain=plain)
    return _models["looped"], _models["model"], _models["plain"]


def ideal(tokens: int, steps_sum: int) -> float:
    return hw.UNROLLED_LAYERS * tokens / hw.layer_work(tokens, steps_sum)


def ours_generate(looped, ids, mask, schedule):
    out = hw.generate_ours(looped, ids, mask, schedule, NEW_TOKENS)
    sync()
    return out


def hf_generate(plain, ids, mask):
    out = hw.generate_hf(plain, ids, mask, NEW_TOKENS)
    sync()
    return out


def check_baseline(looped, plain):
    """The baseline computes what ours does with halting off (every token 8
    steps); with the controlled halting ours stops where it should."""
    ids, mask = hw.left_padded(3, 8, 24, seed=5)
    valid = mask.bool()
    with torch.no_grad():
        out = looped(ids, mask)
        assert torch.equal(out.steps[valid], looped.token_steps[ids][valid])
        bias = looped.halting.bias.item()
        looped.halting.bias.fill_(-40.0)
        try:
            off = looped(ids, mask)
        finally:
            looped.halting.bias.fill_(bias)
        ref = plain(ids, attention_mask=mask).logits
    assert int(off.steps[valid].min()) == hw.MAX_STEPS
    torch.testing.assert_close(off.logits[valid], ref[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["looped", "unrolled_hf"])
def test_training_forward_backward(benchmark, record, timer, impl):
    """8 x 256 random bytes, forward and backward of transformers' causal-LM
    loss (plus 0.01 x the mean ponder cost for ours)."""
    looped, _, plain = models()
    batch, length = 8, 256
    tokens = torch.randint(0, hw.VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))
    module = looped if impl == "looped" else plain
    module.train()

    def run():
        hw.training_step(module, tokens, impl == "looped")
        sync()

    try:
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    finally:
        module.eval()
    steps = looped.token_steps[tokens]
    record("hf_train", impl, batch=batch, length=length, d_model=hw.HIDDEN, max_steps=hw.MAX_STEPS,
           mean_steps=float(steps.double().mean()), ideal_speedup=ideal(tokens.numel(), int(steps.sum())),
           unrolled_layers=hw.UNROLLED_LAYERS, timer=timer)


@pytest.mark.parametrize("impl", ["depthwise", "synchronous", "unrolled_hf"])
@pytest.mark.parametrize("batch", BATCHES)
def test_generation_tokens_per_second(benchmark, record, timer, impl, batch):
    """`batch` left-padded prompts of 32..128 bytes, 48 new tokens each."""
    looped, _, plain = models()
    ids, mask = hw.left_padded(batch, 32, 128)
    rounds = ROUNDS if batch <= 16 else 3
    if impl == "unrolled_hf":
        out = benchmark.pedantic(lambda: hf_generate(plain, ids, mask), rounds=rounds, warmup_rounds=1)
        assert out.sequences.shape == (batch, ids.shape[1] + NEW_TOKENS)
        record("hf_generate", impl, batch=batch, new_tokens=NEW_TOKENS, prompt_tokens=int(mask.sum()),
               d_model=hw.HIDDEN, max_steps=hw.MAX_STEPS,
               tokens_per_s=batch * NEW_TOKENS / median_of(benchmark), timer=timer)
        return
    out = benchmark.pedantic(lambda: ours_generate(looped, ids, mask, impl), rounds=rounds, warmup_rounds=1)
    width = ids.shape[1]
    assert out.sequences.shape == (batch, width + NEW_TOKENS)
    valid = torch.cat([mask.bool(), torch.ones(batch, NEW_TOKENS, dtype=torch.bool)], 1)
    assert torch.equal(out.steps[valid], looped.token_steps[out.sequences][valid]), "tokens halted elsewhere"
    other = _outputs.setdefault(batch, out.sequences)
    assert torch.equal(other, out.sequences), "the schedules generated different tokens"
    new_steps = out.steps[:, width:]
    prefill = int(out.steps[:, :width].max())           # the prompts' one parallel call ponders max N steps
    slowest = int(new_steps.sum(1).max())               # depthwise: the sequence with the most steps
    rounds_max = int(new_steps.max(0).values.sum())     # synchronous: each decode call runs its batch's max N
    assert out.iterations == prefill + (slowest if impl == "depthwise" else rounds_max), out.iterations
    record("hf_generate", impl, batch=batch, new_tokens=NEW_TOKENS, prompt_tokens=int(mask.sum()),
           d_model=hw.HIDDEN, max_steps=hw.MAX_STEPS, mean_steps=float(new_steps.double().mean()),
           iterations=out.iterations, prefill_iterations=prefill, depthwise_floor=prefill + slowest,
           synchronous_floor=prefill + rounds_max,
           ideal_speedup=ideal(int(valid.sum()), int(out.steps[valid].sum())),
           tokens_per_s=batch * NEW_TOKENS / median_of(benchmark), timer=timer)


def test_cache_bytes_after_generation(benchmark, record):
    """The keys and values held after generating 48 tokens for 16 prompts:
    our ragged caches (prelude, block, coda; in use, and allocated: the
    buffers grow by doubling) against the unrolled model's DynamicCache."""
    looped, _, plain = models()
    batch = 16
    ids, mask = hw.left_padded(batch, 32, 128)
    out = benchmark.pedantic(lambda: ours_generate(looped, ids, mask, "depthwise"), rounds=1, warmup_rounds=0)
    used, allocated = hw.ragged_cache_bytes(looped.captured_caches)
    rows = sum(sum(c.rows()) for c in looped.captured_caches)
    theirs = hf_generate(plain, ids, mask)
    cache = getattr(theirs, "cache", None) or theirs.past_key_values
    hf_bytes = hw.dynamic_cache_bytes(cache)
    valid = torch.cat([mask.bool(), torch.ones(batch, NEW_TOKENS, dtype=torch.bool)], 1)
    tokens, steps = int(valid.sum()), int(out.steps[valid].sum())
    row_bytes = 2 * hw.KV_HEADS * hw.HEAD_DIM * looped.halting.weight.element_size()
    # per token: N + 1 rows at the block's first layer, N at the other, one per prelude and coda layer
    assert rows == tokens * (hw.PRELUDE + hw.CODA + 1) + hw.BLOCK_LAYERS * steps - batch * hw.CODA, rows
    assert used == rows * row_bytes
    unpadded = hw.UNROLLED_LAYERS * (tokens - batch) * row_bytes     # the last new token is never fed
    record("hf_cache_bytes", "ragged", batch=batch, new_tokens=NEW_TOKENS, tokens=tokens, ragged_rows=rows,
           ragged_bytes=used, ragged_allocated_bytes=allocated, hf_bytes=hf_bytes, hf_unpadded_bytes=unpadded,
           mean_steps=steps / tokens, ideal_speedup=unpadded / used,
           dtype=str(looped.halting.weight.dtype))
