"""ACT recurrent layers (Graves 2016, §2) on the ragged ponder kernels.

At every time step the cell ponders: ponder step n feeds the cell the input
with one extra feature, the first-step flag (1 at n = 1, else 0), the halting
unit reads the cell's hidden output, and the mean-field state (h, and c for an
LSTM) becomes the state passed to the next time step and the output.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .checks import check_layer_input, check_layer_options
from ..ops.act import PonderOutput, get_kernels, ponder
from ..backends import CellBackends, resolve_cell
from ..ops.cells import cell_ponder, gate_kernels

# Cells whose step has fused gates: the input projection is hoisted out of the
# ponder loop and a ponder step runs h W_hh^T and one launch of the gates and
# the halting step together, the whole ponder being one autograd Function.
# Exact types only: a subclass may change forward.
_FUSED_GATES = {nn.GRUCell: "gru", nn.LSTMCell: "lstm"}
_UNRESOLVED = object()   # ACTCell.forward resolves its backends itself unless the caller did


class ACTCell(nn.Module):
    """Wraps any recurrent cell into one ACT time step.

    cell(input (A, input_size + 1), state) -> new state, where state is a
    tensor (A, hidden_size) or a tuple whose first tensor is the hidden output
    (LSTMCell's (h, c)). The cell must take the input with the first-step flag
    appended as its last feature. `.halting` is nn.Linear(hidden_size, 1).

        cell = ACTCell(nn.GRUCell(10 + 1, 64), 64)
        out = cell(x, h)            # a PonderOutput: out.state, out.ponder_cost, out.steps

    For an nn.GRUCell or nn.LSTMCell on a GPU kernel backend, the input
    projection x W_ih^T + b_ih is computed once per time step (once per
    sequence inside the layers), not once per ponder step, and the gates run
    in the same kernel launch as the halting step (`act_kernels.ops.cells`);
    the math is the cell's.
    """

    def __init__(self, cell: nn.Module, hidden_size: int, *, max_steps: int = 100, eps: float = 0.01,
                 backend: str = "auto", halting_bias_init: float = 1.0):
        super().__init__()
        check_layer_options(max_steps, eps, backend)
        self.cell = cell
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.eps = eps
        self.backend = backend
        self.halting = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.halting.bias.fill_(halting_bias_init)  # the paper initialises it to 1

    def fused_gates(self, device: torch.device) -> str:
        """The gate kernels this cell's ponder steps use on `device` ("triton"
        or "cuda", as its backend resolves; "cpu" for "auto" on the CPU in
        float32/float64 when the extension is built), or "" for the wrapped
        cell module as it is (the reference backend, half precision on the
        CPU, or a cell other than torch's own GRUCell / LSTMCell)."""
        chosen = self.cell_backends(device)
        return chosen.gates if chosen is not None else ""

    def cell_backends(self, device: torch.device) -> Optional[CellBackends]:
        """The gate kernels and combine backward of this cell's fused ponder on
        `device` (`backends.resolve_cell`), or None where it runs the wrapped
        cell module as it is."""
        if type(self.cell) not in _FUSED_GATES:
            return None
        return resolve_cell(self.backend, device, self.cell.weight_hh.dtype)

    def project(self, input: Tensor) -> Tensor:
        """x W_ih^T + b_ih without the first-step flag column: the part of the
        input projection shared by every ponder step (a whole sequence at once
        when the layer calls it)."""
        w = self.cell.weight_ih
        return F.linear(input, w[:, : w.shape[1] - 1], self.cell.bias_ih)

    def forward(self, input: Tensor, state, *, projected: Optional[Tensor] = None,
                flag_column: Optional[Tensor] = None, backends=_UNRESOLVED) -> PonderOutput:
        """input (B, I); state (B, H) or a tuple of (B, H_k). Returns the ponder's output.

        projected (B, G) and flag_column (G,), optional: `project(input)` and
        `flag_column()`, when the caller computed them for many time steps at
        once (used only with fused gates); backends: `cell_backends(device)`,
        when the caller resolved it once for many time steps."""
        chosen = self.cell_backends(input.device) if backends is _UNRESOLVED else backends
        if chosen is not None:
            return self._forward_fused(input, state, projected, flag_column, chosen)
        ones = input.new_ones(input.shape[0], 1)
        first = torch.cat([input, ones], dim=1)        # the flag: 1 on the first ponder step
        later = torch.cat([input, ones * 0], dim=1)    # and 0 after it

        def step(s, n, active):
            x = first if n == 1 else later
            # while every row runs, `active` is all of them: no gather
            return self.cell(x if active.numel() == x.shape[0] else x.index_select(0, active), s)

        return ponder(step, state, self.halting.weight, self.halting.bias,
                      max_steps=self.max_steps, eps=self.eps, backend=self.backend)

    def flag_column(self) -> Tensor:
        """The first-step flag's column of W_ih (G,). A caller running many
        time steps takes it once: each view taken is one more autograd node,
        whose backward writes a zero-filled tensor the size of W_ih."""
        return self.cell.weight_ih[:, -1]

    def _forward_fused(self, input, state, projected, flag_column, chosen: CellBackends) -> PonderOutput:
        # the whole ponder as one autograd Function over the fused gate kernels (ops.cells.ponder)
        cell = self.cell
        later = self.project(input) if projected is None else projected
        flag = self.flag_column() if flag_column is None else flag_column
        return cell_ponder(_FUSED_GATES[type(cell)], gate_kernels(chosen.gates), get_kernels(chosen.combine).combine_backward,
                           later, flag, state, cell.weight_hh, cell.bias_hh, self.halting.weight,
                           self.halting.bias, max_steps=self.max_steps, eps=self.eps)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, max_steps={self.max_steps}, eps={self.eps}, backend={self.backend!r}"


class _ACTLayer(nn.Module):
    """A recurrent network whose every time step ponders, with torch.nn.RNN /
    GRU / LSTM's conventions: num_layers, dropout between layers (training
    only), bidirectional (the reverse direction ponders over the reversed
    sequence; with PackedSequence, over each sequence from its own end),
    batch_first, unbatched (L, I) input and PackedSequence input (then the
    output is a PackedSequence and only the real time steps are computed).

    forward(input, hx=None) -> (output, h_n) shaped exactly as torch's module
    returns them: output (L, B, D * H), h_n (and c_n) (num_layers * D, B, H),
    D = 2 if bidirectional else 1, ordered layer 0 forward, layer 0 reverse,
    layer 1 forward, ...

    After a call, `.ponder_cost` (differentiable: add tau * ponder_cost.sum()
    to the loss) is the ponder cost summed over layers and directions, shaped
    like the output without its feature dimension (for PackedSequence input:
    1-D, aligned with `output.data`). `.steps` (int64) is kept per layer and
    direction: (num_layers * D, *ponder_cost.shape), in h_n's order.

    Every (layer, direction) has its own cell and halting unit:
    `ponder_cell(layer, reverse)` returns its ACTCell (`.cell`, `.halting`);
    `.cell` and `.halting` name layer 0's forward ones.
    """

    _cell_class = None
    _is_lstm = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 max_steps: int = 100, eps: float = 0.01, backend: str = "auto",
                 halting_bias_init: float = 1.0, **cell_kwargs):
        super().__init__()
        check_layer_options(max_steps, eps, backend)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a float in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.bidirectional = batch_first, float(dropout), bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.acts = nn.ModuleList()
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.num_directions
            for _ in range(self.num_directions):
                cell = self._cell_class(width + 1, hidden_size, bias=bias, **cell_kwargs)
                self.acts.append(ACTCell(cell, hidden_size, max_steps=max_steps, eps=eps, backend=backend,
                                         halting_bias_init=halting_bias_init))
        self.ponder_cost: Optional[Tensor] = None
        self.steps: Optional[Tensor] = None

    def ponder_cell(self, layer: int = 0, reverse: bool = False) -> ACTCell:
        """The ACTCell (cell and halting unit) of one layer and direction."""
        if reverse and not self.bidirectional:
            raise ValueError("a unidirectional layer has no reverse direction")
        return self.acts[layer * self.num_directions + int(reverse)]

    @property
    def cell(self) -> nn.Module:
        return self.acts[0].cell

    @property
    def halting(self) -> nn.Linear:
        return self.acts[0].halting

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}")

    def _initial_states(self, hx, batch: int, like: Tensor):
        """One initial state per (layer, direction): a list of tensors (B, H), or of (h, c)."""
        count = self.num_layers * self.num_directions
        if hx is None:
            zeros = like.new_zeros(batch, self.hidden_size)
            return [(zeros, zeros) if self._is_lstm else zeros for _ in range(count)]
        if self._is_lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("ACTLSTM expects hx = (h_0, c_0)")
            h, c = (self._check_hidden(t, batch) for t in hx)
            return [(h[k], c[k]) for k in range(count)]
        return list(self._check_hidden(hx, batch))

    def _check_hidden(self, t: Tensor, batch: int) -> Tensor:
        want = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if not isinstance(t, Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"hidden state must have shape {want} (num_layers * num_directions, batch, "
                             f"hidden_size), got {got}")
        return t

    def _between_layers(self, x: Tensor, layer: int) -> Tensor:
        # dropout on each layer's output but the last, as torch does it
        if self.dropout > 0 and self.training and layer < self.num_layers - 1:
            return F.dropout(x, self.dropout, training=True)
        return x

    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        check_layer_input(input.data if isinstance(input, PackedSequence) else input,
                          next(self.cell.parameters()))
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"input must be (L, B, I), (B, L, I) or (L, I), got shape {tuple(input.shape)}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input has {x.shape[-1]} features, expected input_size = {self.input_size}")
        if unbatched and hx is not None:
            hx = tuple(t.unsqueeze(1) for t in hx) if self._is_lstm else hx.unsqueeze(1)
        initial = self._initial_states(hx, x.shape[1], x)
        finals, costs, steps = [], [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, final, cost, n = self._direction(self.acts[k], x, initial[k], reverse=direction == 1)
                outputs.append(out)
                finals.append(final)
                costs.append(cost)
                steps.append(n)
            x = self._between_layers(torch.cat(outputs, -1) if len(outputs) > 1 else outputs[0], layer)
        output, cost, steps = x, torch.stack(costs).sum(0), torch.stack(steps)
        if self.batch_first and not unbatched:
            output, cost, steps = output.transpose(0, 1), cost.t(), steps.transpose(1, 2)
        h_n = self._stack_finals(finals)
        if unbatched:
            output, cost, steps = output.squeeze(1), cost.squeeze(1), steps.squeeze(2)
            h_n = tuple(t.squeeze(1) for t in h_n) if self._is_lstm else h_n.squeeze(1)
        self.ponder_cost, self.steps = cost, steps
        return output, h_n

    def _stack_finals(self, finals):
        if self._is_lstm:
            return torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
        return torch.stack(finals)

    def _direction(self, act: ACTCell, x: Tensor, state, reverse: bool):
        """One direction of one layer over a (L, B, I) sequence: every time step
        ponders. Returns the outputs (L, B, H), the final state, and the ponder
        cost and steps per time step (L, B)."""
        length = x.shape[0]
        # Per-step views by unbind: one autograd node whose backward stacks
        # every step's gradient once. Indexing x[t] would make each step's
        # backward write a zero-filled (L, B, I) tensor: O(L^2) memory traffic.
        inputs = x.unbind(0)
        chosen = act.cell_backends(x.device)   # once per sequence, not per time step
        fused = chosen is not None
        projected = act.project(x).unbind(0) if fused else None   # one GEMM
        flag = act.flag_column() if fused else None
        outputs, costs, steps = [None] * length, [None] * length, [None] * length
        for t in (reversed(range(length)) if reverse else range(length)):
            out = act(inputs[t], state, projected=None if projected is None else projected[t], flag_column=flag,
                      backends=chosen)
            state = out.state
            outputs[t] = state[0] if self._is_lstm else state
            costs[t], steps[t] = out.ponder_cost, out.steps
        return torch.stack(outputs), state, torch.stack(costs), torch.stack(steps)

    def _forward_packed(self, packed: PackedSequence, hx):
        data, batch_sizes = packed.data, packed.batch_sizes
        batch = int(batch_sizes[0])
        if hx is not None and packed.sorted_indices is not None:
            order = packed.sorted_indices.to(data.device)
            hx = tuple(t.index_select(1, order) for t in hx) if self._is_lstm else hx.index_select(1, order)
        initial = self._initial_states(hx, batch, data)
        sizes = batch_sizes.tolist()
        finals, costs, steps = [], [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, final, cost, n = self._direction_packed(self.acts[k], data, sizes, initial[k],
                                                             reverse=direction == 1)
                outputs.append(out)
                finals.append(final)
                costs.append(cost)
                steps.append(n)
            data = self._between_layers(torch.cat(outputs, -1) if len(outputs) > 1 else outputs[0], layer)
        self.ponder_cost, self.steps = torch.stack(costs).sum(0), torch.stack(steps)
        output = PackedSequence(data, batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        h_n = self._stack_finals(finals)
        if packed.unsorted_indices is not None:
            order = packed.unsorted_indices.to(data.device)
            h_n = tuple(t.index_select(1, order) for t in h_n) if self._is_lstm else h_n.index_select(1, order)
        return output, h_n

    def _direction_packed(self, act: ACTCell, data: Tensor, sizes, state, reverse: bool):
        """One direction over packed data: time step t holds the first sizes[t]
        sequences (sorted by length), and only those are computed; the others
        keep their state. In reverse, a sequence starts at its own last step,
        from its initial state, since no later step touched its row."""
        states = state if self._is_lstm else (state,)
        # per-step views by split, one backward for all of them (see _direction)
        inputs = data.split(sizes)
        chosen = act.cell_backends(data.device)   # once per sequence, not per time step
        fused = chosen is not None
        projected = act.project(data).split(sizes) if fused else None   # one GEMM
        flag = act.flag_column() if fused else None
        outputs, costs, steps = [None] * len(sizes), [None] * len(sizes), [None] * len(sizes)
        for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
            size = sizes[t]
            running = tuple(s[:size] for s in states)
            out = act(inputs[t], running if self._is_lstm else running[0],
                      projected=None if projected is None else projected[t], flag_column=flag, backends=chosen)
            new = out.state if self._is_lstm else (out.state,)
            states = tuple(torch.cat([n, s[size:]]) for n, s in zip(new, states))
            outputs[t], costs[t], steps[t] = new[0], out.ponder_cost, out.steps
        final = states if self._is_lstm else states[0]
        return torch.cat(outputs), final, torch.cat(costs), torch.cat(steps)


class ACTRNN(_ACTLayer):
    __doc__ = "Elman RNN (tanh or relu) with ACT. " + _ACTLayer.__doc__
    _cell_class = nn.RNNCell

    def __init__(self, input_size, hidden_size, num_layers: int = 1, *, nonlinearity: str = "tanh", **kwargs):
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, **kwargs)


class ACTGRU(_ACTLayer):
    __doc__ = "GRU with ACT. " + _ACTLayer.__doc__
    _cell_class = nn.GRUCell


class ACTLSTM(_ACTLayer):
    __doc__ = "LSTM with ACT: halting reads h, both h and c are mean-fielded. " + _ACTLayer.__doc__
    _cell_class = nn.LSTMCell
    _is_lstm = True

    def __init__(self, input_size, hidden_size, num_layers: int = 1, *, proj_size: int = 0, **kwargs):
        if proj_size:
            raise ValueError(f"ACTLSTM supports no proj_size (got {proj_size}): the halting unit and the "
                             "mean field act on the whole hidden state h; use proj_size=0 and a Linear after it")
        super().__init__(input_size, hidden_size, num_layers, **kwargs)
