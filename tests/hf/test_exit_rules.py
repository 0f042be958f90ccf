"""Exit rules at inference (design §16) on LoopedCausalLM: generate with a
rule equals the forward's argmax with the same rule and equal steps (both
schedulers, left padding, continuous batching); "fixed" is transformers' own
model with the block unrolled; the every-loop reference mode; "kl" in
decoding (its other paths: test_coda_exit_paths.py) and, on
ACTLanguageModel, the kl forward against an independent token-by-token
oracle; bad input refused before anything runs."""
import copy

import pytest
import torch

from looped_lm import generate, padded
from tiny import batch, llama, positions, qwen3, vary

transformers = pytest.importorskip("transformers")
from act_kernels.hf import LoopedCausalLM  # noqa: E402

RULES = [("gate", 0.6), ("latent", 0.25), ("fixed", None)]


def looped_model(make=llama, seed=31, block=(1, 3), max_steps=4):
    return vary(LoopedCausalLM(make(seed=seed), block, max_steps=max_steps), seed=seed, scale=3.0).eval()


def unrolled(model, block, times):
    """transformers' own model with layers [start, stop) repeated `times` times (deep copies, own layer_idx)."""
    model = copy.deepcopy(model)
    layers = list(model.model.layers)
    start, stop = block
    new = layers[:start] + [copy.deepcopy(layer) for _ in range(times) for layer in layers[start:stop]] + layers[stop:]
    for i, layer in enumerate(new):
        layer.self_attn.layer_idx = i
    model.model.layers = torch.nn.ModuleList(new)
    model.config.num_hidden_layers = len(new)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[0]] * len(new)
    return model


def act_lm_kl_oracle(model, sequence, *, threshold, min_steps=1):
    """An ACTLanguageModel's kl rule on one sequence (1-D ids) with every
    token decoded (none a prompt), evaluated token by token with torch's own
    layers (tests/dense_encoder.py: a layer with the keys and values given),
    sharing no code with act_kernels. The prelude runs once, causal. Token i
    at step n applies the block's layers to its own row; their attention
    reads, for every earlier token j (final, exited at N_j), at the first
    layer s_j^min(n-1, N_j) and at layer k > 1 j's input to layer k at its
    step min(n, N_j), then i's own input (design §9, §14). At each step the
    coda (causal, over the earlier tokens' exit states and s_i^n), the final
    norm and the head give P_n; i exits at the first n >= max(2, min_steps)
    with KL(P_n || P_{n-1}) < threshold, else at max_steps. Returns (logits
    (L, V) at each token's exit, steps (L,))."""
    from dense_encoder import _layer_with_keys

    def layers_of(stack):
        if stack is None:
            return []
        module = stack.layer
        assert getattr(module, "norm", None) is None       # no norm closes a stack's layers
        return list(module.layers) if isinstance(module, torch.nn.TransformerEncoder) else [module]

    def causal(rows, layers):
        """The layers on rows (i + 1, D) of tokens 0..i, causal: every row."""
        future = torch.ones(rows.shape[0], rows.shape[0], dtype=torch.bool).triu(1)
        for layer in layers:
            rows = _layer_with_keys(layer, rows[None], rows[None], future, None)[0]
        return rows

    def own_row(layer, earlier, y):
        """`layer` on token i's row y, its attention over the earlier rows and y."""
        return _layer_with_keys(layer, y[None, None], torch.stack(earlier + [y])[None], None, None)[0, 0]

    prelude, block, coda = layers_of(model.prelude), layers_of(model.block), layers_of(model.coda)
    length, most = sequence.shape[0], model.max_steps
    x0 = causal(model.embed(sequence) + model.position(torch.arange(length)), prelude)
    states, inputs, steps, finals, logits = [], [], [], [], []   # per token: s^0..s^N; inputs[j][k][n - 1]
    for i in range(length):
        mine, my_inputs, previous = [x0[i]], [[] for _ in block], None
        for n in range(1, most + 1):
            y = mine[-1]
            for k, layer in enumerate(block):
                if k == 0:
                    earlier = [states[j][min(n - 1, steps[j])] for j in range(i)]
                else:
                    my_inputs[k].append(y)
                    earlier = [inputs[j][k][min(n, steps[j]) - 1] for j in range(i)]
                y = own_row(layer, earlier, y)
            mine.append(y)
            out = model.head(model.norm(causal(torch.stack(finals + [y]), coda)[-1]))
            logp = torch.log_softmax(out.double(), -1)
            quiet = previous is not None and float((logp.exp() * (logp - previous)).sum()) < threshold
            previous = logp
            if n == most or (n >= max(2, min_steps) and quiet):
                break
        states.append(mine)
        inputs.append(my_inputs)
        steps.append(n)
        finals.append(mine[-1])
        logits.append(out)
    return torch.stack(logits), torch.tensor(steps)


def check_generate_against_forward(looped, ids, mask, new, **kw):
    gen = looped.generate(ids, mask, max_new_tokens=new, **kw, return_dict_in_generate=True)
    rule = {k: v for k, v in kw.items() if k in ("exit", "threshold", "min_steps", "every_loop")}
    full = torch.cat([mask, torch.ones(mask.shape[0], gen.sequences.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        out = looped(gen.sequences, full, **rule)
    assert torch.equal(out.steps, gen.steps)
    assert torch.equal(out.logits[:, ids.shape[1] - 1:-1].argmax(-1), gen.sequences[:, ids.shape[1]:])
    return gen, out


@pytest.mark.parametrize("exit,threshold", RULES)
@pytest.mark.parametrize("make", [llama, qwen3])
def test_generate_with_a_rule_equals_the_forward_with_it(make, exit, threshold):
    looped = looped_model(make)
    ids, mask = batch(seed=32, rows=3, left=True)
    sync, _ = check_generate_against_forward(looped, ids, mask, 5, exit=exit, threshold=threshold,
                                             schedule="synchronous")
    for kw in (dict(), dict(max_batch_size=2), dict(max_batch_size=2, fixed_rows=True)):
        gen, out = check_generate_against_forward(looped, ids, mask, 5, exit=exit, threshold=threshold, **kw)
        assert torch.equal(gen.sequences, sync.sequences) and torch.equal(gen.steps, sync.steps)
    real = out.steps[torch.cat([mask, torch.ones(3, 5, dtype=mask.dtype)], 1).bool()]
    if exit == "fixed":
        assert bool((real == looped.max_steps).all())
    else:
        assert int(real.min()) < int(real.max())       # the rule gives tokens different depths


def test_fixed_is_transformers_model_with_the_block_unrolled():
    for make, block in ((llama, (1, 3)), (qwen3, (2, 4))):
        looped = looped_model(make, block=block, max_steps=3)
        ids, mask = batch(seed=33, rows=3, left=True)
        deep = unrolled(looped.model, block, 3)
        with torch.no_grad():
            want = deep(ids, attention_mask=mask, position_ids=positions(mask)).logits
            got = looped(ids, mask, exit="fixed")
        keep = mask.bool()
        torch.testing.assert_close(got.logits[keep], want[keep], atol=1e-10, rtol=0)
        assert bool((got.steps[keep] == 3).all())
        # and generation: transformers' own greedy generate of the unrolled model
        ids1 = ids[2:3]
        theirs = deep.generate(ids1, attention_mask=torch.ones_like(ids1), max_new_tokens=4, do_sample=False)
        ours = looped.generate(ids1, None, max_new_tokens=4, exit="fixed", return_dict_in_generate=True)
        assert torch.equal(ours.sequences, theirs)


def test_min_steps_and_extreme_thresholds():
    looped = looped_model(max_steps=5)
    ids, mask = batch(seed=34, rows=2, left=False)
    keep = mask.bool()
    with torch.no_grad():
        early = looped(ids, mask, exit="gate", threshold=1e-9, min_steps=3)
        assert bool((early.steps[keep] == 3).all())          # any mass meets it: out at min_steps
        late = looped(ids, mask, exit="latent", threshold=1e-12)
        assert bool((late.steps[keep] == 5).all())           # nothing converges that far: max_steps
        fixed = looped(ids, mask, exit="fixed")
        for exit, threshold in (("gate", 0.5), ("latent", 0.3)):
            same = looped(ids, mask, exit=exit, threshold=threshold, min_steps=5)
            torch.testing.assert_close(same.logits, fixed.logits, atol=0, rtol=0)
        latent = looped(ids, mask, exit="latent", threshold=1e9)
        assert bool((latent.steps[keep] == 2).all())         # latent compares two states: never before step 2


def test_every_loop_picks_the_same_kind_of_exit_without_freezing():
    looped = looped_model(max_steps=4)
    ids, mask = batch(seed=35, rows=3, left=True)
    keep = mask.bool()
    with torch.no_grad():
        fixed = looped(ids, mask, exit="fixed")
        all_fixed = looped(ids, mask, exit="fixed", every_loop=True)
        torch.testing.assert_close(all_fixed.logits, fixed.logits, atol=0, rtol=0)
        frozen = looped(ids, mask, exit="gate", threshold=0.6)
        picked = looped(ids, mask, exit="gate", threshold=0.6, every_loop=True)
    assert bool((picked.ponder_cost[keep] == 4).all())       # every token ran every loop
    first = positions(mask) == 0
    # a sequence's first token reads nothing earlier: freezing changes nothing there
    torch.testing.assert_close(picked.logits[first & keep], frozen.logits[first & keep], atol=1e-10, rtol=0)
    assert torch.equal(picked.steps[first & keep], frozen.steps[first & keep])
    assert not torch.allclose(picked.logits[keep], frozen.logits[keep])
    check_generate_against_forward(looped, ids, mask, 4, exit="latent", threshold=0.25, every_loop=True)


def test_kl_rule_in_decoding():
    looped = looped_model(max_steps=4)
    ids, mask = batch(seed=36, rows=3, left=True)
    length = ids.shape[1]
    gen = looped.generate(ids, mask, max_new_tokens=5, exit="kl", threshold=1e-3, prefill_steps=2, return_dict_in_generate=True)
    keep = mask.bool()
    assert bool((gen.steps[:, :length][keep] == 2).all())     # prompt tokens: prefill_steps
    new = gen.steps[:, length:]
    assert int(new.min()) >= 2 and int(new.max()) <= 4
    loose = looped.generate(ids, mask, max_new_tokens=5, exit="kl", threshold=1e9, prefill_steps=3, min_steps=3,
                            return_dict_in_generate=True)
    assert bool((loose.steps[:, length:] == 3).all())        # any divergence passes: out at max(2, min_steps)
    tight = looped.generate(ids, mask, max_new_tokens=5, exit="kl", threshold=1e-300, return_dict_in_generate=True)
    assert bool((tight.steps[:, length:] == 4).all())
    # equal to one sequence at a time, and under fixed rows and one slot
    for kw in (dict(max_batch_size=1), dict(max_batch_size=2, fixed_rows=True)):
        other = looped.generate(ids, mask, max_new_tokens=5, exit="kl", threshold=1e-3, prefill_steps=2, **kw,
                                return_dict_in_generate=True)
        assert torch.equal(other.sequences, gen.sequences) and torch.equal(other.steps, gen.steps)


def test_an_act_language_model_takes_the_same_rules():
    import act_kernels as ak
    torch.manual_seed(37)
    model = ak.nn.ACTLanguageModel(40, 32, 4, 64, prelude_layers=1, block_layers=2, coda_layers=1, max_steps=5,
                                   backend="reference").double().eval()
    with torch.no_grad():
        model.block.halting.weight.normal_(0.0, 1.0)
    g = torch.Generator().manual_seed(38)
    given = [torch.randint(0, 40, (n,), generator=g) for n in (5, 2, 7)]
    for exit, threshold in RULES:
        for schedule in ("synchronous", "depthwise"):
            out = generate(model, given, 5, exit=exit, threshold=threshold, schedule=schedule)
            for prompt, seq, steps in zip(given, out.sequences, out.steps):
                with torch.no_grad():
                    forward = model(seq[None], exit=exit, threshold=threshold)
                assert torch.equal(forward.steps[0], steps)
                assert torch.equal(forward.logits[0][prompt.numel() - 1:-1].argmax(-1), seq[prompt.numel():])
    kl = generate(model, given, 4, exit="kl", threshold=1e-2, prefill_steps=2)
    assert all(bool((s[:p.numel()] == 2).all()) for s, p in zip(kl.steps, given))
    synchronous = generate(model, given, 4, exit="kl", threshold=1e-2, prefill_steps=2, schedule="synchronous")
    assert all(torch.equal(a, b) for a, b in zip(synchronous.sequences, kl.sequences))
    assert all(torch.equal(a, b) for a, b in zip(synchronous.steps, kl.steps))
    # the forward decodes every token (none a prompt): the independent token-by-token oracle's exits and logits,
    # the three sequences together in one padded batch (left and right padding)
    for left in (True, False):
        ids, mask = padded(kl.sequences, left)
        keep = mask.bool()
        for threshold, min_steps in ((1e-2, 1), (5e-3, 4)):   # exits 3-4; 4-5, min_steps binding
            with torch.no_grad():
                forward = model(ids, mask, exit="kl", threshold=threshold, min_steps=min_steps)
                for row, seq in enumerate(kl.sequences):
                    logits, steps = act_lm_kl_oracle(model, seq, threshold=threshold, min_steps=min_steps)
                    assert torch.equal(forward.steps[row][keep[row]], steps)
                    torch.testing.assert_close(forward.logits[row][keep[row]], logits, atol=1e-10, rtol=0)
            assert bool((forward.steps[~keep] == 0).all())
            assert len(set(forward.steps[keep].tolist())) > 1


@pytest.mark.parametrize("kw,error,match", [
    (dict(exit="halt"), ValueError, "exit must be one of"),
    (dict(exit="gate"), ValueError, "needs a finite float threshold"),
    (dict(exit="gate", threshold=1.5), ValueError, r"probability mass in \(0, 1\]"),
    (dict(exit="latent", threshold=-0.1), ValueError, "threshold > 0"),
    (dict(exit="latent", threshold=float("nan")), ValueError, "finite float threshold"),
    (dict(exit="gate", threshold=0.5, min_steps=9), ValueError, "min_steps must be an int in"),
    (dict(exit="gate", threshold=0.5, min_steps=0), ValueError, "min_steps must be an int in"),
    (dict(exit="fixed", threshold=0.5), ValueError, "takes no threshold"),
    (dict(threshold=0.5), ValueError, "not to act"),
    (dict(exit="act", min_steps=2), ValueError, "not to act"),
    (dict(every_loop=True), ValueError, "every_loop picks"),
])
def test_bad_rules_are_refused_before_anything_runs(kw, error, match):
    looped = looped_model()
    ids, mask = batch(seed=39)
    with torch.no_grad(), pytest.raises(error, match=match):
        looped(ids, mask, **kw)


def test_inference_rules_refuse_training_and_bad_generate_options():
    looped = looped_model()
    ids, mask = batch(seed=40)
    looped.train()
    with pytest.raises(RuntimeError, match="is an inference rule"):
        looped(ids, mask, exit="gate", threshold=0.5)
    with torch.no_grad():
        looped(ids, mask, exit="gate", threshold=0.5)              # under no_grad it is inference
    looped.eval()
    with pytest.raises(ValueError, match="prefill_steps must be an int in"):
        looped.generate(ids, mask, max_new_tokens=2, exit="kl", threshold=0.1, prefill_steps=0, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="prefill_steps applies to exit='kl' only"):
        looped.generate(ids, mask, max_new_tokens=2, exit="gate", threshold=0.1, prefill_steps=2, return_dict_in_generate=True)


def test_pondernet_objective_refusals():
    looped = looped_model(block=(1, 3))                     # layer 3 is a coda
    ids, mask = batch(seed=41)
    with pytest.raises(ValueError, match="the block must be the model's last layers"):
        looped.pondernet(ids, mask)
    last = looped_model(block=(2, 4))
    for kw, match in ((dict(beta=-1.0), "beta must be >= 0"), (dict(prior=1.0), r"in \(0, 1\)"),
                      (dict(beta=float("inf")), "finite float")):
        with pytest.raises(ValueError, match=match):
            last.pondernet(ids, mask, **kw)
    with pytest.raises(ValueError, match="labels must be shaped like input_ids"):
        last.pondernet(ids, mask, labels=ids[:, :-1])


def test_an_act_language_model_pondernet_objective():
    import torch.nn.functional as F

    import act_kernels as ak
    torch.manual_seed(42)
    model = ak.nn.ACTLanguageModel(40, 32, 4, 64, prelude_layers=1, block_layers=2, coda_layers=0, max_steps=5,
                                   backend="reference").double()
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(43))
    lengths = torch.tensor([7, 4, 2])
    with torch.no_grad():   # halting at step 1 for every token: the loss is the model's own next-token loss
        model.block.halting.weight.zero_()
        model.block.halting.bias.fill_(40.0)
    one = model.pondernet(tokens, lengths=lengths, beta=0.5)
    logits = model(tokens, lengths=lengths).logits
    real = torch.arange(7)[None, 1:] < lengths[:, None]
    want = F.cross_entropy(logits[:, :-1][real], tokens[:, 1:][real])
    torch.testing.assert_close(one.loss, want, atol=1e-10, rtol=0)
    assert bool((one.steps[torch.arange(7)[None] < lengths[:, None]] == 1).all())
    with torch.no_grad():
        model.block.halting.weight.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(44))
        model.block.halting.bias.fill_(0.0)
    out = model.pondernet(tokens, lengths=lengths, beta=0.01)
    assert len(set(out.steps[out.steps > 0].tolist())) > 1
    out.loss.backward()
    assert model.block.halting.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"the block must be the model's last layers \(no coda"):
        ak.nn.ACTLanguageModel(40, 32, 4, 64, coda_layers=1).pondernet(tokens)
