"""The kl exit rule (it reads the coda at every step, design §16) on every
path of LoopedCausalLM, float64: synchronous generate equals depth-wise
generate (tokens, steps, scores; greedy and sampling, min_steps, every_loop,
continuous batching); forward equals feeding each row token by token through
the cache as decoded tokens (left and right padding) and the independent
token-by-token oracle (tests/hf/exit_oracle.py) with no prompt."""
import pytest
import torch

from hf.exit_oracle import kl_decode_oracle
from looped_lm import decoded_token_by_token
from tiny import batch, llama, qwen3, vary

transformers = pytest.importorskip("transformers")
from act_kernels.hf import LoopedCausalLM  # noqa: E402

CASES = [(llama, (1, 3), False), (qwen3, (1, 3), False)]


def make(build, block, step_norm, seed=53):
    looped = LoopedCausalLM(build(seed=seed), block, max_steps=4, step_norm=step_norm)
    return vary(looped, seed=seed, scale=3.0).eval()


def generate(looped, ids, mask, **kw):
    return looped.generate(ids, mask, max_new_tokens=5, exit="kl", return_dict_in_generate=True, output_scores=True,
                           pad_token_id=0, eos_token_id=None, **kw)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.steps, b.steps)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("build,block,step_norm", CASES)
@pytest.mark.parametrize("threshold,min_steps,prefill,every_loop", [(1e-3, 1, 2, False), (3e-4, 3, 4, False),
                                                                     (3e-4, 1, 1, False), (1e-3, 1, 3, True)])
def test_synchronous_generation_equals_depthwise(build, block, step_norm, threshold, min_steps, prefill,
                                                 every_loop):
    looped = make(build, block, step_norm)
    ids, mask = batch(seed=54, rows=3, length=7, left=True)
    rule = dict(threshold=threshold, min_steps=min_steps, prefill_steps=prefill, every_loop=every_loop)
    spread = set()
    for sampling in (dict(do_sample=False), dict(do_sample=True, temperature=1.5)):
        draws = (lambda: dict(generator=torch.Generator().manual_seed(7))) if sampling["do_sample"] else dict
        depthwise = generate(looped, ids, mask, **rule, **sampling, **draws())
        for kw in (dict(), dict(max_batch_size=2)):
            synchronous = generate(looped, ids, mask, schedule="synchronous", **rule, **sampling, **draws(), **kw)
            assert_same_generation(synchronous, depthwise)
        new = depthwise.steps[:, ids.shape[1]:]
        spread |= set(new[new > 0].tolist())
        assert bool((depthwise.steps[:, :ids.shape[1]][mask.bool()] == prefill).all())   # prompts: prefill_steps
    assert len(spread) > 1       # the rule splits the new tokens


def token_by_token(looped, ids, mask, **rule):
    """Each row alone, its real tokens fed one at a time as decoded tokens."""
    exit_rule = looped._exit_rule("kl", rule["threshold"], rule.get("min_steps", 1), rule.get("every_loop", False))
    return decoded_token_by_token(looped, ids, mask, exit_rule)


@pytest.mark.parametrize("build,block,step_norm", CASES)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("every_loop", [False, True])
def test_forward_equals_token_by_token_extend(build, block, step_norm, left, every_loop):
    looped = make(build, block, step_norm)
    ids, mask = batch(seed=55, rows=3, length=8, left=left)
    keep = mask.bool()
    rule = dict(threshold=1e-3, min_steps=1, every_loop=every_loop)
    with torch.no_grad():
        out = looped(ids, mask, exit="kl", **rule)
    logits, steps = token_by_token(looped, ids, mask, **rule)
    assert torch.equal(out.steps, steps)
    torch.testing.assert_close(out.logits[keep], logits[keep], atol=1e-10, rtol=0)
    assert bool((out.logits[~keep] == 0).all()) and bool((out.steps[~keep] == 0).all())
    ran = 4 if every_loop else out.steps
    assert torch.equal(out.ponder_cost, (ran * keep).to(torch.float32))
    assert len(set(out.steps[keep].tolist())) > 1


@pytest.mark.parametrize("build,block,step_norm", CASES)
def test_forward_equals_the_token_by_token_oracle(build, block, step_norm):
    """Every token decoded, none a prompt: the oracle with prompt_length 0."""
    looped = make(build, block, step_norm)
    ids, mask = batch(seed=56, rows=2, length=7, left=True)
    for threshold, min_steps in ((1e-3, 1), (3e-4, 3)):
        with torch.no_grad():
            out = looped(ids, mask, exit="kl", threshold=threshold, min_steps=min_steps)
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            logits, steps = kl_decode_oracle(looped.model, block, threshold=threshold, min_steps=min_steps,
                                             max_steps=looped.max_steps, prefill_steps=1, step_norm=step_norm,
                                             sequence=ids[row][keep], prompt_length=0)
            assert torch.equal(out.steps[row][keep], steps)
            torch.testing.assert_close(out.logits[row][keep], logits, atol=1e-10, rtol=0)


def test_extend_refuses_decoding_chunks_longer_than_one_token():
    looped = make(llama, (1, 3), False)
    rule = looped._exit_rule("kl", 1e-3, 1, False)
    caches = looped.new_cache(1)
    with pytest.raises(ValueError, match="one token per sequence"):
        looped.extend(caches, torch.tensor([1, 2]), [0, 2], [0], exit=rule, decode=True)
    with pytest.raises(TypeError, match="decode must be a bool"):
        looped.extend(caches, torch.tensor([1]), [0, 1], [0], exit=rule, decode=1)
