"""A transformers decoder layer's row math (design §15), with the layer's own
modules: its norms, projections, rotary embedding, q/k norms and MLP run as
transformers wrote them, on the rows of one step as a batch of one, (1, R, D).

Its attention module hands q (1, Hq, R, d) and k, v (1, Hkv, R, d), after
RoPE, to the attention function its config names. For our calls that name is
the backend `act_kernels.hf` registers with transformers' AttentionInterface,
which calls the `attend` it finds in the layer's keyword arguments: the
engine's, which writes the rows' keys and values into the layer's pool and
returns ragged attention of their queries over it. The switch of the
config's attention implementation is scoped to our calls (`hf`), so the model
keeps its own attention everywhere else. This module does not import
transformers: it knows a decoder layer only by its call.

Keys and values without the rest of the layer (a token that has just halted
needs them at the block's first layer) come from the layer's input norm and
attention module alone when the layer has them as `input_layernorm` and
`self_attn` (every Llama-family layer, sandwich norms included), and from the
whole layer otherwise.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

ATTEND_KWARG = "act_kernels_attend"


class RotaryTable:
    """The rotary embedding (cos, sin) of every packed token of one call, from
    the model's rotary module at each token's own position; gathered for the
    rows of a step once and shared by the block's layers."""

    def __init__(self, rotary: nn.Module, positions: Tensor, dtype: torch.dtype):
        by_position = _by_position(rotary, positions, dtype)
        if by_position is not None:
            flat = positions.view(-1)
            self.cos, self.sin = by_position[0][flat], by_position[1][flat]
        else:
            probe = torch.empty(0, device=positions.device, dtype=dtype)
            cos, sin = rotary(probe, positions.view(1, -1))
            self.cos, self.sin = cos[0], sin[0]
        self._rows, self._at = None, (self.cos, self.sin)

    def at(self, rows: Optional[Tensor]):
        """(1, R, d) cos and sin of the rows (packed token indices; None: all)."""
        if rows is None:
            return self.cos[None], self.sin[None]
        if rows is not self._rows:
            self._rows, self._at = rows, (self.cos[rows][None], self.sin[rows][None])
        return self._at


# rope types whose frequencies never change after the module is built: their (cos, sin) at a
# position is the same in every call (the dynamic types rescale with the sequence length)
STATIC_ROPE = {"default", "linear", "llama3"}
_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _by_position(rotary: nn.Module, positions: Tensor, dtype: torch.dtype):
    """(cos, sin) (P, d) of the rotary module at positions 0 .. P - 1, P
    past the largest of `positions`, kept per module (rebuilt when its
    frequencies change): gathering the rows of a call from it is two index
    reads, where the module's call is a dozen operations. Each row is what
    the module gives at that position (elementwise math of the position
    alone), so the result is the same. None where it does not apply: a rope
    type that rescales, or a device whose largest position would be a read
    of it (there the compiled step is the lever)."""
    inv_freq = getattr(rotary, "inv_freq", None)
    if positions.device.type != "cpu" or getattr(rotary, "rope_type", None) not in STATIC_ROPE \
            or not isinstance(inv_freq, Tensor) or positions.numel() == 0:
        return None
    need = int(positions.max()) + 1
    key = (inv_freq.data_ptr(), inv_freq._version, dtype)
    held = _TABLES.get(rotary)
    if held is None or held[0] != key or held[1].shape[0] < need:
        size = max(need, 2 * held[1].shape[0] if held is not None and held[0] == key else 64)
        probe = torch.empty(0, device=positions.device, dtype=dtype)
        cos, sin = rotary(probe, torch.arange(size, device=positions.device).view(1, -1))
        held = (key, cos[0], sin[0])
        _TABLES[rotary] = held
    return held[1], held[2]


def _kv_rows(k: Tensor, v: Tensor) -> Tensor:
    """(R, 2 Hkv d) from k, v (1, Hkv, R, d): a row's key, then its value."""
    rows = k.shape[2]
    return torch.cat([k[0].transpose(0, 1), v[0].transpose(0, 1)], 1).reshape(rows, -1)


def attention_function(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *,
                       scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """The attention function registered with transformers: hands the rows'
    queries and (lazily) their key/value rows to the engine's attend."""
    attend = kwargs.get(ATTEND_KWARG)
    if attend is None:
        raise RuntimeError("the act_kernels attention backend was called outside an act_kernels ponder")
    if query.shape[0] != 1:
        raise RuntimeError(f"act_kernels calls a decoder layer on the rows of one step as a batch of one, "
                           f"got a batch of {query.shape[0]}")
    q = query[0].transpose(0, 1)                                   # (R, Hq, d)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    out = attend(q, lambda: _kv_rows(key, value), scale, float(dropout))
    return out[None], None


class DecoderLayerRows:
    """One transformers decoder layer on rows, for one call."""

    def __init__(self, layer: nn.Module, rotary: RotaryTable):
        self.layer, self.rotary = layer, rotary
        norm, attn = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
        self._attention_only = (norm, attn) if isinstance(norm, nn.Module) and isinstance(attn, nn.Module) else None

    def _call(self, module: nn.Module, x: Tensor, rows: Optional[Tensor], attend, **extra) -> Tensor:
        cos, sin = self.rotary.at(rows)
        out = module(x[None], attention_mask=None, position_embeddings=(cos, sin), **extra, **{ATTEND_KWARG: attend})
        return (out[0] if isinstance(out, tuple) else out)[0]

    def forward(self, x: Tensor, rows: Optional[Tensor], attend) -> Tensor:
        return self._call(self.layer, x, rows, attend)

    __call__ = forward

    def key_values(self, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        captured = []

        def capture(q, kv, scale, dropout_p):
            captured.append(kv())
            return q.new_zeros(q.shape)

        if self._attention_only is not None:
            norm, attn = self._attention_only
            cos, sin = self.rotary.at(rows)
            attn(hidden_states=norm(x[None]), attention_mask=None, position_embeddings=(cos, sin),
                 **{ATTEND_KWARG: capture})
        else:
            self.forward(x, rows, capture)
        return captured[0]


class DecoderLayers:
    """A slice of a transformers model's decoder layers as a layer kind.

    layers: the decoder layers, applied in order at every step; rotary: the
    model's rotary-embedding module; config: the model's config (heads,
    kv heads, head dim); norm: a module applied at the end of every step
    (Ouro's step norm) or None. The layers stay the model's own modules:
    nothing is copied or registered here."""

    def __init__(self, layers: Sequence[nn.Module], rotary: nn.Module, config, norm: Optional[nn.Module] = None):
        self._layers, self.rotary, self.norm = list(layers), rotary, norm
        self.d_model = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.d_model // self.heads
        self.batch_first = True
        self.kv_in_forward = True    # its forward computes every row's keys and values

    @property
    def layers(self) -> List[nn.Module]:
        return self._layers

    @property
    def weight(self) -> Tensor:
        return next(self._layers[0].parameters())

    def __len__(self) -> int:
        return len(self._layers)

    def final_norm(self):
        return self.norm

    def rows(self, training: bool, positions: Optional[Tensor] = None) -> List[DecoderLayerRows]:
        if positions is None:
            raise ValueError("a decoder layer needs every token's position (its rotary embedding)")
        table = RotaryTable(self.rotary, positions, self.weight.dtype)
        return [DecoderLayerRows(layer, table) for layer in self._layers]

    def pool_path_supported(self, training: bool) -> bool:
        """Whether the pool path (layers/token_ponder.py) computes these layers
        exactly: it takes no attention dropout, so none may act."""
        return not training or all(getattr(layer.self_attn, "attention_dropout", 0.0) == 0 for layer in self._layers)

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input has {x.shape[-1]} features, expected hidden_size = {self.d_model}")


__all__ = ["DecoderLayers", "DecoderLayerRows", "RotaryTable", "attention_function", "ATTEND_KWARG"]
