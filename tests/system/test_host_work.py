"""Host work per ponder step (design §11), counted, not timed: every ATen op
and kernel launch that one time step of the fused ACT GRU and LSTM layers
issues, recorded with a TorchDispatchMode and split at each ponder step.

The budget this guards, per ponder step:
- the hidden GEMM;
- one launch of the gates and the halting step together, which also
  accumulates every state tensor (an LSTM's c: no index_add_);
- one survivor-count read (nonzero, the only host sync), the flag negation,
  and, only at a step where rows halt, one gather of the survivors' indices,
  of each state tensor and of their hoisted input projections;
- after the loop: no host sync at all.
design §11's full budget (one launch and one count read outside the step
function) needs the negation and the gathers fused into the halting launch:
the counts below say exactly what remains."""
import collections

import pytest
import torch

import act_kernels as ak
from census import SYNCS, Census
from helpers import DEVICE

@pytest.mark.parametrize("cls", [ak.nn.ACTGRU, ak.nn.ACTLSTM])
def test_ops_per_ponder_step(cls, monkeypatch):
    import act_kernels.ops.act.triton_kernels as act_triton
    import act_kernels.ops.cells.triton_kernels as cell_triton

    census = Census()
    monkeypatch.setattr(act_triton, "halting_step", census.wrap("halting", act_triton.halting_step))
    for name in ("gru_gates_forward", "lstm_gates_forward"):
        monkeypatch.setattr(cell_triton, name, census.wrap("gates", getattr(cell_triton, name)))
    for name in ("gru_halting_step", "lstm_halting_step"):
        monkeypatch.setattr(cell_triton, name, census.wrap("step", getattr(cell_triton, name)))

    torch.manual_seed(0)
    layer = cls(4, 8, max_steps=6, backend="triton").to(DEVICE)
    act = layer.acts[0]
    with torch.no_grad():
        act.halting.bias.fill_(-1.0)   # rows halt at different steps, the last at max_steps or before
    x = torch.randn(16, 4, device=DEVICE)
    projected = act.project(x)
    h = torch.zeros(16, 8, device=DEVICE)
    state = (h, h) if cls is ak.nn.ACTLSTM else h
    n_states = 2 if cls is ak.nn.ACTLSTM else 1
    with census:
        out = act(x, state, projected=projected)
    steps = out.steps.tolist()
    assert len(set(steps)) > 1, "the test needs rows that halt at different steps"

    # split at each fused launch: chunk n holds step n's work up to the next step's launch
    chunks, current = [], None
    for e in census.events:
        if e == "LAUNCH step":
            current = []
            chunks.append(current)
        if current is not None:
            current.append(e)
    assert len(chunks) == max(steps)
    for n, chunk in enumerate(chunks, start=1):
        ops = collections.Counter(chunk)
        still_running = sum(s > n for s in steps)
        halted_now = sum(s == n for s in steps)
        assert ops["LAUNCH step"] == 1 and not ops["LAUNCH gates"] and not ops["LAUNCH halting"], chunk
        assert sum(ops[s] for s in SYNCS) == 1 and ops["nonzero"] == 1, chunk   # the survivor count
        assert "index_add" not in ops, chunk          # every state tensor accumulated in the launch
        assert "lift_fresh" not in ops, chunk         # no table built on the host
        want = collections.Counter({"LAUNCH step": 1, "bitwise_not": 1, "nonzero": 1})
        if still_running:
            want["addmm"] += 1                        # the next step's hidden GEMM
            if halted_now:                            # survivors' indices, states and projected inputs
                want["index_select"] += 2 + n_states
        else:
            # after the loop: concatenations and the packed step index, with no
            # sync and no table built on the host (lift_fresh: a tensor made
            # from Python data, which on a GPU is a blocking copy)
            after = chunk[chunk.index("nonzero") + 1:]
            assert not SYNCS & set(after), after
            assert "lift_fresh" not in after, after
            for op in after:
                want[op] += 1
        assert ops == want, (n, chunk)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_backward_reads_each_time_step_once(backend):
    """The layers hand every time step a view of the sequence (and of its
    hoisted projection) by one unbind: its backward stacks the L step
    gradients once. A view by x[t] would make each time step's backward
    write a zero-filled tensor as large as the whole sequence (select_backward):
    O(L^2) memory traffic. The flag's column of W_ih is likewise taken once
    per sequence."""
    torch.manual_seed(0)
    layer = ak.nn.ACTGRU(4, 8, num_layers=2, max_steps=3, backend=backend).to(DEVICE)
    x = torch.randn(6, 5, 4, device=DEVICE, requires_grad=True)
    out, _ = layer(x)
    loss = out.square().sum() + layer.ponder_cost.sum()
    census = Census()
    with census:
        loss.backward()
    ops = collections.Counter(census.events)
    # no x[t] view, and W_ih's flag column taken once per (layer, direction), not per time step
    assert ops["select_backward"] == (layer.num_layers if backend == "triton" else 0), ops
    assert ops["stack"] >= 2, ops             # each layer's L step gradients, stacked once
