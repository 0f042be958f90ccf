"""The vLLM plugin on a Qwen3 inner model (q/k norms per head) with
step_norm (the final norm ends every loop, halting reads the normed state)
and the block at the end (no coda: the head reads ACT's output directly),
ACT's mean field: vLLM's greedy tokens equal our generate's token for token
and its logprobs our forward's to 1e-4.

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
    folder = tmp_path_factory.mktemp("looped_qwen3")
    looped = vllm_tiny.build_looped(folder, family="qwen3", block=(2, 4), step_norm=True)
    with vllm_tiny.serving(folder) as (llm, greedy):
        yield looped, llm, greedy


def test_qwen3_step_norm_act_equals_ours(served):
    looped, _, got = served
    assert looped.config.text_config.model_type == "qwen3" and looped.coda is None
    want = vllm_tiny.ours_greedy(looped, "act")
    steps = {s for _, st in want for s in st}
    assert len(steps) > 1, f"the tiny model's tokens should halt at different steps, got {steps}"
    assert [g[0] for g in got] == [w[0] for w in want]
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(looped, "act", prompt, tokens, logprobs, prompt_logprobs) < 1e-4
