"""The vLLM plugin serving Ouro (architecture "OuroForCausalLM", saved by
`act_kernels.hf.OuroForCausalLM.save_pretrained` in the published format)
with the exit gate's per-token exit: vLLM's greedy tokens equal our
generate's token for token and its logprobs our forward's to 1e-4, at the
config's threshold (tokens exit after 1 to 4 loops, frozen for the later
tokens) and at 1.0 set by hf_overrides (every loop); the layers' MLPs see
exactly the rows of the tokens still running; a threshold out of (0, 1] is
refused when the engine's config is built, naming the setting.

vLLM environment only (see vllm_tiny.py); one engine per threshold:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations


import pytest
import torch

import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm

THRESHOLD = 0.6   # the saved config's early_exit_threshold
LOOPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Ouro (hidden 64, 2 heads of 32, 1 kv head, 2 layers, 4 loops,
    vocabulary 61) from the published format, saved by our save_pretrained;
    its gate's exits at THRESHOLD spread over all four loops."""
    from ouro.checkpoints import write_ouro_checkpoint

    from act_kernels.hf import OuroForCausalLM

    source, saved = tmp_path_factory.mktemp("ouro_published"), tmp_path_factory.mktemp("ouro")
    write_ouro_checkpoint(source, seed=0, head_dim=32, num_attention_heads=2, num_key_value_heads=1,
                          total_ut_steps=LOOPS, early_exit_threshold=THRESHOLD, max_position_embeddings=256)
    OuroForCausalLM.from_pretrained(source).save_pretrained(saved)
    return saved


@pytest.fixture(scope="module", params=[THRESHOLD, 1.0], ids=["config", "override_1.0"])
def served(request, folder):
    """Ours at the threshold, and an engine on the folder (threshold 1.0 by
    hf_overrides) with the MLP rows counted over its greedy generation."""
    from act_kernels.hf import OuroForCausalLM

    threshold = request.param
    ours = OuroForCausalLM.from_pretrained(folder, early_exit_threshold=threshold).eval()
    overrides = {} if threshold == THRESHOLD else {"hf_overrides": {"early_exit_threshold": threshold}}
    with vllm_tiny.insecure_serialization():
        llm = vllm_tiny.engine(folder, enable_prefix_caching=False, **overrides)
        try:
            llm.apply_model(vllm_tiny.count_mlp_rows)
            llm.apply_model(vllm_tiny.reset_mlp_rows)
            greedy = vllm_tiny.vllm_greedy(llm)
            (rows,) = llm.apply_model(vllm_tiny.read_mlp_rows)
            yield threshold, ours, llm, greedy, rows
        finally:
            vllm_tiny.shutdown(llm)


def test_ouro_registered(served):
    from act_kernels.vllm import OURO_ARCHITECTURE

    threshold, _, llm, _, _ = served
    model_config = llm.llm_engine.vllm_config.model_config
    assert model_config.architecture == OURO_ARCHITECTURE
    assert model_config.hf_config.early_exit_threshold == threshold


def test_greedy_equals_ours(served):
    threshold, ours, _, got, _ = served
    want = vllm_tiny.ours_greedy(ours, "gate")
    steps = {s for _, st in want for s in st}
    if threshold == 1.0:
        assert steps == {LOOPS}, "at 1.0 every token runs every loop here"
    else:
        assert steps == set(range(1, LOOPS + 1)), f"the tokens should exit at every loop, got {steps}"
    assert [g[0] for g in got] == [w[0] for w in want]


def test_logprobs_equal_ours(served):
    _, ours, _, got, _ = served
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(ours, "gate", prompt, tokens, logprobs, prompt_logprobs) < 1e-4


@torch.no_grad()
def test_frozen_is_not_every_loop(served):
    """Below 1.0 the frozen-token rule changes the later tokens' logits here
    (at 1.0 nobody freezes), so the tests above would catch an engine that
    computed every loop and picked the exits afterwards (the release's way)."""
    threshold, ours, _, got, _ = served
    ids = torch.tensor([vllm_tiny.PROMPTS[-1] + got[-1][0]])
    gap = (ours(ids).logits.log_softmax(-1) - ours(ids, every_loop=True).logits.log_softmax(-1)).abs().max()
    assert (gap > 1e-2) == (threshold < 1.0), float(gap)


def test_mlps_see_the_running_rows_only(served):
    """Each layer's MLP (shared by the loops) sees, over the generation, the
    sum of the fed tokens' exit loops: fewer than every loop below 1.0."""
    threshold, ours, _, _, rows = served
    want = vllm_tiny.ours_greedy(ours, "gate")
    # the engine's forwards see the prompt and every new token but the last (no step reads it)
    fed = [steps[:len(p) + vllm_tiny.NEW_TOKENS - 1] for p, (_, steps) in zip(vllm_tiny.PROMPTS, want)]
    ran = sum(sum(f) for f in fed)
    assert (ran < LOOPS * sum(len(f) for f in fed)) == (threshold < 1.0)
    assert rows == dict.fromkeys(range(ours.config.num_hidden_layers), ran)


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.2, float("nan"), "high"])
def test_bad_threshold_refused_at_start(folder, threshold):
    """Refused while vLLM builds the engine's config, in this process, before a worker starts."""
    with pytest.raises(ValueError, match="early_exit_threshold"):
        vllm_tiny.engine(folder, hf_overrides={"early_exit_threshold": threshold})

