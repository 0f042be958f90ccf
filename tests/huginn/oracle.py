"""Dense float64 oracle for Huginn (tomg-group-umd/huginn-0125, model_type "huginn_raven").

Independent of act_kernels (nothing here imports it): plain torch, written from the
math of the published model. Sources, cited below by these short names:

  [modeling]  seal-rg/recurrent-pretraining recpre/raven_modeling_minimal.py at 59e0b69
              (2025-10-16), the file the Hugging Face repo tomg-group-umd/huginn-0125 ships as
              remote code (the HF copy is synced from it; its Jan-2025 upload differs only where
              noted).
  [config]    the same repository's recpre/raven_config_minimal.py (RavenConfig).
  [hf-config] huginn-0125's config.json (HF blob def35f6; its key set also matches, byte for
              byte, the 1,372-byte config.json of the intermediate checkpoint
              step-00035840-recurrence_full_512_0, plus bos/eos/pad token ids).
  [training]  recpre/model_dynamic.py (the pretraining model), only where the published
              inference code leaves a config value unused.

Cross-check (done once by hand, nothing of it committed): the published
raven_modeling_minimal.py at 59e0b69, cast to float64 (its RMSNorm and RoPE still run in
float32), loaded with checkpoints.write_huginn_checkpoint's files (no missing or unexpected
keys; bias, qk_bias, untied head, other head counts / rope_base / eps / depths, float32 and
bfloat16 weights) gives these logits to within 4e-6 for 0, 1, 4 and 7 steps; its
predict_from_latents gives huginn_step_logits; its initialize_state under torch.manual_seed(s)
equals initial_state(.., torch.Generator().manual_seed(s)) exactly; its
generate_with_adaptive_compute with every published evaluator (kl, minp-kl, entropy-diff,
latent-diff, cosine, argmax-stability; several thresholds, min_steps 0/1/3,
check_criterion_every_n_steps 1/2) exits at exit_steps' step and emits the same token; its
cached generate_minimal gives greedy_decode's tokens (zero and seeded random initial states).

Notation: D = n_embd, H = n_heads, hd = D // H, V = padded_vocab_size, N = number of
recurrent steps, e = prelude output, s_n = latent state after n core steps.

Forward ([modeling] RavenForCausalLM.forward / iterate_forward / core_block_forward):

  x0   = wte[ids] * sqrt(D)                       embedding scale: emb_scale = _init_func(D, ..)
                                                  ["embed_scale"] = sqrt(D) (the Jan-2025 HF
                                                  upload read config.init_values["embed_scale"],
                                                  which is sqrt(D) in the published config)
  e    = prelude blocks (x0)
  s_0  = initial state (below), or the caller's input_states
  s_n  = core blocks( adapter( cat([s_{n-1}, e], -1) ) )   n = 1..N; adapter = Linear(2D -> D,
                                                  bias=config.bias); the STATE comes first, the
                                                  injected e second; no norm at a step's end
  z    = ln_f(s_N)                                (this is the model's `latent_states` output)
  y    = ln_f(coda blocks(z))                     ln_f (one weight) runs twice: before and after
                                                  the coda
  logits = y @ W_head^T                           W_head = wte when tie_embeddings (the model
                                                  calls tie_weights(); the published safetensors
                                                  nevertheless hold a separate identical copy
                                                  lm_head.weight), width V (padded vocabulary,
                                                  no masking of the padding columns)

  num_steps default: in eval mode randomized_iteration_sampler returns (mean_recurrence, 0),
  so N = mean_recurrence. N = 0 is allowed: logits = ln_f(coda(ln_f(s_0))); with a zero s_0
  every block sees zeros, so the logits are exactly 0 whatever the tokens.

  "stopping after n steps" ([modeling] predict_from_latents, used by the exit evaluators):
  logits_n = W_head ln_f(coda(ln_f(s_n))).

Sandwich block ([modeling] SandwichBlock.forward):
  x = norm_2( attn(norm_1(x)) + x )
  x = norm_4( mlp(norm_3(x)) + x )

RMSNorm ([modeling] RMSNorm): x * rsqrt(mean(x^2, -1) + eps) * weight, eps = norm_eps (1e-6);
computed in float32 there, float64 here.

Attention ([modeling] CausalSelfAttention):
  qkv = x @ Wqkv^T, Wqkv (3D, D) bias-free, split [D, D, D] in the order q, k, v; each viewed
  (B, L, H, hd) (head h = columns h*hd:(h+1)*hd). num_key_value_heads = n_heads (RavenConfig
  forces it; the SDPA call has no GQA support, so no GQA).
  q += qk_bias[0], k += qk_bias[1]; qk_bias (2, 1, H, hd), added BEFORE RoPE.
  RoPE on ADJACENT pairs (x[2i], x[2i+1]) as a complex rotation (apply_rotary_emb_complex_like):
      x'[2i]   = x[2i] cos(t w_i) - x[2i+1] sin(t w_i)
      x'[2i+1] = x[2i+1] cos(t w_i) + x[2i] sin(t w_i),   w_i = rope_base^(-2i/hd), i < hd/2
  (freqs_cis buffer: (1, block_size, 1, hd/2, 2) holding [cos, sin], float32, persistent, so it
  is saved in the checkpoint; this oracle recomputes the table in float64.)
  y = softmax(q k^T / sqrt(hd) + causal) v, then proj (D, D), bias-free.

MLP ([modeling] GatedMLP): fc (2I, D) bias-free; [a, b] = chunk(fc(x), 2) (first half a, second
half b); out = proj( silu(a) * b ), proj (D, I).

Initial state ([modeling] initialize_state): std = init_values["std"] * init_scale;
  std > 0: x ~ TruncNormal(0, std, [-3 std, 3 std]) * emb_scale (a randn_like draw is made
           first and overwritten); std == 0 (or init_scale 0): zeros.
  The published inference code IGNORES config.state_init and always applies this
  ("like-init") rule; `initial_state` below also honours the other state_init values of
  [training] (normal / embed / zero / unit) when a config asks for them.

Padding (this oracle's contract; the published forward ignores attention_mask -- its
compile_mask call is commented out -- and uses positions 0..L-1, so only unpadded rows are
comparable): per row, positions count the real tokens 0, 1, 2, .. from the row's first real
token; a query sees a key iff both are real tokens of the row and pos_k <= pos_q; padding
positions get logits 0 (and latent states 0). So every padded row equals that row run alone
unpadded.

Exit criteria ([modeling] generate_with_adaptive_compute and the *ExitEvaluator classes); see
`exit_steps` for the exact formulas and for how min_steps interacts with them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

F64 = torch.float64

# Keys of the published config.json ([hf-config]), in its order (sorted by save_pretrained,
# then bos/eos/pad appended by a later hand edit). Those marked * change the forward:
#   activation_checkpoint_impl            training only
#   architecture_class_name               not read by the minimal code ("RecurrentGPT")
#   architectures                         ["RavenForCausalLM"]
#   auto_map                              AutoConfig / AutoModelForCausalLM -> remote files
#   bias                               *  adapter bias (every other Linear is bias-free)
#   block_class_name                      not read ("SandwichBlock", hard-wired)
#   block_size                         *  RoPE table length = largest position + 1
#   effective_expected_depth              prelude + coda + core * mean_recurrence; init only
#   head_dim                              not read: the code uses n_embd // n_heads
#   init_orthogonal, init_strategy        training init only
#   init_values {embed_scale, embedding, out_proj, std}
#                                      *  std: initial-state std; embed_scale: read by the
#                                         Jan-2025 upload only (current code: sqrt(n_embd));
#                                         embedding, out_proj: init only
#   injection_type                        not read ("linear" adapter hard-wired)
#   intermediate_size                  *  MLP width (shapes)
#   mean_backprop_depth                   training sampler only
#   mean_recurrence                    *  default number of steps at inference
#   mlp_class_name, nonlin_name, norm_class_name   not read (GatedMLP, SiLU, RMSNorm hard-wired)
#   model_type                            "huginn_raven"
#   n_embd                             *  D (and emb_scale = sqrt(D))
#   n_heads                            *  H
#   n_layers                              total prelude + core + coda; not read
#   n_layers_in_coda, n_layers_in_prelude, n_layers_in_recurrent_block   *  block counts
#   norm_eps                           *  RMSNorm eps
#   num_key_value_heads                *  must equal n_heads
#   padded_vocab_size                  *  embedding rows and logits width
#   padding_multiple                      not read
#   qk_bias                            *  whether attn.qk_bias exists and is added
#   rope_base                          *  RoPE base
#   sampling_scheme                       training sampler only
#   state_init                            ignored by the published inference code
#   tie_embeddings                     *  head = wte
#   torch_dtype, transformers_version     metadata ("float32", "4.44.2" published)
#   vocab_size                            tokenizer size (RavenConfig sets padded = vocab,
#                                         config.json's padded_vocab_size overrides)
#   bos_token_id, eos_token_id, pad_token_id   generation only
# Not in the published config.json but read by the current code: test_time_noise (default 0;
# noise injection before each step when > 0 -- refused here), test_time_noise_type.
PUBLISHED_CONFIG_KEYS = (
    "activation_checkpoint_impl", "architecture_class_name", "architectures", "auto_map", "bias",
    "block_class_name", "block_size", "effective_expected_depth", "head_dim", "init_orthogonal",
    "init_strategy", "init_values", "injection_type", "intermediate_size", "mean_backprop_depth",
    "mean_recurrence", "mlp_class_name", "model_type", "n_embd", "n_heads", "n_layers", "n_layers_in_coda",
    "n_layers_in_prelude", "n_layers_in_recurrent_block", "nonlin_name", "norm_class_name", "norm_eps",
    "num_key_value_heads", "padded_vocab_size", "padding_multiple", "qk_bias", "rope_base", "sampling_scheme",
    "state_init", "tie_embeddings", "torch_dtype", "transformers_version", "vocab_size",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
FORWARD_CONFIG_KEYS = frozenset({
    "bias", "block_size", "init_values", "intermediate_size", "mean_recurrence", "n_embd", "n_heads",
    "n_layers_in_coda", "n_layers_in_prelude", "n_layers_in_recurrent_block", "norm_eps", "num_key_value_heads",
    "padded_vocab_size", "qk_bias", "rope_base", "tie_embeddings",
})

# Parameter names of the published safetensors, per block prefix
# transformer.{prelude,core_block,coda}.{i}. (shapes for D, H, hd, I):
BLOCK_PARAMS = (
    "norm_1.weight",       # (D,)
    "attn.Wqkv.weight",    # (3D, D)  rows: q, k, v
    "attn.qk_bias",        # (2, 1, H, hd)  only when qk_bias
    "attn.proj.weight",    # (D, D)
    "norm_2.weight",       # (D,)
    "mlp.fc.weight",       # (2I, D)  rows: gate half, then up half
    "mlp.proj.weight",     # (D, I)
    "norm_3.weight",       # (D,)
    "norm_4.weight",       # (D,)
)
# plus transformer.wte.weight (V, D), transformer.adapter.weight (D, 2D) [+ .bias (D,) when
# bias], transformer.ln_f.weight (D,), lm_head.weight (V, D) (a stored copy of wte in the
# published checkpoint), freqs_cis (1, block_size, 1, hd/2, 2) float32.

# The published exit evaluators' thresholds for exit_threshold="auto".
AUTO_THRESHOLDS = {"kl": 1e-3, "entropy-diff": 1e-3, "latent-diff": 0.03, "argmax-stability": 5,
                   "cosine": 1e-3, "minp-kl": 1e-5}


# ----------------------------------------------------------------------------- config

def _dims(config: dict) -> dict:
    d = int(config["n_embd"])
    h = int(config["n_heads"])
    if d % h:
        raise ValueError("n_embd must be a multiple of n_heads")
    if int(config.get("num_key_value_heads", h)) != h:
        raise ValueError("Huginn has no GQA: num_key_value_heads must equal n_heads")
    if "head_dim" in config and int(config["head_dim"]) != d // h:
        raise ValueError("config head_dim disagrees with n_embd // n_heads (the code uses the latter)")
    if float(config.get("test_time_noise", 0) or 0) != 0:
        raise ValueError("test_time_noise > 0 injects random noise before each step; unsupported")
    if config.get("injection_type", "linear") != "linear":
        # the published inference code hard-wires the linear adapter whatever the config says
        raise ValueError("only injection_type 'linear' is published")
    return dict(
        D=d, H=h, hd=d // h,
        V=int(config.get("padded_vocab_size", config["vocab_size"])),
        eps=float(config.get("norm_eps", 1e-6)),
        base=float(config.get("rope_base", 50_000)),
        block_size=int(config.get("block_size", 4096)),
        n_prelude=int(config["n_layers_in_prelude"]),
        n_core=int(config["n_layers_in_recurrent_block"]),
        n_coda=int(config["n_layers_in_coda"]),
        qk_bias=bool(config.get("qk_bias", True)),
        tie=bool(config.get("tie_embeddings", True)),
        emb_scale=math.sqrt(d),
    )


def init_std(config: dict) -> float:
    """init_values["std"] from the config (RavenConfig's default sqrt(2 / (5 D)) when absent)."""
    values = config.get("init_values") or {}
    return float(values.get("std", math.sqrt(2 / (5 * int(config["n_embd"])))))


def initial_state(config: dict, shape, generator: Optional[torch.Generator] = None, *, scale: float = 1.0,
                  draw_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The published initial latent state, float64, of `shape` (..., D).

    like-init (the published rule, whatever state_init says in the published code):
    std = init_values.std * scale; std > 0: randn (discarded, as randn_like there), then a
    TruncNormal(0, std, [-3std, 3std]) draw in place, times sqrt(D); std == 0: zeros. The draws
    are made in `draw_dtype` (float32: the published model's embeddings) with `generator`, so a
    generator seeded like the global CPU RNG reproduces the published draw.
    Other state_init values follow [training]: "zero" zeros, "normal" randn, "embed"
    randn / sqrt(D), "unit" randn standardised over the last dim.
    """
    shape = tuple(shape)
    d = int(config["n_embd"])
    kind = config.get("state_init", "like-init")
    if kind == "zero":
        return torch.zeros(shape, dtype=F64)
    if kind in ("normal", "embed", "unit"):
        x = torch.randn(shape, generator=generator, dtype=draw_dtype).to(F64)
        if kind == "embed":
            return x / math.sqrt(d)
        if kind == "unit":
            std, mean = torch.std_mean(x, dim=-1, keepdim=True)
            return (x - mean) / std
        return x
    if kind != "like-init":
        raise ValueError(f"unknown state_init {kind!r}")
    std = init_std(config) * scale
    if not std > 0:
        return torch.zeros(shape, dtype=F64)
    x = torch.randn(shape, generator=generator, dtype=draw_dtype)
    torch.nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
    return x.to(F64) * math.sqrt(d)


# ----------------------------------------------------------------------------- pieces

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos, sin of t * base^(-2i/hd), float64, shape positions.shape + (hd/2,)."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angle = positions.to(F64)[..., None] * inv
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]); x (B, L, H, hd), cos/sin (B, L, hd/2)."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


def _attention(x, p, pre, dims, cos, sin, allowed):
    b, length, _ = x.shape
    h, hd, d = dims["H"], dims["hd"], dims["D"]
    q, k, v = (x @ p[pre + "attn.Wqkv.weight"].T).split([d, d, d], dim=-1)
    q, k, v = (t.reshape(b, length, h, hd) for t in (q, k, v))
    if dims["qk_bias"]:
        bias = p[pre + "attn.qk_bias"]
        q, k = q + bias[0], k + bias[1]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1)[:, None, :, None], probs, torch.zeros((), dtype=F64))
    y = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, d)
    return y @ p[pre + "attn.proj.weight"].T


def _mlp(x, p, pre):
    a, g = (x @ p[pre + "mlp.fc.weight"].T).chunk(2, dim=-1)
    return (F.silu(a) * g) @ p[pre + "mlp.proj.weight"].T


def _block(x, p, pre, dims, cos, sin, allowed):
    eps = dims["eps"]
    x = rms_norm(_attention(rms_norm(x, p[pre + "norm_1.weight"], eps), p, pre, dims, cos, sin, allowed) + x,
                 p[pre + "norm_2.weight"], eps)
    return rms_norm(_mlp(rms_norm(x, p[pre + "norm_3.weight"], eps), p, pre) + x, p[pre + "norm_4.weight"], eps)


class _Run:
    """One batch's fixed parts: float64 params, mask, positions, RoPE tables, prelude output."""

    def __init__(self, params, config, input_ids, attention_mask):
        self.dims = dims = _dims(config)
        self.p = {k: v.detach().to(F64) for k, v in params.items() if k != "freqs_cis"}
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2:
            raise ValueError("input_ids must be (B, L)")
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if mask.shape != ids.shape:
            raise ValueError("attention_mask must have input_ids' shape")
        self.mask = mask
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        if bool(mask.any()) and int(pos[mask].max()) >= dims["block_size"]:
            raise ValueError("a row has more real tokens than block_size (the RoPE table's length)")
        self.positions = pos
        self.allowed = mask[:, :, None] & mask[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
        self.cos, self.sin = rope_tables(pos, dims["hd"], dims["base"])
        ids = torch.where(mask, ids, torch.zeros((), dtype=ids.dtype))
        if bool((ids < 0).any()) or bool((ids >= dims["V"]).any()):
            raise ValueError("token id outside the (padded) vocabulary")
        x = self.p["transformer.wte.weight"][ids] * dims["emb_scale"]
        for i in range(dims["n_prelude"]):
            x = self._blk(x, f"transformer.prelude.{i}.")
        self.e = x
        self.head = self.p["transformer.wte.weight"] if dims["tie"] else self.p["lm_head.weight"]

    def _blk(self, x, pre):
        return _block(x, self.p, pre, self.dims, self.cos, self.sin, self.allowed)

    def step(self, s):
        w = self.p["transformer.adapter.weight"]
        x = torch.cat([s, self.e], dim=-1) @ w.T
        if "transformer.adapter.bias" in self.p:
            x = x + self.p["transformer.adapter.bias"]
        for i in range(self.dims["n_core"]):
            x = self._blk(x, f"transformer.core_block.{i}.")
        return x

    def logits(self, s):
        eps, ln_f = self.dims["eps"], self.p["transformer.ln_f.weight"]
        x = rms_norm(s, ln_f, eps)
        for i in range(self.dims["n_coda"]):
            x = self._blk(x, f"transformer.coda.{i}.")
        out = rms_norm(x, ln_f, eps) @ self.head.T
        return torch.where(self.mask[..., None], out, torch.zeros((), dtype=F64))

    def states(self, num_steps, start):
        b, length = self.mask.shape
        if start is None:
            start = torch.zeros(b, length, self.dims["D"], dtype=F64)
        start = torch.as_tensor(start).to(F64)
        if start.shape != (b, length, self.dims["D"]):
            raise ValueError("initial_state must be (B, L, n_embd)")
        out = [start]
        for _ in range(num_steps):
            out.append(self.step(out[-1]))
        zero = torch.zeros((), dtype=F64)
        return [torch.where(self.mask[..., None], s, zero) for s in out]


def _steps(config, num_steps):
    n = int(config["mean_recurrence"]) if num_steps is None else int(num_steps)
    if n < 0:
        raise ValueError("num_steps must be >= 0")
    return n


# ----------------------------------------------------------------------------- public

@torch.no_grad()
def huginn_logits(params: dict, config: dict, input_ids, attention_mask=None, num_steps: Optional[int] = None,
                  initial_state: Optional[torch.Tensor] = None):
    """Logits (B, L, V) float64 after `num_steps` steps (default mean_recurrence), and the latent
    states (N+1, B, L, D): index 0 the initial state, index n the state after n core steps, raw
    (before ln_f; the model's own `latent_states` output is ln_f(states[N])).

    initial_state: (B, L, D); None means zeros (the published code would draw the like-init
    state: pass `initial_state(config, (B, L, D), generator)` for that). Padding positions get
    logits 0 and states 0.
    """
    run = _Run(params, config, input_ids, attention_mask)
    states = run.states(_steps(config, num_steps), initial_state)
    return run.logits(states[-1]), torch.stack(states)


@torch.no_grad()
def huginn_step_logits(params: dict, config: dict, input_ids, attention_mask=None, num_steps: Optional[int] = None,
                       initial_state: Optional[torch.Tensor] = None):
    """Per-step logits (N+1, B, L, V): index n = the logits the model gives when it stops after n
    steps (W_head ln_f(coda(ln_f(s_n))), [modeling] predict_from_latents), and the states
    (N+1, B, L, D) as in huginn_logits. Index N equals huginn_logits' logits."""
    run = _Run(params, config, input_ids, attention_mask)
    states = run.states(_steps(config, num_steps), initial_state)
    return torch.stack([run.logits(s) for s in states]), torch.stack(states)


def last_real(x: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """x (..., B, L, F) -> (..., B, F) at each row's last real token (the last column without a mask)."""
    if attention_mask is None:
        return x[..., -1, :]
    mask = torch.as_tensor(attention_mask).bool()
    idx = torch.where(mask, torch.arange(mask.shape[1]), torch.full_like(mask, -1, dtype=torch.long)).max(1).values
    if bool((idx < 0).any()):
        raise ValueError("a row has no real token")
    return x[..., torch.arange(mask.shape[0]), idx, :]


def exit_steps(per_step_logits: torch.Tensor, per_step_states: torch.Tensor, criterion: str,
               threshold="auto", min_steps: int = 0, check_every: int = 1, return_values: bool = False):
    """Number of core steps each row runs under a published exit criterion.

    per_step_logits: (N+1, B, V), index n = logits at the position being decoded after n steps
        (index 0 is not used; take huginn_step_logits()[..., pos, :] or `last_real`).
    per_step_states: (N+1, B, D) or (N+1, B, S, D): raw latents (before ln_f), index 0 = the
        initial state s_0. With S positions the latent criteria average over them, as the
        published code averages over the positions of the chunk being run (the whole prompt at
        prefill, the one new token at a cached decode step).
    Returns steps (B,) long in 1..N (N when no exit), and with return_values the (N+1, B) float64
    criterion values at every checked step, also after a row's exit (NaN where not checked).

    The loop of [modeling] generate_with_adaptive_compute, per row (rows are independent):
      for t = 0 .. N-1 (the t-th step has run, n = t+1 steps done):
          if t < min_steps or (t - min_steps) % check_every != 0: skip (the evaluator's memory
              is NOT updated on a skipped step)
          value = f(step n, memory); memory <- step n
          if exit(value): return n
      return N
    so the earliest exit is after min_steps + 1 steps. Evaluator memories start at ("init"):
      kl:               prev log p = log(1/V) (uniform over the padded vocabulary V)
                        value = KL(p_prev || p_n) = sum_v p_prev (log p_prev - log p_n)
                        (F.kl_div(log p_n, log p_prev, log_target=True).sum(-1)); exit value < thr
      minp-kl:          as kl on min-p filtered probs: p < 0.1 max p -> 1/V, renormalised
      entropy-diff:     prev H = 100; H_n = -sum p log(p + 1e-10); value = |H_n - H_prev| < thr
      latent-diff:      prev = s_0; value = mean_pos ||s_n - s_prev|| / ||s_n|| < thr
      cosine:           prev = s_0; value = 1 - mean_pos cos(s_n, s_prev) < thr
      argmax-stability: prev argmax = -1, count = 0; count = count + 1 if argmax p_n == prev
                        else 0; value = count; exit when count >= thr (an int)
    thr "auto": kl 1e-3, entropy-diff 1e-3, latent-diff 0.03, argmax-stability 5, cosine 1e-3,
    minp-kl 1e-5. (The published generate also has do_not_exit_in_prefill, which skips every
    check for the first generated token; callers model it by not calling this.)
    """
    logits = torch.as_tensor(per_step_logits).to(F64)
    states = torch.as_tensor(per_step_states).to(F64)
    if logits.dim() != 3:
        raise ValueError("per_step_logits must be (N+1, B, V)")
    if states.dim() == 3:
        states = states[:, :, None, :]
    n_total, b, v = logits.shape[0] - 1, logits.shape[1], logits.shape[2]
    if states.shape[0] != n_total + 1 or states.shape[1] != b:
        raise ValueError("per_step_states must be (N+1, B, [S,] D) like per_step_logits")
    if criterion not in AUTO_THRESHOLDS:
        raise ValueError(f"unknown criterion {criterion!r}")
    thr = AUTO_THRESHOLDS[criterion] if threshold == "auto" else threshold
    thr = int(thr) if criterion == "argmax-stability" else float(thr)
    if check_every < 1 or min_steps < 0:
        raise ValueError("check_every must be >= 1 and min_steps >= 0")

    def minp_log_probs(lg):
        p = torch.softmax(lg, -1)
        p = torch.where(p < 0.1 * p.max(-1, keepdim=True).values, torch.full_like(p, 1 / v), p)
        return (p / p.sum(-1, keepdim=True)).log()

    prev = {"kl": torch.full((b, v), math.log(1 / v), dtype=F64), "entropy-diff": torch.full((b,), 100.0, dtype=F64),
            "latent-diff": states[0], "cosine": states[0], "argmax-stability": torch.full((b,), -1)}
    prev["minp-kl"] = prev["kl"]
    count = torch.zeros(b, dtype=torch.long)
    steps = torch.full((b,), n_total, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    values = torch.full((n_total + 1, b), math.nan, dtype=F64)
    for t in range(n_total):
        n = t + 1
        if t < min_steps or (t - min_steps) % check_every:
            continue
        lg, s = logits[n], states[n]
        if criterion in ("kl", "minp-kl"):
            logp = torch.log_softmax(lg, -1) if criterion == "kl" else minp_log_probs(lg)
            val = (prev[criterion].exp() * (prev[criterion] - logp)).sum(-1)
            prev[criterion] = logp
        elif criterion == "entropy-diff":
            p = torch.softmax(lg, -1)
            ent = -(p * torch.log(p + 1e-10)).sum(-1)
            val = (ent - prev[criterion]).abs()
            prev[criterion] = ent
        elif criterion == "latent-diff":
            val = ((s - prev[criterion]).norm(dim=-1) / s.norm(dim=-1)).mean(-1)
            prev[criterion] = s
        elif criterion == "cosine":
            cos = (s * prev[criterion]).sum(-1) / s.norm(dim=-1) / prev[criterion].norm(dim=-1)
            val = 1 - cos.mean(-1)
            prev[criterion] = s
        else:
            arg = lg.argmax(-1)
            count = torch.where(arg == prev[criterion], count + 1, torch.zeros_like(count))
            prev[criterion] = arg
            val = count.to(F64)
        values[n] = val
        hit = (val >= thr) if criterion == "argmax-stability" else (val < thr)
        new = hit & ~done
        steps[new] = n
        done |= new
    return (steps, values) if return_values else steps


@torch.no_grad()
def greedy_decode(params: dict, config: dict, prompt_ids, max_new_tokens: int, num_steps: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy decoding, one token at a time with a full recompute of the whole sequence, a
    fixed num_steps (default mean_recurrence). Returns the 1-D sequence prompt + new tokens.

    The argmax runs over all V = padded_vocab_size logits (as the published _sample_next_token).
    No stop tokens. Initial states: zeros when generator is None; otherwise each position's
    state is drawn once, when that position first enters (the prompt's together, then one per
    new token), with `initial_state(config, .., generator)` and kept for the later recomputes --
    the same states a KV-cached published generate would have used for those positions.
    """
    seq = torch.as_tensor(prompt_ids).long().reshape(-1)
    if seq.numel() == 0:
        raise ValueError("empty prompt")
    d = int(config["n_embd"])
    start = None
    if generator is not None:
        start = initial_state(config, (1, seq.numel(), d), generator)
    for _ in range(max_new_tokens):
        logits, _ = huginn_logits(params, config, seq[None], num_steps=num_steps, initial_state=start)
        nxt = logits[0, -1].argmax()
        seq = torch.cat([seq, nxt[None]])
        if generator is not None:
            start = torch.cat([start, initial_state(config, (1, 1, d), generator)], dim=1)
    return seq
