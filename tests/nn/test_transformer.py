"""ACTTransformerEncoder against the independent dense loop (tests/dense_encoder.py):
values, exact steps, ponder cost and gradients; work and memory that grow
with sum N; torch.nn conventions; bad input."""
import pytest
import torch
from torch import nn

import act_kernels as ak
from act_kernels.layers.kinds import EncoderLayerRows
from dense_encoder import dense_act_encoder
from helpers import DEVICE, assert_close, assert_grads_match, representative


def make(d=16, heads=2, ff=32, *, batch_first=True, norm_first=False, activation="relu", bias=True,
         dtype=torch.float64, max_steps=6, halting_bias=-1.0, halting_gain=4.0, dropout=0.0, backend="reference",
         seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=dropout, activation=activation, bias=bias,
                                       batch_first=batch_first, norm_first=norm_first)
    layer = layer.to(DEVICE, dtype)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=max_steps, halting_bias_init=halting_bias, backend=backend)
    enc = enc.to(DEVICE, dtype)
    with torch.no_grad():  # spread the halting steps over 1..max_steps
        enc.halting.weight.mul_(halting_gain)
    return enc


def inputs(batch=3, length=7, d=16, dtype=torch.float64, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, length, d, generator=g).to(DEVICE, dtype).requires_grad_()
    pad = None
    if padded:
        pad = torch.zeros(batch, length, dtype=torch.bool, device=DEVICE)
        pad[1 % batch, length - 2:] = True
        pad[2 % batch, 2:] = True
    return x, pad


def compare(enc, x, pad, causal, dtype, check_grads=True):
    """Runs the encoder and the dense loop on batch-first x; checks values,
    exact steps, ponder cost and every gradient."""
    layer = enc.layer
    src = x if layer.self_attn.batch_first else x.transpose(0, 1)
    y = enc(src, src_key_padding_mask=pad, is_causal=causal)
    cost, steps = enc.ponder_cost, enc.steps
    if not layer.self_attn.batch_first:
        y, cost, steps = y.transpose(0, 1), cost.t(), steps.t()
    y_d, cost_d, steps_d = dense_act_encoder(layer, enc.halting, x, pad, causal, enc.max_steps, enc.eps)
    real = torch.ones_like(steps_d, dtype=torch.bool) if pad is None else ~pad
    assert torch.equal(steps, steps_d), (steps, steps_d)
    assert bool((steps[~real] == 0).all()) and bool((cost[~real] == 0).all()) and bool((y[~real] == 0).all())
    assert cost.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y[real], y_d[real], dtype, "output")
    assert_close(cost, cost_d, dtype, "ponder cost")
    if check_grads:
        assert_grads_match(enc, x, (y, cost), (y_d, cost_d), dtype)
    return steps


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_dense_loop(batch_first, norm_first, causal):
    enc = make(batch_first=batch_first, norm_first=norm_first)
    x, pad = inputs()
    steps = compare(enc, x, pad, causal, torch.float64)
    assert len(set(steps[~pad].tolist())) >= 3, "the test needs spread halting"


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("gelu", False)])
def test_activation_and_bias(activation, bias):
    enc = make(activation=activation, bias=bias, norm_first=True)
    x, pad = inputs(seed=2)
    compare(enc, x, pad, False, torch.float64)


def test_all_halt_at_step_one_and_none_before_max():
    x, pad = inputs(seed=3)
    enc = make(halting_bias=30.0, halting_gain=0.0)
    steps = compare(enc, x, pad, False, torch.float64)
    assert bool((steps[~pad] == 1).all())
    enc = make(halting_bias=-30.0, halting_gain=0.0, max_steps=4)
    steps = compare(enc, x, pad, True, torch.float64)
    assert bool((steps[~pad] == 4).all())


def test_single_sequence_single_token_and_unbatched():
    enc = make()
    x, _ = inputs(batch=1, length=1, padded=False)
    compare(enc, x, None, False, torch.float64)
    x, _ = inputs(batch=1, length=6, padded=False, seed=4)
    y = enc(x[0], is_causal=True)
    assert y.shape == x.shape[1:] and enc.steps.shape == (6,) and enc.ponder_cost.shape == (6,)
    y_b = enc(x, is_causal=True)
    torch.testing.assert_close(y, y_b[0])


def test_float_causal_mask_and_float_padding_mask():
    enc = make(norm_first=True)
    x, pad = inputs(seed=6)
    mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=DEVICE, dtype=torch.float64)
    fpad = torch.zeros(pad.shape, dtype=torch.float64, device=DEVICE).masked_fill(pad, float("-inf"))
    y = enc(x, mask=mask, src_key_padding_mask=fpad)
    y_ref = enc(x, src_key_padding_mask=pad, is_causal=True)
    torch.testing.assert_close(y, y_ref)
    y_bool = enc(x, mask=mask.isinf(), src_key_padding_mask=pad)
    torch.testing.assert_close(y_bool, y_ref)


def test_packed_entry_point_matches_padded():
    enc = make()
    x, pad = inputs(seed=7)
    y = enc(x, src_key_padding_mask=pad)
    cost = enc.ponder_cost
    real = ~pad
    cu = torch.nn.functional.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    y_p = enc.forward_packed(x[real], cu)
    torch.testing.assert_close(y_p, y[real])
    torch.testing.assert_close(enc.ponder_cost, cost[real])
    assert enc.steps.shape == (int(real.sum()),)


def test_packed_entry_point_rejects_a_short_max_seqlen():
    """A max_seqlen below the longest sequence would make the kernels skip
    query blocks and leave outputs unwritten: it is an error instead."""
    enc = make()
    x = torch.randn(9, 16, dtype=torch.float64).to(DEVICE)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="max_seqlen must be an int >= the longest sequence"):
        enc.forward_packed(x, cu, max_seqlen=4)
    torch.testing.assert_close(enc.forward_packed(x, cu, max_seqlen=7), enc.forward_packed(x, cu))


def test_empty_sequence_in_packed_batch():
    enc = make()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 16, generator=g, dtype=torch.float64).to(DEVICE)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    y = enc.forward_packed(x, cu)
    y0 = enc.forward_packed(x[:4], cu[:2])
    torch.testing.assert_close(y[:4], y0)


@representative(norm_first=True, causal=True)
@pytest.mark.parametrize("norm_first,causal", [(False, False), (True, True)])
def test_triton_backends_under_interpreter(norm_first, causal):
    """The Triton attention and halting kernels (interpreted on the CPU) in float32."""
    enc = make(norm_first=norm_first, dtype=torch.float32, backend="triton", seed=1)
    x, pad = inputs(dtype=torch.float32, seed=9)
    compare(enc, x, pad, causal, torch.float32)


# ---------------------------------------------------------------------------
# work and memory grow with sum N
# ---------------------------------------------------------------------------

def test_feed_forward_rows_equal_sum_n_and_kv_once(monkeypatch):
    enc = make(max_steps=8)
    x, pad = inputs(batch=4, length=9, seed=10)
    ff_rows, kv_rows, q_rows = [], [], []
    key_values, forward = EncoderLayerRows.key_values, EncoderLayerRows.forward
    monkeypatch.setattr(EncoderLayerRows, "key_values",
                        lambda self, v, rows=None: (kv_rows.append(v.shape[0]), key_values(self, v, rows))[1])
    monkeypatch.setattr(EncoderLayerRows, "forward",
                        lambda self, v, rows, attend: (ff_rows.append(v.shape[0]), forward(self, v, rows, attend))[1])

    def counting(attend):
        return lambda q, kv, scale, p: (q_rows.append(q.shape[0]), attend(q, kv, scale, p))[1]

    monkeypatch.setattr(EncoderLayerRows, "_attention",
                        lambda self, h, attend, f=EncoderLayerRows._attention: f(self, h, counting(attend)))
    enc(x, src_key_padding_mask=pad)
    steps = enc.steps[~pad]
    total, sum_n = steps.numel(), int(steps.sum())
    assert sum(ff_rows) == sum_n and sum(q_rows) == sum_n
    running = [int((steps >= n).sum()) for n in range(1, int(steps.max()) + 1)]
    assert ff_rows == running
    # keys and values: every token once at step 1, then only the tokens that ran the step before
    assert kv_rows == [total] + running[:-1]
    assert sum_n < total * int(steps.max())   # the test needs skew


def test_saved_tensors_grow_with_sum_n():
    """Nothing sized (max_steps, T_tok, D) or (queries, keys) is saved for the
    backward: the bytes saved stay within a constant times sum N rows."""
    d, ff, max_steps = 32, 64, 20
    enc = make(d=d, heads=4, ff=ff, max_steps=max_steps, dtype=torch.float32, halting_bias=1.0, halting_gain=1.0)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 96, d, generator=g).to(DEVICE).requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = enc(x)
    steps = enc.steps
    tokens, sum_n = steps.numel(), int(steps.sum())
    assert int(steps.max()) <= max_steps
    row = 4 * (d + ff)          # one token's activations in one step, float32
    dense = max_steps * tokens * d * 4
    assert max(sizes) < tokens * tokens * 4, "an (A, T_tok) matrix was saved"
    assert max(sizes) < dense
    assert sum(sizes) <= 12 * (sum_n + tokens) * row, (sum(sizes), sum_n, tokens)
    y.sum().backward()


# ---------------------------------------------------------------------------
# dropout, conventions, bad input
# ---------------------------------------------------------------------------

def test_dropout_acts_in_train_mode_only():
    enc = make(dropout=0.3, dtype=torch.float32)
    x, pad = inputs(dtype=torch.float32, seed=12)
    enc.train()
    torch.manual_seed(0)
    a = enc(x, src_key_padding_mask=pad)
    torch.manual_seed(0)
    b = enc(x, src_key_padding_mask=pad)
    c = enc(x, src_key_padding_mask=pad)
    torch.testing.assert_close(a, b)          # repeatable under a seed
    assert not torch.allclose(a, c)           # random in training
    enc.eval()
    y = enc(x, src_key_padding_mask=pad)
    y_d, _, _ = dense_act_encoder(enc.layer, enc.halting, x, pad, False, enc.max_steps, enc.eps)
    assert_close(y[~pad], y_d[~pad], torch.float32, "eval mode has no dropout")


def test_module_attributes_and_halting_init():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=5, halting_bias_init=0.5)
    assert enc.layer is layer
    assert isinstance(enc.halting, nn.Linear) and enc.halting.in_features == 16 and enc.halting.out_features == 1
    assert float(enc.halting.bias) == 0.5
    assert {n for n, _ in enc.named_parameters()} >= {"halting.weight", "halting.bias", "layer.linear1.weight"}


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(eps=1.5), ValueError, "eps"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ak.nn.ACTTransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), **kwargs)
    with pytest.raises(TypeError, match="TransformerEncoderLayer"):
        ak.nn.ACTTransformerEncoder(nn.Linear(4, 4))


def test_bad_call_raises_before_any_kernel(monkeypatch):
    enc = make(dtype=torch.float32)
    x, pad = inputs(dtype=torch.float32)
    monkeypatch.setattr(EncoderLayerRows, "forward", lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    arbitrary = torch.zeros(7, 7, dtype=torch.bool, device=DEVICE)
    arbitrary[0, 3] = True
    cases = [
        (dict(mask=arbitrary), ValueError, "causal mask"),
        (dict(mask=torch.zeros(7, 7, device=DEVICE)), ValueError, "causal mask"),
        (dict(mask=torch.zeros(5, 5, dtype=torch.bool, device=DEVICE)), ValueError, "causal"),
        (dict(src_key_padding_mask=pad[:, :5]), ValueError, "src_key_padding_mask must have shape"),
        (dict(src_key_padding_mask=torch.full((3, 7), 0.5, device=DEVICE)), ValueError, "only 0 and -inf"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            enc(x, **kw)
    with pytest.raises(TypeError, match="float64.*float32"):
        enc(x.double())
    with pytest.raises(ValueError, match="d_model = 16"):
        enc(torch.randn(3, 7, 8, device=DEVICE))
    with pytest.raises(ValueError, match="src must be"):
        enc(torch.randn(2, 3, 7, 16, device=DEVICE))
    with pytest.raises(TypeError, match="int32"):
        enc.forward_packed(x[0], torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="rise from 0"):
        enc.forward_packed(x[0], torch.tensor([0, 5], dtype=torch.int32, device=DEVICE))


def test_autocast_bfloat16_on_cpu():
    """Under autocast the layer computes in bfloat16; the output keeps the
    input's dtype and stays close to the float32 result."""
    enc = make(dtype=torch.float32, halting_bias=2.0, halting_gain=0.0, max_steps=3)
    x, pad = inputs(dtype=torch.float32, seed=14)
    y32 = enc(x, src_key_padding_mask=pad)
    steps32 = enc.steps
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y16 = enc(x, src_key_padding_mask=pad)
    assert y16.dtype == torch.float32 and enc.ponder_cost.dtype == torch.float32
    assert torch.equal(enc.steps, steps32)   # h = sigmoid(2) for every token: N = 2 either way
    torch.testing.assert_close(y16[~pad], y32[~pad], atol=0.1, rtol=0.1)
    y16.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_readme_example_runs():
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "docs" / "examples" / "encoder_model.py"))
