"""Bad input, fuzzed: hypothesis draws shapes, dtypes, devices and options for
`ak.ponder`, `ak.pondernet` and the layers. Every call either works or raises
a ValueError / TypeError naming the argument at fault, before any step runs;
nothing the caller owns is modified."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import act_kernels as ak

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]


def tensor(shape, dtype, device="cpu"):
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype, device=device)
    if not dtype.is_floating_point:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.randn(shape, device="cpu").to(device, dtype)


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)

# One bad value per argument kind: a call starts valid and gets zero, one or
# two of these, so every fault is tried on its own and next to another.
FAULTS = {
    "state": st.one_of(
        shapes.filter(lambda sh: len(sh) != 2 or sh[0] == 0 or sh[1] != 4).map(lambda sh: tensor(sh, torch.float32)),
        st.sampled_from([torch.int64, torch.bool]).map(lambda d: tensor((3, 4), d)),
        st.just([1, 2])),
    "weight": st.one_of(
        st.sampled_from([(5,), (4, 1), (2, 4), (), (3,)]).map(lambda sh: tensor(sh, torch.float32)),
        st.just(tensor((4,), torch.int64)), st.just(tensor((4,), torch.float32, "meta")), st.just(0.5)),
    "bias": st.one_of(st.sampled_from([(2,), (0,), (1, 2)]).map(lambda sh: tensor(sh, torch.float32)),
                      st.just(tensor((1,), torch.int64)), st.just(tensor((1,), torch.float32, "meta")), st.just(1.0)),
    "max_steps": st.sampled_from([0, -3, 2.5, True, "4"]),
    "eps": st.one_of(st.sampled_from([0.0, 1.0, -0.1, 1.5, math.nan, "0.01", True])),
    "backend": st.sampled_from(["fast", "", None, 3]),
}
PONDERNET_FAULTS = {
    "prior": st.sampled_from([0.0, 1.0, -0.2, 2.0, "0.2"]),
    "halting": st.sampled_from(["greedy", "", None]),
    "threshold": st.sampled_from([0.0, -0.5, 1.5, "0.5"]),
}


def valid_call():
    return dict(state=tensor((3, 4), torch.float32), weight=tensor((4,), torch.float32),
                bias=tensor((1,), torch.float32), max_steps=4, eps=0.01, backend="reference")


def snapshot(tensors):
    return [t.clone() for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def unchanged(tensors, before):
    kept = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    return all(torch.equal(t, b) for t, b in zip(kept, before))


def check(call, kwargs, faulty):
    """The call works when nothing is faulty; otherwise it raises a ValueError
    or TypeError that names one of the faulty arguments. Nothing is modified."""
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    before = snapshot(tensors)
    ran = []

    def step(s, n, idx):
        ran.append(n)
        return torch.tanh(s)

    if not faulty:
        call(step, **kwargs)
        assert ran
    else:
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            call(step, **kwargs)
        message = str(info.value)
        assert not ran, "a step ran on bad input"
        assert info.type is not RuntimeError or "backend" in message, message  # RuntimeError: an unavailable backend
        assert any(name in message for name in faulty), f"{faulty}: {message}"
    assert unchanged(tensors, before), "a caller's tensor was modified"


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(faulty=st.lists(st.sampled_from(sorted(FAULTS)), max_size=2, unique=True), data=st.data())
def test_ponder_fuzzed(faulty, data):
    kwargs = valid_call()
    for name in faulty:
        kwargs[name] = data.draw(FAULTS[name], label=name)
    check(lambda step, state, **kw: ak.ponder(step, state, **kw), kwargs, faulty)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(faulty=st.lists(st.sampled_from(sorted({**FAULTS, **PONDERNET_FAULTS})), max_size=2, unique=True),
       data=st.data())
def test_pondernet_fuzzed(faulty, data):
    kwargs = dict(valid_call(), prior=0.2, halting="train", threshold=0.5)
    for name in faulty:
        kwargs[name] = data.draw({**FAULTS, **PONDERNET_FAULTS}[name], label=name)
    check(lambda step, state, **kw: ak.pondernet(step, state, **kw), kwargs, faulty)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer=st.sampled_from(["ACTRNN", "ACTGRU", "ACTLSTM"]), shape=shapes, dtype=st.sampled_from(DTYPES),
       hx_shape=st.one_of(st.none(), shapes), batch_first=st.booleans())
def test_layers_fuzzed(layer, shape, dtype, hx_shape, batch_first):
    rnn = getattr(ak.nn, layer)(3, 4, max_steps=3, batch_first=batch_first)
    x = tensor(shape, dtype)
    hx = None if hx_shape is None else tensor(hx_shape, torch.float32)
    if hx is not None and layer == "ACTLSTM":
        hx = (hx, hx.clone())
    given_tensors = [x] + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx])
    before = snapshot(given_tensors)
    try:
        rnn(x, hx)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert any(w in message for w in ("input", "hidden", "hx", "dtype", "features")), message
    assert unchanged(given_tensors, before)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), pad_shape=st.one_of(st.none(), shapes),
       mask_kind=st.sampled_from(["none", "causal", "ones", "wrong_size"]))
def test_encoder_fuzzed(shape, dtype, pad_shape, mask_kind):
    layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=3)
    x = tensor(shape, dtype)
    pad = None if pad_shape is None else torch.zeros(pad_shape, dtype=torch.bool)
    length = shape[1] if len(shape) == 3 else (shape[0] if len(shape) == 2 else 1)
    mask = {"none": None, "causal": torch.ones(length, length, dtype=torch.bool).triu(1),
            "ones": torch.ones(length, length, dtype=torch.bool), "wrong_size": torch.zeros(length + 1, length + 1)}[mask_kind]
    before = snapshot([x])
    try:
        enc(x, mask=mask, src_key_padding_mask=pad)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert any(w in message for w in ("src", "input", "mask", "d_model", "dtype")), message
    assert unchanged([x], before)
