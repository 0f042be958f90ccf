"""The vLLM plugin serving Ouro (architecture "OuroForCausalLM", saved by
`act_kernels.hf.OuroForCausalLM.save_pretrained` in the published format)
with the exit gate's per-token exit: vLLM's greedy tokens equal our
generate's token for token and its logprobs our forward's to 1e-4, at the
config's threshold (tokens exit after 1 to 4 loops, frozen for the later
tokens), at 1.0 set by hf_overrides (every loop), and in the release's
every-loop mode set by hf_overrides (every_loop: every token runs every
loop, the gate picks the loop the head reads; exits after 1 to 4 loops); at
threshold 0.6 each mode's logprobs are far from the other mode's, so
neither would pass served as the other. The layers' MLPs see exactly the
rows of the tokens still running, and the attention of loops 2.. the
queries from each sequence's first token still running to its last
(vLLM's CPU backend: the batch's metadata cut per loop), both by our
generate's exit loops (every row and query at every loop in the every-loop
mode); counted by forward hooks installed in the worker (vllm_tiny),
prefix caching off so that every prompt token runs. A threshold out of
(0, 1], an every_loop that is not a bool, and any hf_overrides setting
that OuroConfig refuses (RoPE scaling, sliding windows, another
activation, unknown keys) are refused when the engine's config is built,
naming the setting.

vLLM environment only (see vllm_tiny.py); one engine per mode:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations


import pytest

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


# (threshold, every_loop): the config's threshold, 1.0 by hf_overrides, the every-loop mode by hf_overrides
MODES = {"config": (THRESHOLD, False), "override_1.0": (1.0, False), "every_loop": (THRESHOLD, True)}


@pytest.fixture(scope="module", params=list(MODES))
def served(request, folder):
    """Ours at the mode's threshold, and an engine on the folder in that
    mode (its settings by hf_overrides) with the MLP rows and the loop
    copies' attention queries counted over its greedy generation."""
    from act_kernels.hf import OuroForCausalLM

    threshold, every_loop = MODES[request.param]
    ours = OuroForCausalLM.from_pretrained(folder, early_exit_threshold=threshold).eval()
    overrides = {}
    if threshold != THRESHOLD:
        overrides["early_exit_threshold"] = threshold
    if every_loop:
        overrides["every_loop"] = True
    with vllm_tiny.counting(folder, attention=True, enable_prefix_caching=False,
                            hf_overrides=overrides) as (llm, greedy, rows, queries):
        yield threshold, every_loop, ours, llm, greedy, (rows, queries)


def ours_greedy(ours, every_loop: bool):
    """Our generate in the mode; eos (token 0 here) held off for the NEW_TOKENS
    tokens, as vLLM's min_tokens holds off the generation config's eos."""
    return vllm_tiny.ours_greedy(ours, "gate", every_loop=every_loop, min_new_tokens=vllm_tiny.NEW_TOKENS)


def test_ouro_registered(served):
    from act_kernels.vllm import OURO_ARCHITECTURE

    threshold, every_loop, _, llm, _, _ = served
    model_config = llm.llm_engine.vllm_config.model_config
    assert model_config.architecture == OURO_ARCHITECTURE
    assert model_config.hf_config.early_exit_threshold == threshold
    assert model_config.hf_config.every_loop is every_loop


def test_greedy_equals_ours(served):
    threshold, every_loop, ours, _, got, _ = served
    want = ours_greedy(ours, every_loop)
    steps = {s for _, st in want for s in st}
    if threshold == 1.0:
        assert steps == {LOOPS}, "at 1.0 every token runs every loop here"
    else:
        assert steps == set(range(1, LOOPS + 1)), f"the tokens should exit at every loop, got {steps}"
    assert [g[0] for g in got] == [w[0] for w in want]


def test_logprobs_equal_ours(served):
    _, every_loop, ours, _, got, _ = served
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(ours, "gate", prompt, tokens, logprobs, prompt_logprobs,
                                      every_loop=every_loop) < 1e-4


def test_the_modes_differ(served):
    """Below 1.0 the other mode's logprobs are far from the engine's (at 1.0
    nobody exits early, nobody freezes: the modes agree), so the tests above
    would catch an engine that served one mode for the other: the frozen
    exits computed every loop and picked afterwards (the release's way), or
    an every_loop setting ignored."""
    threshold, every_loop, ours, _, got, _ = served
    gap = max(vllm_tiny.logprob_gaps(ours, "gate", prompt, tokens, logprobs, prompt_logprobs,
                                     every_loop=not every_loop)
              for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got))
    assert (gap > 1e-2) == (threshold < 1.0), gap


def test_mlps_see_the_running_rows_only(served):
    """Each layer's MLP (shared by the loops) sees, over the generation, the
    sum of the fed tokens' exit loops: fewer than every loop below 1.0; in
    the every-loop mode every fed token at every loop."""
    threshold, every_loop, ours, _, _, (rows, _) = served
    if every_loop and not vllm_tiny.EAGER:
        pytest.skip("the every-loop mode is compiled: vLLM's graph runs no forward hooks")
    want = ours_greedy(ours, every_loop)
    # the engine's forwards see the prompt and every new token but the last (no step reads it)
    fed = [steps[:len(p) + vllm_tiny.NEW_TOKENS - 1] for p, (_, steps) in zip(vllm_tiny.PROMPTS, want)]
    tokens = sum(len(f) for f in fed)
    ran = LOOPS * tokens if every_loop else sum(sum(f) for f in fed)
    assert (ran < LOOPS * tokens) == (threshold < 1.0 and not every_loop)
    assert rows == dict.fromkeys(range(ours.config.num_hidden_layers), ran)


def test_loop_attention_sees_the_running_sequences_only(served):
    """At loop n >= 2 the attention of each loop copy receives, per sequence
    of the batch (prefill chunk, decode token), the queries from its first
    token still running at n to its last (by our generate's exit loops),
    none where none runs (vLLM's CPU backend: the metadata cut per loop).
    Below 1.0 that is fewer than every query of each batch where a token
    runs, and, in some prefill chunk, fewer than the whole chunk while a
    token of it runs; at 1.0 and in the every-loop mode every query at
    every loop."""
    threshold, every_loop, ours, _, got, (_, (queries, batches)) = served
    if every_loop and not vllm_tiny.EAGER:
        pytest.skip("the every-loop mode is compiled: vLLM's graph runs no forward hooks")
    want = ours_greedy(ours, every_loop)
    sequences = [p + tokens for p, (tokens, *_) in zip(vllm_tiny.PROMPTS, got)]
    # the loops each token runs: its exit loop, or every loop in the every-loop mode (nobody freezes)
    steps = [[LOOPS] * len(st) if every_loop else st for _, st in want]
    expected, whole, every, tails = vllm_tiny.queries_per_loop(batches, sequences, steps, LOOPS)
    layers = ours.config.num_hidden_layers
    assert sorted(queries) == list(range(layers, LOOPS * layers))
    for u, seen in sorted(queries.items()):
        n = 2 + (u - layers) // layers     # loop n's copy of layer u mod L
        assert seen == expected[n], (u, n, seen, expected[n], whole[n], every[n])
    cut = threshold < 1.0 and not every_loop
    assert (sum(expected.values()) < sum(every.values())) == cut, "some batch should hold a sequence with none running"
    assert (sum(expected.values()) < sum(whole.values())) == cut, "some chunk should start or end with exited tokens"
    assert (sum(tails.values()) > 0) == cut, "some chunk's range should end early (its sequence length shortened)"
    assert sum(every.values()) > 0


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.2, float("nan"), "high"])
def test_bad_threshold_refused_at_start(folder, threshold):
    """Refused while vLLM builds the engine's config, in this process, before a worker starts."""
    with pytest.raises(ValueError, match="early_exit_threshold"):
        vllm_tiny.engine(folder, hf_overrides={"early_exit_threshold": threshold})


@pytest.mark.parametrize("override, match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.*RoPE scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}},
     "rope_parameters.*RoPE scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope_parameters.*rope_theta"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
    ({"layer_types": ["sliding_attention"] * 2}, "sliding-window"),
    ({"hidden_act": "gelu"}, "hidden_act.*silu"),
    ({"total_ut_steps": 0}, "total_ut_steps"),
    ({"foo": 1}, "unknown config keys.*'foo'"),
], ids=["rope_scaling", "rope_parameters", "rope_theta", "sliding_window", "layer_types", "hidden_act",
        "total_ut_steps", "unknown_key"])
def test_what_ouro_config_refuses_is_refused_at_start(folder, override, match):
    """An hf_overrides setting that OuroConfig refuses at construction is
    refused by the engine's config check with the same error naming it
    (one check_ouro_settings decides both), not served silently: vLLM
    applies the overrides to the built config, past OuroConfig's checks."""
    from act_kernels.hf import OuroConfig

    with pytest.raises(ValueError, match=match):
        OuroConfig(**override)
    with pytest.raises(ValueError, match=match):
        vllm_tiny.engine(folder, hf_overrides=override)


@pytest.mark.parametrize("every_loop", ["yes", 1, 0, None])
def test_bad_every_loop_refused_at_start(folder, every_loop):
    """The every-loop setting is a bool: anything else is refused when the engine's config is built."""
    with pytest.raises(ValueError, match="every_loop"):
        vllm_tiny.engine(folder, hf_overrides={"every_loop": every_loop})
