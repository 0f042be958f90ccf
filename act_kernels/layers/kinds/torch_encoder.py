"""`torch.nn.TransformerEncoderLayer`'s row math, written once (design §9,
§15): the key/value rows of given tokens and the layer's output for given
tokens around their attention. Both of the engine's paths run it: the pool
path (layers/token_ponder.py) and the step-by-step path with its cache
(layers/transformer.py).

The in-projection is sliced into its query and key/value rows once per call
(a slice per step would cost autograd a slice backward per step), and
LayerNorms run as `F.layer_norm` on the parameters, not through the module.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn


def _norm(module: nn.Module):
    """A norm as a function of rows: F.layer_norm for a plain LayerNorm, the module otherwise."""
    if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return module


class EncoderLayerRows:
    """One `nn.TransformerEncoderLayer` on rows, for one call. With
    `training`, its dropouts act as in torch's layer (attention-probability
    dropout is handed to `attend` as dropout_p)."""

    def __init__(self, layer: nn.TransformerEncoderLayer, training: bool):
        attn = layer.self_attn
        d = attn.embed_dim
        self.d, self.heads = d, attn.num_heads
        self.scale = 1.0 / (d // attn.num_heads) ** 0.5
        self.norm_first, self.activation = layer.norm_first, layer.activation
        w, b = attn.in_proj_weight, attn.in_proj_bias
        self.q_w, self.kv_w = w[:d], w[d:]
        self.q_b, self.kv_b = (None, None) if b is None else (b[:d], b[d:])
        self.out_w, self.out_b = attn.out_proj.weight, attn.out_proj.bias
        self.norm1, self.norm2 = _norm(layer.norm1), _norm(layer.norm2)
        self.l1_w, self.l1_b = layer.linear1.weight, layer.linear1.bias
        self.l2_w, self.l2_b = layer.linear2.weight, layer.linear2.bias
        dropouts = (layer.dropout.p, layer.dropout1.p, layer.dropout2.p)
        self.dropout = (layer.dropout, layer.dropout1, layer.dropout2) if training and any(dropouts) else None
        self.attention_dropout = attn.dropout if training else 0.0

    def key_values(self, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """(R, 2 d_model): the keys and values of rows, as one pool row each."""
        return F.linear(self.norm1(x) if self.norm_first else x, self.kv_w, self.kv_b)

    def forward(self, x: Tensor, rows: Optional[Tensor], attend) -> Tensor:
        """nn.TransformerEncoderLayer's forward on rows x."""
        if self.norm_first:
            x = x + self._attention(self.norm1(x), attend)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, attend))
        return self.norm2(x + self._feed_forward(x))

    __call__ = forward

    def _attention(self, h: Tensor, attend) -> Tensor:
        count = h.shape[0]
        q = F.linear(h, self.q_w, self.q_b).view(count, self.heads, self.d // self.heads)
        out = attend(q, lambda: F.linear(h, self.kv_w, self.kv_b), self.scale, self.attention_dropout)
        out = F.linear(out.reshape(count, self.d), self.out_w, self.out_b)
        return out if self.dropout is None else self.dropout[1](out)

    def _feed_forward(self, x: Tensor) -> Tensor:
        hidden = self.activation(F.linear(x, self.l1_w, self.l1_b))
        if self.dropout is None:
            return F.linear(hidden, self.l2_w, self.l2_b)
        return self.dropout[2](F.linear(self.dropout[0](hidden), self.l2_w, self.l2_b))


class EncoderLayers:
    """A block of `nn.TransformerEncoderLayer`s as a layer kind: one layer,
    or an `nn.TransformerEncoder`'s layers and its final norm."""

    def __init__(self, encoder_layer: Union[nn.TransformerEncoderLayer, nn.TransformerEncoder]):
        if isinstance(encoder_layer, nn.TransformerEncoder):
            layers = list(encoder_layer.layers)
        elif isinstance(encoder_layer, nn.TransformerEncoderLayer):
            layers = [encoder_layer]
        else:
            raise TypeError(f"encoder_layer must be a torch.nn.TransformerEncoderLayer or a "
                            f"torch.nn.TransformerEncoder of them, got {type(encoder_layer).__name__}")
        if not layers or not all(isinstance(layer, nn.TransformerEncoderLayer) for layer in layers):
            raise TypeError("a TransformerEncoder block must hold one or more TransformerEncoderLayers")
        first = layers[0].self_attn
        for layer in layers:
            attn = layer.self_attn
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                raise ValueError("the layer's self-attention must use one in-projection, no bias_k/bias_v "
                                 "and no add_zero_attn (as nn.TransformerEncoderLayer builds it)")
            if attn.embed_dim != first.embed_dim or attn.batch_first != first.batch_first:
                raise ValueError("every layer of the block must share d_model and batch_first")
            if attn.num_heads != first.num_heads:
                raise ValueError("every layer of the block must have the same number of heads")
        self.module = encoder_layer
        self.d_model, self.heads = first.embed_dim, first.num_heads
        self.kv_heads, self.head_dim = self.heads, self.d_model // self.heads
        self.batch_first = first.batch_first
        self.kv_in_forward = False   # its key/value projection is one matmul of its own

    @property
    def layers(self) -> List[nn.TransformerEncoderLayer]:
        m = self.module
        return list(m.layers) if isinstance(m, nn.TransformerEncoder) else [m]

    @property
    def weight(self) -> Tensor:
        return self.layers[0].self_attn.in_proj_weight

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def norm(self) -> Optional[nn.Module]:
        """A TransformerEncoder's final norm, applied at the end of every step."""
        return self.module.norm if isinstance(self.module, nn.TransformerEncoder) else None

    def final_norm(self):
        norm = self.norm
        return None if norm is None else _norm(norm)

    def rows(self, training: bool, positions: Optional[Tensor] = None) -> List[EncoderLayerRows]:
        return [EncoderLayerRows(layer, training) for layer in self.layers]

    def pool_path_supported(self, training: bool) -> bool:
        """Whether the pool path computes these layers exactly as torch does:
        LayerNorm norms, an activation without parameters, and no dropout
        that acts (attention-probability dropout has no Triton kernel)."""
        norm = self.norm
        norms = [n for layer in self.layers for n in (layer.norm1, layer.norm2)] + ([norm] if norm else [])
        if not all(type(n) is nn.LayerNorm and len(n.normalized_shape) == 1 for n in norms):
            return False
        for layer in self.layers:
            act = layer.activation
            if isinstance(act, nn.Module) and any(True for _ in act.parameters()):
                return False
            dropouts = (layer.dropout.p, layer.dropout1.p, layer.dropout2.p, layer.self_attn.dropout)
            if training and any(p > 0 for p in dropouts):
                return False
        return True

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input has {x.shape[-1]} features, expected d_model = {self.d_model}")


__all__ = ["EncoderLayers", "EncoderLayerRows"]
