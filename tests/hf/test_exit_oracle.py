"""Checks of the dense exit-rule oracle (tests/hf/exit_oracle.py) against
transformers' own forwards, hand computations, tests/hf/oracle.py's frozen
rule, and its own token-by-token evaluation. Tiny random models in float64,
no downloads."""
import copy

import pytest
import torch

from hf import tiny
from hf.exit_oracle import (ExitRule, exit_oracle, frozen_loop, kl_decode_oracle, pick_after_every_loop,
                            token_by_token)
from hf.oracle import dense_looped_lm, plain_logits

TIGHT = dict(atol=1e-10, rtol=1e-10)
KINDS = ["llama", "qwen3"]
HIDDEN = 32
M = 4


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def make_model(kind, seed=0):
    return tiny.MODELS[kind](seed=seed, initializer_range=0.1)


def make_halting(seed=1, scale=3.0, bias=-1.0):
    g = torch.Generator().manual_seed(seed)
    halting = torch.nn.Linear(HIDDEN, 1).double()
    with torch.no_grad():
        halting.weight.copy_(torch.randn(1, HIDDEN, generator=g, dtype=torch.float64) * scale / HIDDEN ** 0.5)
        halting.bias.fill_(bias)
    return halting


def sequence(length=10, seed=3):
    return torch.randint(0, tiny.VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def split(values):
    """A threshold between two neighbouring distinct values near the middle of `values`."""
    v = values.flatten().unique().sort().values
    i = max(1, v.numel() // 2)
    return float((v[i - 1] + v[i]) / 2)


def varied_threshold(model, block, halting, rule, step_norm, ids, mask=None, at=2):
    """A threshold that splits the tokens' statistic at step `at` of the
    no-freezing trajectories (so the steps vary)."""
    *_, rec = pick_after_every_loop(model, block, halting, rule=rule, threshold=0.5, max_steps=M, step_norm=step_norm,
                                    input_ids=ids, attention_mask=mask, debug=True)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return split(rec["trace"][at - 1][real])


class NormAfter(torch.nn.Module):
    """A decoder layer followed by the final norm (step_norm's end of a step)."""

    def __init__(self, layer, norm):
        super().__init__()
        self.layer, self.norm = layer, norm

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        return self.norm(out[0] if isinstance(out, tuple) else out)


def unrolled_model(model, block, times, step_norm=False):
    """A deep copy of the model whose layers are the prelude, `times` deep
    copies of the block (each layer its own layer_idx; with step_norm the
    final norm after each copy), then the coda; with step_norm and no coda
    the last copy's norm is the final norm."""
    new = copy.deepcopy(model)
    start, stop = block
    layers = list(new.model.layers)
    body = []
    for _ in range(times):
        copies = [copy.deepcopy(layer) for layer in layers[start:stop]]
        if step_norm:
            copies[-1] = NormAfter(copies[-1], new.model.norm)
        body += copies
    seq = layers[:start] + body + layers[stop:]
    for i, layer in enumerate(seq):
        getattr(layer, "layer", layer).self_attn.layer_idx = i
    new.config.num_hidden_layers = len(seq)
    if getattr(new.config, "layer_types", None) is not None:
        new.config.layer_types = [new.config.layer_types[0]] * len(seq)
    new.model.layers = torch.nn.ModuleList(seq)
    if step_norm and stop == len(layers):
        new.model.norm = torch.nn.Identity()
    return new


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("block,step_norm", [((1, 3), False), ((0, 2), False), ((1, 3), True), ((2, 4), True)])
def test_fixed_is_the_unrolled_model(kind, left, block, step_norm):
    model = make_model(kind)
    ids, mask = tiny.batch(left=left)
    real = mask.bool()
    want = plain_logits(unrolled_model(model, block, M, step_norm), ids, mask)
    for oracle in (exit_oracle, pick_after_every_loop):
        logits, steps = oracle(model, block, make_halting(), rule="fixed", threshold=0.0, max_steps=M,
                               step_norm=step_norm, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(logits[real], want[real], atol=1e-9, rtol=1e-9)
        assert torch.equal(steps, M * real.long())
        assert not logits[~real].any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_norm", [False, True])
def test_min_steps_at_max_steps_is_fixed(kind, step_norm):
    model, halting, block = make_model(kind), make_halting(), (1, 3)
    ids, mask = tiny.batch()
    kw = dict(max_steps=M, step_norm=step_norm, input_ids=ids, attention_mask=mask)
    fixed, fixed_steps = exit_oracle(model, block, halting, rule="fixed", threshold=0.0, **kw)
    for oracle in (exit_oracle, pick_after_every_loop):
        for rule, threshold in [("gate", 1e-9), ("gate", 0.5), ("latent", 1e9), ("latent", 0.3)]:
            logits, steps = oracle(model, block, halting, rule=rule, threshold=threshold, min_steps=M, **kw)
            torch.testing.assert_close(logits, fixed, **TIGHT)
            assert torch.equal(steps, fixed_steps)
    row = ids[2]                                    # the unpadded row
    logits, steps = kl_decode_oracle(model, block, threshold=1e9, min_steps=M, max_steps=M, prefill_steps=M,
                                     step_norm=step_norm, sequence=row, prompt_length=3)
    torch.testing.assert_close(logits, fixed[2], **TIGHT)
    assert torch.equal(steps, fixed_steps[2])


@pytest.mark.parametrize("kind", KINDS)
def test_gate_thresholds_at_the_ends(kind):
    """threshold 1e-9: every token exits at min_steps (min_steps 1: the model
    itself); threshold 1.5 (never reached before M): every token runs M."""
    model, halting, block = make_model(kind), make_halting(), (1, 3)
    ids, mask = tiny.batch()
    real = mask.bool()
    kw = dict(max_steps=M, input_ids=ids, attention_mask=mask)
    for oracle in (exit_oracle, pick_after_every_loop):
        for min_steps in (1, 2, 3):
            logits, steps = oracle(model, block, halting, rule="gate", threshold=1e-9, min_steps=min_steps, **kw)
            assert torch.equal(steps, min_steps * real.long())
            fixed = exit_oracle(model, block, halting, rule="fixed", threshold=0.0, max_steps=min_steps,
                                input_ids=ids, attention_mask=mask)[0]
            torch.testing.assert_close(logits, fixed, **TIGHT)
            if min_steps == 1:
                torch.testing.assert_close(logits[real], plain_logits(model, ids, mask)[real], atol=1e-9, rtol=1e-9)
        logits, steps = oracle(model, block, halting, rule="gate", threshold=1.5, **kw)
        assert torch.equal(steps, M * real.long())


def mlp_only(model, block, zero_mlp=False):
    """A deep copy whose block layers have no attention output (o_proj = 0):
    in the block each token's trajectory is its own. zero_mlp: down_proj = 0
    too (the block is the identity)."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for layer in new.model.layers[block[0]:block[1]]:
            layer.self_attn.o_proj.weight.zero_()
            if zero_mlp:
                layer.mlp.down_proj.weight.zero_()
    return new


def hand_trajectories(model, block, step_norm, ids):
    """s^0..s^M of every token of an unpadded row through an attention-free
    block, by hand: x + mlp(post_attention_layernorm(x)) per layer."""
    x = model(input_ids=ids, output_hidden_states=True).hidden_states[block[0]][0]
    states = [x]
    for _ in range(M):
        for layer in model.model.layers[block[0]:block[1]]:
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if step_norm:
            x = model.model.norm(x)
        states.append(x)
    return torch.stack(states)           # (M + 1, L, D)


def first_exit(stats, threshold, first, below):
    """Per token: the first step n >= first (steps from 1; stats[n - 1]) whose
    statistic is below (latent) / at least (gate) the threshold, else M."""
    out = []
    for token in range(stats.shape[1]):
        n = next((n for n in range(first, M + 1)
                  if (stats[n - 1, token] < threshold if below else stats[n - 1, token] >= threshold)), M)
        out.append(n)
    return torch.tensor([out])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_norm", [False, True])
def test_latent_and_gate_by_hand(kind, step_norm):
    """An attention-free block: each token's states by hand, its ratios
    ||s^n - s^(n-1)|| / ||s^n|| and gate sums c_n = sum_{j<=n} lam_j prod_{i<j} (1 - lam_i)
    by hand, the exit steps by hand; both oracles agree with them (freezing
    changes nothing where the block mixes no tokens) and output s^N."""
    block, ids = (1, 3), sequence()
    model, halting = mlp_only(make_model(kind), block), make_halting()
    with torch.no_grad():
        s = hand_trajectories(model, block, step_norm, ids)
        ratio = (s[1:] - s[:-1]).norm(dim=-1) / s[1:].norm(dim=-1)          # ratio[n - 1] at step n
        lam = torch.sigmoid(halting(s[1:]).squeeze(-1))
        survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), 0)
        p = lam * survive
        p[-1] = 1 - p[:-1].sum(0)
        cdf = p.cumsum(0)
    for rule, stats, below in [("latent", ratio, True), ("gate", cdf, False)]:
        for min_steps in (1, 3):
            first = max(2, min_steps) if rule == "latent" else min_steps
            threshold = split(stats[first - 1])
            want = first_exit(stats, threshold, first, below)
            assert want.unique().numel() > 1
            for oracle in (exit_oracle, pick_after_every_loop):
                _, steps, rec = oracle(model, block, halting, rule=rule, threshold=threshold, min_steps=min_steps,
                                       max_steps=M, step_norm=step_norm, input_ids=ids, debug=True)
                assert torch.equal(steps, want), (rule, min_steps, oracle.__name__)
                exit_states = s[want[0], torch.arange(ids.shape[1])]
                torch.testing.assert_close(rec["exit_states"][0], exit_states, **TIGHT)
                for n in range(first, M + 1):               # the statistic while a token runs
                    ran = want[0] >= n
                    torch.testing.assert_close(rec["trace"][n - 1][0, ran], stats[n - 1, ran], **TIGHT)
                # a tie: token 0's own statistic at step `first` as the threshold (gate exits, latent runs on)
                tie = float(rec["trace"][first - 1][0, 0])
                steps = oracle(model, block, halting, rule=rule, threshold=tie, min_steps=min_steps, max_steps=M,
                               step_norm=step_norm, input_ids=ids)[1]
                assert (steps[0, 0] == first) if rule == "gate" else (steps[0, 0] > first)


@pytest.mark.parametrize("kind", KINDS)
def test_latent_identity_block(kind):
    """An identity block: r_n = 0 exactly, so latent exits at max(2, min_steps)
    for any threshold > 0, and a tie (threshold 0) runs to M; the logits are
    the model's own (its block is the identity too)."""
    block = (1, 3)
    model = mlp_only(make_model(kind), block, zero_mlp=True)
    ids, mask = tiny.batch()
    real = mask.bool()
    plain = plain_logits(model, ids, mask)
    for oracle in (exit_oracle, pick_after_every_loop):
        for min_steps, threshold, want in [(1, 1e-12, 2), (3, 1e-12, 3), (1, 0.0, M)]:
            logits, steps = oracle(model, block, make_halting(), rule="latent", threshold=threshold,
                                   min_steps=min_steps, max_steps=M, input_ids=ids, attention_mask=mask)
            assert torch.equal(steps, want * real.long())
            torch.testing.assert_close(logits[real], plain[real], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("left", [True, False])
def test_a_padded_row_is_the_row_alone(kind, left):
    model, halting, block = make_model(kind), make_halting(), (1, 3)
    ids, mask = tiny.batch(left=left)
    for rule, step_norm in [("gate", False), ("latent", True)]:
        threshold = varied_threshold(model, block, halting, rule, step_norm, ids, mask)
        for oracle in (exit_oracle, pick_after_every_loop):
            kw = dict(rule=rule, threshold=threshold, max_steps=M, step_norm=step_norm)
            logits, steps = oracle(model, block, halting, input_ids=ids, attention_mask=mask, **kw)
            assert steps[mask.bool()].unique().numel() > 1
            for row in range(ids.shape[0]):
                keep = mask[row].bool()
                alone = oracle(model, block, halting, input_ids=ids[row, keep][None], **kw)
                torch.testing.assert_close(logits[row, keep], alone[0][0], **TIGHT)
                assert torch.equal(steps[row, keep], alone[1][0])
                assert not steps[row, ~keep].any() and not logits[row, ~keep].any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule,step_norm", [("gate", False), ("gate", True), ("latent", False), ("latent", True)])
def test_freezing_matters(kind, rule, step_norm):
    """Frozen exits against every-loop-then-pick: the first token agrees
    (nothing earlier to read); so does every token none of whose earlier
    tokens exits before it (same step, same exit state: it never read a
    frozen row); somewhere they differ."""
    model, halting, block = make_model(kind), make_halting(), (1, 3)
    ids = sequence()
    threshold = varied_threshold(model, block, halting, rule, step_norm, ids)
    kw = dict(rule=rule, threshold=threshold, max_steps=M, step_norm=step_norm, input_ids=ids, debug=True)
    frozen, frozen_steps, frec = exit_oracle(model, block, halting, **kw)
    picked, picked_steps, prec = pick_after_every_loop(model, block, halting, **kw)
    assert frozen_steps.unique().numel() > 1
    torch.testing.assert_close(frozen[0, 0], picked[0, 0], **TIGHT)
    n = frozen_steps[0]
    for i in range(ids.shape[1]):
        if bool((n[:i] >= n[i]).all()):
            assert picked_steps[0, i] == n[i]
            torch.testing.assert_close(frec["exit_states"][0, i], prec["exit_states"][0, i], **TIGHT)
    assert (frozen - picked).abs().max() > 1e-4


@pytest.mark.parametrize("kind,step_norm", [("llama", False), ("qwen3", True)])
def test_batched_equals_token_by_token(kind, step_norm):
    """Two evaluations of the frozen rule: the whole batch every step against
    each token alone over stored rows of the earlier ones (a three-layer
    block), with and without a prompt of fixed steps."""
    model, halting, block = make_model(kind), make_halting(), (0, 3)
    ids = sequence(8)
    for rule in ("gate", "latent"):
        threshold = varied_threshold(model, block, halting, rule, step_norm, ids)
        logits, steps = exit_oracle(model, block, halting, rule=rule, threshold=threshold, max_steps=M,
                                    step_norm=step_norm, input_ids=ids)
        assert steps.unique().numel() > 1
        alone = token_by_token(model, block, halting, rule=rule, threshold=threshold, max_steps=M,
                               step_norm=step_norm, sequence=ids[0])
        torch.testing.assert_close(alone[0], logits[0], **TIGHT)
        assert torch.equal(alone[1], steps[0])
        # a prompt of 3 tokens at 2 steps each, the rest by the rule
        prompt = torch.arange(ids.shape[1]) < 3
        decider = ExitRule(rule, threshold=threshold, min_steps=1, max_steps=M, halting=halting)

        def decide(n, y):
            return torch.where(prompt[None], torch.tensor(n == 2), decider.exits(n, y))

        logits, steps, _ = frozen_loop(model, block, decide, max_steps=M, step_norm=step_norm, input_ids=ids)
        alone = token_by_token(model, block, halting, rule=rule, threshold=threshold, max_steps=M,
                               prompt_length=3, prefill_steps=2, step_norm=step_norm, sequence=ids[0])
        assert torch.equal(alone[1], steps[0]) and alone[1][:3].tolist() == [2, 2, 2]
        torch.testing.assert_close(alone[0], logits[0], **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_rule_is_the_act_oracles(kind):
    """The frozen loop, made to exit each token at the step where
    tests/hf/oracle.py's ACT halts it, has that oracle's states at every
    step a token runs (padded batch, two-layer block)."""
    model, block = make_model(kind), (1, 3)
    ids, mask = tiny.batch()
    real = mask.bool()
    halting = make_halting(scale=20.0, bias=0.0)
    _, _, act_steps, act = dense_looped_lm(model, block, halting, max_steps=M, eps=0.01, step_norm=True, input_ids=ids,
                                           attention_mask=mask, attn="sdpa", debug=True)
    assert act_steps[real].unique().numel() > 1
    _, steps, rec = frozen_loop(model, block, lambda n, y: act_steps == n, max_steps=M, step_norm=True, input_ids=ids,
                                attention_mask=mask)
    assert torch.equal(steps, act_steps)
    for n in range(1, int(act_steps.max()) + 1):
        ran = act_steps >= n
        torch.testing.assert_close(rec["states"][n - 1][ran], act["states"][n - 1][ran], **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_ends(kind):
    """Threshold huge: every decoded token exits at max(2, min_steps) (at most
    M); threshold 0 (KL > 0 here): at M. Prompt tokens: prefill_steps."""
    model, block, ids = make_model(kind), (1, 3), sequence(7)[0]
    for min_steps, threshold, want, prefill in [(1, 1e9, 2, 1), (3, 1e9, 3, 3), (M, 1e9, M, 1), (1, 0.0, M, 3)]:
        logits, steps, rec = kl_decode_oracle(model, block, threshold=threshold, min_steps=min_steps, max_steps=M,
                                              prefill_steps=prefill, sequence=ids, prompt_length=3, debug=True)
        assert steps.tolist() == [prefill] * 3 + [want] * 4
        assert all(t is None for t in rec["trace"][:3])
        if threshold == 0.0:
            assert all(bool((torch.stack(t[1:]) > 0).all()) for t in rec["trace"][3:])


def kl_by_forced_runs(model, block, ids, steps, i, step_norm):
    """log P_n of token i for n = 1..M from the batched frozen loop, every
    earlier token forced to its given step, token i to n."""
    out = []
    for n in range(1, M + 1):
        forced = steps.clone()
        forced[i] = n
        forced[i + 1:] = M
        logits, got, _ = frozen_loop(model, block, lambda k, y: forced[None] == k, max_steps=max(M, int(steps.max())),
                                     step_norm=step_norm, input_ids=ids[None])
        assert torch.equal(got[0], forced)
        out.append(torch.log_softmax(logits[0, i], -1))
    return out


@pytest.mark.parametrize("kind,block,step_norm", [("llama", (1, 3), False), ("qwen3", (2, 4), True),
                                                  ("qwen3", (0, 2), False)])
def test_kl_rule_by_forced_runs(kind, block, step_norm):
    """With a threshold that splits the decoded tokens' KL at step 2, steps
    vary; for every decoded token, its P_n recomputed by batched frozen runs
    (earlier tokens at their kl steps, it at n) gives KL_n = sum P_n (log P_n
    - log P_(n-1)), equal to the oracle's own statistic; its step is the first
    n >= max(2, min_steps) with KL_n < threshold, else M; its logits are those
    of the run at its step."""
    model, ids, prompt = make_model(kind), sequence(7)[0], 3
    kw = dict(max_steps=M, prefill_steps=2, step_norm=step_norm, sequence=ids, prompt_length=prompt)
    *_, rec = kl_decode_oracle(model, block, threshold=0.0, **kw, debug=True)
    threshold = split(torch.stack([t[1] for t in rec["trace"][prompt:]]))
    for min_steps in (1, 3):
        logits, steps, rec = kl_decode_oracle(model, block, threshold=threshold, min_steps=min_steps, **kw, debug=True)
        if min_steps == 1:
            assert steps[prompt:].unique().numel() > 1
        forced_all, _, _ = frozen_loop(model, block, lambda k, y: steps[None] == k, max_steps=M, step_norm=step_norm,
                                       input_ids=ids[None])
        torch.testing.assert_close(logits, forced_all[0], **TIGHT)
        for i in range(prompt, ids.shape[0]):
            logp = kl_by_forced_runs(model, block, ids, steps, i, step_norm)
            kl = [None] + [float((logp[n].exp() * (logp[n] - logp[n - 1])).sum()) for n in range(1, M)]
            want = next((n for n in range(max(2, min_steps), M + 1) if kl[n - 1] < threshold), M)
            assert steps[i] == want, (i, kl, threshold)
            for n in range(max(2, min_steps), want + 1):             # the oracle's own KL_n
                torch.testing.assert_close(float(rec["trace"][i][n - 1]), kl[n - 1], **TIGHT)
            torch.testing.assert_close(torch.log_softmax(logits[i], -1), logp[want - 1], **TIGHT)
