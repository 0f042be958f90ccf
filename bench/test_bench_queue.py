"""A queue of prompts through a fixed number of slots at reduced size
(bench/queue_workloads.py has the full comparison, in alternation): 16
left-padded prompts of 32..128 bytes through 4 slots, 16 new tokens each,
sampled at temperature 1 with no top-k (a fixed generator), for the
controlled shallow and deep mixes (hf_workloads' per-byte halting,
MEAN_STEPS 1.5 and 5.0): ours with max_batch_size=4 (continuous batching)
under "depthwise" and "synchronous", and transformers' generate of the
unrolled model over the same prompts in 4 batches of 4 (sampling, top_k=0).
Each row records the mix's measured mean N of the new tokens, the share at
max_steps, the block iterations and the ideal (layer applications per
token, unrolled over ours, from our own steps).

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_queue.py --benchmark-only \
        --benchmark-timer time.process_time
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import queue_workloads as qw  # noqa: E402
from conftest import median_of, sync  # noqa: E402

PROMPTS, SLOTS, NEW, ROUNDS = 16, 4, 16, 3
MIXES = ("shallow", "deep")
_models = {}
_depth = {}


def models(mix):
    """(looped, the unrolled Llama) of the controlled mix, made once per session."""
    if mix not in _models:
        looped, model = qw.controlled(mix)
        _models[mix] = (looped, qw.hw.unrolled(model))
    return _models[mix]


@pytest.mark.parametrize("impl", ["depthwise", "synchronous", "transformers"])
@pytest.mark.parametrize("mix", MIXES)
def test_queue_tokens_per_second(benchmark, record, timer, mix, impl):
    looped, plain = models(mix)
    ids, mask = qw.hw.left_padded(PROMPTS, qw.LOW, qw.HIGH)
    sizes = dict(source="controlled", mix=mix, prompts=PROMPTS, slots=SLOTS, new_tokens=NEW,
                 mean_steps_setting=qw.CONTROLLED_MEAN[mix], max_steps=qw.hw.MAX_STEPS, timer=timer)
    if impl == "transformers":
        batches = qw.hf_batches(ids, mask, SLOTS)

        def run():
            outs = qw.hf_sampled(plain, batches, NEW)
            sync()
            return outs

        outs = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
        qw.check_hf(outs, batches, NEW)
        record("queue_generate", impl, **sizes, hf_padded_tokens=sum(i.numel() for i, _ in batches),
               tokens_per_s=PROMPTS * NEW / median_of(benchmark))
        return

    def run():
        out = qw.ours_sampled(looped, ids, mask, impl, SLOTS, NEW)
        sync()
        return out

    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    fig = qw.depth_figures(looped, out, ids, mask, NEW, "controlled")
    other = _depth.setdefault(mix, (out.sequences, out.steps))
    assert (other[0] == out.sequences).all() and (other[1] == out.steps).all(), "the schedules generated different tokens"
    record("queue_generate", impl, **sizes, mean_n=fig["mean_n"], at_max=fig["at_max"],
           prompt_mean_n=fig["prompt_mean_n"], iterations=int(out.iterations), ideal_speedup=fig["ideal"],
           tokens_per_s=PROMPTS * NEW / median_of(benchmark))
