"""A complete model with per-token ACT: embedding, ACTTransformerEncoder,
read-out, the loss with the ponder cost, and an optimizer step."""
import torch
from torch import nn

import act_kernels as ak


class PonderingClassifier(nn.Module):
    def __init__(self, vocab=100, d_model=64, heads=4, classes=10, max_steps=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = ak.nn.ACTTransformerEncoder(layer, max_steps=max_steps, eps=0.01)
        self.readout = nn.Linear(d_model, classes)

    def forward(self, tokens, pad):
        h = self.encoder(self.embed(tokens), src_key_padding_mask=pad)   # (B, L, d_model), 0 at padding
        return self.readout(h)


torch.manual_seed(0)
model = PonderingClassifier()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 100, (4, 12))
pad = torch.arange(12)[None] >= torch.tensor([12, 9, 5, 7])[:, None]   # True at padding
labels = torch.randint(0, 10, (4, 12))

tau = 1e-3                                              # the time penalty
logits = model(tokens, pad)
task = nn.functional.cross_entropy(logits[~pad], labels[~pad])
ponder = model.encoder.ponder_cost[~pad].mean()         # rho = N + R per token, differentiable
loss = task + tau * ponder
optimizer.zero_grad()
loss.backward()
optimizer.step()
print(f"loss {loss.item():.3f}, mean steps per token {model.encoder.steps[~pad].float().mean():.2f}")
