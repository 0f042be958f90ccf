"""An independent dense oracle for the per-token ACT encoder (design §9): every
step applies torch's own layer to whole padded sequences of visible states,
then does ACT's halting per token with masks. It shares no code with the
package."""
import torch


def dense_act_encoder(layer, halting, src, pad=None, causal=False, max_steps=8, eps=0.01):
    """src (B, L, D) batch-first values; pad (B, L) bool, True at padding.
    Returns (output, ponder_cost, steps) as (B, L, D), (B, L), (B, L); the
    layer sees (B, L, D) or (L, B, D) as its batch_first says."""
    batch, length, _ = src.shape
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    real = torch.ones(batch, length, dtype=torch.bool) if pad is None else ~pad
    real = real.to(src.device)
    mask = torch.ones(length, length, dtype=torch.bool, device=src.device).triu(1) if causal else None
    visible = src
    running = real.clone()
    sum_h = torch.zeros(batch, length, dtype=acc, device=src.device)
    out = torch.zeros(src.shape, dtype=acc, device=src.device)
    steps = torch.zeros(batch, length, dtype=torch.int64, device=src.device)
    remainder = torch.zeros(batch, length, dtype=acc, device=src.device)
    for n in range(1, max_steps + 1):
        x = visible if layer.self_attn.batch_first else visible.transpose(0, 1)
        y = layer(x, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
        y = y if layer.self_attn.batch_first else y.transpose(0, 1)
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
