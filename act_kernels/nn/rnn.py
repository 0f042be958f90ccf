"""ACT recurrent layers (Graves 2016, §2) on the ragged ponder kernels.

At every time step the cell ponders: ponder step n feeds the cell the input
with one extra feature, the first-step flag (1 at n = 1, else 0), the halting
unit reads the cell's hidden output, and the mean-field state (h, and c for an
LSTM) becomes the state passed to the next time step and the output.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .._validation import check_layer_input, check_layer_options
from ..api import ponder
from ..output import PonderOutput


class ACTCell(nn.Module):
    """Wraps any recurrent cell into one ACT time step.

    cell(input (A, input_size + 1), state) -> new state, where state is a
    tensor (A, hidden_size) or a tuple whose first tensor is the hidden output
    (LSTMCell's (h, c)). The cell must take the input with the first-step flag
    appended as its last feature. `.halting` is nn.Linear(hidden_size, 1).

        cell = ACTCell(nn.GRUCell(10 + 1, 64), 64)
        out = cell(x, h)            # a PonderOutput: out.state, out.ponder_cost, out.steps
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

    def forward(self, input: Tensor, state) -> PonderOutput:
        """input (B, I); state (B, H) or a tuple of (B, H_k). Returns the ponder's output."""
        ones = input.new_ones(input.shape[0], 1)
        first = torch.cat([input, ones], dim=1)        # the flag: 1 on the first ponder step
        later = torch.cat([input, ones * 0], dim=1)    # and 0 after it

        def step(s, n, active):
            return self.cell((first if n == 1 else later)[active], s)

        return ponder(step, state, self.halting.weight, self.halting.bias,
                      max_steps=self.max_steps, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, max_steps={self.max_steps}, eps={self.eps}, backend={self.backend!r}"


class _ACTLayer(nn.Module):
    """A single-layer recurrent network whose every time step ponders.

    forward(input, hx=None) -> (output, h_n) shaped as torch.nn.RNN/GRU/LSTM
    return them, for (L, B, I) / (B, L, I) with batch_first / unbatched (L, I)
    input and for PackedSequence input (then the output is a PackedSequence and
    only the real time steps of each sequence are computed).

    After a call, `.ponder_cost` (differentiable: add tau * ponder_cost.sum()
    to the loss) and `.steps` are shaped like the output without its feature
    dimension; for PackedSequence input they are 1-D and aligned with
    `output.data`.
    """

    _cell_class = None
    _is_lstm = False

    def __init__(self, input_size: int, hidden_size: int, *, bias: bool = True, batch_first: bool = False,
                 max_steps: int = 100, eps: float = 0.01, backend: str = "auto",
                 halting_bias_init: float = 1.0, **cell_kwargs):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.batch_first = batch_first
        self.act = ACTCell(self._cell_class(input_size + 1, hidden_size, bias=bias, **cell_kwargs),
                           hidden_size, max_steps=max_steps, eps=eps, backend=backend,
                           halting_bias_init=halting_bias_init)
        self.ponder_cost: Optional[Tensor] = None
        self.steps: Optional[Tensor] = None

    @property
    def cell(self) -> nn.Module:
        return self.act.cell

    @property
    def halting(self) -> nn.Linear:
        return self.act.halting

    def _initial_state(self, hx, batch: int, like: Tensor):
        if hx is None:
            zeros = like.new_zeros(batch, self.hidden_size)
            return (zeros, zeros.clone()) if self._is_lstm else zeros
        if self._is_lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("ACTLSTM expects hx = (h_0, c_0)")
            return tuple(self._check_hidden(t, batch) for t in hx)
        return self._check_hidden(hx, batch)

    def _check_hidden(self, t: Tensor, batch: int) -> Tensor:
        want = (1, batch, self.hidden_size)
        if tuple(t.shape) != want:
            raise ValueError(f"hidden state must have shape {want}, got {tuple(t.shape)}")
        return t[0]

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
        state = self._initial_state(hx, x.shape[1], x)
        outputs, costs, steps = [], [], []
        for t in range(x.shape[0]):
            out = self.act(x[t], state)
            state = out.state
            outputs.append(state[0] if self._is_lstm else state)
            costs.append(out.ponder_cost)
            steps.append(out.steps)
        output = torch.stack(outputs)
        self.ponder_cost, self.steps = torch.stack(costs), torch.stack(steps)
        if self.batch_first and not unbatched:
            output = output.transpose(0, 1)
            self.ponder_cost, self.steps = self.ponder_cost.t(), self.steps.t()
        h_n = tuple(s.unsqueeze(0) for s in state) if self._is_lstm else state.unsqueeze(0)
        if unbatched:
            output = output.squeeze(1)
            self.ponder_cost, self.steps = self.ponder_cost.squeeze(1), self.steps.squeeze(1)
            h_n = tuple(s.squeeze(1) for s in h_n) if self._is_lstm else h_n.squeeze(1)
        return output, h_n

    def _forward_packed(self, packed: PackedSequence, hx):
        data, batch_sizes = packed.data, packed.batch_sizes
        batch = int(batch_sizes[0])
        if hx is not None and packed.sorted_indices is not None:
            order = packed.sorted_indices.to(data.device)
            hx = tuple(t.index_select(1, order) for t in hx) if self._is_lstm else hx.index_select(1, order)
        state = self._initial_state(hx, batch, data)
        states = state if self._is_lstm else (state,)
        outputs, costs, steps = [], [], []
        offset = 0
        # Time step t holds the first batch_sizes[t] sequences (sorted by
        # length): only those are computed; the others keep their last state.
        for size in batch_sizes.tolist():
            running = tuple(s[:size] for s in states)
            out = self.act(data[offset:offset + size], running if self._is_lstm else running[0])
            new = out.state if self._is_lstm else (out.state,)
            states = tuple(torch.cat([n, s[size:]]) for n, s in zip(new, states))
            outputs.append(new[0])
            costs.append(out.ponder_cost)
            steps.append(out.steps)
            offset += size
        self.ponder_cost, self.steps = torch.cat(costs), torch.cat(steps)
        output = PackedSequence(torch.cat(outputs), batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        if packed.unsorted_indices is not None:
            order = packed.unsorted_indices.to(data.device)
            states = tuple(s.index_select(0, order) for s in states)
        h_n = tuple(s.unsqueeze(0) for s in states)
        return output, (h_n if self._is_lstm else h_n[0])


class ACTRNN(_ACTLayer):
    __doc__ = "Elman RNN (tanh or relu) with ACT. " + _ACTLayer.__doc__
    _cell_class = nn.RNNCell

    def __init__(self, input_size, hidden_size, *, nonlinearity: str = "tanh", **kwargs):
        super().__init__(input_size, hidden_size, nonlinearity=nonlinearity, **kwargs)


class ACTGRU(_ACTLayer):
    __doc__ = "GRU with ACT. " + _ACTLayer.__doc__
    _cell_class = nn.GRUCell


class ACTLSTM(_ACTLayer):
    __doc__ = "LSTM with ACT: halting reads h, both h and c are mean-fielded. " + _ACTLayer.__doc__
    _cell_class = nn.LSTMCell
    _is_lstm = True
