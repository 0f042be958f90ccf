"""Benchmark workloads: a GRU-cell ponder with a controlled, skewed halting
distribution, and the inputs of a single halting step."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from naive import naive_ponder  # noqa: E402  the padded-and-masked baseline
from dense_encoder import dense_act_encoder  # noqa: E402  the dense-loop baseline of design §9

__all__ = ["GRUPonder", "GRUPonderNet", "GRULayerWorkload", "EncoderPonder", "skewed_steps", "naive_ponder",
           "dense_act_encoder", "ut_act_encoder", "halting_step_inputs"]


def skewed_steps(batch: int, max_steps: int, mean: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Target N per row: geometric with the given mean, capped at max_steps,
    one row forced to max_steps (the padded baseline pays for the slowest)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=g)
    q = 1.0 - 1.0 / mean
    n = 1 + torch.floor(torch.log1p(-u) / math.log(q)).long()
    n = n.clamp(1, max_steps)
    n[0] = max_steps
    return n


class GRUPonder:
    """A GRU cell pondering on a fixed input; feature 0 of every new state is
    set to a per-row logit so that row b halts after exactly target[b] steps
    (h_b = 0.99 / N_b + 1e-4 each step), with gradients flowing as usual."""

    def __init__(self, batch, hidden, max_steps, dtype=torch.float32, device="cuda", seed=0, mean=3.0):
        torch.manual_seed(seed)
        self.cell = torch.nn.GRUCell(hidden, hidden).to(device, dtype)
        self.x = torch.randn(batch, hidden, device=device, dtype=dtype)
        self.h0 = torch.zeros(batch, hidden, device=device, dtype=dtype, requires_grad=True)
        self.target = skewed_steps(batch, max_steps, mean, seed).to(device)
        h = 0.99 / self.target.double() + 1e-4
        self.logit = torch.log(h / (1 - h)).to(dtype)
        self.weight = torch.zeros(hidden, device=device, dtype=dtype)
        self.weight[0] = 1.0
        self.weight.requires_grad_()
        self.bias = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        self.onehot = torch.zeros(hidden, device=device, dtype=dtype)
        self.onehot[0] = 1.0
        self.max_steps = max_steps

    def step(self, s, n, active):
        out = self.cell(self.x[active], s)
        return out + self.onehot * (self.logit[active, None] - out[:, :1])

    @property
    def padded_rows(self) -> int:
        return self.target.numel() * int(self.target.max())

    @property
    def ragged_rows(self) -> int:
        return int(self.target.sum())


def halting_step_inputs(rows, hidden, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(
        state=torch.randn(rows, hidden, generator=g).to(device, dtype),
        active=torch.arange(rows, device=device),
        weight=(torch.randn(hidden, generator=g) / math.sqrt(hidden)).to(device, dtype),
        bias=torch.zeros(1, device=device, dtype=dtype),
        threshold=torch.full((1,), 0.99, device=device, dtype=acc),
    )
    buffers = dict(
        running_sum=torch.zeros(rows, device=device, dtype=acc),
        accumulator=torch.zeros(rows, hidden, device=device, dtype=acc),
        steps=torch.zeros(rows, device=device, dtype=torch.int64),
        remainder=torch.zeros(rows, device=device, dtype=acc),
    )
    return args, buffers


class EncoderPonder:
    """A per-token ACT encoder over a pre-norm layer, with a controlled skewed
    halting distribution: feature 0 of every token never changes (the rows of
    out_proj and linear2 that write it are zero), and the halting unit reads
    only it, so token j halts after exactly target[j] steps (h_j = 0.99 / N_j
    + 1e-4 each step). Every sequence holds at least one token at max_steps,
    so the dense loop pays for max_steps steps, as it does in practice."""

    def __init__(self, batch, length, d_model, max_steps=8, mean=2.5, dtype=torch.float32, device="cpu",
                 seed=0, heads=None, backend="auto"):
        import act_kernels as ak

        torch.manual_seed(seed)
        heads = heads or max(1, d_model // 64)
        layer = torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                                 norm_first=True).to(device, dtype)
        with torch.no_grad():
            for lin in (layer.self_attn.out_proj, layer.linear2):
                lin.weight[0].zero_()
                lin.bias[0].zero_()
        self.enc = ak.nn.ACTTransformerEncoder(layer, max_steps=max_steps, backend=backend).to(device, dtype)
        with torch.no_grad():
            self.enc.halting.weight.zero_()
            self.enc.halting.weight[0, 0] = 1.0
            self.enc.halting.bias.zero_()
        target = skewed_steps(batch * length, max_steps, mean, seed).reshape(batch, length)
        target[:, 0] = max_steps
        self.target = target.to(device)
        h = 0.99 / self.target.double() + 1e-4
        self.x = torch.randn(batch, length, d_model, device=device, dtype=dtype)
        self.x[..., 0] = torch.log(h / (1 - h)).to(dtype)
        self.x.requires_grad_()
        self.max_steps = max_steps

    @property
    def ideal_speedup(self) -> float:
        """T_tok * max N / sum N: the dense loop's rows over the ragged rows."""
        return self.target.numel() * int(self.target.max()) / int(self.target.sum())


def ut_act_encoder(layer, halting, src, max_steps=8, eps=0.01):
    """tensor2tensor-style Universal Transformer ACT: every token is transformed
    at every step until the whole batch has halted (halted tokens keep
    changing and keep serving as keys and values); only the accumulation
    freezes them. The baseline of design §9's comparison, not our semantics."""
    batch, length, _ = src.shape
    state = src
    running = torch.ones(batch, length, dtype=torch.bool, device=src.device)
    sum_h = torch.zeros(batch, length, device=src.device)
    out = torch.zeros(src.shape, device=src.device)
    cost = torch.zeros(batch, length, device=src.device)
    for n in range(1, max_steps + 1):
        state = layer(state)
        h = torch.sigmoid(halting(state).squeeze(-1).float())
        halt = running & ((sum_h + h >= 1 - eps) | (n == max_steps))
        p = torch.where(running, torch.where(halt, 1 - sum_h, h), torch.zeros_like(h))
        out = out + p[..., None] * state.float()
        cost = cost + running.float() + torch.where(halt, p, torch.zeros_like(p))
        sum_h = torch.where(running & ~halt, sum_h + h, sum_h)
        running = running & ~halt
        if not bool(running.any()):
            break
    return out.to(src.dtype), cost


class GRUPonderNet(GRUPonder):
    """The GRU ponder with lambda held per row so that PonderNet's training rule
    halts row b after exactly target[b] steps: 1 - lambda_b = eps^(1 / (N_b - 1/2)),
    so u^(N-1) >= eps > u^N."""

    def __init__(self, batch, hidden, max_steps, eps=0.01, **kwargs):
        super().__init__(batch, hidden, max_steps, **kwargs)
        keep = eps ** (1.0 / (self.target.double() - 0.5))
        lam = (1 - keep).clamp(1e-6, 1 - 1e-6)
        self.logit = torch.log(lam / (1 - lam)).to(self.logit.dtype)
        self.eps = eps


class GRULayerWorkload:
    """An ACTGRU layer over a sequence whose halting is controlled per (time
    step, row): hidden feature 0 copies tanh(x_0) (its update gate is shut,
    its candidate reads only input feature 0) and the halting unit reads only
    it, so a row halts after target[t, b] steps. "flat": every row at the same
    N (nothing to skip); "skewed": N spread from 1 to max_steps."""

    def __init__(self, length, batch, hidden, max_steps=8, kind="skewed", dtype=torch.float32, device="cpu",
                 seed=0, gain=6.0):
        import act_kernels as ak

        torch.manual_seed(seed)
        self.layer = ak.nn.ACTGRU(hidden, hidden, max_steps=max_steps).to(device, dtype)
        cell = self.layer.cell
        with torch.no_grad():
            H = hidden
            for w in (cell.weight_ih, cell.weight_hh):
                w[0].zero_()            # reset gate row 0
                w[H].zero_()            # update gate row 0
                w[2 * H].zero_()        # candidate row 0
            cell.weight_ih[2 * H, 0] = 1.0
            for b in (cell.bias_ih, cell.bias_hh):
                b[[0, H, 2 * H]] = 0.0
            cell.bias_ih[H] = -30.0     # z_0 ~ 0: h_0 <- tanh(x_0) at every step
            self.layer.halting.weight.zero_()
            self.layer.halting.weight[0, 0] = gain
            self.layer.halting.bias.zero_()
        if kind == "flat":
            target = torch.full((length, batch), 3, dtype=torch.long)
        else:
            target = skewed_steps(length * batch, max_steps, 2.5, seed).reshape(length, batch)
        self.target = target.to(device)
        h = 0.99 / target.double() + 1e-4
        logit = torch.log(h / (1 - h)) / gain
        self.x = torch.randn(length, batch, hidden, dtype=torch.float64)
        self.x[..., 0] = torch.atanh(logit.clamp(-0.999, 0.999))
        self.x = self.x.to(device, dtype)
        self.max_steps = max_steps

    @property
    def ideal_speedup(self) -> float:
        """Per time step, B * max N / sum N (the padded layer's rows over the ragged ones)."""
        per_step = self.target.shape[1] * self.target.max(1).values
        return float(per_step.sum() / self.target.sum())

    def padded_layer(self):
        """The padded-and-masked baseline layer: every time step steps all rows
        until the slowest one halts (tests/naive.py), with the same cell."""
        act, x = self.layer.ponder_cell(0), self.x
        state = x.new_zeros(x.shape[1], self.layer.hidden_size)
        outs, costs = [], []
        for t in range(x.shape[0]):
            first = torch.cat([x[t], x.new_ones(x.shape[1], 1)], 1)
            later = torch.cat([x[t], x.new_zeros(x.shape[1], 1)], 1)
            state, rho, _, _ = naive_ponder(lambda s, n, idx: act.cell(first if n == 1 else later, s), state,
                                            act.halting.weight, act.halting.bias, act.max_steps, act.eps)
            outs.append(state)
            costs.append(rho)
        return torch.stack(outs), torch.stack(costs)


class HostFloor:
    """The host floor of a transformer ponder step (design §11): sizes so
    small that only host work counts, every token running every one of the
    8 steps (halting bias -40), against the same layers run as plain layers
    on the same rows, one thread.

    - encoder: B = 1, L = 8, d_model 16, 2 heads, dropout 0 in train mode:
      the ACT encoder against nn.TransformerEncoderLayer called 8 times,
      forward under no_grad (`forward`) and forward + backward (`backward`);
    - decode: a looped LM's decode call (4 sequences, one new token each,
      after a 5-token prefill) of a 2-layer pre-norm block (d_model 32, 4
      heads) against the same layers as a plain cached stack (`CausalStack`)
      on the same rows; each side's cache grows by a token per call.
    Per ponder step: the ACT side's time over 8."""

    STEPS = 8

    def __init__(self, backend: str = "auto"):
        import act_kernels as ak

        torch.manual_seed(0)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = ak.nn.ACTTransformerEncoder(self.layer, max_steps=self.STEPS, halting_bias_init=-40.0,
                                               backend=backend)
        self.x = torch.randn(1, 8, 16, requires_grad=True)
        block_layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        block = torch.nn.TransformerEncoder(block_layer, 2, enable_nested_tensor=False)
        self.block = ak.nn.ACTTransformerEncoder(block, max_steps=self.STEPS, halting_bias_init=-40.0,
                                                 backend=backend).eval()
        self.stack = ak.nn.CausalStack(block, backend=backend).eval()
        g = torch.Generator().manual_seed(1)
        self.prompt = torch.randn(20, 32, generator=g)
        self.token = torch.randn(4, 32, generator=g)
        self.caches = {}
        for name, module in (("block", self.block), ("stack", self.stack)):
            self.caches[name] = module.new_cache(4)
            module.extend(self.caches[name], self.prompt, [0, 5, 10, 15, 20], [0, 1, 2, 3])

    def cases(self):
        """(name, ACT side, plain side, plain steps): each side is a no-argument
        callable; the plain side runs its layers `plain steps` times (8 for
        the encoder, whose plain side is the layer called 8 times; 1 for
        decoding)."""
        def act_forward():
            with torch.no_grad():
                self.enc(self.x)

        def plain_forward():
            with torch.no_grad():
                y = self.x
                for _ in range(self.STEPS):
                    y = self.layer(y)

        def act_backward():
            y = self.enc(self.x)
            (y.sum() + self.enc.ponder_cost.sum()).backward()

        def plain_backward():
            y = self.x
            for _ in range(self.STEPS):
                y = self.layer(y)
            y.sum().backward()

        def decode(name, module):
            cache = self.caches[name]
            return lambda: module.extend(cache, self.token, [0, 1, 2, 3, 4], [0, 1, 2, 3])

        return [("forward (no_grad)", act_forward, plain_forward, self.STEPS),
                ("forward + backward", act_backward, plain_backward, self.STEPS),
                ("decode call", decode("block", self.block), decode("stack", self.stack), 1)]
