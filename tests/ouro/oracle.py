"""A dense float64 oracle of Ouro, ByteDance's looped language model (Ouro-1.4B / 2.6B and
their -Thinking variants), written from the math of the published code; it shares no code
with act_kernels (it does not import it) and none with the published files.

Sources read (public copies; nothing was copied, the math was re-derived from them):
  [HF]    modeling_ouro.py, the Hugging Face remote code of ByteDance/Ouro-1.4B (auto_map
          target), as mirrored in daedalus/llm-fusion:Ouro-1.4B/modeling_ouro.py and
          Eagle4398/ouro-nixpkgs:modeling_ouro.py (the latter patched only in its cache class).
  [CFG]   configuration_ouro.py (copy in LoopedLMs/ouro_rl:ouro_rl/modeling/configuration_ouro.py)
          and the published config.json of ByteDance/Ouro-1.4B (mirror daedalus/llm-fusion:
          Ouro-1.4B/config.json).
  [VLLM]  vllm-project/vllm:vllm/model_executor/models/ouro.py (the port vLLM carried).
  [MLX]   ml-explore/mlx-lm:mlx_lm/models/ouro.py (the mlx-lm port, PR #599).

The math (B rows, L tokens, D = hidden_size, T = total_ut_steps, N = num_hidden_layers):

  embedding    x_0 = E[ids]                                           [HF OuroModel, MLX]
  loops        for t = 0..T-1: run the SAME N decoder layers (shared weights) on x, then
               h_t = RMSNorm_final(x); x = h_t. The final norm is applied after EVERY loop and
               its output feeds the next loop, the exit gate and the head.
                                                          [HF OuroModel.forward, VLLM, MLX]
  layer        (sandwich norms; order as in [HF OuroDecoderLayer.forward], same in [VLLM, MLX])
                 x = x + input_layernorm_2( attn( input_layernorm(x) ) )
                 x = x + post_attention_layernorm_2( mlp( post_attention_layernorm(x) ) )
  RMSNorm      y = w * x / sqrt(mean(x^2) + rms_norm_eps)       (weight applied after) [HF OuroRMSNorm]
  attention    q = x Wq^T, k = x Wk^T, v = x Wv^T, no biases on q/k/v/o             [HF, VLLM, MLX]
               H = num_attention_heads query heads, K = num_key_value_heads kv heads,
               head_dim = config head_dim (else D // H); query head h reads kv head h // (H/K)
               (repeat_kv); scores q.k * head_dim^-0.5, softmax, o_proj.            [HF OuroAttention]
  RoPE         inv_freq_i = rope_theta^(-2i/head_dim), i < head_dim/2; angle = pos * inv_freq;
               cos/sin of cat(angle, angle); q' = q cos + rotate_half(q) sin with
               rotate_half(x) = cat(-x[half:], x[:half]); the same tables for every loop
               (computed once per forward).                  [HF OuroRotaryEmbedding, rotate_half]
               rope_scaling is null in the published config; anything else is refused here.
  MLP          down( silu(gate(x)) * up(x) ), no biases                            [HF OuroMLP]
  exit gate    lambda_t = sigmoid( w_g . h_t + b_g ), a Linear(D, 1) WITH bias named
               model.early_exit_gate, read on the normed state h_t.    [HF OuroModel, VLLM, MLX]
  exit pdf     p_t = lambda_t * prod_{j<t} (1 - lambda_j) for t < T-1; the last loop takes the
               rest, p_{T-1} = prod_{j<T-1} (1 - lambda_j) (its own lambda is unused).
                                                              [HF OuroForCausalLM.forward, MLX]
  exit rule    (inference, exit_threshold set) the first loop whose cumulative sum of p reaches
               the threshold (cumsum(p) >= threshold); if none does, the last loop. The head reads
               that loop's normed state. early_exit_threshold = 1.0 in the published config, i.e.
               (up to rounding of the cumulative sum) the last loop.  [HF OuroForCausalLM.forward]
               The release runs all T loops for every token whatever the exit: the exit only picks
               the state the head reads, so the keys/values of every (loop, layer) exist for every
               token (cache slot current_ut * N + layer_idx [HF UniversalTransformerCache; VLLM
               one attention per (loop, layer)]), and a later token's loop-t layer-i attention
               reads the earlier tokens' loop-t layer-i keys. Full recompute (what this oracle
               does, greedy_decode included) is therefore exactly the cached computation.
  head         logits = h_exit lm_head^T (lm_head.weight; tie_word_embeddings is false in the
               published 1.4B config; if true, the embedding matrix).       [HF, CFG, MLX]

Padding (this oracle's convention, stated by the task): attention_mask (B, L) marks real
tokens, left or right padding (or any holes); a row's positions count its real tokens 0,1,2..
from its first real token; a query sees a key iff both are real tokens of one row and
pos_k <= pos_q. Padding positions get hidden state 0, logits 0, lambda 0, p 0 and exit loop -1.
(HF's generate builds the same positions from the mask; a bare HF forward without position_ids
uses 0..L-1 including the padding, which gives the same scores in exact arithmetic since RoPE
depends on pos_q - pos_k only.)

Everything is computed in float64 on the CPU (parameters are cast to float64; the norms and the
RoPE tables too: no float32 rounding anywhere, unlike the release, which computes RoPE angles and
norm statistics in float32).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["OuroLoops", "ouro_loops", "ouro_logits", "greedy_decode", "rms_norm", "rope_tables", "layer_names"]

F64 = torch.float64


class OuroLoops(NamedTuple):
    hidden: torch.Tensor   # (T, B, L, D) normed state h_t after each loop
    logits: torch.Tensor   # (T, B, L, V) head applied to h_t
    gate: torch.Tensor     # (T, B, L) lambda_t = sigmoid(gate(h_t))
    pdf: torch.Tensor      # (T, B, L) exit probabilities p_t (sum 1 over t at real tokens)


def layer_names(i: int) -> dict[str, str]:
    """The published parameter names of decoder layer i (model.layers.{i}.*)."""
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "in1": p + "input_layernorm.weight",
        "in2": p + "input_layernorm_2.weight",
        "post1": p + "post_attention_layernorm.weight",
        "post2": p + "post_attention_layernorm_2.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


class _Cfg(NamedTuple):
    D: int
    H: int
    K: int
    hd: int
    I: int  # noqa: E741
    N: int
    T: int
    V: int
    eps: float
    theta: float
    tied: bool


def _read_config(config: dict) -> _Cfg:
    D, H = int(config["hidden_size"]), int(config["num_attention_heads"])
    K = config.get("num_key_value_heads")
    K = H if K is None else int(K)
    hd = config.get("head_dim")
    hd = D // H if hd is None else int(hd)
    if H % K:
        raise ValueError(f"num_attention_heads {H} is not a multiple of num_key_value_heads {K}")
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for RoPE")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"hidden_act {act!r}: the oracle implements silu (the published value) only")
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise NotImplementedError(f"rope_scaling {scaling!r}: the published config has null")
    if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or ()):
        raise NotImplementedError("sliding-window layers: the published config has full attention in every layer")
    T = config.get("total_ut_steps")
    T = 4 if T is None else int(T)   # [HF] getattr(config, "total_ut_steps", 4)
    if T < 1:
        raise ValueError(f"total_ut_steps {T} < 1")
    return _Cfg(D=D, H=H, K=K, hd=hd, I=int(config["intermediate_size"]), N=int(config["num_hidden_layers"]), T=T,
                V=int(config["vocab_size"]), eps=float(config.get("rms_norm_eps", 1e-6)),
                theta=float(config.get("rope_theta", 10000.0)), tied=bool(config.get("tie_word_embeddings", False)))


def _f64(params: dict, name: str) -> torch.Tensor:
    if name not in params:
        raise KeyError(f"parameter {name!r} missing")
    return params[name].detach().to(device="cpu", dtype=F64)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dimension, in x's dtype (float64 here)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim), float64: angle = pos * theta^(-2i/head_dim),
    the half-size table repeated twice (the rotate_half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angle = positions.to(F64)[..., None] * inv_freq
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _attention(x, W, c: _Cfg, cos, sin, allowed):
    B, L, _ = x.shape
    q = (x @ W["q"].T).view(B, L, c.H, c.hd).transpose(1, 2)   # (B, H, L, hd)
    k = (x @ W["k"].T).view(B, L, c.K, c.hd).transpose(1, 2)   # (B, K, L, hd)
    v = (x @ W["v"].T).view(B, L, c.K, c.hd).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]                        # (B, 1, L, hd)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    group = c.H // c.K                                           # query head h reads kv head h // group
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * c.hd ** -0.5            # (B, H, L, L)
    allowed = allowed[:, None]                                   # (B, 1, L, L)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros((), dtype=F64))  # padding queries
    out = (probs @ v).transpose(1, 2).reshape(B, L, c.H * c.hd)
    return out @ W["o"].T


def _mlp(x, W):
    return (torch.nn.functional.silu(x @ W["gate"].T) * (x @ W["up"].T)) @ W["down"].T


def _layer(x, W, c: _Cfg, cos, sin, allowed):
    x = x + rms_norm(_attention(rms_norm(x, W["in1"], c.eps), W, c, cos, sin, allowed), W["in2"], c.eps)
    x = x + rms_norm(_mlp(rms_norm(x, W["post1"], c.eps), W), W["post2"], c.eps)
    return x


def _positions_and_mask(input_ids: torch.Tensor, attention_mask):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        real = torch.ones(input_ids.shape, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have input_ids' shape")
        real = attention_mask.detach().cpu() != 0
    pos = (real.long().cumsum(-1) - 1).clamp_min(0).masked_fill(~real, 0)   # real tokens 0,1,2.. per row
    allowed = real[:, :, None] & real[:, None, :] & (pos[:, None, :] <= pos[:, :, None])   # [b, query, key]
    return real, pos, allowed


@torch.no_grad()
def ouro_loops(params: dict, config: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> OuroLoops:
    """Every loop of Ouro on a padded batch: the normed states h_t (T, B, L, D), their logits
    (T, B, L, V), the gate lambda_t (T, B, L) and the exit pdf p_t (T, B, L), all float64.
    params: name -> tensor in the published names; config: the config.json dict."""
    c = _read_config(config)
    ids = input_ids.detach().cpu().long()
    real, pos, allowed = _positions_and_mask(ids, attention_mask)
    keep = real[..., None].to(F64)
    layers = [{k: _f64(params, n) for k, n in layer_names(i).items()} for i in range(c.N)]
    embed = _f64(params, "model.embed_tokens.weight")
    final_w = _f64(params, "model.norm.weight")
    gate_w = _f64(params, "model.early_exit_gate.weight")   # (1, D)
    gate_b = _f64(params, "model.early_exit_gate.bias")     # (1,)
    head = embed if c.tied and "lm_head.weight" not in params else _f64(params, "lm_head.weight")
    if embed.shape != (c.V, c.D) or head.shape != (c.V, c.D):
        raise ValueError(f"embedding/head shapes {tuple(embed.shape)}/{tuple(head.shape)} do not match the config")

    cos, sin = rope_tables(pos, c.hd, c.theta)   # once, shared by every loop and layer
    x = embed[ids.clamp(0, c.V - 1)] * keep       # padding ids may be anything; their states are 0
    hidden, gates = [], []
    for _ in range(c.T):
        for W in layers:
            x = _layer(x, W, c, cos, sin, allowed) * keep
        x = rms_norm(x, final_w, c.eps)           # h_t: feeds the next loop, the gate and the head
        hidden.append(x)
        gates.append(torch.sigmoid(x @ gate_w.T + gate_b)[..., 0] * keep[..., 0])
    hidden = torch.stack(hidden)                  # (T, B, L, D)
    logits = hidden @ head.T                      # padding: 0 since h = 0 there
    gate = torch.stack(gates)                     # (T, B, L)

    pdf, remaining = [], keep[..., 0].clone()     # 1 at real tokens, 0 at padding
    for t in range(c.T):
        if t < c.T - 1:
            pdf.append(gate[t] * remaining)
            remaining = remaining * (1.0 - gate[t])
        else:
            pdf.append(remaining)
    return OuroLoops(hidden=hidden, logits=logits, gate=gate, pdf=torch.stack(pdf))


def _exit_loops(pdf: torch.Tensor, real: torch.Tensor, threshold: float | None) -> torch.Tensor:
    T = pdf.shape[0]
    if threshold is None:   # [HF] no exit_threshold (and no exit_at_step): the last loop
        idx = torch.full(pdf.shape[1:], T - 1, dtype=torch.long)
    else:
        reached = pdf.cumsum(0) >= threshold                       # (T, B, L)
        first = reached.long().argmax(0)                           # first True (0 if none)
        idx = torch.where(reached.any(0), first, torch.full_like(first, T - 1))
    return idx.masked_fill(~real, -1)


@torch.no_grad()
def ouro_logits(params: dict, config: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                threshold: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits the release's exit rule gives (B, L, V) float64, and the exit loop per token
    (B, L) long, -1 at padding. threshold: the first loop whose cumulative exit probability is
    >= threshold, else the last; 1.0 (the published early_exit_threshold) is the last loop
    unless the cumulative sum rounds to 1 earlier; None = the last loop (the release without
    exit_threshold). Pass config["early_exit_threshold"] to follow a config."""
    out = ouro_loops(params, config, input_ids, attention_mask)
    real, _, _ = _positions_and_mask(input_ids.detach().cpu().long(), attention_mask)
    idx = _exit_loops(out.pdf, real, threshold)
    gather = idx.clamp_min(0)[None, :, :, None].expand(1, *idx.shape, out.logits.shape[-1])
    logits = out.logits.gather(0, gather)[0] * real[..., None].to(F64)
    return logits, idx


@torch.no_grad()
def greedy_decode(params: dict, config: dict, prompt_ids: torch.Tensor, max_new_tokens: int, threshold: float | None = 1.0,
                  eos_token_id: int | None = None, return_exits: bool = False):
    """Greedy decoding of one prompt (1-D ids) by full recompute (no cache): each step runs
    ouro_logits on the whole sequence so far and appends the argmax (lowest id on ties) of the
    last position's exit-loop logits. Returns the new tokens (1-D long; stops after eos_token_id
    if given), and with return_exits=True also the exit loop of each step's last position."""
    seq = prompt_ids.detach().cpu().long().reshape(-1)
    if seq.numel() == 0:
        raise ValueError("empty prompt")
    new, exits = [], []
    for _ in range(max_new_tokens):
        logits, idx = ouro_logits(params, config, seq[None], None, threshold)
        tok = int(logits[0, -1].argmax())
        new.append(tok)
        exits.append(int(idx[0, -1]))
        seq = torch.cat([seq, torch.tensor([tok])])
        if eos_token_id is not None and tok == eos_token_id:
            break
    tokens = torch.tensor(new, dtype=torch.long)
    return (tokens, torch.tensor(exits, dtype=torch.long)) if return_exits else tokens
