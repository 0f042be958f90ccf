"""The kernel contracts (design §3) called directly, against their reference twins."""
import pytest
import torch

from act_kernels import reference
from act_kernels.ops.act import get_kernels
from backends import CPU_GATES, KERNEL_BACKENDS
from helpers import DEVICE, assert_close, representative

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Under the Triton interpreter each grid below runs one case by default (helpers.representative),
# the grids' cases taking different dtypes so that each dtype keeps a default case on Triton.
# the halting step also has the extension's CPU implementation (half precision runs on the twin)
HALTING_BACKENDS = [*KERNEL_BACKENDS, CPU_GATES]


def halting_inputs(batch, hidden, active, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.randn(len(active), hidden, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(hidden, generator=g) / hidden ** 0.5).to(DEVICE, dtype)
    buffers = dict(
        running_sum=(torch.rand(batch, generator=g) * 0.9).to(DEVICE, acc),
        accumulator=torch.randn(batch, hidden, generator=g).to(DEVICE, acc),
        steps=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
        remainder=torch.zeros(batch, dtype=acc, device=DEVICE),
    )
    return dict(
        state=state,
        active=torch.tensor(active, dtype=torch.int64, device=DEVICE),
        weight=weight,
        bias=torch.tensor([bias], dtype=dtype, device=DEVICE),
        threshold=torch.tensor([0.99], dtype=acc, device=DEVICE),
    ), buffers


@representative(dtype=torch.float32, hidden=100, active=[0, 2, 3, 6], step=3, max_steps=10,
                also=[dict(dtype=torch.float32, hidden=7, active=[1], step=1, max_steps=1),
                      dict(dtype=torch.float32, hidden=64, active=[], step=4, max_steps=10)])
@pytest.mark.parametrize("backend", HALTING_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 64, 100])
@pytest.mark.parametrize("active,step,max_steps", [
    ([0, 2, 3, 6], 3, 10),
    ([1], 1, 1),                      # last allowed step: everything halts
    ([], 4, 10),                      # A_n = 0
    (list(range(8)), 2, 10),
])
def test_halting_step(backend, dtype, hidden, active, step, max_steps):
    kernel = get_kernels(backend).halting_step
    args, buffers = halting_inputs(8, hidden, active, dtype, bias=0.5)
    ref_buffers = {k: v.clone() for k, v in buffers.items()}
    p, h, halted = kernel(**args, **buffers, step=step, max_steps=max_steps)
    rp, rh, rhalted = reference.halting_step(**args, **ref_buffers, step=step, max_steps=max_steps)
    assert torch.equal(halted, rhalted)
    if max_steps == step:
        assert bool(halted.all())
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for a, b, name in [(p, rp, "p"), (h, rh, "h")]:
        assert a.dtype == acc_dtype
        assert_close(a, b, torch.float32 if dtype != torch.float64 else dtype, name)
    assert torch.equal(buffers["steps"], ref_buffers["steps"])
    for name in ("running_sum", "accumulator", "remainder"):
        assert_close(buffers[name], ref_buffers[name], acc_dtype, name)


@representative(dtype=torch.bfloat16, widths=(5, 3))
@pytest.mark.parametrize("backend", HALTING_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("widths", [(70,), (5, 3)])
def test_halting_step_accumulates_extra_state_tensors(backend, dtype, widths):
    """A tuple state's further tensors (an LSTM's c, here wider than h; then
    two of them) are accumulated with the same p; a strided one is read
    through its row stride, and only the active rows change."""
    kernel = get_kernels(backend).halting_step
    active = [0, 2, 3, 6]
    args, buffers = halting_inputs(8, 37, active, dtype, bias=0.5)
    g = torch.Generator().manual_seed(3)
    acc = torch.float32
    # the first: a column slice (row stride w + 4); the others: a column stride of 2
    xs = [torch.randn(len(active), w + 4, generator=g).to(DEVICE, dtype)[:, 2:2 + w] if k == 0
          else torch.randn(len(active), 2 * w, generator=g).to(DEVICE, dtype)[:, ::2]
          for k, w in enumerate(widths)]
    accs = [torch.randn(8, w, generator=g).to(DEVICE, acc) for w in widths]
    before = [a.clone() for a in accs]
    ref_accs = [a.clone() for a in accs]
    ref_buffers = {k: v.clone() for k, v in buffers.items()}
    kernel(**args, **buffers, step=2, max_steps=10, extra=list(zip(xs, accs)))
    reference.halting_step(**args, **ref_buffers, step=2, max_steps=10, extra=list(zip(xs, ref_accs)))
    untouched = [b for b in range(8) if b not in active]
    for a, b, b0 in zip(accs, ref_accs, before):
        assert_close(a, b, acc, "extra accumulator")
        assert not torch.equal(a[active], b0[active])
        assert torch.equal(a[untouched], b0[untouched])


@representative(dtype=torch.float64, hidden=100, active=[0, 2, 3, 6], row_steps=[1, 4, 2, 6], max_steps=6,
                also=[dict(dtype=torch.float32, hidden=1, active=[1, 5], row_steps=[3, 3], max_steps=3),
                      dict(dtype=torch.float32, hidden=64, active=[], row_steps=[], max_steps=8)])
@pytest.mark.parametrize("backend", HALTING_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 64, 100])
@pytest.mark.parametrize("active,row_steps,max_steps", [
    ([0, 2, 3, 6], [1, 4, 2, 6], 6),       # one row at the last allowed step, the others before it
    ([1, 5], [3, 3], 3),                   # every row at the last step: all halt
    ([], [], 8),                           # A = 0
    (list(range(8)), [5, 1, 1, 2, 7, 3, 8, 4], 8),
])
def test_halting_step_with_a_step_per_row(backend, dtype, hidden, active, row_steps, max_steps):
    """step as an (A,) tensor (the depth-wise scheduler, design §17): one
    call equals the twin run row by row, each at its own int step."""
    kernel = get_kernels(backend).halting_step
    args, buffers = halting_inputs(8, hidden, active, dtype, bias=0.5, seed=2)
    one_by_one = {k: v.clone() for k, v in buffers.items()}
    n = torch.tensor(row_steps, dtype=torch.int64, device=DEVICE)
    p, h, halted = kernel(**args, **buffers, step=n, max_steps=max_steps)
    expect = []
    for i, step in enumerate(row_steps):
        row = dict(args, state=args["state"][i:i + 1], active=args["active"][i:i + 1])
        expect.append(reference.halting_step(**row, **one_by_one, step=step, max_steps=max_steps))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if active:
        rp, rh, rhalted = (torch.cat(t) for t in zip(*expect))
        assert torch.equal(halted, rhalted)
        assert_close(p, rp, torch.float32 if dtype != torch.float64 else dtype, "p")
        assert_close(h, rh, torch.float32 if dtype != torch.float64 else dtype, "h")
        at_last = n >= max_steps
        assert bool(halted[at_last].all())
    else:
        assert p.shape == h.shape == halted.shape == (0,)
    assert torch.equal(buffers["steps"], one_by_one["steps"])
    for name in ("running_sum", "accumulator", "remainder"):
        assert_close(buffers[name], one_by_one[name], acc, name)


@pytest.mark.parametrize("backend", HALTING_BACKENDS)
@pytest.mark.parametrize("step,error", [
    (torch.tensor([1, 2, 3]), ValueError),                 # one step short
    (torch.tensor(2), ValueError),                         # 0-d
    (torch.tensor([1.0, 2.0, 3.0, 4.0]), TypeError),       # not integers
], ids=["short", "0-d", "float"])
def test_a_bad_step_per_row_is_refused(backend, step, error):
    """A kernel reads the per-row step by row: anything but one integer step
    per row is an error before any launch."""
    kernel = get_kernels(backend).halting_step
    args, buffers = halting_inputs(8, 16, [0, 2, 3, 6], torch.float32, bias=0.5)
    with pytest.raises(error, match="step per row"):
        kernel(**args, **buffers, step=step.to(DEVICE), max_steps=8)


@pytest.mark.parametrize("backend", HALTING_BACKENDS)
def test_halting_step_mixed_decisions(backend):
    """Rows on both sides of the threshold in one launch."""
    kernel = get_kernels(backend).halting_step
    args, buffers = halting_inputs(6, 4, list(range(6)), torch.float32, bias=0.0)
    args["state"].zero_()  # z = bias = 0, h = 0.5 for every row
    buffers["running_sum"] = torch.tensor([0.0, 0.2, 0.48, 0.49, 0.5, 0.9], device=DEVICE)
    _, _, halted = kernel(**args, **buffers, step=2, max_steps=5)
    assert halted.tolist() == [False, False, False, True, True, True]
    torch.testing.assert_close(buffers["remainder"][3:], torch.tensor([0.51, 0.5, 0.1], device=DEVICE))
    assert buffers["steps"].tolist() == [0, 0, 0, 2, 2, 2]


def combine_inputs(counts, hidden, dtype, seed=0, strided=False):
    """A packed ragged layout with `counts[n]` rows at step n."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    batch = counts[0]
    alive = list(range(batch))
    rows, steps = [], torch.zeros(batch, dtype=torch.int64)
    states = []
    for n, a in enumerate(counts, start=1):
        perm = torch.randperm(len(alive), generator=g)[:a].sort().values
        alive = [alive[i] for i in perm]
        rows.append(torch.tensor(alive))
        steps[alive] = n
        if strided:  # row-strided step outputs: a slice of a wider tensor
            states.append(torch.randn(a, hidden + 3, generator=g).to(DEVICE, dtype)[:, 1:hidden + 1])
        else:
            states.append(torch.randn(a, hidden, generator=g).to(DEVICE, dtype))
    batch_index = torch.cat(rows).to(DEVICE)
    total = batch_index.numel()
    return dict(
        states=states,
        batch_index=batch_index,
        p=torch.rand(total, generator=g).to(DEVICE, acc),
        h=torch.rand(total, generator=g).to(DEVICE, acc),
        steps=steps.to(DEVICE),
        grad_state=torch.randn(batch, hidden, generator=g).to(DEVICE, dtype),
        grad_ponder=torch.randn(batch, generator=g).to(DEVICE, acc),
        weight=torch.randn(hidden, generator=g).to(DEVICE, dtype),
    )


@representative(dtype=torch.float16, counts=[9, 6, 3, 3, 1], hidden=70, strided=True, extra=True,
                also=[dict(dtype=torch.float32, counts=[1], hidden=1, strided=False, extra=False)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts,hidden", [
    ([1], 1),               # B = 1, one step
    ([5], 33),              # every row halts at step 1
    ([4, 4, 4, 4], 16),     # no row halts before the last step
    ([9, 6, 3, 3, 1], 70),  # skewed
])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("extra", [False, True])
def test_combine_backward(backend, dtype, counts, hidden, strided, extra):
    kernel = get_kernels(backend).combine_backward
    args = combine_inputs(counts, hidden, dtype, strided=strided)
    if extra:
        args["extra_dot"] = torch.randn(args["p"].shape[0], dtype=args["p"].dtype, device=DEVICE)
    gs, gw, gc = kernel(**args)
    rgs, rgw, rgc = reference.combine_backward(**args)
    assert gs.dtype == dtype and gs.shape == rgs.shape
    tol_dtype = dtype if dtype in (torch.float64,) else torch.float32
    assert_close(gs.float() if dtype != torch.float64 else gs, rgs, dtype, "gs")
    assert_close(gw, rgw, tol_dtype, "gw")
    assert_close(gc, rgc, tol_dtype, "gc")
