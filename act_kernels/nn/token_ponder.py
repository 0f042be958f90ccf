"""The per-token encoder's whole ponder as one autograd Function (design §9,
§11): the host work of a step is the layer's own math, one attention launch
per layer and one halting launch.

- Keys and values: one (T_tok, 2 d_model) pool per layer, a token's row at
  its packed index, written in place where a token's visible state changed.
  No segment list, no token -> row table, no concatenation: the key side of
  attention is fixed for the call (`fixed_pool.key_table`), the query side
  is built once per step for every layer.
- Autograd: each step's dense math (norms, projections, activation,
  residuals) is recorded by autograd as usual, on leaves of its own (the
  previous step's output and the layers' parameters); the steps are chained
  and the halting combine differentiated by hand. The backward walks the
  steps in reverse: the combine backward (one launch over all packed rows)
  gives every step's state gradient, then each step's graph runs backward
  once. Attention at step n read the pool as it was then; its backward
  reads the pool again after every later step has put back the rows it had
  overwritten, accumulates dK/dV into the pool's gradient, hands the rows
  written at step n their gradient and restores the rows they replaced.
- The parameters enter through detached leaves made once per call (the
  in-projection as two leaves, queries and keys/values, so no step slices
  it): their gradients accumulate over the steps and return through the
  Function, so torch.autograd.grad, DDP's hooks and frozen parameters work
  as with any module.

It runs the layers as `nn.TransformerEncoderLayer` computes them
(`supports` says which layers qualify: LayerNorms, a parameter-free
activation, no active dropout); the encoder falls back to the step-by-step
autograd path otherwise, and on backend="reference".
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops.act import Kernels
from ..ops.attention import KeyTable, pool_backward, pool_forward, query_table


def supports(layers: Sequence[nn.TransformerEncoderLayer], final_norm: Optional[nn.Module], training: bool) -> bool:
    """Whether the whole-ponder Function computes these layers exactly as
    torch does: LayerNorm norms, an activation without parameters, and no
    dropout that acts (its masks would have to be replayed)."""
    norms = [n for layer in layers for n in (layer.norm1, layer.norm2)] + ([final_norm] if final_norm else [])
    if not all(type(n) is nn.LayerNorm and len(n.normalized_shape) == 1 for n in norms):
        return False
    for layer in layers:
        act = layer.activation
        if isinstance(act, nn.Module) and any(True for _ in act.parameters()):
            return False
        dropouts = (layer.dropout.p, layer.dropout1.p, layer.dropout2.p, layer.self_attn.dropout)
        if training and any(p > 0 for p in dropouts):
            return False
    return True


def block_parameters(layers: Sequence[nn.TransformerEncoderLayer], final_norm: Optional[nn.LayerNorm]) -> List:
    """Every tensor the block's math reads, in a fixed order (None where a
    layer has no bias): 12 per layer, then the final norm's 2."""
    out = []
    for layer in layers:
        attn = layer.self_attn
        out += [attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                layer.norm1.weight, layer.norm1.bias, layer.linear1.weight, layer.linear1.bias,
                layer.linear2.weight, layer.linear2.bias, layer.norm2.weight, layer.norm2.bias]
    if final_norm is not None:
        out += [final_norm.weight, final_norm.bias]
    return out


def _leaf(t: Optional[Tensor], need_grad: bool) -> Optional[Tensor]:
    return None if t is None else t.detach().requires_grad_(need_grad and t.requires_grad)


class _LayerMath:
    """One layer's math on rows, on leaves of its parameters."""

    def __init__(self, layer: nn.TransformerEncoderLayer, params: Sequence[Optional[Tensor]], need_grad: bool):
        d = layer.self_attn.embed_dim
        in_w, in_b = params[0], params[1]
        self.d, self.heads = d, layer.self_attn.num_heads
        self.norm_first, self.activation = layer.norm_first, layer.activation
        self.eps1, self.eps2 = layer.norm1.eps, layer.norm2.eps
        self.q_w, self.kv_w = _leaf(in_w[:d], need_grad), _leaf(in_w[d:], need_grad)
        self.q_b, self.kv_b = (None, None) if in_b is None else (_leaf(in_b[:d], need_grad),
                                                                 _leaf(in_b[d:], need_grad))
        (self.out_w, self.out_b, self.n1_w, self.n1_b, self.l1_w, self.l1_b, self.l2_w, self.l2_b, self.n2_w,
         self.n2_b) = (_leaf(t, need_grad) for t in params[2:])

    def leaves(self) -> List[Tensor]:
        return [t for t in (self.q_w, self.kv_w, self.q_b, self.kv_b, self.out_w, self.out_b, self.n1_w, self.n1_b,
                            self.l1_w, self.l1_b, self.l2_w, self.l2_b, self.n2_w, self.n2_b)
                if t is not None and t.requires_grad]

    def grads(self, params: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """The gradients of the layer's 12 parameters (None where it has none)."""
        def joined(a, b, param):
            if param is None or not param.requires_grad:
                return None
            parts = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (a, b)]
            return torch.cat(parts)
        own = [joined(self.q_w, self.kv_w, params[0]), joined(self.q_b, self.kv_b, params[1])]
        for t in (self.out_w, self.out_b, self.n1_w, self.n1_b, self.l1_w, self.l1_b, self.l2_w, self.l2_b,
                  self.n2_w, self.n2_b):
            own.append(None if t is None else t.grad)
        return own

    def project_kv(self, x: Tensor) -> Tensor:
        """(rows, 2 d_model): the keys and values of rows, as one pool row each."""
        h = F.layer_norm(x, (self.d,), self.n1_w, self.n1_b, self.eps1) if self.norm_first else x
        return F.linear(h, self.kv_w, self.kv_b)

    def __call__(self, x: Tensor, attend) -> Tensor:
        """nn.TransformerEncoderLayer's forward on rows; attend(q (A, heads,
        head_dim)) -> (A, heads, head_dim) reads the pool."""
        if self.norm_first:
            x = x + self._attention(F.layer_norm(x, (self.d,), self.n1_w, self.n1_b, self.eps1), attend)
            return x + self._feed_forward(F.layer_norm(x, (self.d,), self.n2_w, self.n2_b, self.eps2))
        x = F.layer_norm(x + self._attention(x, attend), (self.d,), self.n1_w, self.n1_b, self.eps1)
        return F.layer_norm(x + self._feed_forward(x), (self.d,), self.n2_w, self.n2_b, self.eps2)

    def _attention(self, h: Tensor, attend) -> Tensor:
        rows = h.shape[0]
        q = F.linear(h, self.q_w, self.q_b).view(rows, self.heads, self.d // self.heads)
        return F.linear(attend(q).reshape(rows, self.d), self.out_w, self.out_b)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return F.linear(self.activation(F.linear(x, self.l1_w, self.l1_b)), self.l2_w, self.l2_b)


class _Pool:
    """One layer's keys and values during a ponder, and their gradient
    during the backward."""

    def __init__(self):
        self.rows: Optional[Tensor] = None   # (T_tok, 2 d_model)
        self.grad: Optional[Tensor] = None


class _PoolAttention(torch.autograd.Function):
    """Writes kv (the rows of `written`, all tokens when None) into the pool,
    then attends q to it. The backward returns dq and the gradient of the
    written rows: what this step's attention and every later read of them
    gave, before a later step overwrote them."""

    @staticmethod
    def forward(ctx, pool: _Pool, keys: KeyTable, queries, written: Optional[Tensor], q: Tensor, kv: Tensor):
        if written is None:
            # step 1 writes every token: the pool starts as a copy of it
            pool.rows = kv.detach().clone(memory_format=torch.contiguous_format)
            ctx.replaced = None
        else:
            ctx.replaced = pool.rows.index_select(0, written)
            pool.rows.index_copy_(0, written, kv.detach())
        out, saved = pool_forward(q, pool.rows, keys, queries)
        ctx.pool, ctx.keys, ctx.queries, ctx.written = pool, keys, queries, written
        ctx.save_for_backward(q, out, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, out, *saved = ctx.saved_tensors
        pool, written = ctx.pool, ctx.written
        dq, dk, dv = pool_backward(grad_out.contiguous(), q, pool.rows, out, saved, ctx.keys, ctx.queries)
        tokens, width = pool.rows.shape
        if pool.grad is None:
            pool.grad = torch.cat([dk.reshape(tokens, width // 2), dv.reshape(tokens, width // 2)], 1)
        else:
            pool.grad[:, :width // 2] += dk.reshape(tokens, width // 2)
            pool.grad[:, width // 2:] += dv.reshape(tokens, width // 2)
        if written is None:   # step 1: the rows' whole gradient, and nothing reads the pool after
            d_kv, pool.grad = pool.grad, None
        else:
            d_kv = pool.grad.index_select(0, written)
            pool.grad.index_fill_(0, written, 0)
            pool.rows.index_copy_(0, written, ctx.replaced)
        return None, None, None, None, dq, d_kv


class _Step(NamedTuple):
    leaf: Tensor      # the previous step's output (step 1: the input), a leaf of this step's graph
    new: Tensor       # this step's output, the root of its graph


class TokenPonder:
    """One call of the whole-ponder function: the block's math, the halting
    kernels and the saved steps between the forward and the backward."""

    def __init__(self, layers: Sequence[nn.TransformerEncoderLayer], final_norm: Optional[nn.LayerNorm],
                 keys: KeyTable, kernels: Kernels, max_steps: int, eps: float):
        self.layers, self.final_norm, self.keys, self.kernels = list(layers), final_norm, keys, kernels
        self.max_steps, self.eps = max_steps, eps

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor, params: Sequence[Optional[Tensor]], need_grad: bool):
        """Runs the ponder; returns (state, ponder_cost, steps)."""
        tokens, dtype, device = x.shape[0], x.dtype, x.device
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.math = [_LayerMath(layer, params[12 * k:12 * k + 12], need_grad) for k, layer in enumerate(self.layers)]
        self.norm = None
        if self.final_norm is not None:
            self.norm = (_leaf(params[-2], need_grad), _leaf(params[-1], need_grad), self.final_norm.eps)
        self.params, self.dtype = params, dtype
        w = weight.detach().reshape(-1).to(acc).contiguous()
        c = bias.detach().reshape(1).to(acc)
        self.w = w
        threshold = torch.full((1,), 1.0 - self.eps, dtype=acc, device=device)
        running_sum = torch.zeros(tokens, dtype=acc, device=device)
        steps = torch.zeros(tokens, dtype=torch.int64, device=device)
        remainder = torch.zeros(tokens, dtype=acc, device=device)
        mean_field = torch.zeros(x.shape, dtype=acc, device=device)
        pools = [_Pool() for _ in self.layers]
        active = torch.arange(tokens, device=device)
        prev, prev_rows, keep = x.detach(), None, None
        self.records: List[_Step] = []
        ps, hs, rows, counts = [], [], [], []
        grad_mode = torch.enable_grad if need_grad else torch.no_grad
        for n in range(1, self.max_steps + 1):
            with grad_mode():
                leaf = prev.detach().requires_grad_(need_grad and (n > 1 or x.requires_grad))
                current = leaf if keep is None else leaf.index_select(0, keep)
                queries = query_table(self.keys, active, active.numel())
                new = self._block(leaf, current, prev_rows, None if n == 1 else active, queries, pools)
            p, h, halted = self.kernels.halting_step(new.detach(), active, w, c, threshold, running_sum, mean_field,
                                                     steps, remainder, n, self.max_steps, extra=[])
            if need_grad:
                self.records.append(_Step(leaf, new))
            ps.append(p)
            hs.append(h)
            rows.append(active)
            counts.append(active.numel())
            keep = torch.nonzero(~halted).squeeze(1)   # the one host sync per step: A_{n+1}
            if keep.numel() == 0:
                break
            prev, prev_rows = new.detach(), active
            if keep.numel() == active.numel():
                keep = None
            else:
                active = active.index_select(0, keep)
        self.saved = (torch.cat(ps), torch.cat(hs), torch.cat(rows), steps, counts)
        return mean_field.to(dtype), steps.to(acc) + remainder, steps

    def _block(self, leaf: Tensor, x: Tensor, first_rows: Optional[Tensor], rows: Optional[Tensor], queries,
               pools: Sequence[_Pool]) -> Tensor:
        """One step: the layers on the running rows x. The first layer's pool
        takes the keys and values of every token that ran the step before
        (`leaf`, at `first_rows`), every later layer's those of the running
        tokens (at `rows`); None: every token."""
        for k, (math, pool) in enumerate(zip(self.math, pools)):
            source, written = (leaf, first_rows) if k == 0 else (x, rows)
            kv = math.project_kv(source)
            x = math(x, lambda q: _PoolAttention.apply(pool, self.keys, queries, written, q, kv))  # noqa: B023
        if self.norm is not None:
            x = F.layer_norm(x, (x.shape[1],), *self.norm)
        # under autocast the layers return the autocast dtype; the state keeps the input's
        return x.to(self.dtype)

    def backward(self, grad_state: Optional[Tensor], grad_cost: Optional[Tensor], weight: Tensor, bias: Tensor):
        """Gradients of (x, weight, bias, *params) from those of (state, ponder_cost)."""
        if not self.records:
            raise RuntimeError("ACTTransformerEncoder's backward ran twice: call backward once per forward")
        p, h, batch_index, steps, counts = self.saved
        acc = p.dtype
        if grad_state is None:
            grad_state = torch.zeros((steps.shape[0], self.records[0].new.shape[1]), dtype=self.dtype,
                                     device=p.device)
        grad_cost = torch.zeros(steps.shape, dtype=acc, device=p.device) if grad_cost is None \
            else grad_cost.to(acc).contiguous()
        states = [record.new.detach() for record in self.records]
        gs, gw, gc = self.kernels.combine_backward(states, batch_index, p, h, steps, grad_state, grad_cost, self.w,
                                                   None)
        leaves = [t for math in self.math for t in math.leaves()]
        if self.norm is not None:
            leaves += [t for t in self.norm[:2] if t is not None and t.requires_grad]
        grad_next = None
        for n, g in reversed(list(enumerate(torch.split(gs, counts)))):
            step = self.records[n]
            g = g if grad_next is None else g + grad_next
            inputs = ([step.leaf] if step.leaf.requires_grad else []) + leaves
            if inputs:
                torch.autograd.backward(step.new, g, inputs=inputs)
            grad_next = step.leaf.grad
            self.records[n] = None   # step n's graph is done with: free it
        self.records = []
        grads = [g for k, math in enumerate(self.math) for g in math.grads(self.params[12 * k:12 * k + 12])]
        if self.norm is not None:
            grads += [None if t is None else t.grad for t in self.norm[:2]]
        self.math = self.norm = self.saved = None   # the leaves and their gradients are handed over
        return (grad_next, gw.to(weight.dtype).reshape(weight.shape), gc.to(bias.dtype).reshape(bias.shape),
                *grads)


class _TokenPonderFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: TokenPonder, present: Sequence[bool], x, weight, bias, *given):
        params, it = [], iter(given)
        params = [next(it) if here else None for here in present]
        state, cost, steps = run.forward(x, weight, bias, params, need_grad=True)
        ctx.run, ctx.present = run, present
        ctx.save_for_backward(weight, bias)
        ctx.mark_non_differentiable(steps)
        return state, cost, steps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_state, grad_cost, _grad_steps):
        weight, bias = ctx.saved_tensors
        gx, gw, gc, *grads = ctx.run.backward(grad_state, grad_cost, weight, bias)
        return (None, None, gx, gw, gc, *[g for g, here in zip(grads, ctx.present) if here])


def token_ponder(run: TokenPonder, x: Tensor, weight: Tensor, bias: Tensor):
    """(state, ponder_cost, steps) of the per-token ponder of x (T_tok, D)."""
    params = block_parameters(run.layers, run.final_norm)
    need_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or bias.requires_grad
        or any(t is not None and t.requires_grad for t in params))
    if not need_grad:
        return run.forward(x, weight, bias, params, need_grad=False)
    present = [t is not None for t in params]
    return _TokenPonderFunction.apply(run, present, x, weight, bias, *[t for t in params if t is not None])
