"""LoopedCausalLM against the independent dense oracle over transformers'
own layers (tests/hf/oracle.py): values, exact steps, ponder cost and every
parameter's gradient, float64, Llama with grouped-query attention and Qwen3
(q/k norms), left and right padding, blocks with and without prelude, coda
and step norm; on the step-by-step path ("reference") and on the pool path
("auto": fixed key/value pools, layers/token_ponder.py), which must be the path
that ran."""
import pytest
import torch

import act_kernels.layers.transformer as transformer

from hf.oracle import dense_looped_lm
from tiny import MODELS, batch, vary

pytest.importorskip("transformers")
from act_kernels.hf import LoopedCausalLM  # noqa: E402


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


CASES = [((1, 3), False), ((0, 2), False), ((2, 4), True), ((1, 4), True), ((0, 4), False)]


@pytest.fixture
def paths(monkeypatch):
    """Records which of the two paths each stack call took: "pool" (the
    ponder and plain stacks on fixed pools) or "steps" (step by step)."""
    seen = []
    for name, label in (("pool_ponder", "pool"), ("pool_stack", "pool"), ("SegmentStep", "steps")):
        original = getattr(transformer, name)

        def record(*args, original=original, label=label, **kwargs):
            seen.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(transformer, name, record)
    return seen


def check_against_oracle(model, block, step_norm, backend, ids, mask, bias=None):
    """Runs the looped model and the oracle on ids, mask (float64); checks
    steps, logits, cost and every gradient. Returns the steps."""
    looped = vary(LoopedCausalLM(model, block, max_steps=5, eps=0.05, step_norm=step_norm, backend=backend),
                  seed=4, scale=2.0)
    if bias is not None:
        with torch.no_grad():
            looped.halting.bias.fill_(bias)
    weights = torch.randn(ids.shape + (model.config.vocab_size,), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(6))

    out = looped(ids, mask)
    ((out.logits * weights).sum() + 0.3 * out.ponder_cost.sum()).backward()
    ours = grads(looped)
    looped.zero_grad()

    logits, cost, steps = dense_looped_lm(model, block, looped.halting, max_steps=5, eps=0.05, step_norm=step_norm,
                                          input_ids=ids, attention_mask=mask, attn="sdpa")
    ((logits * weights).sum() + 0.3 * cost.sum()).backward()
    theirs = grads(looped)

    assert torch.equal(out.steps, steps)
    torch.testing.assert_close(out.logits, logits, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out.ponder_cost, cost.to(out.ponder_cost.dtype), atol=1e-10, rtol=1e-8)
    assert ours.keys() == theirs.keys() and len(ours) == len(list(looped.parameters()))
    for name in ours:
        # transformers' RMSNorm computes in float32 even in a float64 model, so a gradient that
        # passes through a norm carries float32 rounding of sums taken in another order: 1e-6 of
        # the gradient's scale (measured: at most 5e-8; the block's output side agrees to 1e-15)
        scale = float(theirs[name].abs().max())
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6 * scale, rtol=0, msg=name)
    return steps


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("block, step_norm", CASES)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("backend", ["reference", "auto"], ids=["steps", "pool"])
def test_values_steps_cost_and_gradients_match_the_oracle(arch, block, step_norm, left, backend, paths):
    model = MODELS[arch](seed=3, initializer_range=0.1)
    ids, mask = batch(seed=5, rows=4, length=10, left=left)
    steps = check_against_oracle(model, block, step_norm, backend, ids, mask)
    real = mask.bool()
    assert steps[real].min() < steps[real].max()          # real pondering: steps differ between tokens
    assert set(paths) == {"pool" if backend == "auto" else "steps"}


@pytest.mark.parametrize("bias, expect", [(40.0, 1), (-40.0, 5)], ids=["all_halt_at_1", "none_before_max"])
@pytest.mark.parametrize("rows, length", [(1, 7), (3, 9)], ids=["one_row", "three_rows"])
def test_pool_path_at_the_halting_extremes(bias, expect, rows, length, paths):
    """Every token halting at step 1 (no halted rows to project later), and
    none before max_steps (every step writes every pool whole)."""
    model = MODELS["llama"](seed=3, initializer_range=0.1)
    ids, mask = batch(seed=8, rows=rows, length=length, left=True)
    steps = check_against_oracle(model, (1, 3), False, "auto", ids, mask, bias=bias)
    assert bool((steps[mask.bool()] == expect).all())
    assert set(paths) == {"pool"}


def test_attention_dropout_in_training_takes_the_step_by_step_path(paths):
    """The pool path has no attention dropout: a model whose attention
    drops probabilities trains step by step (in eval the pool path serves)."""
    model = MODELS["llama"](seed=3, initializer_range=0.1)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    looped = LoopedCausalLM(model, (1, 3), max_steps=3)
    ids, mask = batch(seed=9, rows=2, length=6)
    looped.train()
    looped(ids, mask)
    assert paths and set(paths) == {"steps"}
    paths.clear()
    looped.eval()
    looped(ids, mask)
    assert set(paths) == {"pool"}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generation_matches_the_oracle_forward(arch):
    """Greedy generation over the cache, its steps and its choices, against
    the oracle's parallel forward on the completed sequences."""
    model = MODELS[arch](seed=7, initializer_range=0.1)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=5, eps=0.05), seed=8, scale=2.0)
    ids, mask = batch(seed=9, rows=3, length=8, left=True)
    new = 6
    gen = looped.generate(ids, mask, max_new_tokens=new, max_batch_size=2, return_dict_in_generate=True)
    full = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits, _, steps = dense_looped_lm(model, (1, 3), looped.halting, max_steps=5, eps=0.05, step_norm=False,
                                           input_ids=gen.sequences, attention_mask=full, attn="sdpa")
    assert torch.equal(gen.steps, steps)
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), gen.sequences[:, ids.shape[1]:])


def test_pool_path_with_torch_attention_keeps_the_kv_heads(monkeypatch, paths):
    """The pool path where it runs the reference through torch's own
    scaled_dot_product_attention rather than its CPU flash kernels (what a
    CUDA float64 call, or one without Triton, takes): the grouped-query
    pools keep their Hkv heads there too (enable_gqa), forward and backward."""
    import act_kernels.layers.transformer as engine

    original = engine.key_table
    monkeypatch.setattr(engine, "key_table", lambda *a, **k: original(*a, **k)._replace(cpu_flash=False))
    model = MODELS["llama"](seed=3, initializer_range=0.1)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids, mask = batch(seed=5, rows=3, length=9, left=True)
    check_against_oracle(model, (1, 3), False, "auto", ids, mask)
    assert set(paths) == {"pool"}
