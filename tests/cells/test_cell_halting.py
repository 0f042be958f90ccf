"""A GRU/LSTM ponder step's gates and its halting step in one launch
(ops.cells `gru_halting_step` / `lstm_halting_step`, which the layers'
whole-ponder Function calls once per step): the twins against torch's cells
followed by the halting twin, the kernels against the twins on every buffer
they write, and the whole-ponder Function's backward gradchecked."""
import pytest
import torch
import torch.nn.functional as F

from act_kernels.ops.act import reference as act_twins
from act_kernels.ops.cells import gate_kernels
from act_kernels.ops.cells import reference as twins
from backends import CPU_DTYPES, CPU_GATES, KERNEL_BACKENDS
from helpers import DEVICE, TOL, representative

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CELLS = {"gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}


def _problem(kind, rows, hidden, dtype, *, batch=None, step=2, max_steps=5, sum_scale=0.9, seed=0):
    """A step over `rows` of a batch of `batch` rows (active: a random
    ascending subset), with buffers already part-filled by earlier steps."""
    g = torch.Generator().manual_seed(seed)
    batch = rows + 3 if batch is None else batch
    cell = CELLS[kind](6, hidden).double()
    x = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    c = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    with torch.no_grad():
        gi = F.linear(x, cell.weight_ih, cell.bias_ih)
        gh = F.linear(h, cell.weight_hh, cell.bias_hh)
    acc = torch.float32
    active = torch.sort(torch.randperm(batch, generator=g)[:rows]).values
    weight = torch.randn(hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    bias = torch.randn(1, generator=g, dtype=torch.float64)
    buffers = dict(
        running_sum=torch.rand(batch, generator=g, dtype=torch.float64) * sum_scale,
        acc_h=torch.randn(batch, hidden, generator=g, dtype=torch.float64),
        acc_c=torch.randn(batch, hidden, generator=g, dtype=torch.float64),
        steps=torch.zeros(batch, dtype=torch.int64),
        remainder=torch.zeros(batch, dtype=torch.float64),
    )
    to = dict(device=DEVICE)
    state = (h if kind == "gru" else c).to(dtype)
    inputs = (gi.to(dtype).to(**to), gh.to(dtype).to(**to), state.to(**to), active.to(**to),
              weight.to(acc).to(**to), bias.to(acc).to(**to),
              torch.full((1,), 0.99, dtype=acc, device=DEVICE))
    fresh = {k: (v.to(acc) if v.is_floating_point() else v).to(**to) for k, v in buffers.items()}
    return cell, x, h, c, inputs, fresh, step, max_steps


def _run(impl, kind, inputs, buffers, step, max_steps):
    b = {k: v.clone() for k, v in buffers.items()}
    accumulators = (b["acc_h"],) if kind == "gru" else (b["acc_h"], b["acc_c"])
    fn = impl.gru_halting_step if kind == "gru" else impl.lstm_halting_step
    *lead, threshold = inputs
    gi, gh, state, active, weight, bias = lead
    new, p, hh, halted = fn(gi, gh, state, active, weight, bias, threshold, b["running_sum"], accumulators,
                            b["steps"], b["remainder"], step, max_steps)
    return new, p, hh, halted, b


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_twin_is_torchs_cell_then_the_halting_twin(kind):
    cell, x, h, c, inputs, buffers, step, max_steps = _problem(kind, 5, 11, torch.float64)
    new, p, hh, halted, got = _run(twins, kind, inputs, buffers, step, max_steps)
    with torch.no_grad():
        flag = cell(x, h) if kind == "gru" else cell(x, (h, c))
    want_states = (flag,) if kind == "gru" else flag
    want = {k: v.clone() for k, v in buffers.items()}
    extra = [] if kind == "gru" else [(want_states[1].to(DEVICE), want["acc_c"])]
    wp, wh, whalt = act_twins.halting_step(want_states[0].to(DEVICE), inputs[3], inputs[4], inputs[5], inputs[6],
                                           want["running_sum"], want["acc_h"], want["steps"], want["remainder"],
                                           step, max_steps, extra=extra)
    for a, b in zip(new, want_states):
        torch.testing.assert_close(a, b.to(DEVICE), **TOL[torch.float64])
    torch.testing.assert_close(p, wp)
    torch.testing.assert_close(hh, wh)
    assert torch.equal(halted, whalt)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


CASES = [
    # rows, hidden, step, max_steps, sum_scale: some halt / none / all (last step) / all (sum near 1)
    (5, 37, 2, 5, 0.9),
    (1, 1, 1, 5, 0.0),
    (3, 300, 5, 5, 0.5),
    (6, 64, 1, 5, 1.0),
    (0, 8, 2, 5, 0.5),
]


@representative(dtype=torch.float32, rows=5, hidden=37, step=2, max_steps=5, sum_scale=0.9,   # per kind
                also=[dict(dtype=torch.float32, rows=0, hidden=8, step=2, max_steps=5, sum_scale=0.5)])
@pytest.mark.parametrize("backend", [CPU_GATES, *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,step,max_steps,sum_scale", CASES)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_kernels_match_twins(backend, kind, rows, hidden, step, max_steps, sum_scale, dtype):
    """Every output and buffer; rows = 0 launches nothing. The halting
    decision is compared exactly: the fused kernel decides on h' rounded to
    the state dtype, as the unfused path does. p, h and the buffers follow
    h', so they are compared at h's dtype's tolerance."""
    if backend == "cpu" and dtype not in CPU_DTYPES:
        pytest.skip("the CPU kernels take float32 and float64")
    _, _, _, _, inputs, buffers, step, max_steps = _problem(kind, rows, hidden, dtype, step=step,
                                                            max_steps=max_steps, sum_scale=sum_scale)
    w_new, w_p, w_hh, w_halted, want = _run(twins, kind, inputs, buffers, step, max_steps)
    g_new, g_p, g_hh, g_halted, got = _run(gate_kernels(backend), kind, inputs, buffers, step, max_steps)
    for a, b in zip(g_new, w_new):
        assert a.dtype == dtype and a.shape == (rows, hidden)
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])
    assert torch.equal(g_halted, w_halted)
    tol = TOL[dtype]
    torch.testing.assert_close(g_p, w_p, **tol)
    torch.testing.assert_close(g_hh, w_hh, **tol)
    for k in want:
        if k == "acc_c" and kind == "gru":
            assert torch.equal(got[k], want[k])          # not touched
            continue
        torch.testing.assert_close(got[k], want[k], **tol)
    if rows and step == max_steps:
        assert bool(g_halted.all())


@pytest.mark.parametrize("backend", [CPU_GATES, *KERNEL_BACKENDS])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_kernels_read_strided_inputs_and_write_strided_buffers(backend, kind):
    """gi a column slice of a wider buffer, the state expanded from one row
    (row stride 0), gh transposed twice, the mean field a column slice, and
    a non-contiguous running sum (copied back after the launch)."""
    _, _, _, _, inputs, buffers, step, max_steps = _problem(kind, 4, 9, torch.float32, batch=6)
    gi, gh, state, active, weight, bias, threshold = inputs
    wide = torch.randn(4, gi.shape[1] + 5, device=DEVICE)
    wide[:, 2:2 + gi.shape[1]] = gi
    views = (wide[:, 2:2 + gi.shape[1]], gh.t().contiguous().t(), state[:1].expand(4, -1))
    dense = (gi, gh, state[:1].expand(4, -1).contiguous())
    w_new, w_p, _, w_halted, want = _run(twins, kind, (*dense, active, weight, bias, threshold), buffers,
                                         step, max_steps)

    b = {k: v.clone() for k, v in buffers.items()}
    wide_acc = torch.zeros(6, 20, device=DEVICE)
    wide_acc[:, 3:12] = b["acc_h"]
    wide_sum = torch.zeros(6, 2, device=DEVICE)
    wide_sum[:, 1] = b["running_sum"]
    impl = gate_kernels(backend)
    fn = impl.gru_halting_step if kind == "gru" else impl.lstm_halting_step
    accumulators = (wide_acc[:, 3:12],) if kind == "gru" else (wide_acc[:, 3:12], b["acc_c"])
    new, p, _, halted = fn(*views, active, weight, bias, threshold, wide_sum[:, 1], accumulators, b["steps"],
                           b["remainder"], step, max_steps)
    for a, c in zip(new, w_new):
        torch.testing.assert_close(a, c, **TOL[torch.float32])
    assert torch.equal(halted, w_halted)
    torch.testing.assert_close(wide_acc[:, 3:12], want["acc_h"], **TOL[torch.float32])
    torch.testing.assert_close(wide_sum[:, 1], want["running_sum"], **TOL[torch.float32])
    assert not wide_acc[:, :3].any() and not wide_acc[:, 12:].any()


# The Triton rows run the interpreter through many evaluations: --run-slow there
PONDER_GRADCHECK = ["reference", CPU_GATES, *(pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id)
                                             if p.id == "triton" and not torch.cuda.is_available() else p
                                             for p in KERNEL_BACKENDS)]


@pytest.mark.parametrize("backend", PONDER_GRADCHECK)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cell_ponder_gradcheck_float64(kind, backend):
    """A cell's whole ponder as one autograd Function (ops.cells.ponder), its
    hand-written backward gradchecked in float64 in every input: the hoisted
    projection, the flag column, the initial state, W_hh, b_hh and the
    halting unit. Rows halt at steps 1, 2 and 3 and the running sums stay
    away from the threshold (eps = 0.3)."""
    from act_kernels.ops.act import get_kernels
    from act_kernels.ops.cells import cell_ponder

    g = torch.Generator().manual_seed(7)    # rows halt at steps 1, 2 and 3 for both cells
    B, H, G = 5, 4, (3 if kind == "gru" else 4) * 4
    f64 = dict(dtype=torch.float64, device=DEVICE)
    later = torch.randn(B, G, generator=g, dtype=torch.float64).to(DEVICE)
    flag = torch.randn(G, generator=g, dtype=torch.float64).to(DEVICE)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64).to(DEVICE)
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64).to(DEVICE)
    w_hh = (torch.randn(G, H, generator=g, dtype=torch.float64) * 0.5).to(DEVICE)
    b_hh = torch.randn(G, generator=g, dtype=torch.float64).to(DEVICE)
    halt_w = (torch.randn(1, H, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    halt_b = torch.zeros(1, **f64)
    combine = get_kernels({"reference": "twins", "cpu": "twins"}.get(backend, backend)).combine_backward
    impl = gate_kernels(backend)

    def fn(later, flag, h0, c0, w_hh, b_hh, halt_w, halt_b):
        state = (h0, c0) if kind == "lstm" else h0
        out = cell_ponder(kind, impl, combine, later, flag, state, w_hh, b_hh, halt_w, halt_b, max_steps=3,
                          eps=0.3)
        s = out.state if kind == "lstm" else (out.state,)
        return (*s, out.ponder_cost)

    args = [t.clone().requires_grad_() for t in (later, flag, h0, c0, w_hh, b_hh, halt_w, halt_b)]
    if kind == "gru":
        args[3].requires_grad_(False)
    with torch.no_grad():
        steps = cell_ponder(kind, impl, combine, later, flag, (h0, c0) if kind == "lstm" else h0, w_hh, b_hh,
                            halt_w, halt_b, max_steps=3, eps=0.3).steps
    assert len(set(steps.tolist())) > 1, f"the test needs rows that halt at different steps, got {steps}"
    assert torch.autograd.gradcheck(fn, args)


def test_cell_ponder_refuses_double_backward():
    """Its backward calls kernels that autograd cannot see through: a second
    derivative is an error, not a silently wrong number."""
    from act_kernels.ops.act import get_kernels
    from act_kernels.ops.cells import cell_ponder

    torch.manual_seed(0)
    later = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    h0 = torch.randn(3, 4, device=DEVICE)
    w_hh, b_hh = torch.randn(12, 4, device=DEVICE), torch.randn(12, device=DEVICE)
    halt_w, halt_b = torch.randn(1, 4, device=DEVICE), torch.zeros(1, device=DEVICE)
    out = cell_ponder("gru", gate_kernels("reference"), get_kernels("twins").combine_backward, later,
                      torch.zeros(12, device=DEVICE), h0, w_hh, b_hh, halt_w, halt_b, max_steps=3, eps=0.1)
    (g,) = torch.autograd.grad(out.state.square().sum(), later, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        g.sum().backward()
