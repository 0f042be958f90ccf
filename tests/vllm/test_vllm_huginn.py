"""The vLLM plugin serving Huginn from its published format (config.json
with architecture "RavenForCausalLM", safetensors under the published
names, written by tests/huginn/checkpoints.py), zero initial state:

- at the fixed depth (mean_recurrence steps), vLLM's greedy tokens equal
  our `HuginnForCausalLM.generate`'s token for token and its logprobs our
  forward's to 1e-4;
- under "latent-diff" (hf_overrides), every token exits by the criterion,
  prompt tokens included: vLLM's greedy tokens are the argmax of our
  `forward(exit="latent-diff")` on the sequence it produced (exits spread
  over steps 2..4, frozen for later tokens), its logprobs within 1e-4; the
  core layers' MLPs see exactly the running tokens' rows (the sum of our
  exit steps), the prelude's and coda's every token once; and the frozen
  rows change later tokens' logits against the fixed depth, so an engine
  that ignored the exit would fail;
- on two tensor-parallel ranks, a vocabulary padded to more rows than it
  has and an untied head: our tokens and logprobs over the real vocabulary;
- bad exit settings are refused when the engine's config is built, naming
  the setting.

vLLM environment only (see vllm_tiny.py); one engine per exit setting:

    /work/vllm-venv/bin/python -m pytest tests/vllm -p no:xdist -o addopts=""
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vllm_tiny

vllm = vllm_tiny.require_vllm()

pytestmark = pytest.mark.vllm

STEPS = 4            # mean_recurrence
THRESHOLD = 0.95     # latent-diff: the tiny random core's steps differ a lot; exits spread over steps 2..4 here
LATENT = {"act_exit": "latent-diff", "exit_threshold": THRESHOLD}
# the tensor-parallel engine's exit_min_steps: the criterion is first checked at step 2, against the initial
# state (zeros: never met), so its tokens exit at steps 3 and 4 only, where min_steps 0 lets some exit at 2
TP_MIN_STEPS = 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Huginn in the published format (hidden 64, 2 heads of 32, one
    prelude, two core and one coda layer, 4 steps, vocabulary 64 unpadded),
    initial state zeros (init_values.std 0)."""
    from huginn.checkpoints import write_huginn_checkpoint

    saved = tmp_path_factory.mktemp("huginn_published")
    write_huginn_checkpoint(saved, seed=0, n_embd=64, n_heads=2, vocab_size=64, padded_vocab_size=64,
                            mean_recurrence=STEPS, block_size=256, init_values={"std": 0.0})
    return saved


@pytest.fixture(scope="module")
def ours(folder):
    from act_kernels.hf import HuginnForCausalLM

    return HuginnForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["fixed", "latent-diff"])
def served(request, folder):
    """An engine on the folder under the exit setting, with the MLP rows
    counted over its greedy generation."""
    overrides = {} if request.param == "fixed" else {"hf_overrides": LATENT}
    with vllm_tiny.counting(folder, enable_prefix_caching=False, **overrides) as (llm, greedy, rows, _):
        yield request.param, llm, greedy, rows


class _Forward:
    """Our forward under the served exit, as vllm_tiny.logprob_gaps calls it."""

    def __init__(self, model, rule: str, min_steps: int = 0, vocab: int | None = None):
        self.model, self.rule, self.min_steps, self.vocab = model, rule, min_steps, vocab

    def __call__(self, ids, exit=None):
        if self.rule == "fixed":
            out = self.model(ids)
        else:
            out = self.model(ids, exit="latent-diff", threshold=THRESHOLD, min_steps=self.min_steps)
        if self.vocab is not None:   # what vLLM samples from: the logits of the real vocabulary
            out = SimpleNamespace(logits=out.logits[..., :self.vocab], steps=out.steps)
        return out


def test_huginn_registered(served):
    rule, llm, _, _ = served
    model_config = llm.llm_engine.vllm_config.model_config
    assert model_config.architecture == "RavenForCausalLM"
    assert getattr(model_config.hf_config, "act_exit", "fixed") == rule
    if rule != "fixed":   # an exit runs eager: its row counts depend on the data
        from vllm.config import CUDAGraphMode

        assert llm.llm_engine.vllm_config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE


@torch.no_grad()
def test_greedy_equals_ours(served, ours):
    rule, _, got, _ = served
    if rule == "fixed":   # our generate, prompts and new tokens at mean_recurrence steps
        want = vllm_tiny.ours_greedy(ours, None)
        assert {s for _, steps in want for s in steps} == {STEPS}
        assert [g[0] for g in got] == [w[0] for w in want]
        return
    exits = set()
    for prompt, (tokens, _, _) in zip(vllm_tiny.PROMPTS, got):
        out = ours(torch.tensor([prompt + tokens]), exit="latent-diff", threshold=THRESHOLD)
        assert out.logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == tokens
        exits |= set(out.steps[0].tolist())
    assert exits == {2, 3, STEPS}, f"the tokens should exit at several steps, got {exits}"


def test_logprobs_equal_ours(served, ours):
    rule, _, got, _ = served
    forward = _Forward(ours, rule)
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        assert vllm_tiny.logprob_gaps(forward, rule, prompt, tokens, logprobs, prompt_logprobs) < 1e-4


@torch.no_grad()
def test_mlps_see_the_running_rows_only(served, ours):
    """The prelude's and coda's MLPs see every fed token once; each core
    layer's MLP (shared by the steps) the sum of the fed tokens' exit steps,
    fewer than every step under the criterion."""
    rule, _, got, rows = served
    if rule == "fixed" and not vllm_tiny.EAGER:
        pytest.skip("compiled (the fixed depth under ACT_KERNELS_VLLM_COMPILE=1): module hooks do not run inside "
                    "vLLM's compiled graph")
    fed, ran = 0, 0
    for prompt, (tokens, _, _) in zip(vllm_tiny.PROMPTS, got):
        # the engine's forwards see the prompt and every new token but the last (no step reads it)
        ids = torch.tensor([prompt + tokens[:-1]])
        steps = ours(ids).steps if rule == "fixed" else ours(ids, exit="latent-diff", threshold=THRESHOLD).steps
        fed, ran = fed + ids.shape[1], ran + int(steps.sum())
    assert (ran < STEPS * fed) == (rule != "fixed")
    config = ours.config
    core = range(config.n_layers_in_prelude, config.n_layers_in_prelude + config.n_layers_in_recurrent_block)
    assert rows == {i: ran if i in core else fed for i in range(config.num_hidden_layers)}


@torch.no_grad()
def test_frozen_rows_matter(served, ours):
    """The criterion's exits move the later tokens' logits by more than the
    tolerance above against the fixed depth, so an engine that ignored them fails."""
    rule, _, got, _ = served
    if rule == "fixed":
        pytest.skip("nothing exits at the fixed depth")
    ids = torch.tensor([vllm_tiny.PROMPTS[-1] + got[-1][0]])
    fixed = ours(ids).logits.log_softmax(-1)
    gap = (fixed - _Forward(ours, rule)(ids).logits.log_softmax(-1)).abs().max()
    assert gap > 1e-2, float(gap)


@pytest.mark.parametrize("overrides, named", [
    ({"act_exit": "kl", "exit_threshold": 0.1}, "act_exit"),
    ({"act_exit": "latent", "exit_threshold": 0.1}, "act_exit"),
    ({"act_exit": "latent-diff"}, "exit_threshold"),
    ({"act_exit": "latent-diff", "exit_threshold": -1.0}, "exit_threshold"),
    ({"act_exit": "latent-diff", "exit_threshold": 0.1, "exit_min_steps": STEPS}, "exit_min_steps"),
    ({"exit_threshold": 0.1}, "exit_threshold"),
    ({"mean_recurrence": 0}, "mean_recurrence"),
    ({"state_init": "normal"}, "state_init"),
    ({"act_exit": "latent-diff", "exit_threshold": 0.1, "exit_min_step": 1}, "exit_min_step"),   # a typo
    ({"init_values": 0.02}, "init_values"),
])
def test_bad_settings_refused_at_start(folder, overrides, named):
    """Refused while vLLM builds the engine's config, in this process, before a worker starts."""
    with pytest.raises(ValueError, match=named):
        vllm_tiny.engine(folder, hf_overrides=overrides)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """The module's Huginn (seed 0: the same embedding, layers and adapter,
    so the same exits) with the published layout's two other cases: a
    vocabulary of 61 padded to 64 rows, and an untied head of its own.
    Returns (folder, our model)."""
    from huginn.checkpoints import write_huginn_checkpoint

    from act_kernels.hf import HuginnForCausalLM

    saved = tmp_path_factory.mktemp("huginn_padded_untied")
    write_huginn_checkpoint(saved, seed=0, n_embd=64, n_heads=2, vocab_size=61, padded_vocab_size=64,
                            mean_recurrence=STEPS, block_size=256, init_values={"std": 0.0}, tie_embeddings=False)
    model = HuginnForCausalLM.from_pretrained(saved).eval()
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    return saved, model


@pytest.fixture(scope="module")
def served_tp(padded):
    """Under "latent-diff" with exit_min_steps, the padded, untied checkpoint
    on two tensor-parallel ranks (one per CPU)."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor_parallel_size=2 needs two CPUs")
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        with vllm_tiny.serving(padded[0], tensor_parallel_size=2, enable_prefix_caching=False,
                               hf_overrides={**LATENT, "exit_min_steps": TP_MIN_STEPS}) as (llm, greedy):
            yield llm, greedy
    finally:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind if bind is not None else "1"


@torch.no_grad()
def test_two_ranks_equal_ours(served_tp, padded):
    """The heads, MLP halves and vocabulary split over two ranks, the exits
    agreed across them, no exit before step exit_min_steps + 1: the same
    tokens and logprobs as ours with that min_steps (whose exits differ from
    min_steps 0's here), our logits cut to the real vocabulary as vLLM's
    sampler cuts the padded head's (the untied head loaded from its own rows)."""
    llm, got = served_tp
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    ours = padded[1]
    forward = _Forward(ours, "latent-diff", TP_MIN_STEPS, vocab=ours.config.vocab_size)
    exits, moved = set(), False
    for prompt, (tokens, logprobs, prompt_logprobs) in zip(vllm_tiny.PROMPTS, got):
        ids = torch.tensor([prompt + tokens])
        out = forward(ids)
        assert out.logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == tokens
        assert vllm_tiny.logprob_gaps(forward, "latent-diff", prompt, tokens, logprobs, prompt_logprobs) < 1e-4
        exits |= set(out.steps[0].tolist())
        moved |= not torch.equal(out.steps, _Forward(ours, "latent-diff")(ids).steps)
    assert exits == {3, STEPS} and moved, exits


def test_a_longer_context_than_the_rotary_table_refused(folder):
    """block_size (256 here) bounds the positions: vLLM reads it as the
    longest sequence and refuses a longer max_model_len at start."""
    from vllm import LLM

    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3,
            max_model_len=512, enforce_eager=True)


def test_pipeline_stages_refused(folder):
    """The loops' copies share their weights with loop 1's layers: one pipeline stage only."""
    with pytest.raises(ValueError, match="runs Huginn on one pipeline stage"):
        vllm_tiny.engine(folder, pipeline_parallel_size=2)
