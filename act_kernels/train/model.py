"""The task networks: one ACT recurrent layer and a linear read-out, run on
packed variable-length sequences so padding is never computed (the paper's
tasks); and a per-token ACT transformer encoder (per-token tasks)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..nn import ACTGRU, ACTLSTM, ACTRNN, ACTTransformerEncoder
from ..ops.pondernet import pondernet, pondernet_loss
from .tasks import Batch, Task


class TaskOutput(NamedTuple):
    logits: Tensor       # (L, B, heads, classes)
    ponder_cost: Tensor  # (L, B), zero past each sequence's length
    steps: Tensor        # (L, B) int64, zero past each sequence's length


class TaskModel(nn.Module):
    """The paper's network for `task`. `fixed_steps=K` gives the same network
    (the same cell, first-step flag and read-out) with exactly K computation
    steps per input and no halting: the cell runs K times and its last state
    is the output, as a network of fixed depth K would compute it."""

    def __init__(self, task: Task, hidden: int, *, max_steps: int, eps: float = 0.01,
                 backend: str = "auto", fixed_steps: int = 0, halting_bias_init: float = 1.0,
                 cell: str = ""):
        super().__init__()
        if isinstance(fixed_steps, bool) or not isinstance(fixed_steps, int) or fixed_steps < 0:
            raise ValueError(f"fixed_steps must be an int >= 0 (0: ACT), got {fixed_steps!r}")
        layer = {"rnn": ACTRNN, "gru": ACTGRU, "lstm": ACTLSTM}[cell or task.cell]
        self.task = task
        self.fixed_steps = fixed_steps
        self.rnn = layer(task.input_size, hidden, max_steps=fixed_steps or max_steps, eps=eps,
                         backend=backend, halting_bias_init=halting_bias_init)
        self.readout = nn.Linear(hidden, task.heads * task.classes)

    def _fixed_depth(self, batch: Batch) -> TaskOutput:
        # Padded time steps run too: they come after each sequence's last
        # target, so in this forward-only network they change no scored output.
        x = batch.inputs
        L, B = x.shape[:2]
        cell, lstm = self.rnn.cell, isinstance(self.rnn, ACTLSTM)
        zeros = x.new_zeros(B, self.rnn.hidden_size)
        state = (zeros, zeros) if lstm else zeros
        flag = x.new_ones(B, 1)
        outputs = []
        for t in range(L):
            for k in range(self.fixed_steps):
                state = cell(torch.cat([x[t], flag if k == 0 else flag * 0], dim=1), state)
            outputs.append(state[0] if lstm else state)
        logits = self.readout(torch.stack(outputs)).reshape(L, B, self.task.heads, self.task.classes)
        steps = batch.mask.long() * self.fixed_steps
        return TaskOutput(logits, torch.zeros(L, B, device=x.device), steps)

    def forward(self, batch: Batch) -> TaskOutput:
        if self.fixed_steps:
            return self._fixed_depth(batch)
        L = batch.inputs.shape[0]
        packed = pack_padded_sequence(batch.inputs, batch.lengths.cpu(), enforce_sorted=False)
        out, _ = self.rnn(packed)
        hidden, _ = pad_packed_sequence(out, total_length=L)

        def pad(values: Tensor) -> Tensor:
            as_packed = PackedSequence(values[:, None], out.batch_sizes, out.sorted_indices, out.unsorted_indices)
            return pad_packed_sequence(as_packed, total_length=L)[0][..., 0]

        logits = self.readout(hidden).reshape(L, -1, self.task.heads, self.task.classes)
        return TaskOutput(logits, pad(self.rnn.ponder_cost), pad(self.rnn.steps[0]))

    def loss(self, batch: Batch, tau: float) -> Tensor:
        return task_loss(self(batch), batch, tau)


def task_loss(out: TaskOutput, batch: Batch, tau: float) -> Tensor:
    """Cross-entropy over the steps with targets, plus tau times the ponder
    cost summed over each sequence's time steps, averaged over the batch."""
    logits = out.logits[batch.mask]                     # (targets, heads, classes)
    targets = batch.targets[batch.mask]
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    ponder = out.ponder_cost.sum(0).mean()  # zero past each length
    return ce + tau * ponder


@torch.no_grad()
def sequence_errors(out: TaskOutput, batch: Batch) -> Tensor:
    """(B,) bool: a sequence is wrong if any of its outputs is (the paper's metric)."""
    wrong = (out.logits.argmax(-1) != batch.targets).any(-1) & batch.mask
    return wrong.any(0)


class TokenTaskModel(nn.Module):
    """The network for a per-token task: an input projection plus a learned
    position embedding, one shared pre-norm transformer layer pondered per
    token by ACTTransformerEncoder, a final LayerNorm and a linear read-out.

    fixed_steps=K gives the same layer applied exactly K times to every token
    (a Universal Transformer of fixed depth, no halting)."""

    def __init__(self, task: Task, hidden: int, *, max_steps: int, eps: float = 0.01, backend: str = "auto",
                 fixed_steps: int = 0, halting_bias_init: float = 1.0, heads: int = 4):
        super().__init__()
        self.task = task
        self.fixed_steps = fixed_steps
        self.embed = nn.Linear(task.input_size, hidden)
        self.position = nn.Embedding(task.max_len, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        if fixed_steps:
            self.layer = layer
        else:
            self.encoder = ACTTransformerEncoder(layer, max_steps=max_steps, eps=eps, backend=backend,
                                                 halting_bias_init=halting_bias_init)
        self.norm = nn.LayerNorm(hidden)
        self.readout = nn.Linear(hidden, task.heads * task.classes)

    def forward(self, batch: Batch) -> TaskOutput:
        L = batch.inputs.shape[0]
        x = batch.inputs.transpose(0, 1)                       # (B, L, I)
        pad = ~batch.mask.t()
        h = self.embed(x) + self.position.weight[:L]
        if self.fixed_steps:
            for _ in range(self.fixed_steps):
                h = self.layer(h, src_key_padding_mask=pad)
            cost = torch.zeros(pad.shape, device=h.device)
            steps = (~pad).long() * self.fixed_steps
        else:
            h = self.encoder(h, src_key_padding_mask=pad)
            cost, steps = self.encoder.ponder_cost, self.encoder.steps
        logits = self.readout(self.norm(h)).reshape(x.shape[0], L, self.task.heads, self.task.classes)
        return TaskOutput(logits.transpose(0, 1), cost.t(), steps.t())

    def loss(self, batch: Batch, tau: float) -> Tensor:
        return task_loss(self(batch), batch, tau)


class PonderNetTaskModel(nn.Module):
    """PonderNet on a one-step task (parity), as in Banino et al. 2021: a GRU
    cell ponders over the input vector, fed at every step; every step's state
    is read out, and the loss is mean_b sum_n p_b^n CE(y_b^n) + beta * mean_b
    KL(p_b || geometric(prior)). `forward` (evaluation) halts by sampling
    ("sample", repeatable through `generator`) or at the median ("threshold"
    0.5), and reads out the state at the halting step."""

    def __init__(self, task: Task, hidden: int, *, max_steps: int, eps: float = 0.01, backend: str = "auto",
                 prior: float = 0.2, beta: float = 0.01, eval_halting: str = "sample"):
        super().__init__()
        if task.name != "parity":
            raise ValueError("PonderNet is wired for the one-step parity task")
        self.task, self.hidden = task, hidden
        self.max_steps, self.eps, self.backend = max_steps, eps, backend
        self.prior, self.beta, self.eval_halting = prior, beta, eval_halting
        self.cell = nn.GRUCell(task.input_size, hidden)
        self.halting = nn.Linear(hidden, 1)
        self.readout = nn.Linear(hidden, task.heads * task.classes)
        self._draws = 0   # evaluation draws are repeatable: the k-th call uses seed k

    def ponder(self, x: Tensor, halting: str, generator=None):
        h0 = x.new_zeros(x.shape[0], self.hidden)
        return pondernet(lambda h, n, idx: self.cell(x[idx], h), h0, self.halting.weight, self.halting.bias,
                         max_steps=self.max_steps, eps=self.eps, prior=self.prior, halting=halting,
                         threshold=0.5, generator=generator, backend=self.backend)

    def forward(self, batch: Batch) -> TaskOutput:
        x = batch.inputs[0]
        generator = None
        if self.eval_halting == "sample":
            generator = torch.Generator(device=x.device).manual_seed(self._draws)
            self._draws += 1
        out = self.ponder(x, self.eval_halting, generator)
        logits = self.readout(out.state).reshape(1, -1, self.task.heads, self.task.classes)
        return TaskOutput(logits, torch.zeros(1, out.batch_size, device=logits.device), out.steps[None])

    def loss(self, batch: Batch, tau: float) -> Tensor:
        out = self.ponder(batch.inputs[0], "train")
        logits = self.readout(out.states)
        step_loss = nn.functional.cross_entropy(logits, batch.targets[0, out.batch_index, 0], reduction="none")
        return pondernet_loss(out, step_loss, self.beta)
