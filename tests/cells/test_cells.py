"""The fused GRU/LSTM gates (act_kernels.ops.cells) and the ACT layers' fused
path (input projection hoisted out of the ponder loop): the twins against
torch's own cells, Triton against the twins, and the layers' fused path
against their torch-cell path."""
import pytest
import torch
import torch.nn.functional as F

import act_kernels as ak
from act_kernels.ops.cells import gate_kernels, gru_gates, lstm_gates
from act_kernels.ops.cells import reference as twins
from backends import CPU_DTYPES, CPU_GATES, KERNEL_BACKENDS
from helpers import DEVICE, TOL, representative

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GATES = {"gru": (torch.nn.GRUCell, 3), "lstm": (torch.nn.LSTMCell, 4)}


def _problem(kind, rows, hidden, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    cls, _ = GATES[kind]
    cell = cls(7, hidden, bias=bias).to(DEVICE, torch.float64)
    x = torch.randn(rows, 7, dtype=torch.float64, device=DEVICE)
    h = torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE)
    c = torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE)
    gi = F.linear(x, cell.weight_ih, cell.bias_ih)
    gh = F.linear(h, cell.weight_hh, cell.bias_hh)
    return cell, x, h, c, gi.to(dtype), gh.to(dtype), h.to(dtype), c.to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_twins_compute_torchs_cells(kind, bias):
    cell, x, h, c, gi, gh, _, _ = _problem(kind, 6, 13, bias=bias)
    params = list(cell.parameters())
    if kind == "gru":
        want = cell(x, h)
        got = gru_gates(gi, gh, h)
    else:
        want = cell(x, (h, c))
        got = lstm_gates(gi, gh, c)
    want, got = (want,) if kind == "gru" else want, (got,) if kind == "gru" else got
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    probe = [torch.randn_like(t) for t in want]
    g_want = torch.autograd.grad(sum((t * p).sum() for t, p in zip(want, probe)), params)
    g_got = torch.autograd.grad(sum((t * p).sum() for t, p in zip(got, probe)), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


# Triton: the GRU's Function gradchecked; the LSTM's Triton gates are held to the
# twins (test_kernels_match_twins) and to the reference's gradients
# (test_kernels_read_strided_and_stride0_inputs), its twin gradchecked here
@representative(kind="gru")
@pytest.mark.parametrize("backend", ["reference", CPU_GATES, *KERNEL_BACKENDS])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_gradcheck_float64(kind, backend):
    _, _, _, _, gi, gh, h, c = _problem(kind, 3, 5)
    fn = gru_gates if kind == "gru" else lstm_gates
    args = [t.clone().requires_grad_() for t in (gi, gh, h if kind == "gru" else c)]
    assert torch.autograd.gradcheck(lambda a, b, s: fn(a, b, s, backend=backend), args)


@representative(dtype=torch.bfloat16, rows=3, hidden=300, also=[dict(dtype=torch.float32, rows=0, hidden=8)])
@pytest.mark.parametrize("backend", [CPU_GATES, *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(0, 8), (1, 1), (5, 37), (3, 300)])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_kernels_match_twins(backend, kind, rows, hidden, dtype):
    """H = 300 spans two blocks of 256 with a ragged tail; rows = 0 launches nothing."""
    if backend == "cpu" and dtype not in CPU_DTYPES:
        pytest.skip("the CPU kernels take float32 and float64 (half precision: test_cpu_kernels_refuse_half_and_auto_falls_back)")
    tk = gate_kernels(backend)
    _, _, _, _, gi, gh, h, c = _problem(kind, rows, hidden, dtype)
    state = h if kind == "gru" else c
    fwd = "gru_gates_forward" if kind == "gru" else "lstm_gates_forward"
    bwd = "gru_gates_backward" if kind == "gru" else "lstm_gates_backward"
    want, got = getattr(twins, fwd)(gi, gh, state), getattr(tk, fwd)(gi, gh, state)
    for a, b in zip(got if kind == "lstm" else (got,), want if kind == "lstm" else (want,)):
        assert a.dtype == dtype and a.shape == (rows, hidden)
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])
    grads = [torch.randn(rows, hidden, device=DEVICE).to(dtype) for _ in range(1 if kind == "gru" else 2)]
    want, got = getattr(twins, bwd)(*grads, gi, gh, state), getattr(tk, bwd)(*grads, gi, gh, state)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


@pytest.mark.parametrize("backend", [CPU_GATES, *KERNEL_BACKENDS])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_kernels_read_strided_and_stride0_inputs(backend, kind):
    """gi as a column slice of a wider buffer (row stride > width), the
    state expanded from one row (row stride 0), gh transposed twice."""
    _, _, _, _, gi, gh, h, c = _problem(kind, 4, 9, torch.float32)
    wide = torch.randn(4, gi.shape[1] + 5, device=DEVICE)
    wide[:, 2:2 + gi.shape[1]] = gi
    gi_view = wide[:, 2:2 + gi.shape[1]]
    state = (h if kind == "gru" else c)[:1].expand(4, -1)
    gh_view = gh.t().contiguous().t()
    fn = gru_gates if kind == "gru" else lstm_gates
    args = [gi_view, gh_view, state]
    dense = [t.contiguous().requires_grad_() for t in args]
    views = [t.detach().requires_grad_() for t in args]
    want, got = fn(*dense, backend="reference"), fn(*views, backend=backend)
    want, got = (want,) if kind == "gru" else want, (got,) if kind == "gru" else got
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    probe = [torch.randn_like(t) for t in want]
    ga = torch.autograd.grad(sum((t * p).sum() for t, p in zip(got, probe)), views)
    gb = torch.autograd.grad(sum((t * p).sum() for t, p in zip(want, probe)), dense)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_bad_input_is_named():
    gi, gh, h = torch.zeros(2, 9), torch.zeros(2, 9), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"gh must be \(rows, 3 \* hidden\)"):
        gru_gates(gi, torch.zeros(2, 8), h)
    with pytest.raises(ValueError, match="state must be a 2-D tensor"):
        gru_gates(gi, gh, torch.zeros(3))
    with pytest.raises(ValueError, match=r"gi must be \(rows, 4 \* hidden\)"):
        lstm_gates(gi, gh, h)
    with pytest.raises(TypeError, match="floating point"):
        gru_gates(gi.long(), gh, h)
    with pytest.raises(ValueError, match="'reference', 'cpu', 'triton' and 'cuda'"):
        gru_gates(gi, gh, h, backend="fast")


# -- the layers' fused path ---------------------------------------------------------------------

def _layer_pair(cls, backend, **kwargs):
    torch.manual_seed(0)
    ref = cls(5, 19, max_steps=4, backend="reference", **kwargs).to(DEVICE)
    # the CPU gate kernels are what "auto" picks on the CPU; no backend name selects them
    fused = cls(5, 19, max_steps=4, backend="auto" if backend == "cpu" else backend, **kwargs).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@representative(packed=True, kwargs=dict(num_layers=2, bidirectional=True))   # per layer class
@pytest.mark.parametrize("backend", [CPU_GATES, *KERNEL_BACKENDS])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kwargs", [{}, dict(num_layers=2, bidirectional=True)])
@pytest.mark.parametrize("cls", [ak.nn.ACTGRU, ak.nn.ACTLSTM])
def test_fused_layer_matches_the_torch_cell_path(cls, kwargs, packed, backend, monkeypatch):
    from torch.nn.utils.rnn import pack_sequence

    ref, fused = _layer_pair(cls, backend, **kwargs)
    assert fused.acts[0].fused_gates(torch.device(DEVICE)) == backend
    assert ref.acts[0].fused_gates(torch.device(DEVICE)) == ""
    projections = []
    original = type(fused.acts[0]).project
    monkeypatch.setattr(type(fused.acts[0]), "project",
                        lambda self, x: projections.append(x.shape) or original(self, x))
    torch.manual_seed(1)
    seqs = [torch.randn(n, 5, device=DEVICE) for n in (4, 2, 3)]
    x = pack_sequence(seqs, enforce_sorted=False) if packed else torch.nn.utils.rnn.pad_sequence(seqs)
    results = []
    for m in (ref, fused):
        y, h_n = m(x)
        y = y.data if packed else y
        finals = h_n if isinstance(h_n, tuple) else (h_n,)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum() \
            + 0.1 * m.ponder_cost.sum() + sum(f.square().sum() for f in finals)
        results.append((y, finals, m.steps, m.ponder_cost, torch.autograd.grad(loss, list(m.parameters()))))
    (y0, f0, n0, r0, g0), (y1, f1, n1, r1, g1) = results
    torch.testing.assert_close(y1, y0, **TOL[torch.float32])
    for a, b in zip(f1, f0):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert torch.equal(n1, n0)
    torch.testing.assert_close(r1, r0, **TOL[torch.float32])
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    # the input projection ran once per (layer, direction), over the whole sequence
    directions = len(fused.acts)
    assert len(projections) == directions
    assert all(shape[0] == (sum(len(s) for s in seqs) if packed else 4) for shape in projections)


def test_fused_cell_matches_torch_cell_as_a_module():
    """ACTCell alone: the per-time-step hoist (no `projected` given)."""
    torch.manual_seed(0)
    ref = ak.nn.ACTCell(torch.nn.GRUCell(6, 11), 11, max_steps=5, backend="reference").to(DEVICE)
    fused = ak.nn.ACTCell(torch.nn.GRUCell(6, 11), 11, max_steps=5, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x, h = torch.randn(4, 5, device=DEVICE), torch.randn(4, 11, device=DEVICE)
    a, b = ref(x, h), fused(x, h)
    torch.testing.assert_close(b.state, a.state, **TOL[torch.float32])
    assert torch.equal(a.steps, b.steps)


def test_subclassed_cells_keep_their_own_forward():
    class Noisy(torch.nn.GRUCell):
        def forward(self, x, h):
            return super().forward(x, h) * 0.5

    act = ak.nn.ACTCell(Noisy(6, 11), 11, backend="triton")
    assert act.fused_gates(torch.device(DEVICE)) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors")
def test_cpu_kernels_refuse_half_and_auto_falls_back():
    """The CPU kernels take float32 and float64; a half-precision layer on
    the CPU keeps torch's cell (no error), and backend='reference' always does."""
    from act_kernels.backends import cuda_extension_error
    from act_kernels.ops.cells import cpu_kernels

    if cuda_extension_error():
        pytest.skip(cuda_extension_error())
    gi, gh, h = torch.zeros(2, 9, dtype=torch.bfloat16), torch.zeros(2, 9, dtype=torch.bfloat16), \
        torch.zeros(2, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu_kernels.gru_gates_forward(gi, gh, h)
    cpu = torch.device("cpu")
    assert ak.nn.ACTGRU(3, 4).acts[0].fused_gates(cpu) == "cpu"
    assert ak.nn.ACTGRU(3, 4).to(torch.bfloat16).acts[0].fused_gates(cpu) == ""
    assert ak.nn.ACTGRU(3, 4, backend="reference").acts[0].fused_gates(cpu) == ""
    layer = ak.nn.ACTLSTM(3, 4).to(torch.bfloat16)
    out, _ = layer(torch.randn(5, 2, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# the Triton rows take over 30 s each under the interpreter: --run-slow there
LAYER_GRADCHECK = [CPU_GATES, *(pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id)
                                if p.id == "triton" and not torch.cuda.is_available() else p
                                for p in KERNEL_BACKENDS)]


@pytest.mark.parametrize("backend", LAYER_GRADCHECK)
@pytest.mark.parametrize("cls", [ak.nn.ACTGRU, ak.nn.ACTLSTM])
def test_fused_layer_gradcheck_float64(cls, backend):
    """The fused layer path in float64 (on the CPU: the whole ponder as one
    autograd Function with a hand-written backward), gradchecked in the input
    and the initial state through the output and the ponder cost. Halting
    decisions are piecewise constant, so the problem keeps every running sum
    away from the threshold (eps = 0.3, max_steps = 3)."""
    torch.manual_seed(0)
    layer = cls(3, 4, max_steps=3, eps=0.3, backend="auto" if backend == "cpu" else backend)
    layer = layer.to(DEVICE, torch.float64)
    with torch.no_grad():
        layer.halting.bias.fill_(0.0)
        layer.halting.weight.mul_(15.0)   # h spread widely, so rows halt at different steps
    assert layer.acts[0].fused_gates(torch.device(DEVICE)) == backend
    x = torch.randn(2, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    h0 = torch.randn(1, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(x, h0):
        out, _ = layer(x, (h0, h0 * 0.5) if cls is ak.nn.ACTLSTM else h0)
        return out, layer.ponder_cost

    steps = None
    with torch.no_grad():
        fn(x, h0)
        steps = layer.steps.clone()
    assert len(set(steps.flatten().tolist())) > 1, "the test needs rows that halt at different steps"
    assert torch.autograd.gradcheck(fn, (x, h0))
