"""torch.compile of a model using each layer runs and matches eager (graph
breaks allowed: the README lists them); the ops themselves compile with
fullgraph=True in act/test_act_library.py, attention/test_attention.py and
pondernet/test_pondernet.py."""
import pytest
import torch

import act_kernels as ak
from helpers import DEVICE


def model_and_input(name):
    torch.manual_seed(0)
    if name == "ACTTransformerEncoder":
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return ak.nn.ACTTransformerEncoder(layer, max_steps=4).to(DEVICE), torch.randn(3, 5, 8, device=DEVICE)
    return getattr(ak.nn, name)(4, 8, max_steps=4, batch_first=True).to(DEVICE), torch.randn(3, 5, 4, device=DEVICE)


@pytest.mark.parametrize("name", ["ACTRNN", "ACTGRU", "ACTLSTM", "ACTTransformerEncoder"])
def test_compiled_model_matches_eager(name):
    model, x = model_and_input(name)

    def loss_fn(x):
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        return out.square().mean() + 0.01 * model.ponder_cost.sum()

    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    steps = model.steps.clone()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn)
    got = compiled(x)
    grads = torch.autograd.grad(got, list(model.parameters()))
    assert torch.equal(model.steps, steps)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
