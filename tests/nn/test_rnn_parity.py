"""torch.nn parity of the ACT recurrent layers: num_layers, dropout between
layers, bidirectional (dense and PackedSequence), h_n / c_n shapes exactly as
torch's modules give them, and one cell and halting unit per (layer, direction)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import act_kernels as ak
from helpers import DEVICE

KINDS = {"rnn": (ak.nn.ACTRNN, nn.RNN), "gru": (ak.nn.ACTGRU, nn.GRU), "lstm": (ak.nn.ACTLSTM, nn.LSTM)}


def build(kind, **kw):
    torch.manual_seed(0)
    layer = KINDS[kind][0](3, 5, max_steps=4, halting_bias_init=-1.0, **kw).double().to(DEVICE)
    with torch.no_grad():
        for act in layer.acts:
            act.halting.weight.mul_(3.0)   # spread the halting steps
    return layer


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_shapes_as_torch(kind, num_layers, bidirectional, batch_first):
    ours = build(kind, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    theirs = KINDS[kind][1](3, 5, num_layers, bidirectional=bidirectional, batch_first=batch_first).double().to(DEVICE)
    for x in (torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE), torch.randn(4, 3, dtype=torch.float64, device=DEVICE)):
        out, h = ours(x)
        ref_out, ref_h = theirs(x)
        assert out.shape == ref_out.shape
        for a, b in zip(h if kind == "lstm" else (h,), ref_h if kind == "lstm" else (ref_h,)):
            assert a.shape == b.shape
        assert ours.ponder_cost.shape == out.shape[:-1]
        assert ours.steps.shape == (num_layers * (2 if bidirectional else 1), *out.shape[:-1])
        # hx in torch's shape is accepted and its shape checked
        out2, _ = ours(x, ref_h)
        assert out2.shape == out.shape
    assert len(ours.acts) == num_layers * (2 if bidirectional else 1)
    params = [id(p) for act in ours.acts for p in act.parameters()]
    assert len(params) == len(set(params))          # every (layer, direction) its own cell and halting unit
    assert ours.cell is ours.ponder_cell(0).cell and ours.halting is ours.ponder_cell(0).halting


def manual(layer, x, lstm):
    """The layer written out with its ponder cells: each direction of each
    layer steps its ACTCell over the sequence (reversed for the reverse one)."""
    dirs = layer.num_directions
    finals, cost = [], 0
    for layer_index in range(layer.num_layers):
        outs = []
        for d in range(dirs):
            act = layer.ponder_cell(layer_index, reverse=d == 1)
            zeros = torch.zeros(x.shape[1], 5, dtype=x.dtype, device=x.device)
            state = (zeros, zeros) if lstm else zeros
            seq = [None] * x.shape[0]
            for t in (range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])):
                out = act(x[t], state)
                state = out.state
                seq[t] = state[0] if lstm else state
                cost = cost + torch.zeros(x.shape[0], x.shape[1], dtype=out.ponder_cost.dtype,
                                          device=x.device).index_put((torch.tensor([t]),), out.ponder_cost[None])
            outs.append(torch.stack(seq))
            finals.append(state)
        x = torch.cat(outs, -1)
    h = torch.stack([f[0] for f in finals]) if lstm else torch.stack(finals)
    return x, h, cost


@pytest.mark.parametrize("kind", list(KINDS))
def test_stacked_bidirectional_matches_its_cells(kind):
    layer = build(kind, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=DEVICE)
    out, h = layer(x)
    m_out, m_h, m_cost = manual(layer, x, kind == "lstm")
    torch.testing.assert_close(out, m_out)
    torch.testing.assert_close(h[0] if kind == "lstm" else h, m_h)
    torch.testing.assert_close(layer.ponder_cost, m_cost)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_packed_bidirectional_ponders_each_sequence_from_its_own_end(kind):
    layer = build(kind, num_layers=2, bidirectional=True)
    lengths = [2, 5, 1, 3]
    x = torch.randn(5, 4, 3, dtype=torch.float64, device=DEVICE)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h = layer(packed)
    assert layer.steps.shape == (4, packed.data.shape[0]) and layer.ponder_cost.shape == packed.data.shape[:1]
    cost = layer.ponder_cost
    padded, _ = pad_packed_sequence(out)
    hs = h if kind == "lstm" else (h,)
    for b, n in enumerate(lengths):
        alone, h_alone = layer(x[:n, b:b + 1])         # the sequence on its own, no padding
        torch.testing.assert_close(padded[:n, b], alone[:, 0])
        for a, e in zip(hs, h_alone if kind == "lstm" else (h_alone,)):
            torch.testing.assert_close(a[:, b], e[:, 0])
    (padded.sum() + cost.sum()).backward()


def test_dropout_between_layers_in_training_only():
    x = torch.randn(6, 3, 3, dtype=torch.float64, device=DEVICE)
    layer = build("gru", num_layers=2, dropout=0.5)
    layer.train()
    a, _ = layer(x)
    b, _ = layer(x)
    assert not torch.equal(a, b)                       # random masks between layers
    layer.eval()
    c, _ = layer(x)
    d, _ = layer(x)
    assert torch.equal(c, d)
    single = build("gru", num_layers=1, dropout=0.5)   # no layer after the only one: no dropout
    single.train()
    e, _ = single(x)
    f, _ = single(x)
    assert torch.equal(e, f)


def test_bad_options():
    with pytest.raises(ValueError, match="proj_size"):
        ak.nn.ACTLSTM(3, 5, proj_size=2)
    with pytest.raises(ValueError, match="num_layers"):
        ak.nn.ACTGRU(3, 5, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        ak.nn.ACTGRU(3, 5, dropout=1.5)
    with pytest.raises(ValueError, match="no reverse direction"):
        ak.nn.ACTGRU(3, 5).ponder_cell(0, reverse=True)
    layer = ak.nn.ACTGRU(3, 5, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"hidden state must have shape \(4, 2, 5\)"):
        layer(torch.randn(4, 2, 3), torch.zeros(1, 2, 5))
