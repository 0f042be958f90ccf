"""The Llama-family decoder layer's math on packed rows, written once in our
engine (design §15): the layer's own parameters read in place, q/k/v and
gate/up each one matrix product, RoPE on the queries and keys of all rows
in one pass. An iteration then issues a small fixed number of ATen calls,
where the layer's own forward (`DecoderLayerRows`) goes through transformers'
module calls, views and its attention interface.

    x = x + post_attn(o_proj(attend(rope(q_norm(q)), rope(k_norm(k)), v)))   q, k, v = qkv(in_norm(x))
    x = x + post_mlp(down(act(gate(y)) * up(y)))                              y = mlp_norm(x)

post_attn and post_mlp are the identity in Llama, Qwen2/3 and Mistral, and
RMSNorms in a sandwich layer (Ouro: input_layernorm_2,
post_attention_layernorm_2); q_norm / k_norm are Qwen3's per-head norms.

Exactness: the same elementwise expressions as transformers' layers
(RMSNorm in float32 inside when the norm module does that, RoPE as q cos +
rotate_half(q) sin), so results match the layer's own forward to the last
bits of a matrix product. A norm built by our own model kinds (`RMSNorm`
below) computes in the input's dtype: float64 stays float64.

In inference the q/k/v and gate/up weights are packed once into one matrix
each, a copy kept in sync with the parameters (rebuilt when one of them is
replaced or changed in place: their version counters); with autograd on,
the separate products run, so the parameters get their gradients.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transformers_decoder import DecoderLayers, RotaryTable

# transformers' layers whose forward is exactly the math above (full causal attention: the
# sliding-window ones are refused before a kind is built)
LEAN_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
TRANSFORMERS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


class RMSNorm(nn.Module):
    """w · x / sqrt(mean(x²) + eps), computed in float32 or the input's dtype
    if wider (float64 stays float64; transformers' own rounds to float32)."""

    def __init__(self, size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(self, x)


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The norm module's math without its module call."""
    # transformers' norms compute in float32 whatever the input (float64 included); ours in float32 or wider
    inner = torch.float32 if type(norm).__name__ in TRANSFORMERS_NORMS else torch.promote_types(x.dtype, torch.float32)
    if x.dtype == inner and norm.weight.dtype == inner and not torch.is_autocast_enabled(x.device.type):
        # torch's fused norm: the same expression in the same dtype, one call instead of seven (autocast
        # may cast a fused op's inputs: there the elementwise form keeps float32)
        return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)
    xi = x.to(inner)
    return norm.weight * (xi * torch.rsqrt(xi.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


class _Packed:
    """One parameter of several modules (their weights or biases) concatenated
    along the output rows; rebuilt when any of them changes (a new tensor or
    an in-place write: its version counter). None when they have none."""

    def __init__(self, modules: Sequence[nn.Module], name: str):
        self.modules, self.name = list(modules), name
        self.key, self.value = None, None

    def get(self) -> Optional[Tensor]:
        params = [getattr(m, self.name) for m in self.modules]
        if params[0] is None:
            return None
        key = tuple((p.data_ptr(), p._version) for p in params)
        if key != self.key:
            self.key, self.value = key, torch.cat([p.detach() for p in params])
        return self.value


class LeanLayer:
    """What the lean math reads of one layer module, found once."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.in_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.post_attn = getattr(layer, "input_layernorm_2", None)
        self.post_mlp = getattr(layer, "post_attention_layernorm_2", None)
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.scale = float(getattr(attn, "scaling", None) or attn.head_dim ** -0.5)
        self.dropout = float(getattr(attn, "attention_dropout", 0.0))
        self.attn = attn
        self.qkv = _Packed([self.q, self.k, self.v], "weight"), _Packed([self.q, self.k, self.v], "bias")
        self.kv = _Packed([self.k, self.v], "weight"), _Packed([self.k, self.v], "bias")
        self.gate_up = _Packed([self.gate, self.up], "weight"), _Packed([self.gate, self.up], "bias")


# On the CPU, float32 inference products run on oneDNN with the weight packed once into its blocked
# layout (torch.ops.mkldnn, what inductor uses for frozen weights): F.linear repacks the whole weight on
# every call, which at a few rows costs more than the product (1.3-2.1x faster at 1 to 256 rows for this
# model family's shapes, weights out of the L2 cache). The packed copy is kept per weight tensor and
# rebuilt when the weight changes (its data pointer or version counter; a write through `.data` bumps
# neither, so it is not seen: write through the parameter under torch.no_grad(), as load_state_dict and
# the optimizers do). Other dtypes: a product of 2 to 8
# rows as (weight @ rows^T)^T, which skips the repacking (1.4-2x); one row and more than 8 take F.linear.
FEW_ROWS = range(2, 9)
PACKED_ROWS_HINT = 16
_PACKED: Dict[int, tuple] = {}     # id(weight) -> (a weak reference to it, its key, the packed copy)
_ONEDNN = {"works": torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")}


def _onednn_weight(weight: Tensor) -> Tensor:
    """The weight packed for oneDNN, kept while the weight lives (tensors
    compare elementwise, so the table is keyed by identity)."""
    key, ident = (weight.data_ptr(), weight._version), id(weight)
    held = _PACKED.get(ident)
    if held is None or held[0]() is not weight or held[1] != key:
        ref = weakref.ref(weight, partial(_forget, ident))
        held = (ref, key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_ROWS_HINT))
        _PACKED[ident] = held
    return held[2]


def _forget(ident: int, _ref) -> None:
    _PACKED.pop(ident, None)


def inference_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear for inference calls, rounded as a matrix product is (its sums in another order)."""
    if x.device.type == "cpu" and x.dim() == 2:
        if _ONEDNN["works"] and x.dtype == weight.dtype == torch.float32 and x.shape[0]:
            packed = _onednn_weight(weight)
            try:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
            except (RuntimeError, NotImplementedError):   # a build whose oneDNN lacks it: plain products from now on
                _ONEDNN["works"] = False
        if x.shape[0] in FEW_ROWS:
            out = torch.mm(weight, x.t()).t().contiguous()
            return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def _records(x: Tensor, weight: Tensor) -> bool:
    """Whether autograd records a product of x by weight."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def linear_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A linear module (a head) on rows: its own call where autograd records
    it, `inference_linear` on its parameters otherwise."""
    if _records(x, module.weight):
        return module(x)
    return inference_linear(x, module.weight, module.bias)


def _fused(x: Tensor, p: LeanLayer) -> bool:
    """The packed products serve calls autograd does not record."""
    return not _records(x, p.q.weight)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (R, heads, d) rotated as transformers' apply_rotary_pos_emb does (rotate_half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class LeanDecoderRows:
    """One Llama-family layer on rows, for one call (the row adapter of
    layers/kinds, the lean math of this module's docstring)."""

    def __init__(self, layer: LeanLayer, rotary: RotaryTable, heads: int, kv_heads: int, head_dim: int,
                 training: bool):
        self.p, self.rotary = layer, rotary
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dropout = layer.dropout if training else 0.0

    def _project(self, y: Tensor, fused: bool, kv_only: bool = False) -> Tensor:
        """(R, [q,] k, v) rows of y in one product (inference) or one per
        projection (autograd on)."""
        p = self.p
        if fused:
            w, b = p.kv if kv_only else p.qkv
            return inference_linear(y, w.get(), b.get())
        parts = [p.k(y), p.v(y)] if kv_only else [p.q(y), p.k(y), p.v(y)]
        return torch.cat(parts, -1)

    def _keys_values(self, qkv: Tensor, rows: Optional[Tensor], with_q: bool):
        """Queries (R, H, d) or None, and the (R, 2 Hkv d) key/value rows (keys
        normed and rotated) from the projected rows."""
        rows_n, h, hk, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        q_width = h * d if with_q else 0
        cos, sin = self.rotary.at(rows)
        cos, sin = cos[0][:, None], sin[0][:, None]
        k = qkv[:, q_width:q_width + hk * d].view(rows_n, hk, d)
        v = qkv[:, q_width + hk * d:]
        q = qkv[:, :q_width].view(rows_n, h, d) if with_q else None
        if self.p.q_norm is not None:   # per-head norms before the rotation (Qwen3)
            k = _rotate(rms_norm(self.p.k_norm, k), cos, sin)
            if with_q:
                q = _rotate(rms_norm(self.p.q_norm, q), cos, sin)
        elif with_q:   # queries and keys rotated in one pass
            qk = _rotate(qkv[:, :(h + hk) * d].view(rows_n, h + hk, d), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
        else:
            k = _rotate(k, cos, sin)
        return q, torch.cat([k.reshape(rows_n, -1), v], -1)

    def forward(self, x: Tensor, rows: Optional[Tensor], attend) -> Tensor:
        p = self.p
        fused = _fused(x, p)
        q, kv = self._keys_values(self._project(rms_norm(p.in_norm, x), fused), rows, True)
        o = attend(q, lambda: kv, p.scale, self.dropout).reshape(x.shape[0], -1)
        o = inference_linear(o, p.o.weight, p.o.bias) if fused else p.o(o)
        x = x + (rms_norm(p.post_attn, o) if p.post_attn is not None else o)
        y = rms_norm(p.mlp_norm, x)
        if fused:
            gate, up = inference_linear(y, p.gate_up[0].get(), p.gate_up[1].get()).chunk(2, -1)
            m = inference_linear(p.act(gate) * up, p.down.weight, p.down.bias)
        else:
            m = p.down(p.act(p.gate(y)) * p.up(y))
        return x + (rms_norm(p.post_mlp, m) if p.post_mlp is not None else m)

    __call__ = forward

    def key_values(self, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        return self._keys_values(self._project(rms_norm(self.p.in_norm, x), _fused(x, self.p), kv_only=True), rows, False)[1]


def lean_supported(layers: Sequence[nn.Module]) -> bool:
    """Whether every layer's forward is the lean math (its class is one the
    module names, or it is one of our own model kinds' layers)."""
    return bool(layers) and all(type(layer).__name__ in LEAN_LAYERS or getattr(layer, "lean", False)
                                for layer in layers)


class LeanDecoderLayers(DecoderLayers):
    """A slice of Llama-family decoder layers as a layer kind that runs the
    lean math (same contract as `DecoderLayers`)."""

    def __init__(self, layers: Sequence[nn.Module], rotary: nn.Module, config, norm: Optional[nn.Module] = None):
        super().__init__(layers, rotary, config, norm)
        self._lean = [LeanLayer(layer) for layer in self._layers]

    def rows(self, training: bool, positions: Optional[Tensor] = None) -> List[LeanDecoderRows]:
        if positions is None:
            raise ValueError("a decoder layer needs every token's position (its rotary embedding)")
        table = RotaryTable(self.rotary, positions, self.weight.dtype)
        return [LeanDecoderRows(layer, table, self.heads, self.kv_heads, self.head_dim, training)
                for layer in self._lean]


def decoder_kind(layers: Sequence[nn.Module], rotary: nn.Module, config, norm: Optional[nn.Module] = None,
                 lean: bool = True) -> DecoderLayers:
    """The layer kind for a slice of a transformers model's decoder layers:
    the lean math where the layers' forward is known to be it, their own
    forward otherwise (the one place this is chosen)."""
    if lean and lean_supported(layers):
        return LeanDecoderLayers(layers, rotary, config, norm)
    return DecoderLayers(layers, rotary, config, norm)


__all__ = ["LeanDecoderLayers", "LeanDecoderRows", "RMSNorm", "decoder_kind", "inference_linear", "lean_supported",
           "linear_rows", "rms_norm"]
