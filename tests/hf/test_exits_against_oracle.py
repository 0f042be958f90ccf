"""Exit rules and the per-token PonderNet objective of LoopedCausalLM against
the independent dense oracles (tests/hf/exit_oracle.py,
tests/hf/pondernet_oracle.py), float64: values to 1e-10, steps exactly, for
Llama (GQA) and Qwen3, left and right padding, with and without step_norm;
the every-loop reference mode against the oracle that computes every loop
and picks afterwards; the kl rule in decoding against a token-by-token
oracle; the objective's loss and every parameter's gradient against the
padded oracle."""
import pytest
import torch

from hf.exit_oracle import exit_oracle, kl_decode_oracle, pick_after_every_loop
from hf.pondernet_oracle import pondernet_oracle
from tiny import batch, llama, qwen3, vary

transformers = pytest.importorskip("transformers")
from act_kernels.hf import LoopedCausalLM  # noqa: E402

CASES = [(llama, (1, 3), False, True), (qwen3, (1, 3), True, False), (llama, (0, 2), True, True)]
RULES = [("gate", 0.7, 1), ("gate", 0.5, 2), ("latent", "median", 1), ("latent", "median", 3), ("fixed", None, 1)]


def make(build, block, step_norm, seed, max_steps=4, scale=3.0, bias=0.0):
    model = build(seed=seed)
    looped = LoopedCausalLM(model, block, max_steps=max_steps, step_norm=step_norm)
    return vary(looped, seed=seed, scale=scale, bias=bias).eval()


def median_latent_threshold(looped, block, step_norm, ids, mask, min_steps):
    """A latent threshold between two tokens' ratios at the first step they may
    exit (from the oracle with nobody exiting before it): it splits the tokens."""
    with torch.no_grad():
        _, _, record = exit_oracle(looped.model, block, looped.halting, rule="latent", threshold=1e-300,
                                   min_steps=min_steps, max_steps=looped.max_steps, step_norm=step_norm,
                                   input_ids=ids, attention_mask=mask, debug=True)
    ratios = record["trace"][max(2, min_steps) - 1][mask.bool()].sort().values
    middle = ratios.numel() // 2
    return float((ratios[middle - 1] + ratios[middle]) / 2)


@pytest.mark.parametrize("exit,threshold,min_steps", RULES)
@pytest.mark.parametrize("build,block,step_norm,left", CASES)
def test_exit_rules_against_the_dense_oracle(build, block, step_norm, left, exit, threshold, min_steps):
    looped = make(build, block, step_norm, seed=51)
    ids, mask = batch(seed=52, rows=3, length=9, left=left)
    keep = mask.bool()
    if threshold == "median":
        threshold = median_latent_threshold(looped, block, step_norm, ids, mask, min_steps)
    for every_loop, oracle in ((False, exit_oracle), (True, pick_after_every_loop)):
        with torch.no_grad():
            got = looped(ids, mask, exit=exit, threshold=threshold, min_steps=min_steps, every_loop=every_loop)
            want, steps = oracle(looped.model, block, looped.halting, rule=exit, threshold=threshold,
                                 min_steps=min_steps, max_steps=looped.max_steps, step_norm=step_norm,
                                 input_ids=ids, attention_mask=mask)
        assert torch.equal(got.steps, steps), (every_loop, got.steps, steps)
        torch.testing.assert_close(got.logits[keep], want[keep], atol=1e-10, rtol=0)
        if exit != "fixed" and not every_loop and (min_steps == 1 or exit == "latent"):
            assert len(set(steps[keep].tolist())) > 1          # the thresholds split the tokens


@pytest.mark.parametrize("build,block,step_norm", [(llama, (1, 3), False), (qwen3, (1, 2), True)])
def test_kl_rule_against_the_token_by_token_oracle(build, block, step_norm):
    looped = make(build, block, step_norm, seed=53)
    ids, mask = batch(seed=54, rows=2, length=7, left=True)
    spread = set()
    for threshold, min_steps, prefill in ((1e-3, 1, 2), (1e-2, 3, 4), (1e-4, 1, 1)):
        gen = looped.generate(ids, mask, max_new_tokens=5, exit="kl", threshold=threshold, min_steps=min_steps,
                              prefill_steps=prefill, max_batch_size=2, return_dict_in_generate=True)
        for row in range(ids.shape[0]):
            keep = torch.cat([mask[row].bool(), torch.ones(5, dtype=torch.bool)])
            sequence = gen.sequences[row][keep]
            prompt = int(mask[row].sum())
            logits, steps = kl_decode_oracle(looped.model, block, threshold=threshold, min_steps=min_steps,
                                             max_steps=looped.max_steps, prefill_steps=prefill,
                                             step_norm=step_norm, sequence=sequence, prompt_length=prompt)
            assert torch.equal(gen.steps[row][keep], steps), (threshold, row, gen.steps[row][keep], steps)
            assert torch.equal(logits[prompt - 1:-1].argmax(-1), sequence[prompt:])
            spread |= set(steps[prompt:].tolist())
    assert len(spread) > 1


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("build,step_norm,left", [(llama, False, True), (qwen3, True, False)])
def test_pondernet_objective_against_the_padded_oracle(build, step_norm, left, entropy):
    looped = make(build, (2, 4), step_norm, seed=55, max_steps=5, scale=2.0, bias=0.5)
    ids, mask = batch(seed=56, rows=3, length=8, left=left)
    labels = ids.clone()
    labels[1, 3] = -100
    params = dict(looped.named_parameters())
    out = looped.pondernet(ids, mask, labels, beta=0.05, prior=0.3, entropy=entropy)
    ours = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    loss, steps = pondernet_oracle(looped.model, 2, looped.halting, max_steps=5, eps=looped.eps, prior=0.3,
                                   beta=0.05, entropy=entropy, step_norm=step_norm, input_ids=ids,
                                   attention_mask=mask, labels=labels.masked_fill(~mask.bool(), -100), attn="sdpa")
    theirs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert torch.equal(out.steps, steps)
    assert len(set(steps[mask.bool()].tolist())) > 1
    torch.testing.assert_close(out.loss, loss, atol=1e-10, rtol=0)
    for name, a, b in zip(params, ours, theirs):
        if b is None:
            assert a is None or not a.abs().max(), name
            continue
        scale = b.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(a / scale, b / scale, atol=1e-6, rtol=0, msg=name)
