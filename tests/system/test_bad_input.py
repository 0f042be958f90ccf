"""Bad input: a clear ValueError/TypeError before any kernel runs (design §5)."""
import pytest
import torch

import act_kernels as ak
from backends import KERNEL_BACKENDS
from helpers import DEVICE, TanhStep

BACKENDS = ["reference", *KERNEL_BACKENDS]


def good(batch=3, hidden=4):
    return (TanhStep(batch, hidden), torch.randn(batch, hidden, device=DEVICE),
            torch.randn(hidden, device=DEVICE), torch.zeros(1, device=DEVICE))


def case(**change):
    step, s0, w, c = good()
    kw = dict(step_fn=step, state=s0, weight=w, bias=c, max_steps=5, eps=0.01)
    kw.update(change)
    return kw


BAD = [
    (dict(state=torch.randn(3, 4, 2, device=DEVICE)), ValueError, r"state must have shape \(B, H\)"),
    (dict(state=torch.randn(0, 4, device=DEVICE)), ValueError, "non-empty"),
    (dict(state=torch.randn(3, 0, device=DEVICE)), ValueError, "non-empty"),
    (dict(state=torch.ones(3, 4, dtype=torch.int64, device=DEVICE)), TypeError, "float16, bfloat16"),
    (dict(state=[1, 2]), TypeError, "state must be a tensor"),
    (dict(weight=torch.randn(5, device=DEVICE)), ValueError, "expected H = 4"),
    (dict(weight=torch.randn(2, 4, device=DEVICE)), ValueError, r"\(H,\) or \(1, H\)"),
    (dict(weight=torch.ones(4, dtype=torch.int32, device=DEVICE)), TypeError, "floating-point"),
    (dict(weight=[0.0] * 4), TypeError, "weight must be a tensor"),
    (dict(bias=torch.zeros(2, device=DEVICE)), ValueError, "exactly one element"),
    (dict(bias=0.0), TypeError, "bias must be a one-element tensor"),
    (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
    (dict(max_steps=2.5), TypeError, "max_steps must be an int"),
    (dict(eps=0.0), ValueError, r"eps must lie in \(0, 1\)"),
    (dict(eps=1.0), ValueError, r"eps must lie in \(0, 1\)"),
    (dict(eps="0.1"), TypeError, "eps must be a float"),
    (dict(state=(torch.randn(3, 4, device=DEVICE), torch.randn(2, 4, device=DEVICE))), ValueError, "batch size 2"),
    (dict(step_fn=lambda s, n, a: s[:, :2]), ValueError, r"returned shape \(3, 2\) at step 1"),
    (dict(step_fn=lambda s, n, a: torch.cat([s, s])), ValueError, "one row per active row"),
    (dict(step_fn=lambda s, n, a: s.double()), TypeError, "returned dtype torch.float64"),
    (dict(step_fn=lambda s, n, a: (s, s)), ValueError, "returned 2 tensors"),
    (dict(step_fn=lambda s, n, a: None), TypeError, "must return a tensor"),
]
if DEVICE.type == "cuda":
    BAD.append((dict(weight=torch.randn(4)), ValueError, "weight is on cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,exc,msg", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises(backend, change, exc, msg):
    kw = case(**change)
    with pytest.raises(exc, match=msg):
        ak.ponder(kw.pop("step_fn"), kw.pop("state"), kw.pop("weight"), kw.pop("bias"),
                  backend=backend, **kw)
