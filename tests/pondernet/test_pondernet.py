"""PonderNet: every backend against an independent padded unroll (p, kl,
steps, states, gradients), gradcheck, the halting modes, NaN isolation, the
loss helper, and bad input."""
import math

import pytest
import torch

import act_kernels as ak
from act_kernels.ops.pondernet import get_kernels
from act_kernels.ops.pondernet import ragged_pondernet
from helpers import DEVICE, TanhStep, assert_close, make_problem, representative
from naive_pondernet import padded_pondernet

from backends import KERNEL_BACKENDS  # noqa: E402

IMPLS = ["reference", "twins", *KERNEL_BACKENDS]


def run(impl, step, s0, w, c, **kw):
    if impl == "twins":  # the reference twins on the kernel driver
        return ragged_pondernet(get_kernels("twins"), step, s0, w, c, **kw)
    return ak.pondernet(step, s0, w, c, backend=impl, **kw)


GRID = [
    # batch, hidden, bias, max_steps, w_scale   what it covers
    (1, 1, 0.0, 6, 1.0),                        # B = 1, H = 1
    (7, 33, -1.0, 10, 2.0),                     # mixed halting, H not a power of two
    (5, 16, 12.0, 6, 0.0),                      # every row halts at step 1
    (4, 8, -12.0, 5, 0.0),                      # no row halts before max_steps
    (9, 40, -2.0, 12, 3.0),
]


def loss_of(p, kl, states, seed=0):
    """A loss weighing every p, kl and state element differently."""
    g = torch.Generator().manual_seed(seed)
    loss = (p.double() * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.device)).sum()
    loss = loss + (kl.double() * torch.rand(kl.shape, generator=g, dtype=torch.float64).to(kl.device)).sum()
    return loss + (states.double() * torch.randn(states.shape, generator=g, dtype=torch.float64).to(states.device)).sum()


@representative(key="impl", dtype=torch.float32, batch=7, hidden=33, bias=-1.0, max_steps=10, w_scale=2.0,  # per mode
                also=[dict(dtype=torch.float32, batch=5, hidden=16, bias=12.0, max_steps=6, w_scale=0.0),
                      dict(dtype=torch.float32, batch=4, hidden=8, bias=-12.0, max_steps=5, w_scale=0.0)])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("halting", ["train", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch,hidden,bias,max_steps,w_scale", GRID)
def test_matches_padded_unroll(impl, halting, dtype, batch, hidden, bias, max_steps, w_scale):
    s0, w, c = make_problem(batch, hidden, dtype, bias, w_scale=w_scale)
    step = TanhStep(batch, hidden, dtype, scale=2.0)
    kw = dict(max_steps=max_steps, eps=0.05, prior=0.3, halting=halting, threshold=0.6)
    out = run(impl, step, s0, w, c, **kw)
    assert step.rows_seen == int(out.steps.sum())
    ref_step = TanhStep(batch, hidden, dtype, scale=2.0)
    p, kl, steps, states = padded_pondernet(ref_step, s0, w, c, **kw)
    assert torch.equal(out.steps, steps)
    inside = torch.arange(1, p.shape[1] + 1, device=DEVICE)[None] <= steps[:, None]
    assert_close(out.padded(out.p), p * inside, dtype, "p")
    assert_close(out.kl, kl, dtype, "kl")
    assert_close(out.padded(out.states), states * inside[..., None], dtype, "states")
    assert_close(out.state, states[torch.arange(batch), steps - 1], dtype, "state at the halting step")
    torch.testing.assert_close(out.padded(out.p).sum(1).double(), torch.ones(batch, dtype=torch.float64,
                                                                              device=DEVICE), atol=1e-5, rtol=0)
    params = [s0, w, c, *step.params()]
    got = torch.autograd.grad(loss_of(out.padded(out.p), out.kl, out.padded(out.states)), params)
    ref_params = [s0, w, c, *ref_step.params()]
    exp = torch.autograd.grad(loss_of(p * inside, kl, states * inside[..., None]), ref_params)
    for name, a, b in zip(["s0", "w", "c", "W", "u"], got, exp):
        assert_close(a, b, dtype, f"grad {name}")
    if bias == 12.0:
        assert bool((out.steps == 1).all())
    if bias == -12.0:
        assert bool((out.steps == max_steps).all())


@pytest.mark.parametrize("impl", ["reference", "twins"])
def test_gradcheck_float64(impl):
    batch, hidden = 4, 5
    s0, w, c = make_problem(batch, hidden, torch.float64, -1.0, w_scale=2.0)
    step = TanhStep(batch, hidden, torch.float64, scale=2.0)

    def f(s0, w, c, W):
        step.W = W
        out = run(impl, step, s0, w, c, max_steps=6, eps=0.05, prior=0.3)
        return out.p, out.kl, out.states

    assert torch.autograd.gradcheck(f, (s0, w, c, step.W))


def test_kernel_backward_against_twin_on_random_inputs():
    """The Triton reverse scan and its twin on the same packed inputs."""
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(1, 7, (11,), generator=g)
    counts = [int((steps >= n).sum()) for n in range(1, int(steps.max()) + 1)]
    batch_index = torch.cat([torch.nonzero(steps >= n).squeeze(1) for n in range(1, len(counts) + 1)])
    step_index = torch.cat([torch.full((a,), n + 1) for n, a in enumerate(counts)])
    total = batch_index.numel()
    lam = torch.rand(total, generator=g) * 0.9 + 0.05
    u = torch.rand(total, generator=g)
    p = torch.rand(total, generator=g)
    p[3] = 0.0   # an underflowed p: no KL path
    gp, gkl = torch.randn(total, generator=g), torch.randn(11, generator=g)
    args = (p, lam, u, batch_index, step_index, steps, gp, gkl, 0.25)
    a = get_kernels("triton").halting_backward(*[t.to(DEVICE) if torch.is_tensor(t) else t for t in args])
    b = get_kernels("twins").halting_backward(*[t.to(DEVICE) if torch.is_tensor(t) else t for t in args])
    assert_close(a, b, torch.float32, "grad z")


@pytest.mark.parametrize("impl", IMPLS)
def test_threshold_mode_exact(impl):
    """Each row halts at the first n with 1 - u^n >= q, computed here from lambda."""
    batch, hidden, q = 6, 8, 0.7
    s0, w, c = make_problem(batch, hidden, torch.float64, -1.0, w_scale=2.0)
    step = TanhStep(batch, hidden, torch.float64, scale=2.0)
    out = run(impl, step, s0, w, c, max_steps=15, halting="threshold",
              threshold=q)
    lam = torch.sigmoid(out.padded(out.states).detach() @ w.detach() + c.detach())
    for b in range(batch):
        u, expected = 1.0, 15
        for n in range(1, int(out.steps[b]) + 1):
            u *= 1 - float(lam[b, n - 1])
            if 1 - u >= q:
                expected = n
                break
        assert int(out.steps[b]) == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_mode_is_geometric_and_repeatable(impl):
    """A constant lambda gives N ~ Geometric(lambda) capped at max_steps; a
    generator makes the draws repeatable."""
    batch, lam, max_steps = 3000 if impl != "triton" else 400, 0.3, 30
    s0 = torch.zeros(batch, 2, device=DEVICE)
    w = torch.zeros(2, device=DEVICE)
    c = torch.tensor([math.log(lam / (1 - lam))], device=DEVICE)
    rows = []
    step = lambda s, n, idx: (rows.append(idx.numel()), s + 0.0)[1]  # noqa: E731
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    out = run(impl, step, s0, w, c, max_steps=max_steps, halting="sample", generator=gen)
    assert sum(rows) == int(out.steps.sum())   # the step function saw exactly sum N rows
    n = out.steps.double()
    se = math.sqrt((1 - lam) / lam ** 2 / batch)
    assert abs(float(n.mean()) - 1 / lam) < 4 * se
    for k in (1, 2, 3):
        expected = lam * (1 - lam) ** (k - 1)
        assert abs(float((out.steps == k).double().mean()) - expected) < 4 * math.sqrt(expected / batch)
    again = run(impl, step, s0, w, c, max_steps=max_steps, halting="sample",
                generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert torch.equal(out.steps, again.steps)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_row_changes_no_other_row(impl):
    batch, hidden = 6, 8
    s0, w, c = make_problem(batch, hidden, torch.float32, -1.0, w_scale=2.0)
    clean = run(impl, TanhStep(batch, hidden, scale=2.0), s0, w, c, max_steps=8)
    poisoned = s0.detach().clone()
    poisoned[2] = float("nan")
    dirty = run(impl, TanhStep(batch, hidden, scale=2.0), poisoned, w, c, max_steps=8)
    others = torch.arange(batch, device=DEVICE) != 2
    assert torch.equal(clean.steps[others], dirty.steps[others])
    assert torch.equal(clean.kl[others], dirty.kl[others])
    keep = clean.padded(clean.p)[others]
    assert torch.equal(keep, dirty.padded(dirty.p)[others][:, :keep.shape[1]])


def test_kl_direction_and_loss_helper():
    batch, hidden = 5, 6
    s0, w, c = make_problem(batch, hidden, torch.float64, -1.0, w_scale=2.0)
    out = ak.pondernet(TanhStep(batch, hidden, torch.float64, scale=2.0), s0, w, c, max_steps=10, prior=0.25)
    p = out.padded(out.p)
    n = torch.arange(1, p.shape[1] + 1, device=DEVICE, dtype=torch.float64)[None]
    g = 0.25 * 0.75 ** (n - 1.0)
    g = torch.where(n == out.steps[:, None], 0.75 ** (n - 1.0), g) * (n <= out.steps[:, None])
    torch.testing.assert_close(g.sum(1), torch.ones(batch, dtype=torch.float64, device=DEVICE))  # renormalised
    inside = n <= out.steps[:, None]
    kl_pg = torch.where(inside, p * torch.log(p / torch.where(inside, g, 1.0)), 0.0).sum(1)
    kl_gp = torch.where(inside, g * torch.log(g / torch.where(inside, p, 1.0)), 0.0).sum(1)
    torch.testing.assert_close(out.kl, kl_pg)
    assert not torch.allclose(out.kl, kl_gp)   # the direction KLDivLoss(p.log(), g) gets wrong
    step_loss = torch.rand(out.p.shape, dtype=torch.float64, device=DEVICE)
    expected = (p * out.padded(step_loss)).sum(1).mean() + 0.1 * kl_pg.mean()
    torch.testing.assert_close(ak.pondernet_loss(out, step_loss, beta=0.1), expected)
    with pytest.raises(ValueError, match="one value per packed"):
        ak.pondernet_loss(out, step_loss[:-1])


class _CudaGenerator(torch.Generator):
    """Stands in for a generator on another device on a machine without one."""

    @property
    def device(self):
        return torch.device("cuda" if DEVICE.type == "cpu" else "cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("change,exc,match", [
    (dict(prior=0.0), ValueError, r"prior .* must lie in \(0, 1\)"),
    (dict(prior=1.5), ValueError, r"must lie in \(0, 1\)"),
    (dict(halting="greedy"), ValueError, "halting must be one of"),
    (dict(threshold=0.0), ValueError, r"threshold must lie in \(0, 1\]"),
    (dict(threshold=1.2), ValueError, r"threshold must lie in \(0, 1\]"),
    (dict(eps=1.0), ValueError, "eps must lie"),
    (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
    (dict(generator=_CudaGenerator()), ValueError, "generator is on"),
])
def test_bad_input_raises_before_any_step(impl, change, exc, match):
    s0, w, c = make_problem(3, 4, torch.float32, 0.0)

    def step(s, n, idx):
        raise AssertionError("the step function ran on bad input")

    with pytest.raises(exc, match=match):
        run(impl, step, s0, w, c, **{"max_steps": 5, **change})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    s0, w, c = make_problem(3, 4, torch.float32, 0.0)
    with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
        ak.pondernet(lambda s, n, i: s, s0, w, c, backend="cuda")


# ---------------------------------------------------------------------------
# the torch.library ops
# ---------------------------------------------------------------------------

def ragged_run(batch=6, hidden=8, dtype=torch.float32, seed=0):
    """A reference PonderNet, and its per-step states and halting decisions."""
    from act_kernels import reference

    s0, w, c = make_problem(batch, hidden, dtype, -1.0, seed=seed, w_scale=2.0)
    out = reference.pondernet(TanhStep(batch, hidden, dtype, seed=seed, scale=2.0), s0, w, c, max_steps=8,
                              eps=0.05, prior=0.3)
    counts = torch.bincount(out.step_index).tolist()[1:]
    states = [t.detach().clone().requires_grad_() for t in torch.split(out.states, counts)]
    return out, states, w, c


def test_opcheck_distribution_and_backward():
    from act_kernels.ops.pondernet import library

    out, states, w, c = ragged_run()
    args = (states, w, c, out.batch_index, out.step_index, out.steps, 0.3)
    torch.library.opcheck(library.distribution, args)
    p, kl = library.distribution(*args)
    assert_close(p, out.p, torch.float32, "p")
    assert_close(kl, out.kl, torch.float32, "kl")
    g = torch.Generator().manual_seed(1)
    bargs = (out.p.detach(), torch.rand(out.p.shape, generator=g).to(DEVICE), torch.rand(out.p.shape, generator=g).to(DEVICE),
             out.batch_index, out.step_index, out.steps, torch.randn(out.p.shape, generator=g).to(DEVICE),
             torch.randn(out.steps.shape, generator=g).to(DEVICE), 0.3)
    torch.library.opcheck(library.halting_backward, bargs)


def test_distribution_op_gradients_match_reference_and_compile():
    from act_kernels.ops.pondernet import library

    out, states, w, c = ragged_run(seed=2)
    wp, wk = torch.rand(out.p.shape, device=DEVICE), torch.rand(out.kl.shape, device=DEVICE)

    def loss_fn(states, w, c):
        p, kl = library.distribution(states, w, c, out.batch_index, out.step_index, out.steps, 0.3)
        return (p * wp).sum() + (kl * wk).sum()

    eager = torch.autograd.grad(loss_fn(states, w, c), [*states, w, c])
    leaves = [*states, w, c]
    # against plain autograd through the same formulas
    lam, u = library._lambda_and_mass(states, w, c, out.batch_index, out.step_index, out.steps)
    last = out.step_index == out.steps[out.batch_index]
    from act_kernels.ops.pondernet.prior import kl_per_row, log_prior
    p = torch.where(last, u, lam * u)
    kl = kl_per_row(p, log_prior(out.step_index, last, 0.3, p.dtype), out.batch_index, out.batch_size)
    plain = torch.autograd.grad((p * wp).sum() + (kl * wk).sum(), leaves)
    for a, b in zip(eager, plain):
        assert_close(a, b, torch.float32, "op gradient")
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(compiled(states, w, c), leaves), eager):
        assert_close(a, b, torch.float32, "compiled gradient")


def test_opcheck_halting_step():
    from act_kernels.ops.pondernet import library

    batch, hidden = 6, 8
    args = (torch.randn(4, hidden, device=DEVICE), torch.tensor([0, 2, 3, 5], device=DEVICE),
            torch.randn(hidden, device=DEVICE), torch.zeros(1, device=DEVICE),
            torch.rand(batch, device=DEVICE), torch.zeros(batch, dtype=torch.int64, device=DEVICE),
            None, 2, 10, 0, 0.05, 0.5)
    torch.library.opcheck(library.halting_step, args)


def test_readme_example_runs():
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "docs" / "examples" / "pondernet_model.py"))


@pytest.mark.parametrize("impl", IMPLS)
def test_tuple_states(impl):
    """An (h, c) state: halting reads h; both are returned packed and at the halting step."""
    from helpers import PairStep

    batch, hidden, width = 5, 6, 3
    s0, w, c = make_problem(batch, hidden, torch.float64, -1.0, w_scale=2.0)
    c0 = torch.randn(batch, width, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = run(impl, PairStep(batch, hidden, width, torch.float64), (s0, c0), w, c, max_steps=7, eps=0.05)
    ref = ak.reference.pondernet(PairStep(batch, hidden, width, torch.float64), (s0, c0), w, c, max_steps=7, eps=0.05)
    assert isinstance(out.states, tuple) and isinstance(out.state, tuple) and len(out.states) == 2
    assert torch.equal(out.steps, ref.steps)
    for a, b in zip(out.states + out.state, ref.states + ref.state):
        assert_close(a, b, torch.float64, "tuple state")
    assert_close(out.p, ref.p, torch.float64, "p")
    loss = lambda o: (o.p * o.states[1].sum(1)).sum() + o.kl.sum() + o.state[0].sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(out), [s0, c0, w, c]), torch.autograd.grad(loss(ref), [s0, c0, w, c])):
        assert_close(a, b, torch.float64, "tuple-state gradient")
