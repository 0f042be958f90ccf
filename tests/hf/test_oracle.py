"""Checks of the dense oracle for per-token ACT over transformers' decoder
layers (tests/hf/oracle.py) against the models' own forwards and hand
computations. Tiny random models in float64, no downloads."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hf.oracle import causal_mask, dense_looped_lm, plain_logits, positions

SIZE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.1)
KINDS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
TIGHT = dict(atol=1e-10, rtol=1e-10)
LOOSE = dict(atol=1e-6, rtol=1e-6)         # eager attention takes its softmax in float32


def make_model(kind, seed=0):
    config_cls, model_cls = KINDS[kind]
    torch.manual_seed(seed)
    return model_cls(config_cls(**SIZE)).double().eval()


def make_halting(bias, scale=1.0, seed=1):
    torch.manual_seed(seed)
    halting = torch.nn.Linear(SIZE["hidden_size"], 1).double()
    with torch.no_grad():
        halting.weight.normal_(0, scale / SIZE["hidden_size"] ** 0.5)
        halting.bias.fill_(bias)
    return halting


def batch(padding, seed=2):
    """ids (3, 7) and a mask with rows of 7, 4 and 2 real tokens."""
    torch.manual_seed(seed)
    ids = torch.randint(0, SIZE["vocab_size"], (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    if padding == "right":
        mask[1, 4:], mask[2, 2:] = 0, 0
    else:
        mask[1, :3], mask[2, :5] = 0, 0
    return ids, mask


# (block, step_norm) settings whose one-step ponder is the plain model
PLAIN = [((1, 3), False), ((0, 2), False), ((0, 4), False), ((2, 4), True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("block,step_norm", PLAIN)
def test_one_step_is_the_plain_model(kind, padding, block, step_norm):
    model = make_model(kind)
    ids, mask = batch(padding)
    real = mask.bool()
    plain = plain_logits(model, ids, mask)
    for max_steps, bias in [(1, 0.0), (1, -30.0), (4, 30.0)]:   # (1) one step; (2) every token halts at step 1
        for attn, tol in [("sdpa", TIGHT), ("eager", LOOSE)]:
            logits, cost, steps = dense_looped_lm(model, block, make_halting(bias), max_steps=max_steps, eps=0.01,
                                                  step_norm=step_norm, input_ids=ids, attention_mask=mask, attn=attn)
            torch.testing.assert_close(logits[real], plain[real], **tol)
            assert torch.equal(steps, real.long())
            torch.testing.assert_close(cost, 2.0 * real.double())     # rho = N + R = 1 + 1
            assert not logits[~real].any() and torch.isfinite(logits).all()
    assert model.config._attn_implementation == "sdpa"                # restored after the calls


def unrolled(model, block, times):
    """A model of the same class sharing every module, whose layers are the
    prelude, the block `times` times over, then the coda."""
    start, stop = block
    layers = list(model.model.layers)
    seq = layers[:start] + layers[start:stop] * times + layers[stop:]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(seq)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * len(seq)
    new = type(model)(config).double().eval()
    for name in ["embed_tokens", "norm", "rotary_emb"]:
        setattr(new.model, name, getattr(model.model, name))
    new.model.layers, new.lm_head = torch.nn.ModuleList(seq), model.lm_head
    return new


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_norm", [False, True])
def test_no_halting_unrolls_the_block(kind, step_norm):
    """(3) Bias -30: nothing halts before max_steps; S = sum p s with p^n = h^n
    and p^M = 1 - sum h, and (h ~ 1e-13) the logits are those of the model
    with the block unrolled max_steps times."""
    model, block, max_steps = make_model(kind), (1, 3), 4
    ids, mask = batch("left")
    real = mask.bool()
    logits, cost, steps, rec = dense_looped_lm(model, block, make_halting(-30.0), max_steps=max_steps, eps=0.01,
                                               step_norm=step_norm, input_ids=ids, attention_mask=mask, attn="sdpa",
                                               debug=True)
    assert torch.equal(steps, max_steps * real.long())
    h, p = torch.stack(rec["halts"]), torch.stack(rec["weights"])
    assert p.shape[0] == max_steps
    torch.testing.assert_close(p[:-1][:, real], h[:-1][:, real], **TIGHT)
    torch.testing.assert_close(p[-1][real], 1 - h[:-1].sum(0)[real], **TIGHT)
    torch.testing.assert_close(cost[real], max_steps + p[-1][real], **TIGHT)
    if not step_norm:   # the states are the block applied again and again to the whole batch
        torch.testing.assert_close(logits[real], plain_logits(unrolled(model, block, max_steps), ids, mask)[real],
                                   atol=1e-9, rtol=1e-9)
    # the weighted sum of the step states is what the coda reads: rebuild the logits from it
    x = (p[..., None] * torch.stack(rec["states"])).sum(0)
    pos = positions(mask)
    rope = model.model.rotary_emb(x, pos)
    for layer in model.model.layers[block[1]:]:     # the model's own attention, sdpa
        x = layer(x, attention_mask=causal_mask(mask, x.dtype), position_ids=pos, position_embeddings=rope)
    torch.testing.assert_close(logits[real], model.lm_head(model.model.norm(x))[real], **TIGHT)


def pondering_halting():
    return make_halting(0.0, scale=20.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_norm", [False, True])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_padded_row_is_the_row_alone(kind, step_norm, padding):
    """(4) A padded row's real tokens give what the row alone gives, unpadded
    (positions count from its first real token), under real pondering."""
    model, halting = make_model(kind), pondering_halting()
    ids, mask = batch(padding)
    kw = dict(max_steps=4, eps=0.01, step_norm=step_norm)
    logits, cost, steps = dense_looped_lm(model, (1, 3), halting, input_ids=ids, attention_mask=mask, **kw)
    assert steps[mask.bool()].unique().numel() > 1
    for row in range(3):
        keep = mask[row].bool()
        alone = dense_looped_lm(model, (1, 3), halting, input_ids=ids[row, keep][None], **kw)
        torch.testing.assert_close(logits[row, keep], alone[0][0], **TIGHT)
        torch.testing.assert_close(cost[row, keep], alone[1][0], **TIGHT)
        assert torch.equal(steps[row, keep], alone[2][0])
        assert not steps[row, ~keep].any() and not cost[row, ~keep].any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block,step_norm", [((1, 3), False), ((1, 4), True)])
def test_gradients_reach_every_parameter(kind, block, step_norm):
    """(5) Under real pondering (steps vary), every parameter of the model and
    the halting unit gets a finite, non-zero gradient; the halting unit's
    matches central differences (rho = N + R depends on the h's)."""
    model, halting = make_model(kind), pondering_halting()
    ids, mask = batch("left")
    torch.manual_seed(3)
    probe = torch.randn(3, 7, SIZE["vocab_size"], dtype=torch.float64)

    def loss(attn="eager", logits_weight=1.0):
        logits, cost, steps = dense_looped_lm(model, block, halting, max_steps=4, eps=0.01, step_norm=step_norm,
                                              input_ids=ids, attention_mask=mask, attn=attn)
        return logits_weight * (logits * probe).sum() + 0.1 * cost.sum(), steps

    value, steps = loss()
    assert steps[mask.bool()].unique().numel() > 1
    value.backward()
    named = list(model.named_parameters()) + [("halting." + n, p) for n, p in halting.named_parameters()]
    for name, param in named:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # Central differences need a smooth forward: sdpa attention (eager rounds its softmax to float32). The
    # models' RMSNorm also computes in float32, so a norm after S (a coda, or the final norm without
    # step_norm) makes the logits noisy at 1e-7: there only the ponder cost is differenced.
    smooth = step_norm and block[1] == SIZE["num_hidden_layers"]
    weight = 1.0 if smooth else 0.0
    model.zero_grad(), halting.zero_grad()
    loss("sdpa", weight)[0].backward()
    delta = 1e-6
    for param, index in [(halting.bias, (0,)), (halting.weight, (0, 0)), (halting.weight, (0, 7))]:
        with torch.no_grad():
            param[index] += delta
            up = loss("sdpa", weight)[0]
            param[index] -= 2 * delta
            down = loss("sdpa", weight)[0]
            param[index] += delta
        torch.testing.assert_close(param.grad[index], (up - down) / (2 * delta), atol=1e-7, rtol=1e-6)


def fitted_halting(points, targets):
    """A halting unit whose logits at the given states are the targets."""
    design = torch.cat([points, torch.ones(points.shape[0], 1, dtype=points.dtype)], 1)
    solution = torch.linalg.pinv(design) @ targets
    halting = torch.nn.Linear(points.shape[1], 1).double()
    with torch.no_grad():
        halting.weight.copy_(solution[:-1][None])
        halting.bias.copy_(solution[-1:])
    return halting


def hand_layer(model, layer, x):
    """A decoder layer on one unpadded sequence (1, L, D) by torch's own causal
    sdpa (no mask of ours), positions 0..L-1."""
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        old = model.config._attn_implementation
        model.config._attn_implementation = "sdpa"
        try:
            return layer(x, attention_mask=None, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
        finally:
            model.config._attn_implementation = old


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_token_one_layer_block(kind):
    """(6) Token 0 halts at step 1, tokens 1 and 2 run to step 3. At step 2
    they read s_0^1 (as every token does); at step 3 they still read s_0^1,
    not the s_0^2 it would have had running on."""
    model, block = make_model(kind), (1, 2)
    layer = model.model.layers[1]
    ids = torch.randint(0, SIZE["vocab_size"], (1, 3), generator=torch.Generator().manual_seed(5))
    kw = dict(eps=0.01, step_norm=False, input_ids=ids)
    with torch.no_grad():
        *_, rec = dense_looped_lm(model, block, make_halting(-30.0), max_steps=2, debug=True, **kw)
        s1, s2 = rec["states"][0][0], rec["states"][1][0]
        halting = fitted_halting(torch.stack([s1[0], s1[1], s1[2], s2[1], s2[2]]),
                                 torch.tensor([30.0, -30.0, -30.0, -30.0, -30.0], dtype=torch.float64))
        _, _, steps, rec = dense_looped_lm(model, block, halting, max_steps=3, debug=True, **kw)
    assert steps.tolist() == [[1, 3, 3]]
    x0 = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]     # the prelude's output
    hand1 = hand_layer(model, layer, x0[None])[0]
    hand2 = hand_layer(model, layer, hand1[None])[0]
    hand3 = hand_layer(model, layer, torch.stack([hand1[0], hand2[1], hand2[2]])[None])[0]
    for n, hand in enumerate([hand1, hand2, hand3]):
        rows = slice(0, 3) if n == 0 else slice(1, 3)
        torch.testing.assert_close(rec["states"][n][0, rows], hand[rows], **LOOSE)
    running_on = hand_layer(model, layer, hand2[None])[0]           # token 0 not frozen
    assert (running_on[1:] - hand3[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_token_two_layer_block(kind):
    """(6b) In a block of two layers A, B, token 0 halts at step 1. At step 2
    layer B sees token 0 through its step-1 input to B, A(x^0)_0, not through
    A(s^1)_0."""
    model, block = make_model(kind), (1, 3)
    A, B = model.model.layers[1], model.model.layers[2]
    ids = torch.randint(0, SIZE["vocab_size"], (1, 3), generator=torch.Generator().manual_seed(6))
    kw = dict(eps=0.01, step_norm=False, input_ids=ids)
    with torch.no_grad():
        *_, rec = dense_looped_lm(model, block, make_halting(-30.0), max_steps=1, debug=True, **kw)
        s1 = rec["states"][0][0]
        halting = fitted_halting(s1, torch.tensor([30.0, -30.0, -30.0], dtype=torch.float64))
        _, _, steps, rec = dense_looped_lm(model, block, halting, max_steps=2, debug=True, **kw)
    assert steps.tolist() == [[1, 2, 2]]
    x0 = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    a1 = hand_layer(model, A, x0)[0]                                   # every token's input to B at step 1
    a2 = hand_layer(model, A, s1[None])[0]
    hand = hand_layer(model, B, torch.stack([a1[0], a2[1], a2[2]])[None])[0]
    torch.testing.assert_close(rec["states"][1][0, 1:], hand[1:], **LOOSE)
    unfrozen = hand_layer(model, B, a2[None])[0]
    assert (unfrozen[1:] - hand[1:]).abs().max() > 1e-3


def test_eager_and_sdpa_agree_under_pondering():
    model, halting = make_model("qwen3"), pondering_halting()
    ids, mask = batch("left")
    kw = dict(max_steps=4, eps=0.01, step_norm=True, input_ids=ids, attention_mask=mask)
    eager = dense_looped_lm(model, (1, 3), halting, attn="eager", **kw)
    sdpa = dense_looped_lm(model, (1, 3), halting, attn="sdpa", **kw)
    torch.testing.assert_close(eager[0], sdpa[0], **LOOSE)
    assert torch.equal(eager[2], sdpa[2])
