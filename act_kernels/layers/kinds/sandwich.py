"""Huginn's sandwich block on packed rows (recurrent-depth LMs, design §18):
one layer kind for its prelude, its recurrent core and its coda.

    x = norm_2(x + proj(attend(rope(q + b_q), rope(k + b_k), v)))     q, k, v = Wqkv(norm_1(x))
    x = norm_4(x + proj(silu(a) * b))                                 a, b = fc(norm_3(x)) halves

RoPE rotates adjacent pairs (x[2i], x[2i+1]) by t·θ^(−2i/d); qk_bias (2, 1,
H, d) is added to queries and keys before it. The norms compute in float32
or wider (float64 stays float64).

The recurrent core reads the prelude's output e at every step through an
adapter, s ← core(adapter([s, e])): the engine's state for the core is the
row [s, e] (width 2D), so every path of the engine (pools, cache, the
depth-wise slots) carries e with its token and nothing else changes. The
core's first layer reads the row through the adapter and keeps e aside; its
last layer puts it back. The coda's first layer takes s from the row and
applies the final norm first (`enter_norm`: Huginn's ln_f runs after the
recurrence, again after the coda).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lean_decoder import linear_rows, rms_norm
from .transformers_decoder import RotaryTable


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (R, heads, d) with each adjacent pair rotated; cos, sin (R, 1, d/2)."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)


class PairRotary(nn.Module):
    """cos and sin of t·θ^(−2i/d), i < d/2, at given positions; the angles in
    float64, then the probe's dtype. (Shapes as the rotary modules
    RotaryTable takes: (1, T, d/2).)"""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, float(base)

    def forward(self, probe: Tensor, positions: Tensor):
        freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device)
                             / self.head_dim)
        angles = positions.to(torch.float64)[..., None] * freq
        return angles.cos().to(probe.dtype), angles.sin().to(probe.dtype)


def initial_states(rows: int, width: int, std: float, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """(rows, width) initial states of the recurrence: zeros for std 0, else
    Huginn's rule, a normal draw truncated at ±3 std, times √width, from
    generator (torch's default where None), in like's dtype and device."""
    if not std > 0:
        return like.new_zeros(rows, width)
    draw = torch.empty(rows, width, dtype=torch.float32, device=like.device)
    nn.init.trunc_normal_(draw, std=std, a=-3 * std, b=3 * std, generator=generator)
    return (draw * math.sqrt(width)).to(like.dtype)


class _Carry:
    """The injected half of a step's rows, from the core's first layer to its last."""
    e: Optional[Tensor] = None


class SandwichRows:
    """One sandwich block on rows, for one call."""

    def __init__(self, layer: nn.Module, rotary: RotaryTable, heads: int, head_dim: int, *, adapter=None,
                 enter_norm=None, width: int = 0, carry: Optional[_Carry] = None, last: bool = False,
                 dropout: float = 0.0):
        self.layer, self.rotary, self.heads, self.head_dim = layer, rotary, heads, head_dim
        self.adapter, self.enter_norm, self.width, self.carry, self.last = adapter, enter_norm, width, carry, last
        self.dropout = dropout

    def _enter(self, x: Tensor, keep: bool) -> Tensor:
        if self.adapter is not None:                   # the core's first layer: adapter([s, e])
            if keep:
                self.carry.e = x[:, self.width:]
            return linear_rows(self.adapter, x) if isinstance(self.adapter, nn.Linear) else self.adapter(x)
        if self.enter_norm is not None:                # the coda's first layer: ln_f(s)
            return rms_norm(self.enter_norm, x[:, :self.width])
        return x

    def _qkv(self, x: Tensor, rows: Optional[Tensor]):
        attn, rows_n, h, d = self.layer.attn, x.shape[0], self.heads, self.head_dim
        q, k, v = linear_rows(attn.Wqkv, rms_norm(self.layer.norm_1, x)).view(rows_n, 3, h, d).unbind(1)
        if getattr(attn, "qk_bias", None) is not None:
            q, k = q + attn.qk_bias[0, 0], k + attn.qk_bias[1, 0]
        cos, sin = self.rotary.at(rows)
        cos, sin = cos[0][:, None], sin[0][:, None]
        return rotate_pairs(q, cos, sin), torch.cat([rotate_pairs(k, cos, sin).reshape(rows_n, -1),
                                                      v.reshape(rows_n, -1)], -1)

    def forward(self, x: Tensor, rows: Optional[Tensor], attend) -> Tensor:
        layer = self.layer
        x = self._enter(x, keep=True)
        q, kv = self._qkv(x, rows)
        o = attend(q, lambda: kv, self.head_dim ** -0.5, self.dropout)
        x = rms_norm(layer.norm_2, x + linear_rows(layer.attn.proj, o.reshape(x.shape[0], -1)))
        a, b = linear_rows(layer.mlp.fc, rms_norm(layer.norm_3, x)).chunk(2, -1)
        x = rms_norm(layer.norm_4, x + linear_rows(layer.mlp.proj, F.silu(a) * b))
        if self.last and self.carry is not None:       # the core's last layer: the row [s, e] again
            x = torch.cat([x, self.carry.e], -1)
        return x

    __call__ = forward

    def key_values(self, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        return self._qkv(self._enter(x, keep=False), rows)[1]


class SandwichLayers:
    """Sandwich blocks as a layer kind (the contract of layers/kinds).
    adapter: the core's input adapter (then the rows are [s, e], 2D wide);
    enter_norm: a norm the first layer applies to s of a [s, e] row (the
    coda's); width: D. The layers stay the model's own modules."""

    def __init__(self, layers: Sequence[nn.Module], rotary: nn.Module, *, d_model: int, heads: int,
                 adapter: Optional[nn.Module] = None, enter_norm: Optional[nn.Module] = None):
        self._layers, self.rotary = list(layers), rotary
        self.adapter, self.enter_norm, self.width = adapter, enter_norm, d_model
        self.d_model = 2 * d_model if (adapter is not None or enter_norm is not None) else d_model
        self.heads = self.kv_heads = heads
        self.head_dim = d_model // heads
        self.batch_first, self.kv_in_forward, self.norm = True, True, None

    @property
    def layers(self) -> List[nn.Module]:
        return self._layers

    @property
    def weight(self) -> Tensor:
        return self._layers[0].attn.Wqkv.weight

    def __len__(self) -> int:
        return len(self._layers)

    def final_norm(self):
        return None

    def rows(self, training: bool, positions: Optional[Tensor] = None) -> List[SandwichRows]:
        if positions is None:
            raise ValueError("a sandwich block needs every token's position (its rotary embedding)")
        table = RotaryTable(self.rotary, positions, self.weight.dtype)
        carry = _Carry() if self.adapter is not None else None
        last = len(self._layers) - 1
        return [SandwichRows(layer, table, self.heads, self.head_dim, adapter=self.adapter if k == 0 else None,
                             enter_norm=self.enter_norm if k == 0 else None, width=self.width, carry=carry,
                             last=k == last) for k, layer in enumerate(self._layers)]

    def pool_path_supported(self, training: bool) -> bool:
        return True

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.d_model}")


__all__ = ["SandwichLayers", "SandwichRows", "PairRotary", "rotate_pairs", "initial_states"]
