"""The vLLM plugin serving Ouro under tensor parallelism
(tensor_parallel_size=2, two CPU workers): vLLM's column- and row-parallel
layers split each layer's heads (2 query heads and 2 key/value heads here,
one of each per rank) and MLP across the ranks, and the exit gate, which is
not split, reads the all-reduced loop outputs on every rank, the ranks
taking the same exits (`rows.agreed`). With the gate's frozen exits (the
running rows and the attention cut per rank) and in the every-loop mode,
at a threshold where the tokens exit after 1 to 4 loops, the greedy tokens
equal our generate's token for token and the logprobs our forward's to
1e-4, far from the other mode's.

vLLM environment only (see vllm_tiny.py); one engine per mode, its workers
bound to CPUs 0 and 1:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations

import os

import pytest

import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm

THRESHOLD = 0.6
LOOPS = 4
MODES = {"frozen": False, "every_loop": True}   # the every_loop setting, by hf_overrides


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Ouro as test_vllm_ouro.py's but with 2 key/value heads (one per
    rank: vLLM splits the key/value heads, or replicates one across the
    ranks), saved by our save_pretrained; at THRESHOLD its exits spread over
    all four loops in both modes."""
    from ouro.checkpoints import write_ouro_checkpoint

    from act_kernels.hf import OuroForCausalLM

    source, saved = tmp_path_factory.mktemp("ouro_tp_published"), tmp_path_factory.mktemp("ouro_tp")
    write_ouro_checkpoint(source, seed=0, head_dim=32, num_attention_heads=2, num_key_value_heads=2,
                          total_ut_steps=LOOPS, early_exit_threshold=THRESHOLD, max_position_embeddings=256)
    OuroForCausalLM.from_pretrained(source).save_pretrained(saved)
    return saved


@pytest.fixture(scope="module", params=list(MODES))
def served(request, folder):
    from act_kernels.hf import OuroForCausalLM

    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor_parallel_size=2 needs two CPUs")
    every_loop = MODES[request.param]
    ours = OuroForCausalLM.from_pretrained(folder).eval()
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"     # one worker per CPU
    try:
        with vllm_tiny.serving(folder, tensor_parallel_size=2, hf_overrides={"every_loop": every_loop}) \
                as (llm, greedy):
            yield every_loop, ours, llm, greedy
    finally:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind if bind is not None else "1"


def test_two_ranks_serve_ouro(served):
    every_loop, _, llm, _ = served
    config = llm.llm_engine.vllm_config
    assert config.parallel_config.tensor_parallel_size == 2
    assert config.model_config.architecture == "OuroForCausalLM"
    assert config.model_config.hf_config.num_key_value_heads == 2
    assert config.model_config.hf_config.every_loop is every_loop


def test_greedy_equals_ours_across_two_ranks(served):
    every_loop, ours, _, got = served
    # eos (token 0) held off for the NEW_TOKENS tokens, as vLLM's min_tokens holds off the generation config's eos
    want = vllm_tiny.ours_greedy(ours, "gate", every_loop=every_loop, min_new_tokens=vllm_tiny.NEW_TOKENS)
    steps = {s for _, st in want for s in st}
    assert steps == set(range(1, LOOPS + 1)), f"the tokens should exit at every loop, got {steps}"
    assert [g[0] for g in got] == [w[0] for w in want]


def test_logprobs_equal_ours_across_two_ranks(served):
    every_loop, ours, _, got = served
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(ours, "gate", prompt, tokens, logprobs, prompt_logprobs,
                                      every_loop=every_loop) < 1e-4


def test_the_other_mode_is_far(served):
    """So the logprob test would catch the ranks serving the other mode."""
    every_loop, ours, _, got = served
    gap = max(vllm_tiny.logprob_gaps(ours, "gate", prompt, tokens, logprobs, prompt_logprobs,
                                     every_loop=not every_loop)
              for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got))
    assert gap > 1e-2, gap
