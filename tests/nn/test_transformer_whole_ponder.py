"""The per-token encoder's ponder over fixed key/value pools
(layers/token_ponder.py, design §9, §11): the path every backend but "reference"
takes. Checked against the independent dense loop (values, exact steps,
ponder cost, every gradient), against the step-by-step oracle path, and for
what it must not do: take layers it cannot compute exactly, run a second
backward over pools the first restored, or mix two calls' pools."""
import pytest
import torch
from torch import nn

import act_kernels.layers.transformer as transformer
from dense_encoder import dense_act_block, dense_act_encoder
from helpers import DEVICE, assert_close, assert_grads_match, representative
from test_transformer import compare, inputs, make
from test_transformer_block import block_inputs, compare_block, make_block


@pytest.fixture
def calls(monkeypatch):
    """Records, for each call that ran on the pool path, whether autograd recorded it."""
    seen = []
    original = transformer.pool_ponder

    def pool_ponder(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "pool_ponder", pool_ponder)
    return seen


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "equal_lengths"])
def test_matches_dense_loop(batch_first, norm_first, causal, padded, calls):
    enc = make(batch_first=batch_first, norm_first=norm_first, backend="auto")
    x, pad = inputs(padded=padded)
    steps = compare(enc, x, pad, causal, torch.float64)
    assert calls == [True]
    assert len(set(steps[~pad].tolist() if pad is not None else steps.flatten().tolist())) > 2


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("gelu", False)])
def test_activation_and_bias(activation, bias, calls):
    enc = make(activation=activation, bias=bias, backend="auto", norm_first=True)
    x, pad = inputs(seed=3)
    compare(enc, x, pad, True, torch.float64)
    assert calls == [True]


@pytest.mark.parametrize("layers,final_norm,norm_first", [(2, False, True), (3, True, False), (2, True, True)])
def test_block_matches_dense_loop(layers, final_norm, norm_first, calls):
    enc = make_block(layers, norm_first=norm_first, final_norm=final_norm, backend="auto")
    x, pad = block_inputs()
    compare_block(enc, x, pad, True, torch.float64)
    assert calls == [True]


@pytest.mark.parametrize("bias,expect", [(40.0, 1), (-40.0, 6)], ids=["all_halt_at_1", "none_before_max"])
def test_extreme_halting(bias, expect, calls):
    enc = make(halting_bias=bias, backend="auto")
    x, pad = inputs(seed=4)
    steps = compare(enc, x, pad, False, torch.float64)
    assert bool((steps[~pad] == expect).all())


def test_block_where_every_token_runs_every_step(calls):
    """Every step writes every token's rows at every layer: the pools are
    swapped whole instead of written row by row, and swapped back in the
    backward."""
    enc = make_block(3, norm_first=False, final_norm=True, backend="auto")
    with torch.no_grad():
        enc.halting.bias.fill_(-40.0)
    x, pad = block_inputs(seed=5)
    y = enc(x, src_key_padding_mask=pad, is_causal=True)
    assert bool((enc.steps[~pad] == enc.max_steps).all())
    y_d, cost_d, steps_d = dense_act_block(enc.layers, enc.final_norm, enc.halting, x, pad, True, enc.max_steps,
                                           enc.eps)
    assert torch.equal(enc.steps, steps_d)
    assert_close(y[~pad], y_d[~pad], torch.float64, "output")
    assert_grads_match(enc, x, (y, enc.ponder_cost), (y_d, cost_d), torch.float64)
    assert calls == [True]


def test_single_token_and_unbatched(calls):
    enc = make(backend="auto")
    x, _ = inputs(batch=1, length=1, padded=False)
    compare(enc, x, None, True, torch.float64)
    y = enc(x[0])
    assert y.shape == (1, 16) and enc.steps.shape == (1,)


def test_agrees_with_the_oracle_path_in_float32():
    """The same module on "auto" (the pool path) and on
    "reference" (the step-by-step autograd loop): equal steps, outputs and
    gradients to float32 rounding."""
    enc = make(dtype=torch.float32, norm_first=True, backend="auto", seed=2)
    x, pad = inputs(dtype=torch.float32, seed=5)
    results = []
    for backend in ("auto", "reference"):
        enc.backend = backend
        y = enc(x, src_key_padding_mask=pad, is_causal=True)
        grads = torch.autograd.grad(y.square().sum() + enc.ponder_cost.sum(), [x, *enc.parameters()])
        results.append((y, enc.steps, grads))
    (y_a, s_a, g_a), (y_r, s_r, g_r) = results
    assert torch.equal(s_a, s_r)
    assert_close(y_a, y_r, torch.float32, "output")
    for a, b in zip(g_a, g_r):
        assert_close(a, b, torch.float32, "gradient")


def test_frozen_parameters_input_without_grad_and_no_grad(calls):
    """Frozen parameters get no gradient, an input that needs none gets
    none, and under no_grad the same values come with nothing recorded."""
    enc = make(backend="auto")
    x, pad = inputs(seed=6)
    enc.layer.linear1.weight.requires_grad_(False)
    enc.layer.self_attn.in_proj_bias.requires_grad_(False)
    y = enc(x.detach(), src_key_padding_mask=pad)
    assert y.requires_grad
    y.sum().backward()
    assert enc.layer.linear1.weight.grad is None and enc.layer.self_attn.in_proj_bias.grad is None
    assert enc.layer.linear2.weight.grad is not None and enc.layer.self_attn.in_proj_weight.grad is not None
    with torch.no_grad():
        z = enc(x, src_key_padding_mask=pad)
    assert not z.requires_grad
    assert calls == [True, False]
    torch.testing.assert_close(y.detach(), z, rtol=0, atol=0)


def test_a_second_backward_over_one_forward_raises():
    enc = make(backend="auto")
    x, pad = inputs(seed=7)
    y = enc(x, src_key_padding_mask=pad)
    loss = y.sum() + enc.ponder_cost.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_takes_only_layers_it_computes_exactly(calls):
    """Active dropout in training, a norm other than LayerNorm and the
    "reference" backend run on the step-by-step path."""
    enc = make(dropout=0.1, dtype=torch.float32, backend="auto")
    x, pad = inputs(dtype=torch.float32, seed=8)
    enc.train()
    enc(x, src_key_padding_mask=pad)
    assert calls == []
    enc.eval()
    enc(x, src_key_padding_mask=pad)
    assert calls == [True]
    enc = make(backend="auto")
    enc.layer.norm2 = nn.RMSNorm(16).to(DEVICE, torch.float64)
    enc(inputs()[0])
    enc.backend = "reference"
    enc.layer.norm2 = nn.LayerNorm(16).to(DEVICE, torch.float64)
    enc(inputs()[0])
    assert calls == [True]


def test_non_contiguous_and_stride_zero_input(calls):
    enc = make(backend="auto")
    base = torch.randn(7, 3, 16, dtype=torch.float64, device=DEVICE)
    x = base.transpose(0, 1)                       # (3, 7, 16), not contiguous
    wide = torch.randn(3, 1, 16, dtype=torch.float64, device=DEVICE).expand(3, 7, 16)   # stride 0 over L
    for src in (x, wide):
        y = enc(src)
        y_d, _, steps_d = dense_act_encoder(enc.layer, enc.halting, src.contiguous(), None, False, enc.max_steps,
                                            enc.eps)
        assert torch.equal(enc.steps, steps_d)
        assert_close(y, y_d, torch.float64, "output")


def test_autocast_bfloat16_on_cpu():
    """Under CPU autocast the projections run in bfloat16 and the pools hold
    bfloat16 rows; the result is close to float32 and its gradients flow."""
    enc = make(dtype=torch.float32, backend="auto", halting_bias=1.0, norm_first=True)
    x, pad = inputs(dtype=torch.float32, seed=9)
    y32 = enc(x, src_key_padding_mask=pad).detach()
    steps32 = enc.steps.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = enc(x, src_key_padding_mask=pad)
    assert y.dtype == torch.float32
    same = enc.steps == steps32
    assert bool(same.float().mean() > 0.8)
    torch.testing.assert_close(y[same & ~pad], y32[same & ~pad], atol=0.1, rtol=0.05)
    (y.sum() + enc.ponder_cost.sum()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@representative(norm_first=True, causal=True)
@pytest.mark.parametrize("norm_first,causal", [(False, False), (True, True)])
def test_triton_kernels_under_interpreter(norm_first, causal, calls):
    """The Triton attention and halting kernels on the whole-ponder path
    (interpreted on the CPU), float32, against the dense loop."""
    pytest.importorskip("triton")
    enc = make(norm_first=norm_first, dtype=torch.float32, backend="triton", seed=1)
    x, pad = inputs(dtype=torch.float32, seed=9)
    compare(enc, x, pad, causal, torch.float32)
    assert calls == [True]


def test_backward_restores_the_pools():
    """Two backwards of two forwards over one module, interleaved, give the
    gradients of each alone: each call's pools are its own, and every
    restored row is the one its step read."""
    enc = make(backend="auto", norm_first=True)
    x1, pad = inputs(seed=10)
    x2, _ = inputs(seed=11)
    alone = []
    for x in (x1, x2):
        y = enc(x, src_key_padding_mask=pad, is_causal=True)
        alone.append(torch.autograd.grad(y.square().sum(), [x, enc.layer.linear1.weight]))
    y1 = enc(x1, src_key_padding_mask=pad, is_causal=True)
    y2 = enc(x2, src_key_padding_mask=pad, is_causal=True)
    both = [torch.autograd.grad(y.square().sum(), [x, enc.layer.linear1.weight]) for y, x in ((y2, x2), (y1, x1))]
    for a, b in zip(alone, reversed(both)):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_agrees_with_the_oracle_path(dtype):
    """A half-precision model on the pool path (the twins' halting step,
    attention in float32 on padded copies of the pools) against the
    step-by-step path on the same module: the same steps and outputs, and
    gradients equal to half-precision rounding."""
    enc = make(dtype=dtype, backend="auto", norm_first=True, halting_bias=1.0, halting_gain=1.0)
    x, pad = inputs(dtype=dtype, seed=3)
    results = []
    for backend in ("auto", "reference"):
        enc.backend = backend
        y = enc(x, src_key_padding_mask=pad, is_causal=True)
        assert y.dtype == dtype
        grads = torch.autograd.grad(y.float().square().sum() + enc.ponder_cost.sum(), [x, *enc.parameters()])
        results.append((y, enc.steps.clone(), grads))
    (y_a, s_a, g_a), (y_r, s_r, g_r) = results
    assert torch.equal(s_a, s_r)
    torch.testing.assert_close(y_a, y_r, atol=2e-2, rtol=2e-2)
    for a, b in zip(g_a, g_r):
        assert bool(torch.isfinite(a).all())
        assert float((a.float() - b.float()).norm()) <= 2e-2 * float(b.float().norm()) + 1e-3


def test_saved_tensors_grow_with_sum_n_and_hooks_see_them():
    """Everything the pool path keeps for the backward passes through
    saved-tensor hooks (so offloading them works), nothing saved is of size
    (max_steps, T_tok, D) or (queries, keys), and the bytes stay within a
    constant times sum N rows; a backward through hooks that copy every
    saved tensor gives the same gradients."""
    d, ff, max_steps = 32, 64, 20
    enc = make(d=d, heads=4, ff=ff, max_steps=max_steps, dtype=torch.float32, halting_bias=1.0, halting_gain=1.0,
               backend="auto")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 96, d, generator=g).to(DEVICE).requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t.clone()   # what an offloading hook hands back: another tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = enc(x)
    steps = enc.steps
    tokens, sum_n = steps.numel(), int(steps.sum())
    row = 4 * (d + ff)
    assert max(sizes) < tokens * tokens * 4, "an (A, T_tok) matrix was saved"
    assert max(sizes) < max_steps * tokens * d * 4
    assert sum(sizes) <= 12 * (sum_n + tokens) * row, (sum(sizes), sum_n, tokens)
    got = torch.autograd.grad(y.square().sum(), [x, enc.layer.linear1.weight])
    want = torch.autograd.grad(enc(x).square().sum(), [x, enc.layer.linear1.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_with_an_empty_sequence_and_a_longer_max_seqlen(causal, calls):
    """An empty sequence between two others, and a max_seqlen above the
    longest: each sequence's rows equal its own call's."""
    enc = make(backend="auto")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 16, generator=g, dtype=torch.float64).to(DEVICE)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    y = enc.forward_packed(x, cu, is_causal=causal, max_seqlen=7)
    steps = enc.steps.clone()
    for lo, hi in ((0, 4), (4, 9)):
        alone = enc.forward_packed(x[lo:hi], torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE),
                                   is_causal=causal)
        assert torch.equal(enc.steps, steps[lo:hi])
        torch.testing.assert_close(y[lo:hi], alone)
    assert len(calls) == 3
