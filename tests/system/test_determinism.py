"""Bitwise-identical outputs and gradients across two runs, on the CPU for the
reference paths (ponder, pondernet, ragged attention, the layers); the
kernels' runs on a GPU are in act/test_act_backends.py and attention/test_attention.py (marked
gpu: only there can a race or an order-dependent reduction show)."""
import torch

import act_kernels as ak
from helpers import DEVICE, TanhStep, make_problem


def twice(fn):
    return fn(), fn()


def grads_of(loss, inputs):
    return [g for g in torch.autograd.grad(loss, inputs, allow_unused=True) if g is not None]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ponder_and_pondernet_reference():
    s0, w, c = make_problem(16, 24, torch.float32, -1.0)

    def run_ponder():
        step = TanhStep(16, 24, scale=2.0)
        out = ak.ponder(step, s0, w, c, max_steps=8, backend="reference")
        return [out.state, out.ponder_cost, *grads_of(out.state.sum() + out.ponder_cost.sum(), [s0, w, c, *step.params()])]

    def run_pondernet():
        step = TanhStep(16, 24, scale=2.0)
        out = ak.pondernet(step, s0, w, c, max_steps=8, backend="reference")
        loss = ak.pondernet_loss(out, out.states.square().sum(1), beta=0.1)
        return [out.p, out.kl, *grads_of(loss, [s0, w, c, *step.params()])]

    assert_bitwise(*twice(run_ponder))
    assert_bitwise(*twice(run_pondernet))


def test_layers():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    models = [ak.nn.ACTGRU(4, 8, max_steps=5).to(DEVICE), ak.nn.ACTTransformerEncoder(layer, max_steps=5).to(DEVICE)]
    inputs = [torch.randn(6, 3, 4, device=DEVICE), torch.randn(3, 6, 16, device=DEVICE)]
    for model, x in zip(models, inputs):
        def run():
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            return [out, model.ponder_cost, *grads_of(out.sum() + model.ponder_cost.sum(), list(model.parameters()))]

        assert_bitwise(*twice(run))
