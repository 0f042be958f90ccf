"""ACTTransformerEncoder over a block of several layers (an nn.TransformerEncoder):
one ponder step applies the layers in order and halting reads the block's
output. Checked against the independent dense loop for stacks
(tests/dense_encoder.py: dense_act_block): values, exact steps, ponder cost,
gradients; and the rows each layer computes and keeps (sum N per layer)."""
import pytest
import torch
from torch import nn

import act_kernels as ak
from act_kernels.layers.kinds import EncoderLayerRows
from dense_encoder import dense_act_block, dense_act_encoder
from helpers import DEVICE, assert_close, assert_grads_match


def make_block(layers=2, d=16, heads=2, ff=32, *, norm_first=True, batch_first=True, final_norm=False,
               dtype=torch.float64, max_steps=6, backend="reference", seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    stack = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if final_norm else None,
                                  enable_nested_tensor=False)
    enc = ak.nn.ACTTransformerEncoder(stack, max_steps=max_steps, halting_bias_init=-1.0, backend=backend)
    enc = enc.to(DEVICE, dtype)
    with torch.no_grad():
        enc.halting.weight.mul_(4.0)
        for p in stack.parameters():   # the cloned layers start equal: make them differ
            p.add_(0.05 * torch.randn_like(p))
    return enc


def block_inputs(batch=3, length=7, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, length, d, generator=g).to(DEVICE, dtype).requires_grad_()
    pad = torch.zeros(batch, length, dtype=torch.bool, device=DEVICE)
    pad[1, length - 2:] = True
    pad[2, 2:] = True
    return x, pad


def compare_block(enc, x, pad, causal, dtype):
    y = enc(x, src_key_padding_mask=pad, is_causal=causal)
    cost, steps = enc.ponder_cost, enc.steps
    y_d, cost_d, steps_d = dense_act_block(enc.layers, enc.final_norm, enc.halting, x, pad, causal,
                                           enc.max_steps, enc.eps)
    real = ~pad
    assert torch.equal(steps, steps_d), (steps, steps_d)
    assert 1 < int(steps[real].min()) or int(steps[real].max()) > 1   # halting spreads over steps
    assert_close(y[real], y_d[real], dtype, "output")
    assert_close(cost, cost_d, dtype, "ponder cost")
    assert_grads_match(enc, x, (y, cost), (y_d, cost_d), dtype)
    return steps


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
def test_block_matches_dense_loop(layers, causal, norm_first):
    enc = make_block(layers, norm_first=norm_first)
    x, pad = block_inputs()
    steps = compare_block(enc, x, pad, causal, torch.float64)
    assert len(set(steps[~pad].tolist())) > 1


def test_block_with_final_norm_and_seq_first():
    enc = make_block(2, final_norm=True, batch_first=False)
    x, pad = block_inputs(seed=3)
    y = enc(x.transpose(0, 1), src_key_padding_mask=pad, is_causal=True)
    y_d, cost_d, steps_d = dense_act_block(enc.layers, enc.final_norm, enc.halting, x, pad, True,
                                           enc.max_steps, enc.eps)
    assert torch.equal(enc.steps.t(), steps_d)
    assert_close(y.transpose(0, 1)[~pad], y_d[~pad], torch.float64, "output")


def test_one_layer_block_is_the_layer():
    """A stack of one layer computes what that layer alone does (and what
    the single-layer dense loop gives)."""
    enc = make_block(1)
    x, pad = block_inputs(seed=2)
    y = enc(x, src_key_padding_mask=pad, is_causal=True)
    y_d, _, steps_d = dense_act_encoder(enc.layers[0], enc.halting, x, pad, True, enc.max_steps, enc.eps)
    assert torch.equal(enc.steps, steps_d)
    assert_close(y[~pad], y_d[~pad], torch.float64, "output")


@pytest.mark.parametrize("backend", ["triton"])
def test_block_on_triton_under_the_interpreter(backend):
    pytest.importorskip("triton")
    ref = make_block(2, dtype=torch.float32, backend="reference")
    enc = make_block(2, dtype=torch.float32, backend=backend)
    x, pad = block_inputs(dtype=torch.float32, seed=4)
    y_r = ref(x, src_key_padding_mask=pad, is_causal=True)
    y = enc(x, src_key_padding_mask=pad, is_causal=True)
    assert torch.equal(enc.steps, ref.steps)
    assert_close(y[~pad], y_r[~pad], torch.float32, "output")


def test_each_layer_computes_sum_n_rows(monkeypatch):
    """Work grows with sum N: every layer's feed-forward runs sum N rows; the
    first layer projects keys and values for sum N + (tokens still running at
    the last step's start) rows at most, the later layers for sum N."""
    enc = make_block(2)
    x, pad = block_inputs(seed=6)
    ff_rows = [[], []]
    weights = [layer.linear1.weight for layer in enc.layers]
    feed_forward = EncoderLayerRows._feed_forward

    def counting(self, rows):
        ff_rows[[w is self.l1_w for w in weights].index(True)].append(rows.shape[0])
        return feed_forward(self, rows)

    monkeypatch.setattr(EncoderLayerRows, "_feed_forward", counting)
    with torch.no_grad():
        enc(x, src_key_padding_mask=pad)
    total = int(enc.steps.sum())
    assert [sum(r) for r in ff_rows] == [total, total]


def test_block_bad_construction():
    with pytest.raises(TypeError, match="TransformerEncoderLayer or a torch.nn.TransformerEncoder"):
        ak.nn.ACTTransformerEncoder(nn.Linear(4, 4))
    a = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    b = nn.TransformerEncoderLayer(8, 2, 16, batch_first=False)
    stack = nn.TransformerEncoder(a, 2, enable_nested_tensor=False)
    stack.layers[1] = b
    with pytest.raises(ValueError, match="share d_model and batch_first"):
        ak.nn.ACTTransformerEncoder(stack)
