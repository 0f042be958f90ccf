"""An independent dense oracle for a per-token PonderNet training objective
over transformers' own decoder layers (design §10 per token, §14, §15, §16).
Plain PyTorch and transformers' layer modules; it shares no code with
act_kernels (it takes positions, the additive mask and the scoped attention
switch from tests/hf/oracle.py).

The model: a transformers causal LM whose LAST layers [start, L) are the block
(no coda); layers [0, start) are the prelude, run once.

    s^0 = prelude(embed(ids));  s^n = block(s^{n-1}), then the final norm if
    step_norm (s^n is the state after it: what halting and the head read)
    h^n = s^n if step_norm else final_norm(s^n);   logits^n = lm_head(h^n)

Per token (steps count from 1; M = max_steps; acc = float64 for float64 models,
else float32; z^n = halting(s^n)):

    lam^n = sigmoid(z^n),  u^n = prod_{j<=n} (1 - lam^j) (taken as prod sigmoid(-z^j)),  u^0 = 1
    N     = min(M, first n with u^n < eps)            (strictly; the token stops stepping at N)
    p^n   = lam^n u^{n-1} for n < N,  p^N = u^{N-1}   (sums to 1; in log space:
            log p^n = logsigmoid(z^n) + sum_{j<n} logsigmoid(-z^j), no log of an underflowed p)
    g^n   = lp (1 - lp)^(n-1) for n < N,  g^N = (1 - lp)^(N-1)   (lp = prior, truncated at N)
    KL    = sum_{n<=N} p^n (log p^n - log g^n)        (KL(p || g); 0 log 0 = 0)
    H     = -sum_{n<=N} p^n log p^n
    L^n   = cross_entropy(logits^n, target)           (in acc)

Targets (transformers' shifted causal-LM convention): labels (B, L), -100
ignored, default input_ids with -100 at padding; the REAL token at position i
has target labels[i + 1] when i < L - 1 and labels[i + 1] != -100. Padding
positions never have a target (they are not tokens: they do not step), even
where transformers' loss_function would count a left-padding position's
prediction of the row's first real token. Tokens without a target still step
and are still read by later tokens; they add no term.

    T     = the set of tokens with a target (over the whole batch), |T| their count
    loss  = (1/|T|) sum_{t in T} sum_n p_t^n L_t^n + beta (1/|T|) sum_{t in T} KL_t
    entropy=True (Ouro): loss = (1/|T|) sum_T sum_n p^n L^n - beta (1/|T|) sum_T H_t
    (|T| = 0 gives nan, as a mean over nothing does.)

The frozen-token rule (§14): a token that stopped stepping freezes. Token i at
step n reads an earlier token j at the block's first layer through s_j^{min(n-1, N_j)},
and at block layer k > 1 through j's input to layer k at its step min(n, N_j).
Dense evaluation: every step runs every token of the padded batch through the
block; the first layer reads the visible states (s_j^n while j runs, then
frozen at s_j^{N_j}); a later layer reads, for a token that has stopped, its
stored input to that layer at its last step; only the running tokens' new
states count. Everything is ordinary torch (where, never a multiply by a
mask), so autograd gives every gradient; N is piecewise constant.
"""
import math

import torch
import torch.nn.functional as F

from hf.oracle import attn_implementation, causal_mask, positions


def stopping_steps(z, *, max_steps, eps):
    """N (...) int64 for halting logits z (..., K), K <= max_steps, at steps
    1..K: the first n with u^n = prod_{j<=n} sigmoid(-z^j) < eps, else
    max_steps (which must then be K)."""
    K = z.shape[-1]
    assert 1 <= K <= max_steps
    u = torch.cumprod(torch.sigmoid(-z), -1)
    n = torch.arange(1, K + 1, device=z.device)
    stop = (u < eps) | (n == max_steps)
    first = torch.where(stop, n, torch.full_like(n, K + 1)).amin(-1)
    assert bool((first <= K).all()), "a token neither reached u < eps nor max_steps within K steps"
    return first


def log_prior(steps, K, prior, dtype):
    """(..., K) log g^n of the geometric prior truncated at each token's N
    (`steps`, (...)); 0 after N."""
    assert 0.0 < prior < 1.0, "prior (lambda_p) must lie in (0, 1)"
    n = torch.arange(1, K + 1, device=steps.device)
    N = steps[..., None]
    log_stay = math.log1p(-prior)
    mid = math.log(prior) + (n - 1).to(dtype) * log_stay
    last = (N - 1).to(dtype) * log_stay
    zero = torch.zeros((), dtype=dtype, device=steps.device)
    return torch.where(n < N, mid, torch.where(n == N, last, zero))


def pondernet_terms(z, steps, *, prior=None):
    """The per-token PonderNet distribution of design §10 from halting logits
    z (..., K) at steps 1..K (entries after a token's N are ignored) and its
    N (`steps`, (...), 1 <= N <= K). Returns a dict:
        p (..., K)      halting distribution, 0 after N (sums to 1)
        log_p (..., K)  log p, 0 after N
        kl (...)        KL(p || truncated geometric prior), only with a prior
        entropy (...)   -sum p log p
    all differentiable in z (no nan gradient from the masked entries)."""
    K = z.shape[-1]
    n = torch.arange(1, K + 1, device=z.device)
    N = steps[..., None]
    assert bool(((steps >= 1) & (steps <= K)).all())
    live = n <= N
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    log_lam = F.logsigmoid(torch.where(live, z, zero))
    log_stay = F.logsigmoid(-torch.where(live, z, zero))
    # log u^{n-1} = sum_{j<n} log(1 - lam^j): an exclusive cumulative sum
    log_u_prev = torch.cat([torch.zeros_like(log_stay[..., :1]), torch.cumsum(log_stay, -1)[..., :-1]], -1)
    log_p = torch.where(n < N, log_lam + log_u_prev, torch.where(n == N, log_u_prev, zero))
    p = torch.where(live, torch.exp(log_p), zero)
    out = {"p": p, "log_p": log_p, "entropy": -torch.where(live, p * log_p, zero).sum(-1)}
    if prior is not None:
        log_g = log_prior(steps, K, prior, z.dtype)
        out["log_g"] = log_g
        out["kl"] = torch.where(live, p * (log_p - log_g), zero).sum(-1)
    return out


def shifted_targets(input_ids, attention_mask, labels=None):
    """(targets (B, L) int64, has_target (B, L) bool): the real token at i has
    target labels[i + 1] (labels default: input_ids, -100 at padding); the last
    position, padding and -100 labels have none (targets 0 there)."""
    real = attention_mask.bool()
    if labels is None:
        labels = torch.where(real, input_ids, torch.full_like(input_ids, -100))
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    has = real & (nxt != -100)
    return torch.where(has, nxt, torch.zeros_like(nxt)), has


def pondernet_oracle(model, block_start, halting, *, max_steps, eps, prior, beta, entropy=False, step_norm=False,
                     input_ids, attention_mask=None, labels=None, attn="eager", debug=False):
    """Returns (loss (scalar, differentiable in the model's and halting's
    parameters), steps (B, L) int64, 0 at padding); with debug=True also a dict:
    z (B, L, K) halting logits, states [s^1..s^K], step_losses (B, L, K) L^n
    (0 where no target or after N), p (B, L, K), kl (given a prior), entropy, ponder (B, L)
    sum_n p^n L^n (0 without a target), has_target (B, L), count |T|.
    attn: the attention implementation the layers run under ("eager" like
    tests/hf/oracle.py; "sdpa" is exact in float64)."""
    inner = model.model
    layers = list(inner.layers)
    start = block_start
    assert 0 <= start < len(layers) and max_steps >= 1 and eps >= 0.0
    if entropy:
        assert prior is None or 0.0 < prior < 1.0
    else:
        assert prior is not None and 0.0 < prior < 1.0, "the KL variant needs a prior in (0, 1)"
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    targets, has_target = shifted_targets(input_ids, attention_mask, labels)
    pos = positions(attention_mask)
    hidden = inner.embed_tokens(input_ids)
    dtype = hidden.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mask = causal_mask(attention_mask, dtype)
    rope = inner.rotary_emb(hidden, pos)

    def apply(layer, x):
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    zeros = torch.zeros(real.shape, dtype=acc, device=real.device)
    with attn_implementation(model, attn):
        for layer in layers[:start]:
            hidden = apply(layer, hidden)
        visible = hidden                          # s^0
        last_input = [None] * (len(layers) - start)
        running = real.clone()
        u = torch.ones_like(zeros)                # u^{n-1} of the running tokens (no gradient needed: N only)
        steps = torch.zeros(real.shape, dtype=torch.long, device=real.device)
        zs, states, step_losses = [], [], []
        for n in range(1, max_steps + 1):
            y = visible
            for k, layer in enumerate(layers[start:]):
                if k > 0:
                    last_input[k] = y if last_input[k] is None else torch.where(running[..., None], y, last_input[k])
                    y = last_input[k]
                y = apply(layer, y)
            if step_norm:
                y = inner.norm(y)
            z = halting(y.to(halting.weight.dtype)).squeeze(-1).to(acc)
            head_in = y if step_norm else inner.norm(y)
            logits = model.lm_head(head_in).to(acc)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(real.shape)
            step_losses.append(torch.where(running & has_target, ce, zeros))
            zs.append(torch.where(running, z, zeros))
            states.append(y)
            u = torch.where(running, u * torch.sigmoid(-z.detach()), u)
            halt = running & ((u < eps) | (n == max_steps))
            steps = torch.where(halt, torch.full_like(steps, n), steps)
            visible = torch.where(running[..., None], y, visible)
            running = running & ~halt
            if not bool(running.any()):
                break
    z = torch.stack(zs, -1)                        # (B, L, K)
    L = torch.stack(step_losses, -1)
    K = z.shape[-1]
    N = torch.where(real, steps, torch.ones_like(steps))     # padding: a dummy one-step distribution, masked below
    terms = pondernet_terms(z, N, prior=prior)
    ponder = torch.where(has_target, (terms["p"] * L).sum(-1), zeros)
    count = has_target.sum()
    if entropy:
        reg = -torch.where(has_target, terms["entropy"], zeros).sum() / count
    else:
        reg = torch.where(has_target, terms["kl"], zeros).sum() / count
    loss = ponder.sum() / count + beta * reg
    if not debug:
        return loss, steps
    p = torch.where(real[..., None], terms["p"], torch.zeros_like(terms["p"]))
    record = {"z": z, "states": states, "step_losses": L, "p": p, "entropy": torch.where(real, terms["entropy"], zeros),
              "ponder": ponder, "has_target": has_target, "count": count, "K": K}
    if prior is not None:
        record["kl"] = torch.where(real, terms["kl"], zeros)
    return loss, steps, record
