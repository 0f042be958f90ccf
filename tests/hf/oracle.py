"""An independent dense oracle for per-token ACT over transformers' decoder
layers (design §9, §14, §15). Plain PyTorch and transformers' own layer
modules; it shares no code with act_kernels.

The math, on padded (B, L) batches (attention_mask 1 at real tokens, left or
right padding). Positions count a row's real tokens 0, 1, 2... from its first
real token; query i sees key j iff both are real tokens of one row and
pos_j <= pos_i (a 4-D additive float mask, torch.finfo(dtype).min where
masked; a padded query also sees itself, so its row stays finite: eager
attention takes its softmax in float32, where float64's min is -inf).

    x0 = prelude(embed(ids))              layers [0, start), once each
    v^0 = x0                              every token's visible state
    step n = 1..M, the whole batch through the block's layers [start, stop):
        the first layer reads v^{n-1}; every later layer l reads, for a token
        j that halted (N_j < n), its own input to l at its step N_j, and for
        a running token the previous layer's output; then the final norm if
        step_norm. That is s_j^n for the running tokens.
        h^n = sigmoid(halting(s^n))       float64 for float64 models, else float32
        N = min(M, first n with h^1 + .. + h^n >= 1 - eps)
        R = 1 - sum_{n<N} h^n,  p^n = h^n (n < N),  p^N = R
        S = sum_n p^n s^n,  rho = N + R,  v_j^n = s_j^n if j ran step n else v_j^{n-1}
    logits = head(norm(coda(S)))          coda: layers [stop, num_layers), once each;
                                          no norm when step_norm and no coda (Ouro)
Padding gets logits 0, ponder cost 0, steps 0. Everything is ordinary
differentiable torch (where / masks), so autograd gives every gradient;
rho depends on the h's through R.
"""
import contextlib

import torch


def positions(attention_mask):
    """(B, L) int64: each row's real tokens count 0, 1, 2... from its first
    real token; 0 at padding."""
    real = attention_mask.bool()
    return torch.where(real, attention_mask.long().cumsum(1) - 1, torch.zeros_like(attention_mask, dtype=torch.long))


def causal_mask(attention_mask, dtype):
    """(B, 1, L, L) additive float mask: 0 where query i sees key j (both real,
    one row, pos_j <= pos_i, or j == i), torch.finfo(dtype).min elsewhere."""
    real, pos = attention_mask.bool(), positions(attention_mask)
    sees = real[:, :, None] & real[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
    sees = sees | torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    zero = torch.zeros((), dtype=dtype, device=real.device)
    return torch.where(sees, zero, torch.finfo(dtype).min)[:, None]


@contextlib.contextmanager
def attn_implementation(model, name):
    """The model's config (shared by its layers) set to attention `name` for
    the duration; restored after."""
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old


def plain_logits(model, input_ids, attention_mask=None, attn="model"):
    """The model's own forward with position_ids = positions(attention_mask);
    attn="model" keeps the model's attention implementation."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ctx = contextlib.nullcontext() if attn == "model" else attn_implementation(model, attn)
    with ctx:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                    use_cache=False)
    return out.logits


def dense_looped_lm(model, block, halting, *, max_steps, eps, step_norm, input_ids, attention_mask=None,
                    attn="eager", debug=False):
    """Returns (logits (B, L, V), ponder_cost (B, L) float, steps (B, L) int64),
    and with debug=True a dict too: x0, states [s^1..], halts [h^1..],
    weights [p^1..] (whole (B, L, ...) tensors; a token's entries at steps
    it did not run are meaningless, its weight there 0)."""
    inner, (start, stop) = model.model, block
    layers = list(inner.layers)
    assert 0 <= start < stop <= len(layers) and max_steps >= 1
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    pos = positions(attention_mask)
    hidden = inner.embed_tokens(input_ids)
    dtype = hidden.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mask = causal_mask(attention_mask, dtype)
    rope = inner.rotary_emb(hidden, pos)

    def apply(layer, x):
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    with attn_implementation(model, attn):
        for layer in layers[:start]:
            hidden = apply(layer, hidden)
        x0 = hidden
        visible = x0
        last_input = [None] * (stop - start)       # each token's input to block layer k at its last step
        running = real.clone()
        sum_h = torch.zeros(real.shape, dtype=acc, device=real.device)
        remainder = torch.zeros_like(sum_h)
        steps = torch.zeros(real.shape, dtype=torch.long, device=real.device)
        out = torch.zeros(x0.shape, dtype=acc, device=x0.device)
        record = {"x0": x0, "states": [], "halts": [], "weights": []}
        for n in range(1, max_steps + 1):
            y = visible
            for k, layer in enumerate(layers[start:stop]):
                if k > 0:
                    last_input[k] = y if last_input[k] is None else torch.where(running[..., None], y, last_input[k])
                    y = last_input[k]
                y = apply(layer, y)
            if step_norm:
                y = inner.norm(y)
            h = torch.sigmoid(halting(y.to(halting.weight.dtype)).squeeze(-1).to(acc))
            halt = running & ((sum_h + h >= 1 - eps) | (n == max_steps))
            p = torch.where(running, torch.where(halt, 1 - sum_h, h), torch.zeros_like(h))
            out = out + p[..., None] * y.to(acc)
            remainder = torch.where(halt, p, remainder)
            steps = torch.where(halt, torch.full_like(steps, n), steps)
            sum_h = torch.where(running & ~halt, sum_h + h, sum_h)
            visible = torch.where(running[..., None], y, visible)
            running = running & ~halt
            record["states"].append(y)
            record["halts"].append(h)
            record["weights"].append(p)
            if not bool(running.any()):
                break
        hidden = out.to(dtype)
        for layer in layers[stop:]:
            hidden = apply(layer, hidden)
    if not (step_norm and stop == len(layers)):
        hidden = inner.norm(hidden)
    logits = model.lm_head(hidden)
    logits = torch.where(real[..., None], logits, torch.zeros_like(logits))
    cost = torch.where(real, steps.to(acc) + remainder, torch.zeros_like(remainder))
    return (logits, cost, steps, record) if debug else (logits, cost, steps)
