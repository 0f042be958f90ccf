"""The ACT layers against a naive per-row, per-step implementation."""
import types

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import act_kernels.nn as acn
from backends import KERNEL_BACKENDS
from helpers import DEVICE, representative

# on a GPU machine the layers run on CUDA tensors (the naive twin too)
BACKENDS = [pytest.param("reference", id="reference"), *KERNEL_BACKENDS]
LAYERS = {"rnn": acn.ACTRNN, "gru": acn.ACTGRU, "lstm": acn.ACTLSTM}


def naive_layer(layer, x, hx, lengths):
    """One sequence and one ponder step at a time, written from the paper.
    x (L, B, I) time-major; hx: per-row initial state; returns per-row lists."""
    lstm = isinstance(layer, acn.ACTLSTM)
    M, eps = layer.ponder_cell().max_steps, layer.ponder_cell().eps
    w, c = layer.halting.weight[0], layer.halting.bias[0]
    outs, costs, steps, finals = [], [], [], []
    for b in range(x.shape[1]):
        state = tuple(t[b:b + 1] for t in hx) if lstm else hx[b:b + 1]
        row_out, row_cost, row_steps = [], [], []
        for t in range(lengths[b]):
            cum = 0.0
            mean = None
            state_n = state
            for n in range(1, M + 1):
                flag = torch.full((1, 1), 1.0 if n == 1 else 0.0, dtype=x.dtype, device=x.device)
                inp = torch.cat([x[t, b:b + 1], flag], 1)
                state_n = layer.cell(inp, state_n)
                hid = state_n[0] if lstm else state_n
                h = torch.sigmoid(hid[0] @ w + c)
                halt = n == M or bool(cum + h >= 1 - eps)
                p = (1 - cum) if halt else h
                parts = state_n if lstm else (state_n,)
                mean = [p * s for s in parts] if mean is None else [m + p * s for m, s in zip(mean, parts)]
                if halt:
                    row_cost.append(n + p)
                    row_steps.append(n)
                    break
                cum = cum + h
            state = tuple(mean) if lstm else mean[0]
            row_out.append((mean[0])[0])
        outs.append(row_out)
        costs.append(row_cost)
        steps.append(row_steps)
        finals.append(state)
    return outs, costs, steps, finals


def build(kind, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LAYERS[kind](3, 6, max_steps=6, halting_bias_init=-1.0, **kw).double().to(DEVICE)
    with torch.no_grad():
        layer.halting.weight.mul_(3.0)  # spread the halting times
    return layer


@representative(batch_first=True, give_hx=True)   # per kind
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("give_hx", [False, True])
def test_layer_matches_naive(backend, kind, batch_first, give_hx):
    layer = build(kind, backend=backend, batch_first=batch_first)
    L, B = 4, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(L, B, 3, generator=g, dtype=torch.float64).to(DEVICE)
    lstm = kind == "lstm"
    hx = None
    if give_hx:
        hx = tuple(torch.randn(1, B, 6, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)) if lstm \
            else torch.randn(1, B, 6, generator=g, dtype=torch.float64).to(DEVICE)
    out, h_n = layer(x.transpose(0, 1) if batch_first else x, hx)
    if batch_first:
        assert out.shape == (B, L, 6) and layer.ponder_cost.shape == (B, L)
        assert layer.steps.shape == (1, B, L)
        out, cost, steps = out.transpose(0, 1), layer.ponder_cost.t(), layer.steps[0].t()
    else:
        assert out.shape == (L, B, 6) and layer.ponder_cost.shape == (L, B) and layer.steps.shape == (1, L, B)
        cost, steps = layer.ponder_cost, layer.steps[0]
    assert layer.steps.dtype == torch.int64

    zeros = torch.zeros(B, 6, dtype=torch.float64, device=DEVICE)
    init = (tuple(t[0] for t in hx) if lstm else hx[0]) if give_hx else ((zeros, zeros) if lstm else zeros)
    n_out, n_cost, n_steps, n_final = naive_layer(layer, x, init, [L] * B)
    for b in range(B):
        torch.testing.assert_close(out[:, b], torch.stack(n_out[b]))
        torch.testing.assert_close(cost[:, b], torch.stack([torch.as_tensor(v) for v in n_cost[b]]))
        assert steps[:, b].tolist() == n_steps[b]
        finals = n_final[b] if lstm else (n_final[b],)
        got = h_n if lstm else (h_n,)
        assert all(g_.shape == (1, B, 6) for g_ in got)
        for a, e in zip(got, finals):
            torch.testing.assert_close(a[0, b], e[0])

    # gradients of a loss over outputs and ponder cost
    loss = out.square().sum() + 0.1 * cost.sum()
    grads = torch.autograd.grad(loss, list(layer.parameters()))
    n_loss = sum(torch.stack(o).square().sum() for o in n_out) + 0.1 * sum(sum(c) for c in n_cost)
    n_grads = torch.autograd.grad(n_loss, list(layer.parameters()))
    for a, e in zip(grads, n_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_packed_sequence(backend, kind, monkeypatch):
    import act_kernels.layers.rnn as rnn

    layer = build(kind, seed=2, backend=backend, batch_first=True)
    lengths = [2, 5, 1, 3]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64).to(DEVICE)
    lstm = kind == "lstm"
    hx = tuple(torch.randn(1, 4, 6, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)) if lstm \
        else torch.randn(1, 4, 6, generator=g, dtype=torch.float64).to(DEVICE)
    calls = {"rows": 0}
    cell_forward = layer.cell.forward

    def counting(inp, state):
        calls["rows"] += inp.shape[0]
        return cell_forward(inp, state)

    layer.cell.forward = counting
    # on a kernel backend a ponder step runs the fused gate kernels instead of the cell module
    gate_kernels = rnn.gate_kernels

    def counting_kernels(backend):
        impl = gate_kernels(backend)

        def counted(fn):
            def step(gi, *args):
                calls["rows"] += gi.shape[0]
                return fn(gi, *args)
            return step
        return types.SimpleNamespace(
            gru_halting_step=counted(impl.gru_halting_step), lstm_halting_step=counted(impl.lstm_halting_step),
            gru_gates_backward=impl.gru_gates_backward, lstm_gates_backward=impl.lstm_gates_backward)

    monkeypatch.setattr(rnn, "gate_kernels", counting_kernels)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, h_n = layer(packed, hx)
    assert isinstance(out, type(packed))
    assert layer.ponder_cost.shape == out.data.shape[:1]
    # no padding computed: every cell call was for a real time step of a real sequence
    assert calls["rows"] == int(layer.steps.sum())
    padded, out_lengths = pad_packed_sequence(out, batch_first=True)
    assert out_lengths.tolist() == lengths

    layer.cell.forward = cell_forward
    init = tuple(t[0] for t in hx) if lstm else hx[0]
    n_out, n_cost, n_steps, n_final = naive_layer(layer, x.transpose(0, 1), init, lengths)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(padded[b, :n], torch.stack(n_out[b]))
        got = h_n if lstm else (h_n,)
        fin = n_final[b] if lstm else (n_final[b],)
        for a, e in zip(got, fin):
            torch.testing.assert_close(a[0, b], e[0])
    loss = padded.square().sum() + 0.1 * layer.ponder_cost.sum()
    n_loss = sum(torch.stack(o).square().sum() for o in n_out) + 0.1 * sum(sum(c) for c in n_cost)
    for a, e in zip(torch.autograd.grad(loss, list(layer.parameters())),
                    torch.autograd.grad(n_loss, list(layer.parameters()))):
        torch.testing.assert_close(a, e)


def test_layer_attributes_and_unbatched():
    layer = acn.ACTGRU(4, 8, max_steps=3)
    assert isinstance(layer.cell, nn.GRUCell) and layer.cell.input_size == 5
    assert isinstance(layer.halting, nn.Linear) and layer.halting.out_features == 1
    assert float(layer.halting.bias.detach()) == 1.0  # the paper's initial halting bias
    out, h_n = layer(torch.randn(5, 4))
    assert out.shape == (5, 8) and h_n.shape == (1, 8) and layer.ponder_cost.shape == (5,)
    assert layer.steps.shape == (1, 5)
    assert layer.ponder_cost.requires_grad
    with pytest.raises(ValueError, match="input_size = 4"):
        layer(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="hidden state must have shape"):
        layer(torch.randn(5, 2, 4), torch.zeros(2, 8))


def test_act_cell_wraps_any_cell():
    cell = acn.ACTCell(nn.LSTMCell(3, 7), 7, max_steps=4, halting_bias_init=-2.0)
    x = torch.randn(5, 2)
    out = cell(x, (torch.zeros(5, 7), torch.zeros(5, 7)))
    assert isinstance(out.state, tuple) and out.state[1].shape == (5, 7)
    assert out.steps.shape == (5,) and bool((out.steps >= 1).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_steps=0), "max_steps"),
    (dict(eps=1.5), "eps"),
    (dict(eps=0.0), "eps"),
    (dict(backend="fast"), "backend must be one of"),
])
def test_bad_options_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        acn.ACTGRU(3, 4, **kwargs)


def test_input_dtype_and_device_mismatch_named():
    rnn = acn.ACTGRU(3, 4)
    with pytest.raises(TypeError, match="input has dtype torch.float64, but the layer's parameters are torch.float32"):
        rnn(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        rnn(torch.nn.utils.rnn.pack_sequence([torch.randn(3, 3, dtype=torch.float64)]))


def test_nn_reachable_from_the_package():
    import subprocess
    import sys

    code = "import act_kernels as ak; print(ak.nn.ACTGRU.__name__, ak.nn.ACTTransformerEncoder.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTGRU", "ACTTransformerEncoder"]
