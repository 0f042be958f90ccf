"""Per-token ACT over a shared transformer encoder layer (design §9): a
Universal Transformer in which every token halts on its own.

At ponder step n only the running tokens are projected, attend as queries and
go through the feed-forward block. Keys and values live in a pool of rows,
one segment per step: a token's key and value are computed once each time its
visible state changes (the step after it ran), and a halted token's frozen
rows are read through the token -> pool-row index (the Triton kernels never
copy them; the reference attention gathers them per call and keeps no copy).
Nothing of size (max_steps, T_tok, D) or (queries, keys) is kept for the
backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.act import ponder
from .checks import check_layer_input, check_layer_options
from ..backends import resolve_encoder
from ..ops.attention import attend, reference_ragged_attention


def causal_from(mask: Optional[Tensor], is_causal: bool, length: int) -> bool:
    """True for a causal mask (bool: True above the diagonal; float: -inf
    above it and 0 elsewhere) or is_causal; False for None. Anything else is
    a ValueError: the encoder supports no other attention mask."""
    if mask is None:
        return bool(is_causal)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (length, length):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be None or a causal ({length}, {length}) mask, got {got}")
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        causal = torch.equal(mask, above)
    elif mask.is_floating_point():
        causal = bool(((mask == float("-inf")) == above).all()) and bool((mask[~above] == 0).all())
    else:
        causal = False
    if not causal:
        raise ValueError("mask must be None or a causal mask (True, or -inf, strictly above the diagonal): "
                         "ACTTransformerEncoder supports no other attention mask")
    return True


def _padding_to_valid(mask: Optional[Tensor], shape: Tuple[int, int], device) -> Tensor:
    """(B, L) bool, True at real tokens, from torch's src_key_padding_mask."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"src_key_padding_mask must have shape {shape}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        is_pad = mask == float("-inf")
        if not bool((is_pad | (mask == 0)).all()):
            raise ValueError("a float src_key_padding_mask must hold only 0 and -inf")
        return ~is_pad
    raise TypeError(f"src_key_padding_mask must be bool or float, got {mask.dtype}")


class _TokenStep:
    """The step function of one ponder: applies the shared layer to the
    running tokens, reading keys and values from the pool."""

    def __init__(self, enc: "ACTTransformerEncoder", x: Tensor, cu_seqlens: Tensor, causal: bool,
                 max_seqlen: int, attention_backend: str):
        self.enc, self.cu_seqlens, self.causal = enc, cu_seqlens, causal
        self.max_seqlen, self.backend = max_seqlen, attention_backend
        self.k_pool, self.v_pool = [], []
        self.kv_rows: Optional[Tensor] = None
        self.pool_size = 0
        self.changed, self.changed_rows = x, None  # tokens whose visible state changed last step

    def __call__(self, state: Tensor, n: int, active: Tensor) -> Tensor:
        enc = self.enc
        # Keys and values of the tokens that ran the previous step (all tokens at
        # step 1) join the pool; every other token keeps its frozen rows.
        k_new, v_new = enc._project_kv(self.changed)
        rows_new = torch.arange(self.pool_size, self.pool_size + k_new.shape[0], device=state.device)
        self.kv_rows = rows_new if self.changed_rows is None else self.kv_rows.index_copy(0, self.changed_rows, rows_new)
        self.k_pool.append(k_new)
        self.v_pool.append(v_new)
        self.pool_size += k_new.shape[0]
        # Under autocast the layer returns the autocast dtype; the ponder keeps
        # the input's dtype (its halting math is float32 either way).
        new = enc._layer_rows(state, active, self).to(state.dtype)
        self.changed, self.changed_rows = new, active
        return new


class ACTTransformerEncoder(nn.Module):
    """Adaptive Computation Time over one shared `nn.TransformerEncoderLayer`,
    per token (a Universal Transformer with ACT, design §9).

    encoder_layer: the layer applied at every ponder step (batch_first or not,
        norm_first or not, relu or gelu, bias on or off). `.layer` is that
        layer and `.halting` is nn.Linear(d_model, 1), its bias set to
        halting_bias_init.
    max_steps, eps: ACT's M and epsilon (design §1).
    backend: "auto" | "reference" | "triton" | "cuda". It picks the halting
        kernels; ragged attention runs on Triton for "triton", "cuda" and
        "auto" on a GPU, and on its reference otherwise.

    forward(src, mask=None, src_key_padding_mask=None, is_causal=False)
    follows torch.nn.TransformerEncoder: src is (L, B, D), (B, L, D) with
    batch_first, or unbatched (L, D); `mask` may be None or a causal mask.
    Returns the mean-field output S, shaped like src, 0 at padding. After a
    call, `.ponder_cost` (float32, differentiable: add tau * ponder_cost.sum()
    to the loss) and `.steps` (int64) are shaped like src without its feature
    dim, 0 at padding.

    With dropout 0 the results equal the dense loop that applies the layer to
    whole padded sequences of visible states at every step and keeps only the
    running tokens' rows; a halted token's visible state stays at its last
    state. In training the layer's dropouts act as in torch's layer; dropout
    on the attention probabilities runs on the reference attention (the
    Triton kernel has none).

        layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
        enc = ak.nn.ACTTransformerEncoder(layer, max_steps=8)
        y = enc(x, src_key_padding_mask=pad)           # (B, L, 256)
        loss = task_loss(y) + tau * enc.ponder_cost.sum() / (~pad).sum()
    """

    def __init__(self, encoder_layer: nn.TransformerEncoderLayer, *, max_steps: int = 8, eps: float = 0.01,
                 halting_bias_init: float = 1.0, backend: str = "auto"):
        super().__init__()
        if not isinstance(encoder_layer, nn.TransformerEncoderLayer):
            raise TypeError(f"encoder_layer must be a torch.nn.TransformerEncoderLayer, "
                            f"got {type(encoder_layer).__name__}")
        check_layer_options(max_steps, eps, backend)
        attn = encoder_layer.self_attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("the layer's self-attention must use one in-projection, no bias_k/bias_v "
                             "and no add_zero_attn (as nn.TransformerEncoderLayer builds it)")
        self.layer = encoder_layer
        self.d_model = attn.embed_dim
        self.max_steps, self.eps, self.backend = max_steps, float(eps), backend
        self.halting = nn.Linear(self.d_model, 1, device=attn.in_proj_weight.device,
                                 dtype=attn.in_proj_weight.dtype)
        with torch.no_grad():
            self.halting.bias.fill_(halting_bias_init)
        self.ponder_cost: Optional[Tensor] = None
        self.steps: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"max_steps={self.max_steps}, eps={self.eps}, backend={self.backend!r}"

    # -- the layer's math, on rows -------------------------------------------------

    def _heads(self, t: Tensor) -> Tensor:
        heads = self.layer.self_attn.num_heads
        return t.reshape(t.shape[0], heads, self.d_model // heads)

    def _project_kv(self, visible: Tensor) -> Tuple[Tensor, Tensor]:
        layer, d = self.layer, self.d_model
        h = layer.norm1(visible) if layer.norm_first else visible
        w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
        kv = F.linear(h, w[d:], None if b is None else b[d:])
        return self._heads(kv[:, :d]), self._heads(kv[:, d:])

    def _attention(self, x: Tensor, active: Tensor, step: _TokenStep) -> Tensor:
        layer, d = self.layer, self.d_model
        attn = layer.self_attn
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = self._heads(F.linear(x, w[:d], None if b is None else b[:d]))
        scale = 1.0 / (d // attn.num_heads) ** 0.5
        if self.training and attn.dropout > 0:
            out = reference_ragged_attention(q, step.k_pool, step.v_pool, step.cu_seqlens, active, step.kv_rows,
                                             step.causal, scale, dropout_p=attn.dropout)
        else:
            out = attend(q, step.k_pool, step.v_pool, step.cu_seqlens, active, step.kv_rows, step.causal, scale,
                         step.max_seqlen, step.backend)
        return attn.out_proj(out.reshape(out.shape[0], d))

    def _feed_forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    def _layer_rows(self, x: Tensor, active: Tensor, step: _TokenStep) -> Tensor:
        """nn.TransformerEncoderLayer's forward for the running tokens' rows x."""
        layer = self.layer
        if layer.norm_first:
            x = x + layer.dropout1(self._attention(layer.norm1(x), active, step))
            return x + self._feed_forward(layer.norm2(x))
        x = layer.norm1(x + layer.dropout1(self._attention(x, active, step)))
        return layer.norm2(x + self._feed_forward(x))

    # -- entry points -----------------------------------------------------------

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, *, is_causal: bool = False,
                       max_seqlen: Optional[int] = None) -> Tensor:
        """Packed entry point: x (T_tok, D), the sequences' tokens back to back;
        cu_seqlens (B + 1,) int32. Returns (T_tok, D); `.ponder_cost` and
        `.steps` become (T_tok,)."""
        self._check_input(x, 2)
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D int32 tensor of B + 1 offsets")
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, expected {x.device} like x")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if int(cu_seqlens[0]) != 0 or min(lengths, default=0) < 0 or int(cu_seqlens[-1]) != x.shape[0]:
            raise ValueError(f"cu_seqlens must rise from 0 to T_tok = {x.shape[0]}")
        if x.shape[0] == 0:
            self.ponder_cost = x.new_zeros(0, dtype=torch.float32)
            self.steps = torch.zeros(0, dtype=torch.int64, device=x.device)
            return x.clone()
        longest = max(lengths)
        if max_seqlen is None:
            max_seqlen = longest
        elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < longest:
            # a smaller one would make the kernels skip query blocks and leave rows unwritten
            raise ValueError(f"max_seqlen must be an int >= the longest sequence ({longest}), got {max_seqlen!r}")
        chosen = resolve_encoder(self.backend, x.device, x.dtype)
        step = _TokenStep(self, x, cu_seqlens, bool(is_causal), max_seqlen, chosen.attention)
        out = ponder(step, x, self.halting.weight, self.halting.bias, max_steps=self.max_steps, eps=self.eps,
                     backend=chosen.halting)
        self.ponder_cost, self.steps = out.ponder_cost, out.steps
        return out.state

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if not isinstance(src, Tensor) or src.dim() not in (2, 3):
            raise ValueError(f"src must be (L, B, D), (B, L, D) with batch_first, or (L, D); "
                             f"got {tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__}")
        self._check_input(src, src.dim())
        unbatched = src.dim() == 2
        batch_first = self.layer.self_attn.batch_first
        x = src.unsqueeze(0) if unbatched else (src if batch_first else src.transpose(0, 1))  # (B, L, D)
        batch, length = x.shape[:2]
        pad = src_key_padding_mask
        if unbatched and pad is not None:
            pad = pad.unsqueeze(0)
        causal = causal_from(mask, is_causal, length)
        valid = _padding_to_valid(pad, (batch, length), x.device)
        cu_seqlens = F.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        packed = self.forward_packed(x[valid], cu_seqlens, is_causal=causal)

        out = x.new_zeros(x.shape).index_put((valid,), packed)
        cost = self.ponder_cost.new_zeros(batch, length).index_put((valid,), self.ponder_cost)
        steps = self.steps.new_zeros(batch, length).index_put((valid,), self.steps)
        if unbatched:
            out, cost, steps = out[0], cost[0], steps[0]
        elif not batch_first:
            out, cost, steps = out.transpose(0, 1), cost.t(), steps.t()
        self.ponder_cost, self.steps = cost, steps
        return out

    def _check_input(self, x: Tensor, dims: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != dims:
            raise ValueError(f"expected a {dims}-D input, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input has {x.shape[-1]} features, expected d_model = {self.d_model}")
        check_layer_input(x, self.layer.self_attn.in_proj_weight)
