"""PonderNet on a batch: a GRU cell ponders over its input, every step's state
is read out, and the loss weighs each step's loss by p plus beta * KL."""
import torch
from torch import nn

import act_kernels as ak

torch.manual_seed(0)
batch, inputs, hidden = 32, 8, 64
cell, halting, readout = nn.GRUCell(inputs, hidden), nn.Linear(hidden, 1), nn.Linear(hidden, 2)
params = [*cell.parameters(), *halting.parameters(), *readout.parameters()]
optimizer = torch.optim.Adam(params, lr=1e-3)
x, y = torch.randn(batch, inputs), torch.randint(0, 2, (batch,))

# training: rows halt where their unhalted mass drops below eps; the step
# function only ever sees the rows still running
out = ak.pondernet(lambda h, n, rows: cell(x[rows], h), torch.zeros(batch, hidden),
                   halting.weight, halting.bias, max_steps=20, prior=0.2)
step_loss = nn.functional.cross_entropy(readout(out.states), y[out.batch_index], reduction="none")
loss = ak.pondernet_loss(out, step_loss, beta=0.01)
optimizer.zero_grad()
loss.backward()
optimizer.step()

# inference: halt by sampling, repeatably, and read out the state at the halting step
with torch.no_grad():
    out = ak.pondernet(lambda h, n, rows: cell(x[rows], h), torch.zeros(batch, hidden), halting.weight,
                       halting.bias, max_steps=20, halting="sample", generator=torch.Generator().manual_seed(0))
    prediction = readout(out.state).argmax(-1)
print(f"loss {loss.item():.3f}; sampled steps: mean {out.steps.float().mean():.2f}, "
      f"p as (B, max N): {tuple(out.padded(out.p).shape)}")
