"""act_kernels.hf.HuginnForCausalLM against the independent float64 oracle
(tests/huginn/oracle.py), on tiny checkpoints written in Huginn's published
format by tests/huginn/checkpoints.py: loading with no remote code, exactness
at a fixed number of steps, Huginn's exit criteria per token in generate
(both schedulers, equal) and forward, the initial state's rule, saving
back."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
import act_kernels.hf  # noqa: E402,F401  (registers model_type "huginn_raven")
from act_kernels.hf import HuginnConfig, HuginnForCausalLM  # noqa: E402

from .checkpoints import write_huginn_checkpoint  # noqa: E402
from .oracle import _Run, exit_steps, greedy_decode, huginn_logits, huginn_step_logits  # noqa: E402
from looped_lm import decoded_token_by_token, padded_batch  # noqa: E402

pytestmark = pytest.mark.xdist_group("huginn")
STEPS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huginn64")
    config, params = write_huginn_checkpoint(folder, seed=0, dtype=torch.float64, init_values={"std": 0.0},
                                             mean_recurrence=STEPS)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    return folder, config, params, model



def test_loads_from_the_published_format_without_remote_code(checkpoint, tmp_path):
    folder, config, params, model = checkpoint
    assert type(model) is HuginnForCausalLM and config["auto_map"]
    assert set(model.state_dict()) == set(params)
    for name, tensor in params.items():
        if name != "freqs_cis":      # a float32 table, converted with the model's dtype
            assert torch.equal(model.state_dict()[name], tensor), name
    _, written = write_huginn_checkpoint(tmp_path / "bf16", seed=1, dtype=torch.bfloat16, shards=3)
    loaded = HuginnForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.transformer.core_block[0].attn.Wqkv.weight, written["transformer.core_block.0.attn.Wqkv.weight"])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight            # tied, as published
    model.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float64)
    assert all(torch.equal(again.state_dict()[n], model.state_dict()[n]) for n in params)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("num_steps", [1, 4, None])
def test_fixed_steps_equal_the_oracle(checkpoint, left, num_steps):
    _, config, params, model = checkpoint
    ids, mask = padded_batch(left)
    real = mask.bool()
    want, _ = huginn_logits(params, config, ids, mask, num_steps=num_steps)
    with torch.no_grad():
        out = model(ids, mask, num_steps=num_steps)
    torch.testing.assert_close(out.logits[real], want[real], rtol=0, atol=1e-10)
    assert bool((out.steps[real] == (num_steps or STEPS)).all()) and bool((out.logits[~real] == 0).all())


@pytest.mark.parametrize("schedule", ["depthwise", "synchronous"])
def test_greedy_generation_equals_the_oracle(checkpoint, schedule):
    _, config, params, model = checkpoint
    ids, mask = padded_batch(True)
    out = model.generate(ids, mask, max_new_tokens=4, do_sample=False, schedule=schedule, num_steps=3,
                         pad_token_id=0, eos_token_id=None)
    for b in range(3):
        prompt = ids[b][mask[b].bool()]
        assert torch.equal(out[b, ids.shape[1]:], greedy_decode(params, config, prompt, 4, num_steps=3)[-4:]), b


@pytest.mark.parametrize("criterion,threshold,min_steps", [("kl", 5e-2, 0), ("kl", 5e-2, 2), ("entropy-diff", 5e-2, 0),
                                                           ("latent-diff", 0.3, 0), ("argmax-stability", 2, 1)])
def test_new_tokens_exit_by_the_published_criteria(checkpoint, criterion, threshold, min_steps):
    """The prompt runs num_steps; the first new token enters the recurrence
    and exits on its own: its exit step is the one the published evaluator's
    loop (the oracle's exit_steps) gives over its per-step logits as the
    release decodes them: at step n the token reads the prompt's core at step
    n, and the coda reads the prompt's coda at full depth (the release keeps
    the coda's cache at fixed slots); the next token is chosen from the
    logits at its exit step."""
    _, config, params, model = checkpoint
    ids, mask = padded_batch(True)
    out = model.generate(ids, mask, max_new_tokens=2, do_sample=False, exit=criterion, threshold=threshold,
                         min_steps=min_steps, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    length, exits = ids.shape[1], []
    for b in range(3):
        seq = torch.cat([ids[b][mask[b].bool()], out.sequences[b, length:length + 1]])
        run = _Run(params, config, seq[None], None)
        states = torch.stack(run.states(STEPS, None))                   # (N + 1, 1, L, D)
        logits = torch.stack([run.logits(torch.cat([states[-1, :, :-1], s[:, -1:]], 1)) for s in states])
        want = exit_steps(logits[:, 0, -1][:, None], states[:, 0, -1][:, None], criterion, threshold, min_steps)
        assert int(out.steps[b, length]) == int(want[0]), b
        assert int(out.sequences[b, length + 1]) == int(logits[int(want[0]), 0, -1].argmax()), b
        exits.append(int(want[0]))
    assert bool((out.steps[:, :length][mask.bool()] == STEPS).all())       # the prompts ran num_steps
    return exits


def test_the_criteria_do_exit_early(checkpoint):
    """The cases above are not all at num_steps: the criteria cut work here."""
    seen = set()
    for case in [("kl", 5e-2, 0), ("latent-diff", 0.3, 0), ("entropy-diff", 5e-2, 0)]:
        seen.update(test_new_tokens_exit_by_the_published_criteria(checkpoint, *case))
    assert min(seen) < STEPS


def test_latent_diff_in_forward_exits_per_token(checkpoint):
    """A row's first token reads no other: its exit is the oracle's."""
    _, config, params, model = checkpoint
    ids, mask = padded_batch(True)
    with torch.no_grad():
        out = model(ids, mask, exit="latent-diff", threshold=0.3)
    first = mask.long().argmax(1)
    for b in range(3):
        token = ids[b, first[b]].view(1, 1)
        logits, states = huginn_step_logits(params, config, token, num_steps=STEPS)
        want = exit_steps(logits[:, 0, -1][:, None], states[:, 0, -1][:, None], "latent-diff", 0.3, 0)
        assert int(out.steps[b, first[b]]) == int(want[0])
        torch.testing.assert_close(out.logits[b, first[b]], logits[int(want[0]), 0, 0], rtol=0, atol=1e-10)
    assert int(out.ponder_cost[mask.bool()].sum()) == int(out.steps[mask.bool()].sum())


def test_the_initial_state_follows_the_published_rule(tmp_path):
    write_huginn_checkpoint(tmp_path, seed=2, dtype=torch.float64, init_values={"std": 0.5})
    model = HuginnForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    draws = model._enter_block(torch.zeros(4000, 64, dtype=torch.float64))[:, :64]
    scaled = draws / 64 ** 0.5
    # truncation at ±3σ keeps 98.7 % of σ
    assert float(scaled.abs().max()) <= 1.5 + 1e-6 and abs(float(scaled.std()) - 0.5 * 0.9866) < 0.01
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(ids, generator=torch.Generator().manual_seed(5)).logits
        b = model(ids, generator=torch.Generator().manual_seed(5)).logits
        c = model(ids, generator=torch.Generator().manual_seed(6)).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    zero = HuginnConfig(n_embd=64, n_heads=4, state_init="zero")
    assert HuginnForCausalLM(zero).initial_state(3, torch.zeros(1)).abs().sum() == 0


def test_settings_we_do_not_compute_are_refused():
    with pytest.raises(ValueError, match="unknown config keys.*'foo'"):
        HuginnConfig(foo=1)
    with pytest.raises(ValueError, match="grouped-query"):
        HuginnConfig(n_embd=64, n_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="test_time_noise"):
        HuginnConfig(test_time_noise=0.1)
    with pytest.raises(ValueError, match="block_class_name"):
        HuginnConfig(block_class_name="TransformerPreNormBlock")


CODA_CRITERIA = [("kl", 5e-2, 0), ("kl", 5e-2, 2), ("entropy-diff", 5e-2, 0), ("argmax-stability", 2, 1)]


@pytest.mark.parametrize("criterion,threshold,min_steps", CODA_CRITERIA + [("latent-diff", 0.5, 0)])
def test_synchronous_generation_equals_depthwise(checkpoint, criterion, threshold, min_steps):
    """Every criterion, under both schedulers: the prompts at num_steps, each
    new token exiting on its own; the same tokens, steps and scores, greedy
    and sampled, with continuous batching (a prompt entering beside decoded
    tokens)."""
    model = checkpoint[3]
    ids, mask = padded_batch(True)
    kw = dict(max_new_tokens=4, exit=criterion, threshold=threshold, min_steps=min_steps, pad_token_id=0,
              eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    spread = set()
    for sampling in (dict(do_sample=False), dict(do_sample=True, temperature=2.0)):
        draws = (lambda: dict(generator=torch.Generator().manual_seed(3))) if sampling["do_sample"] else dict
        depthwise = model.generate(ids, mask, **kw, **sampling, **draws())
        for more in (dict(), dict(max_batch_size=2)):
            synchronous = model.generate(ids, mask, schedule="synchronous", **kw, **sampling, **draws(), **more)
            assert torch.equal(synchronous.sequences, depthwise.sequences)
            assert torch.equal(synchronous.steps, depthwise.steps)
            for a, b in zip(synchronous.scores, depthwise.scores):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        new = depthwise.steps[:, ids.shape[1]:]
        spread |= set(new[new > 0].tolist())
    assert len(spread) > 1


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("criterion,threshold,min_steps", CODA_CRITERIA)
def test_criteria_that_read_the_coda_in_forward(checkpoint, criterion, threshold, min_steps, left):
    """forward feeds every token as a decoded one: equal to feeding each
    row token by token through the cache, and a row's first token (it reads
    no other) exits where the oracle's evaluator loop says."""
    _, config, params, model = checkpoint
    ids, mask = padded_batch(left)
    keep = mask.bool()
    with torch.no_grad():
        out = model(ids, mask, exit=criterion, threshold=threshold, min_steps=min_steps)
    rule = model._exit_rule(criterion, threshold, min_steps, False)
    logits, steps = decoded_token_by_token(model, ids, mask, rule)
    assert torch.equal(out.steps, steps) and bool((out.steps[~keep] == 0).all())
    torch.testing.assert_close(out.logits[keep], logits[keep], atol=1e-10, rtol=0)
    assert torch.equal(out.ponder_cost, out.steps.to(torch.float32))
    first = keep.long().argmax(1)
    for b in range(3):
        token = ids[b, first[b]].view(1, 1)
        want_logits, states = huginn_step_logits(params, config, token, num_steps=STEPS)
        want = exit_steps(want_logits[:, 0, -1][:, None], states[:, 0, -1][:, None], criterion, threshold, min_steps)
        assert int(out.steps[b, first[b]]) == int(want[0]), b
        torch.testing.assert_close(out.logits[b, first[b]], want_logits[int(want[0]), 0, 0], rtol=0, atol=1e-10)
    assert len(set(out.steps[keep].tolist())) > 1
