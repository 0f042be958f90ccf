"""Every kernel backend against the reference through the public `ponder`.

On the CPU the triton backend runs under TRITON_INTERPRET=1 (keep shapes
small); on a GPU the same tests run on CUDA tensors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import act_kernels as ak
from backends import KERNEL_BACKENDS
from helpers import DEVICE, PairStep, TanhStep, assert_close, loss_and_grads, make_problem, representative, run

GRID = [
    # batch, hidden, bias, max_steps        what it covers
    (1, 1, 0.0, 4),                         # B = 1, H = 1
    (1, 33, -1.0, 6),                       # B = 1, H not a power of two
    (6, 64, 20.0, 5),                       # every row halts at step 1
    (5, 17, -20.0, 5),                      # no row halts before max_steps
    (12, 40, -1.5, 10),                     # mixed halting, H not a multiple of the block
    (4, 8, 0.3, 1),                         # max_steps = 1
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def compare(backend, batch, hidden, dtype, bias, max_steps, seed=0, w_scale=1.0):
    out, grads, step = run(backend, batch, hidden, dtype, bias, max_steps, seed, w_scale)
    ref, ref_grads, _ = run("reference", batch, hidden, dtype, bias, max_steps, seed, w_scale)
    assert torch.equal(out.steps, ref.steps), (out.steps, ref.steps)
    assert step.rows_seen == int(ref.steps.sum())
    assert out.state.dtype == dtype
    assert_close(out.state, ref.state, dtype, "state")
    assert_close(out.ponder_cost, ref.ponder_cost, dtype, "ponder cost")
    assert_close(out.remainder, ref.remainder, dtype, "remainder")
    hp, ref_hp = out.halting_probs, ref.halting_probs
    assert torch.equal(hp.batch_index, ref_hp.batch_index)
    assert torch.equal(hp.step_index, ref_hp.step_index)
    assert_close(hp.values, ref_hp.values, dtype, "halting probs")
    for name, a, b in zip(["s0", "w", "c", "W", "u"], grads, ref_grads):
        assert a.dtype == b.dtype
        assert_close(a, b, dtype, f"grad {name}")
    return out


@representative(dtype=torch.float32, batch=12, hidden=40, bias=-1.5, max_steps=10,
                also=[dict(dtype=torch.float32, batch=6, hidden=64, bias=20.0, max_steps=5),     # all halt at 1
                      dict(dtype=torch.float32, batch=5, hidden=17, bias=-20.0, max_steps=5)])   # none before
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,hidden,bias,max_steps", GRID)
def test_matches_reference(backend, dtype, batch, hidden, bias, max_steps):
    out = compare(backend, batch, hidden, dtype, bias, max_steps)
    if bias == 20.0:
        assert bool((out.steps == 1).all())
    if bias == -20.0:
        assert bool((out.steps == max_steps).all())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 9),
    hidden=st.integers(1, 48),
    bias=st.floats(-3.0, 3.0),
    w_scale=st.floats(0.1, 4.0),
    max_steps=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_random_halting_patterns(backend, batch, hidden, bias, w_scale, max_steps, seed):
    compare(backend, batch, hidden, torch.float32, bias, max_steps, seed=seed, w_scale=w_scale)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_half_precision_error_within_twice_pytorch(backend):
    """fp16/bf16: the kernel's error against an fp64 oracle is at most twice
    the error of the same computation done by PyTorch in that dtype."""
    batch, hidden = 8, 48
    for dtype in (torch.float16, torch.bfloat16):
        oracle, _, _ = run("reference", batch, hidden, torch.float64, -1.0, 8, seed=4)
        ours, _, _ = run(backend, batch, hidden, dtype, -1.0, 8, seed=4)
        torch_same, _, _ = run("reference", batch, hidden, dtype, -1.0, 8, seed=4)
        assert torch.equal(ours.steps, oracle.steps)
        err = (ours.state.double() - oracle.state).abs().max()
        base = (torch_same.state.double() - oracle.state).abs().max()
        assert err <= 2 * base + 1e-6, (dtype, float(err), float(base))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tuple_state(backend):
    batch, hidden, width = 5, 12, 7
    results = {}
    for be in ("reference", backend):
        g = torch.Generator().manual_seed(3)
        h0 = torch.randn(batch, hidden, generator=g).to(DEVICE).requires_grad_()
        c0 = torch.randn(batch, width, generator=g).to(DEVICE).requires_grad_()
        _, w, c = make_problem(batch, hidden, torch.float32, -1.5)
        step = PairStep(batch, hidden, width, torch.float32)
        out = ak.ponder(step, (h0, c0), w, c, max_steps=9, backend=be)
        assert isinstance(out.state, tuple) and len(out.state) == 2
        results[be] = (out, loss_and_grads(out, [h0, c0, w, c, *step.params()]))
    (ref, ref_g), (out, g) = results["reference"], results[backend]
    assert torch.equal(out.steps, ref.steps)
    for a, b in zip(out.state, ref.state):
        assert_close(a, b, torch.float32)
    for a, b in zip(g, ref_g):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    """A row-strided initial state, a strided weight, a transposed step output."""
    batch, hidden = 6, 20
    results = {}
    for be in ("reference", backend):
        g = torch.Generator().manual_seed(1)
        big = torch.randn(batch * 2, hidden + 5, generator=g).to(DEVICE)
        s0 = big[::2, 3:3 + hidden].detach().requires_grad_(False)
        wbig = torch.randn(hidden * 3, generator=g).to(DEVICE)
        w = wbig[::3].detach().requires_grad_()
        c = torch.tensor([-1.0], device=DEVICE, requires_grad=True)
        step = TanhStep(batch, hidden, seed=1)

        def transposed_step(s, n, active):
            return step(s, n, active).t().contiguous().t()  # column stride != 1

        assert not s0.is_contiguous() and not w.is_contiguous()
        out = ak.ponder(transposed_step, s0, w, c, max_steps=8, backend=be)
        results[be] = (out, loss_and_grads(out, [w, c, *step.params()]))
    (ref, ref_g), (out, g) = results["reference"], results[backend]
    assert torch.equal(out.steps, ref.steps)
    assert_close(out.state, ref.state, torch.float32)
    for a, b in zip(g, ref_g):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_float64(backend):
    batch, hidden = 3, 5
    s0, w, c = make_problem(batch, hidden, torch.float64, -1.0, seed=9)
    step = TanhStep(batch, hidden, torch.float64, seed=9)

    def f(s0, w, c, W):
        step.W = W
        out = ak.ponder(step, s0, w, c, max_steps=5, backend=backend)
        return out.state, out.ponder_cost

    assert torch.autograd.gradcheck(f, (s0, w, c, step.W), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_row_is_isolated(backend):
    batch, hidden = 5, 9
    s0, w, c = make_problem(batch, hidden, torch.float32, -1.0, seed=2)
    clean = ak.ponder(TanhStep(batch, hidden, seed=2), s0.detach(), w, c, max_steps=6, backend=backend)
    poisoned = s0.detach().clone()
    poisoned[2, 4] = float("nan")
    dirty = ak.ponder(TanhStep(batch, hidden, seed=2), poisoned, w, c, max_steps=6, backend=backend)
    keep = torch.tensor([0, 1, 3, 4], device=DEVICE)
    assert torch.equal(dirty.state[keep], clean.state[keep])
    assert torch.equal(dirty.steps[keep], clean.steps[keep])
    assert torch.equal(dirty.ponder_cost[keep], clean.ponder_cost[keep])
    assert bool(torch.isnan(dirty.state[2]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_backward(backend):
    """Bitwise-identical gradients run after run. Only a GPU can show a race or
    an order-dependent reduction: under the CPU interpreter programs run one
    by one, so this test could not fail there and is not run there."""
    runs = [run(backend, 16, 24, torch.float32, -1.0, 8, seed=11)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_caller_tensors_untouched(backend):
    s0, w, c = make_problem(4, 6, torch.float32, -1.0)
    before = [t.detach().clone() for t in (s0, w, c)]
    ak.ponder(TanhStep(4, 6), s0, w, c, max_steps=5, backend=backend)
    for t, b in zip((s0, w, c), before):
        assert torch.equal(t.detach(), b)


def test_auto_backend_dispatch(monkeypatch):
    """auto runs the reference on CPU tensors, and on CUDA tensors the CUDA
    extension when it is built, else Triton: checked by recording which
    implementation the call reached."""
    import importlib

    from act_kernels.backends import cuda_extension_error
    from act_kernels.ops.act import get_kernels

    api = importlib.import_module("act_kernels.ops.act.function")
    reached = []
    ragged, reference_ponder = api.kernel_ponder_loop, api.reference.ponder_loop
    monkeypatch.setattr(api, "kernel_ponder_loop",
                        lambda kernels, *a, **k: (reached.append(kernels.halting_step), ragged(kernels, *a, **k))[1])
    monkeypatch.setattr(api.reference, "ponder_loop",
                        lambda *a, **k: (reached.append("reference"), reference_ponder(*a, **k))[1])
    s0, w, c = make_problem(3, 4, torch.float32, 0.0)
    ak.ponder(TanhStep(3, 4), s0, w, c, max_steps=3, backend="auto")
    if DEVICE.type == "cpu":
        expected = "reference"
    else:
        expected = get_kernels("cuda" if not cuda_extension_error() else "triton").halting_step
    assert reached == [expected]


def test_unavailable_backend_names_what_is_missing():
    s0, w, c = make_problem(3, 4, torch.float32, 0.0, device="cpu")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        ak.ponder(TanhStep(3, 4, device="cpu"), s0, w, c, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.ponder(TanhStep(3, 4, device="cpu"), s0, w, c, backend="magic")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_outputs_free_without_garbage_collection(backend):
    """The autograd Function keeps no reference cycle through its outputs:
    dropping the result frees the state at once."""
    import gc
    import weakref

    s0, w, c = make_problem(4, 6, torch.float32, -1.0)
    gc.disable()
    try:
        out = ak.ponder(TanhStep(4, 6), s0, w, c, max_steps=5, backend=backend)
        alive = weakref.ref(out.state)
        del out
        assert alive() is None
    finally:
        gc.enable()
