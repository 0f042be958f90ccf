"""The vLLM plugin's "act" rule skips the work of tokens that halted: the
MLP of each block layer (shared by every loop) sees, over a whole greedy
generation, exactly the rows of the tokens still running at each loop, the
sum of the tokens' ACT steps that our own generate reports for the same
prompts, and fewer rows than every loop for every token; the layers outside
the block see each token once. At each loop n >= 2 the attention of the
loop's layers receives the queries of the sequences with a token still
running only (vLLM's CPU backend: the metadata cut per loop). Counted by
forward hooks installed in the worker (llm.apply_model; vLLM then pickles
the functions, so the module allows its insecure serialization), prefix
caching off so that every prompt token runs.

vLLM environment only (see vllm_tiny.py); one engine for the module:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations


import pytest

import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm

BLOCK = (1, 3)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("looped_skip")
    looped = vllm_tiny.build_looped(folder, block=BLOCK)
    with vllm_tiny.counting(folder, attention=True, enable_prefix_caching=False) as (_, greedy, rows, counted):
        queries, batches = counted
        yield looped, greedy, rows, queries, batches


def test_counted_generation_equals_ours(counted):
    looped, got, *_ = counted
    want = vllm_tiny.ours_greedy(looped, "act")
    assert [g[0] for g in got] == [w[0] for w in want]


def test_block_mlps_see_the_running_rows_only(counted):
    looped, _, rows, *_ = counted
    want = vllm_tiny.ours_greedy(looped, "act")
    # the engine's forwards see the prompt and every new token but the last (no step reads it)
    fed = [steps[:len(p) + vllm_tiny.NEW_TOKENS - 1] for p, (_, steps) in zip(vllm_tiny.PROMPTS, want)]
    tokens = sum(len(f) for f in fed)
    ran = sum(sum(f) for f in fed)
    start, stop = BLOCK
    assert min(min(f) for f in fed) >= 1
    assert ran < looped.max_steps * tokens, "the tiny model's tokens should halt before max_steps"
    for i, seen in sorted(rows.items()):
        assert seen == (ran if start <= i < stop else tokens), (i, seen, ran, tokens)


def test_loop_attention_sees_the_running_sequences_only(counted):
    """At loop n >= 2 the attention of each loop copy receives, per sequence
    of the batch (prefill chunk, decode token), the queries from its first
    token still running at n to its last (none where none runs); fewer than
    every query of each batch where any token runs, and, in some prefill
    chunk, fewer than the whole chunk while a token of it runs, its range
    ended early in some."""
    looped, got, _, queries, batches = counted
    want = vllm_tiny.ours_greedy(looped, "act")
    full = [p + tokens for p, (tokens, *_) in zip(vllm_tiny.PROMPTS, got)]
    expected, whole, every, tails = vllm_tiny.queries_per_loop(batches, full, [steps for _, steps in want],
                                                               looped.max_steps)
    start, stop = BLOCK
    width, layers = stop - start, looped.model.config.num_hidden_layers
    for u, seen in sorted(queries.items()):
        n = 2 + (u - layers) // width
        assert seen == expected[n], (u, n, seen, expected[n], every[n])
    assert sum(expected.values()) < sum(every.values()), "some batch should hold a sequence with no running token"
    assert sum(expected.values()) < sum(whole.values()), "some prefill chunk should end or start with halted tokens"
    assert sum(tails.values()) > 0, "some chunk's range should end early (its sequence length shortened)"
