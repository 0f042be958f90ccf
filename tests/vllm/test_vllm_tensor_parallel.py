"""The vLLM plugin under tensor parallelism (tensor_parallel_size=2, two
CPU workers): vLLM's column- and row-parallel layers split the prelude,
block and coda across the ranks, and the halting unit, which is not split,
reads the all-reduced loop outputs on every rank. With ACT's exit rule
(every loop computed, halted tokens frozen) its greedy tokens equal our
generate's token for token and its logprobs our forward's to 1e-4.

vLLM environment only (see vllm_tiny.py); one engine for the module, its
workers bound to CPUs 0 and 1:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations

import os

import pytest

import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor_parallel_size=2 needs two CPUs")
    folder = tmp_path_factory.mktemp("looped_tp")
    looped = vllm_tiny.build_looped(folder)
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"     # one worker per CPU
    try:
        with vllm_tiny.serving(folder, tensor_parallel_size=2) as (llm, greedy):
            yield looped, llm, greedy
    finally:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind if bind is not None else "1"


def test_two_ranks_serve_the_model(served):
    _, llm, _ = served
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2


def test_act_greedy_equals_ours_across_two_ranks(served):
    looped, _, got = served
    want = vllm_tiny.ours_greedy(looped, "act")
    assert [g[0] for g in got] == [w[0] for w in want]
    assert len({s for _, steps in want for s in steps}) > 1      # tokens halt after different numbers of loops


def test_act_logprobs_equal_ours_across_two_ranks(served):
    looped, _, got = served
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(looped, "act", prompt, tokens, logprobs, prompt_logprobs) < 1e-4
