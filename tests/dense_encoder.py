"""An independent dense oracle for the per-token ACT encoder (design §9): every
step applies torch's own layer to whole padded sequences of visible states,
then does ACT's halting per token with masks. It shares no code with the
package."""
import torch


def dense_act_encoder(layer, halting, src, pad=None, causal=False, max_steps=8, eps=0.01):
    """src (B, L, D) batch-first values; pad (B, L) bool, True at padding.
    Returns (output, ponder_cost, steps) as (B, L, D), (B, L), (B, L); the
    layer sees (B, L, D) or (L, B, D) as its batch_first says."""
    length = src.shape[1]
    mask = torch.ones(length, length, dtype=torch.bool, device=src.device).triu(1) if causal else None

    def step(visible, running):
        x = visible if layer.self_attn.batch_first else visible.transpose(0, 1)
        y = layer(x, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
        return y if layer.self_attn.batch_first else y.transpose(0, 1)

    return _dense_act(step, halting, src, pad, max_steps, eps)


def _dense_act(step, halting, src, pad, max_steps, eps):
    """ACT's halting per token over whole padded sequences with masks:
    step(visible (B, L, D), running (B, L)) -> every token's new state; a
    halted token's visible state stays at its last state."""
    batch, length, _ = src.shape
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    real = torch.ones(batch, length, dtype=torch.bool) if pad is None else ~pad
    real = real.to(src.device)
    visible = src
    running = real.clone()
    sum_h = torch.zeros(batch, length, dtype=acc, device=src.device)
    out = torch.zeros(src.shape, dtype=acc, device=src.device)
    steps = torch.zeros(batch, length, dtype=torch.int64, device=src.device)
    remainder = torch.zeros(batch, length, dtype=acc, device=src.device)
    for n in range(1, max_steps + 1):
        y = step(visible, running)
        h = torch.sigmoid(halting(y.to(halting.weight.dtype)).squeeze(-1).to(acc))
        halt = running & ((sum_h + h >= 1 - eps) | (n == max_steps))
        p = torch.where(halt, 1 - sum_h, h)
        p = torch.where(running, p, torch.zeros_like(p))
        out = out + p[..., None] * y.to(acc)
        remainder = torch.where(halt, p, remainder)
        steps = torch.where(halt, torch.full_like(steps, n), steps)
        sum_h = torch.where(running & ~halt, sum_h + h, sum_h)
        visible = torch.where(running[..., None], y, visible)
        running = running & ~halt
        if not bool(running.any()):
            break
    cost = torch.where(real, steps.to(acc) + remainder, torch.zeros_like(remainder))
    return out.to(src.dtype), cost, steps

def _layer_with_keys(layer, x, kv, mask, pad):
    """torch's TransformerEncoderLayer (batch-first values (B, L, D), dropout
    0) with its self-attention's keys and values made from `kv` instead of x."""
    def attend(q_in, kv_in):
        out, _ = layer.self_attn(q_in, kv_in, kv_in, attn_mask=mask, key_padding_mask=pad, need_weights=False)
        return out

    if not layer.self_attn.batch_first:   # the attention module takes (L, B, D) then
        attend_bf = attend
        attend = lambda q_in, kv_in: attend_bf(q_in.transpose(0, 1), kv_in.transpose(0, 1)).transpose(0, 1)  # noqa: E731
    ff = lambda h: layer.linear2(layer.activation(layer.linear1(h)))  # noqa: E731
    if layer.norm_first:
        x = x + attend(layer.norm1(x), layer.norm1(kv))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + attend(x, kv))
    return layer.norm2(x + ff(x))


def dense_act_block(layers, final_norm, halting, src, pad=None, causal=False, max_steps=8, eps=0.01):
    """The dense loop for a block of several layers (design §9): every step
    applies the layers in order to whole padded sequences; a halted token is
    seen by the first layer through its visible state (its last state s^N)
    and by every later layer through its input to that layer at its last
    step. Written with the layers' own modules, independently of the package.
    Returns (output, ponder_cost, steps) like dense_act_encoder."""
    length = src.shape[1]
    mask = torch.ones(length, length, dtype=torch.bool, device=src.device).triu(1) if causal else None
    last_inputs = [None] * len(layers)          # every token's input to layer k at its last step

    def step(visible, running):
        y = visible
        for k, layer in enumerate(layers):
            if k == 0:
                kv = y
            else:
                last_inputs[k] = y if last_inputs[k] is None else torch.where(running[..., None], y, last_inputs[k])
                kv = last_inputs[k]
            y = _layer_with_keys(layer, y, kv, mask, pad)
        return y if final_norm is None else final_norm(y)

    return _dense_act(step, halting, src, pad, max_steps, eps)
