"""The vLLM plugin with LoopedCausalLM's default exit rule, ACT's mean field
(no act_exit set): every loop computed for every token, halted tokens
frozen for the later ones as our engine freezes them (design §9, §14).
vLLM's greedy tokens equal our generate's token for token and its logprobs
our forward's to 1e-4, on a model whose tokens halt after different numbers
of loops, with prompts split over several prefill chunks and more prompts
than slots.

vLLM environment only (see vllm_tiny.py); one engine for the module:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations

import pytest

import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("looped_act")
    looped = vllm_tiny.build_looped(folder)
    with vllm_tiny.serving(folder) as (llm, greedy):
        yield looped, llm, greedy


def test_act_is_the_default(served):
    from act_kernels.vllm import exit_rule

    _, llm, _ = served
    assert exit_rule(llm.llm_engine.vllm_config.model_config.hf_config) == "act"


def test_act_greedy_equals_ours(served):
    looped, _, got = served
    want = vllm_tiny.ours_greedy(looped, "act")
    steps = {s for _, st in want for s in st}
    assert len(steps) > 1, f"the tiny model's tokens should halt at different steps, got {steps}"
    assert [g[0] for g in got] == [w[0] for w in want]


def test_act_logprobs_equal_ours(served):
    looped, _, got = served
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(looped, "act", prompt, tokens, logprobs, prompt_logprobs) < 1e-4
