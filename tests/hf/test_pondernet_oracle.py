"""Checks of the per-token PonderNet oracle (tests/hf/pondernet_oracle.py)
against transformers' own models, hand computations, tests/hf/oracle.py's
ACT oracle (same frozen-token machinery) and its own invariances. Tiny
random models in float64 (tests/hf/tiny.py), no downloads."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hf import tiny
from hf.oracle import dense_looped_lm, plain_logits
from hf.pondernet_oracle import pondernet_oracle, pondernet_terms, shifted_targets, stopping_steps

TIGHT = dict(atol=1e-10, rtol=1e-10)
LOOSE = dict(atol=1e-6, rtol=1e-6)     # eager attention's float32 softmax; transformers' loss upcasts to float32
HIDDEN = 32


def make_halting(bias=0.0, scale=0.0, seed=1):
    torch.manual_seed(seed)
    halting = torch.nn.Linear(HIDDEN, 1).double()
    with torch.no_grad():
        halting.weight.normal_(0, scale / HIDDEN ** 0.5)
        halting.bias.fill_(bias)
    return halting


def varied(step_norm, factor=1.0):
    """A halting unit under which steps differ from token to token (tiny.py's
    models have small states; normed ones have unit scale)."""
    return make_halting(0.0, (3.0 if step_norm else 100.0) * factor)


def logit(lam):
    return math.log(lam / (1 - lam))


# --- the p / g / KL arithmetic by hand ----------------------------------------------------------------------

def test_two_steps_by_hand():
    """lam = (0.3, 0.8), M = 2: u^1 = 0.7 >= eps, so N = M = 2; p = (0.3, 0.7);
    prior 0.5: g = (0.5, 0.5); KL = 0.3 ln(0.3/0.5) + 0.7 ln(0.7/0.5)."""
    z = torch.tensor([[logit(0.3), logit(0.8)]], dtype=torch.float64)
    steps = stopping_steps(z, max_steps=2, eps=0.01)
    assert steps.tolist() == [2]
    t = pondernet_terms(z, steps, prior=0.5)
    torch.testing.assert_close(t["p"], torch.tensor([[0.3, 0.7]], dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(t["log_g"].exp(), torch.tensor([[0.5, 0.5]], dtype=torch.float64), **TIGHT)
    kl = 0.3 * math.log(0.3 / 0.5) + 0.7 * math.log(0.7 / 0.5)
    torch.testing.assert_close(t["kl"], torch.tensor([kl], dtype=torch.float64), **TIGHT)
    h = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    torch.testing.assert_close(t["entropy"], torch.tensor([h], dtype=torch.float64), **TIGHT)


def test_three_steps_and_the_eps_stop_by_hand():
    """Row 0: lam = (0.5, 0.5, 0.9), M = 3: u = (0.5, 0.25), N = 3,
    p = (0.5, 0.25, 0.25); prior 0.2 truncated at 3: g = (0.2, 0.16, 0.64).
    Row 1: lam = (0.5, 0.995, 0.3), eps = 0.01: u^2 = 0.0025 < eps, N = 2,
    p = (0.5, 0.5), g = (0.2, 0.8), the step-3 entry ignored.
    Row 2: lam^1 = 0.995: N = 1, p = g = (1), KL = 0."""
    lam = [[0.5, 0.5, 0.9], [0.5, 0.995, 0.3], [0.995, 0.4, 0.4]]
    z = torch.tensor([[logit(v) for v in row] for row in lam], dtype=torch.float64)
    steps = stopping_steps(z, max_steps=3, eps=0.01)
    assert steps.tolist() == [3, 2, 1]
    t = pondernet_terms(z, steps, prior=0.2)
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[0.2, 0.16, 0.64], [0.2, 0.8, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)  # exp(0) after N
    torch.testing.assert_close(t["p"], p, **TIGHT)
    torch.testing.assert_close(t["log_g"].exp(), g, **TIGHT)
    kl = [0.5 * math.log(0.5 / 0.2) + 0.25 * math.log(0.25 / 0.16) + 0.25 * math.log(0.25 / 0.64),
          0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), 0.0]
    torch.testing.assert_close(t["kl"], torch.tensor(kl, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(t["entropy"], torch.tensor([-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)),
                                                         math.log(2.0), 0.0], dtype=torch.float64), **TIGHT)
    # the same u = 0.0025 does not stop at eps = 0.0025 (strictly less), nor anything at eps = 0 before M
    assert stopping_steps(z[1:2], max_steps=3, eps=0.0025 * 0.999).tolist() == [3]


def test_terms_gradients_and_underflow():
    """Autograd of p, KL and H matches central differences in z; a p that
    underflows (lam^1 = sigmoid(-800)) gives 0 log 0 = 0: finite values and
    gradients."""
    torch.manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    steps = torch.tensor([5, 3, 1, 2])
    for key in ["p", "kl", "entropy"]:
        torch.autograd.gradcheck(lambda z: pondernet_terms(z, steps, prior=0.3)[key], (z,))
    z = torch.tensor([[-800.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = pondernet_terms(z, torch.tensor([3]), prior=0.3)
    assert t["p"][0, 0] == 0 and torch.isfinite(t["kl"]).all()
    torch.testing.assert_close(t["p"][0, 1:], torch.tensor([0.5, 0.5], dtype=torch.float64), **TIGHT)
    (t["kl"] + t["entropy"]).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_shifted_targets():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    targets, has = shifted_targets(ids, mask)
    assert has.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert targets[has].tolist() == [7, 8, 10, 11]
    labels = torch.tensor([[-100, 6, -100, 8], [9, 10, 11, 12]])   # user labels are taken as given at real tokens
    targets, has = shifted_targets(ids, mask, labels)
    assert has.tolist() == [[False, False, True, False], [True, True, True, False]]
    assert targets[has].tolist() == [8, 10, 11, 12]


# --- against the models ---------------------------------------------------------------------------------------

def own_loss(model, ids, mask, attn):
    """The model's own shifted causal-LM loss over the oracle's targets, two
    ways: float64 cross-entropy of its own logits, and its loss_function (which
    upcasts to float32) given labels where the left padding's prediction of
    each row's first real token is ignored too."""
    logits = plain_logits(model, ids, mask, attn=attn)
    targets, has = shifted_targets(ids, mask)
    mine = F.cross_entropy(logits[has], targets[has])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    first = mask.argmax(1)
    labels[torch.arange(ids.shape[0]), first] = -100
    theirs = model.loss_function(logits, labels, vocab_size=model.config.vocab_size)
    return mine, theirs, labels


@pytest.mark.parametrize("kind", tiny.MODELS)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("start,step_norm", [(2, False), (2, True), (0, False), (3, True)])
def test_one_step_is_the_model_loss(kind, left, start, step_norm):
    """N = 1 for every token (M = 1, or a halting bias of 30 with eps 0.01:
    u^1 = sigmoid(-30) < eps) gives p = (1), KL = H = 0, so the loss is the
    model's own causal-LM loss over the same tokens, whatever beta."""
    model = tiny.MODELS[kind]()
    ids, mask = tiny.batch(left=left)
    real = mask.bool()
    mine, theirs, labels = own_loss(model, ids, mask, "sdpa")
    torch.testing.assert_close(mine.float(), theirs, atol=1e-6, rtol=1e-6)
    cases = [("sdpa", m, b, e) for m, b in [(1, 0.0), (1, -30.0), (4, 30.0)] for e in [False, True]]
    for attn, max_steps, bias, entropy in cases + [("eager", 4, 30.0, False)]:
        kw = dict(max_steps=max_steps, eps=0.01, prior=0.3, beta=0.7, entropy=entropy, step_norm=step_norm,
                  input_ids=ids, attention_mask=mask, attn=attn)
        loss, steps = pondernet_oracle(model, start, make_halting(bias, 5.0), **kw)
        assert torch.equal(steps, real.long())
        torch.testing.assert_close(loss, mine, **(TIGHT if attn == "sdpa" else LOOSE))
        torch.testing.assert_close(loss.float(), theirs, **LOOSE)
    # the same labels, given: the first real token's label was only the target of a padding position
    given, _ = pondernet_oracle(model, start, make_halting(30.0, 5.0), labels=labels, **kw)
    torch.testing.assert_close(given, loss, **TIGHT)
    assert model.config._attn_implementation == "sdpa"      # restored


@pytest.mark.parametrize("kind", tiny.MODELS)
@pytest.mark.parametrize("step_norm", [False, True])
def test_steps_vary_and_follow_the_rule(kind, step_norm):
    """Under a varied halting unit steps differ between tokens (so the loss is
    not the model's), each real token's N is the stopping rule on its own
    halting logits, p sums to 1, padding has steps 0 and no target; a token
    whose label is ignored still steps exactly as before but adds no term."""
    model = tiny.MODELS[kind]()
    ids, mask = tiny.batch(left=True)
    real = mask.bool()
    kw = dict(max_steps=4, eps=0.05, prior=0.3, beta=0.1, step_norm=step_norm, input_ids=ids, attention_mask=mask)
    loss, steps, rec = pondernet_oracle(model, 2, varied(step_norm), debug=True, **kw)
    assert steps[real].unique().numel() >= 3 and not steps[~real].any() and int(steps.max()) <= 4
    torch.testing.assert_close(rec["p"].sum(-1)[real], torch.ones_like(rec["p"][..., 0][real]), **TIGHT)
    assert torch.equal(stopping_steps(rec["z"][real], max_steps=4, eps=0.05), steps[real])
    assert not rec["has_target"][~real].any() and int(rec["count"]) == int(rec["has_target"].sum())
    mine = own_loss(model, ids, mask, "sdpa")[0]
    assert (loss - mine).abs() > 1e-4
    # by hand from the record: mean over targets of sum p L, plus beta times the mean KL
    has = rec["has_target"]
    torch.testing.assert_close(loss, (rec["p"] * rec["step_losses"]).sum(-1)[has].mean() + 0.1 * rec["kl"][has].mean(),
                               **TIGHT)
    labels = torch.where(real, ids, torch.full_like(ids, -100))
    labels[2, 4] = -100                                            # position 3 of row 2 loses its target
    loss2, steps2, rec2 = pondernet_oracle(model, 2, varied(step_norm), labels=labels, debug=True, **kw)
    assert torch.equal(steps2, steps) and int(rec2["count"]) == int(rec["count"]) - 1
    assert not rec2["has_target"][2, 3] and rec["has_target"][2, 3]
    keep = rec2["has_target"]
    torch.testing.assert_close(loss2, rec["ponder"][keep].mean() + 0.1 * rec["kl"][keep].mean(), **TIGHT)


@pytest.mark.parametrize("kind", tiny.MODELS)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("step_norm", [False, True])
def test_a_padded_row_is_the_row_alone(kind, left, step_norm):
    """Each row alone (its real tokens, unpadded) gives the per-token terms,
    steps and targets of that row in the padded batch, and the batch loss is
    the rows' losses weighted by their target counts (a mean over tokens, not
    over rows)."""
    model, halting = tiny.MODELS[kind](), varied(step_norm)
    ids, mask = tiny.batch(left=left)
    for entropy in [False, True]:
        kw = dict(max_steps=4, eps=0.05, prior=0.3, beta=0.2, entropy=entropy, step_norm=step_norm)
        loss, steps, rec = pondernet_oracle(model, 2, halting, input_ids=ids, attention_mask=mask, debug=True, **kw)
        assert steps[mask.bool()].unique().numel() > 1
        total, counts = 0.0, 0
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            a_loss, a_steps, a_rec = pondernet_oracle(model, 2, halting, input_ids=ids[row, keep][None], debug=True,
                                                      **kw)
            assert torch.equal(steps[row, keep], a_steps[0])
            assert torch.equal(rec["has_target"][row, keep], a_rec["has_target"][0])
            for key in ["ponder", "kl", "entropy"]:
                torch.testing.assert_close(rec[key][row, keep], a_rec[key][0], **LOOSE)
            K = a_rec["p"].shape[-1]
            torch.testing.assert_close(rec["p"][row, keep, :K], a_rec["p"][0], **LOOSE)
            total, counts = total + a_loss * a_rec["count"], counts + int(a_rec["count"])
        assert counts == int(rec["count"])
        torch.testing.assert_close(loss, total / counts, **LOOSE)


@pytest.mark.parametrize("kind", tiny.MODELS)
def test_entropy_and_kl_agree_at_beta_zero(kind):
    """beta = 0: both variants are the expected per-step loss alone; at
    beta != 0 the entropy variant subtracts beta times the mean entropy."""
    model = tiny.MODELS[kind]()
    ids, mask = tiny.batch(left=True)
    kw = dict(max_steps=4, eps=0.05, step_norm=False, input_ids=ids, attention_mask=mask)
    kl0, s1 = pondernet_oracle(model, 2, varied(False), prior=0.3, beta=0.0, **kw)
    ent0, s2 = pondernet_oracle(model, 2, varied(False), prior=None, beta=0.0, entropy=True, **kw)
    torch.testing.assert_close(kl0, ent0, **TIGHT)
    assert torch.equal(s1, s2)
    ent, _, rec = pondernet_oracle(model, 2, varied(False), prior=None, beta=0.5, entropy=True, debug=True, **kw)
    has = rec["has_target"]
    torch.testing.assert_close(ent, ent0 - 0.5 * rec["entropy"][has].mean(), **TIGHT)
    assert rec["entropy"][has].mean() > 0.05
    kl, _ = pondernet_oracle(model, 2, varied(False), prior=0.3, beta=0.5, **kw)
    assert (kl - kl0).abs() > 1e-3


@pytest.mark.parametrize("kind", tiny.MODELS)
@pytest.mark.parametrize("step_norm", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_gradients(kind, step_norm, entropy):
    """Under real pondering every parameter of the halting unit, of every
    block layer (and the prelude and the embedding) gets a finite non-zero
    gradient; the halting unit's match central differences (its parameters
    move p and KL but not the states, so the forward is smooth in them while
    the steps stay put)."""
    model, halting = tiny.MODELS[kind](), varied(step_norm)
    ids, mask = tiny.batch(left=True)
    kw = dict(max_steps=4, eps=0.05, prior=None if entropy else 0.3, beta=0.3, entropy=entropy, step_norm=step_norm,
              input_ids=ids, attention_mask=mask, attn="sdpa")
    loss, steps = pondernet_oracle(model, 2, halting, **kw)
    assert steps[mask.bool()].unique().numel() > 1
    loss.backward()
    named = [("halting." + n, p) for n, p in halting.named_parameters()]
    named += list(model.named_parameters())
    for name, param in named:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    delta = 1e-6
    for param, index in [(halting.bias, (0,)), (halting.weight, (0, 0)), (halting.weight, (0, 9))]:
        with torch.no_grad():
            param[index] += delta
            up, s_up = pondernet_oracle(model, 2, halting, **kw)
            param[index] -= 2 * delta
            down, s_down = pondernet_oracle(model, 2, halting, **kw)
            param[index] += delta
        assert torch.equal(s_up, steps) and torch.equal(s_down, steps)
        torch.testing.assert_close(param.grad[index], (up - down) / (2 * delta), atol=1e-8, rtol=1e-6)


# --- the frozen-token machinery, against the ACT oracle and the unrolled model ------------------------------------

@pytest.mark.parametrize("kind", tiny.MODELS)
@pytest.mark.parametrize("start,step_norm", [(2, False), (1, True), (3, False)])
def test_saturated_halting_matches_the_act_oracle(kind, start, step_norm):
    """With a saturated halting unit (lam in {~0, ~1}) ACT's rule
    (sum h >= 1 - eps) and PonderNet's (u < eps) stop every token at the same
    step, so the states of every step a token ran (frozen tokens read as the
    ACT oracle reads them) equal tests/hf/oracle.py's."""
    model = tiny.MODELS[kind]()
    ids, mask = tiny.batch(left=True)
    real = mask.bool()
    halting = varied(step_norm, factor=300.0)
    common = dict(max_steps=4, eps=0.01, step_norm=step_norm, input_ids=ids, attention_mask=mask, attn="sdpa")
    _, act_steps, rec_act = dense_looped_lm(model, (start, 4), halting, debug=True, **common)[1:]
    _, steps, rec = pondernet_oracle(model, start, halting, prior=0.3, beta=0.1, debug=True, **common)
    assert torch.equal(steps, act_steps)
    assert steps[real].unique().numel() > 1 and int(steps.max()) > 1
    for n, (mine, theirs) in enumerate(zip(rec["states"], rec_act["states"], strict=True), start=1):
        ran = real & (steps >= n)
        torch.testing.assert_close(mine[ran], theirs[ran], **TIGHT)


def unrolled(model, start, times):
    """A model of the same class sharing every module whose layers are the
    prelude and then the block `times` times over."""
    layers = list(model.model.layers)
    seq = layers[:start] + layers[start:] * times
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(seq)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * len(seq)
    new = type(model)(config).double().eval()
    for name in ["embed_tokens", "norm", "rotary_emb"]:
        setattr(new.model, name, getattr(model.model, name))
    new.model.layers, new.lm_head = torch.nn.ModuleList(seq), model.lm_head
    return new


@pytest.mark.parametrize("kind", tiny.MODELS)
def test_no_stop_is_the_unrolled_model_at_every_step(kind):
    """Bias -30 and eps 1e-3: u never drops below eps, every token runs M
    steps and none freezes, so step n's per-token loss L^n is the
    cross-entropy of the model with its block unrolled n times; p^n =
    lam^n prod (1 - lam) (tiny), p^M the rest."""
    model = tiny.MODELS[kind]()
    ids, mask = tiny.batch(left=True)
    real = mask.bool()
    _, steps, rec = pondernet_oracle(model, 2, make_halting(-30.0, 1.0), max_steps=3, eps=1e-3, prior=0.3, beta=0.1,
                                     input_ids=ids, attention_mask=mask, attn="sdpa", debug=True)
    assert torch.equal(steps, 3 * real.long())
    targets, has = shifted_targets(ids, mask)
    for n in range(1, 4):
        logits = plain_logits(unrolled(model, 2, n), ids, mask, attn="sdpa")
        ce = F.cross_entropy(logits[has], targets[has], reduction="none")
        torch.testing.assert_close(rec["step_losses"][..., n - 1][has], ce, atol=1e-9, rtol=1e-9)
    assert rec["p"][..., 2][real].min() > 1 - 1e-10


@pytest.mark.parametrize("kind", tiny.MODELS)
def test_causal_prefix(kind):
    """Appending tokens changes nothing earlier: a prefix's steps, p and
    per-token terms equal the full sequence's at its positions (its last
    position loses its target, so its terms are compared only where both
    have one)."""
    model, halting = tiny.MODELS[kind](), varied(False)
    ids, _ = tiny.batch(rows=1)
    kw = dict(max_steps=4, eps=0.05, prior=0.3, beta=0.1, debug=True)
    _, steps, rec = pondernet_oracle(model, 2, halting, input_ids=ids, **kw)
    assert steps.unique().numel() > 1
    for k in [3, 6]:
        _, p_steps, p_rec = pondernet_oracle(model, 2, halting, input_ids=ids[:, :k], **kw)
        assert torch.equal(p_steps, steps[:, :k])
        K = p_rec["p"].shape[-1]
        torch.testing.assert_close(p_rec["p"], rec["p"][:, :k, :K], **LOOSE)
        torch.testing.assert_close(p_rec["kl"], rec["kl"][:, :k], **LOOSE)
        torch.testing.assert_close(p_rec["ponder"][:, :k - 1], rec["ponder"][:, :k - 1], **LOOSE)
        assert not p_rec["has_target"][0, k - 1]
