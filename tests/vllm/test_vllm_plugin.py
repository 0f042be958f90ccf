"""The vLLM plugin (act_kernels.vllm) serving a saved LoopedCausalLM with the
exit rule "fixed" (every token max_steps loops): vLLM's greedy tokens equal
our generate(..., exit="fixed") token for token, and its logprobs (new
tokens' top-k and the prompts') our forward's to 1e-4; settings the plugin
does not serve are refused when the engine's config is built, naming them.

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
    folder = tmp_path_factory.mktemp("looped_fixed")
    looped = vllm_tiny.build_looped(folder)
    with vllm_tiny.serving(folder, hf_overrides={"act_exit": "fixed"}) as (llm, greedy):
        yield looped, folder, llm, greedy


def test_plugin_registered(served):
    """The entry point registered the architecture; the engine resolved it to our model."""
    from vllm import ModelRegistry

    from act_kernels.vllm import ARCHITECTURE

    _, _, llm, _ = served
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert llm.llm_engine.vllm_config.model_config.architecture == ARCHITECTURE
    assert llm.llm_engine.vllm_config.model_config.hf_config.act_exit == "fixed"


def test_fixed_greedy_equals_ours(served):
    looped, _, _, got = served
    want = vllm_tiny.ours_greedy(looped, "fixed")
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(set(steps) == {3} for _, steps in want)   # every token max_steps loops


def test_fixed_logprobs_equal_ours(served):
    looped, _, _, got = served
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(looped, "fixed", prompt, tokens, logprobs, prompt_logprobs) < 1e-4


def test_fixed_is_not_act(served):
    """The tiny model's ACT steps differ between tokens, so "fixed" is a different model: the test above
    would catch a plugin that ignored the setting."""
    looped, _, _, got = served
    act = vllm_tiny.ours_greedy(looped, "act")
    assert {s for _, steps in act for s in steps} != {3}
    assert [g[0] for g in got] != [a[0] for a in act]


@pytest.mark.parametrize("setting, message", [
    ("bogus", "unknown act_exit='bogus'"),
    ("gate", "act_exit='gate': this exit rule of act_kernels is not served"),
    ("kl", "act_exit='kl'"),
])
def test_unserved_exit_refused_at_start(served, setting, message):
    """Refused while vLLM builds the engine's config, in this process, before a worker starts."""
    _, folder, _, _ = served
    with pytest.raises(ValueError, match=message):
        vllm_tiny.engine(folder, hf_overrides={"act_exit": setting})
