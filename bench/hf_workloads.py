"""The transformers workloads of bench/test_bench_hf.py: a small Llama (hidden
256, grouped-query attention 4 / 2 heads of 64, byte vocabulary, 4 decoder
layers) looped per token by `LoopedCausalLM(model, block=(1, 3), max_steps=8)`,
with controlled halting, and the baseline a user would run instead: the same
weights with the block's layers unrolled max_steps times, as a plain
`LlamaForCausalLM` run through transformers' own forward and generate.

Controlled halting: the prelude and block layers never change feature 0 of
the residual stream (row 0 of `o_proj.weight` and `down_proj.weight` is
zero; Llama's projections have no bias and its positions are rotary, so
nothing else writes the residual), the halting unit reads only feature 0 of
the raw residual (step_norm is off: halting reads the block's output before
any norm), and each byte's embedding holds at feature 0 the logit that halts
after a drawn N (h = 0.99 / N + 1e-4 at every step, skewed: mean about 2.5,
some bytes at max_steps). So every token halts after the steps of its byte,
in every run and under every schedule.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import skewed_steps  # noqa: E402

VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 256, 256, 688, 4, 2, 64
LAYERS, BLOCK, MAX_STEPS, MEAN_STEPS = 4, (1, 3), 8, 2.5
PRELUDE, BLOCK_LAYERS, CODA = BLOCK[0], BLOCK[1] - BLOCK[0], LAYERS - BLOCK[1]
UNROLLED_LAYERS = PRELUDE + BLOCK_LAYERS * MAX_STEPS + CODA     # 18
PAD = 0


def byte_steps(seed: int = 0) -> torch.Tensor:
    """(VOCAB,) the ponder steps after which each byte halts."""
    return skewed_steps(VOCAB, MAX_STEPS, MEAN_STEPS, seed)


def llama_config(layers: int = LAYERS):
    import transformers

    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                    num_hidden_layers=layers, num_attention_heads=HEADS,
                                    num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
                                    pad_token_id=PAD, bos_token_id=None, eos_token_id=None)


def no_eos(model):
    """Every sequence gets its new tokens (no eos; byte 0 is the padding)."""
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def controlled_llama(seed: int = 0, dtype=torch.float32):
    """(LoopedCausalLM, its LlamaForCausalLM): the looped model with
    controlled halting; `.token_steps` on the looped model: each byte's N."""
    import transformers

    from act_kernels.hf import LoopedCausalLM

    torch.manual_seed(seed)
    model = no_eos(transformers.LlamaForCausalLM(llama_config()).to(dtype).eval())
    steps = byte_steps(seed)
    h = 0.99 / steps.double() + 1e-4
    with torch.no_grad():
        for layer in model.model.layers[:BLOCK[1]]:   # the prelude and the block
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.embed_tokens.weight[:, 0] = torch.log(h / (1 - h)).to(dtype)
    looped = LoopedCausalLM(model, block=BLOCK, max_steps=MAX_STEPS)
    with torch.no_grad():
        looped.halting.weight.zero_()
        looped.halting.weight[0, 0] = 1.0
        looped.halting.bias.zero_()
    looped.token_steps = steps
    return looped.eval(), model


def unrolled(model):
    """A LlamaForCausalLM with layers prelude + block x MAX_STEPS + coda, each a
    copy of the looped model's layer (its own layer_idx, so DynamicCache
    works), the embedding, final norm and head copied too: every token runs
    UNROLLED_LAYERS layers."""
    import transformers

    config = llama_config(UNROLLED_LAYERS)
    config._attn_implementation = model.config._attn_implementation
    plain = no_eos(transformers.LlamaForCausalLM(config).to(model.dtype).eval())
    source = model.model.layers
    order = list(range(PRELUDE)) + list(range(BLOCK[0], BLOCK[1])) * MAX_STEPS + list(range(BLOCK[1], LAYERS))
    with torch.no_grad():
        for target, i in zip(plain.model.layers, order):
            target.load_state_dict(source[i].state_dict())
        plain.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
        plain.model.norm.load_state_dict(model.model.norm.state_dict())
        plain.lm_head.load_state_dict(model.lm_head.state_dict())
    for k, layer in enumerate(plain.model.layers):
        assert layer.self_attn.layer_idx == k
    return plain


def left_padded(count: int, low: int = 32, high: int = 128, seed: int = 1):
    """input_ids (count, longest) and attention_mask: prompts of random bytes,
    lengths uniform in [low, high], padded on the left (what generate expects)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g)
    longest = int(lengths.max())
    ids = torch.full((count, longest), PAD, dtype=torch.int64)
    mask = torch.zeros(count, longest, dtype=torch.int64)
    for row, n in enumerate(lengths.tolist()):
        ids[row, longest - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, longest - n:] = 1
    return ids, mask


def padded_positions_and_mask(attention_mask, position_ids, batch: int, length: int, past: int):
    """What the dense release baselines (bench/ouro_workloads.py,
    bench/huginn_workloads.py) build from transformers' left-padded
    attention_mask (B, past + L) for L new tokens after `past` cached ones:
    position ids counting each row's real tokens from 0 (unless given), and
    the boolean mask (B, 1, L, S): a query sees the real keys up to itself;
    a padding query sees itself (its output is never read)."""
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + length, dtype=torch.int64)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    keys = attention_mask.bool()                                   # (B, S)
    query = torch.arange(past, past + length)[:, None]
    column = torch.arange(keys.shape[1])[None, :]
    mask = (keys[:, None, :] & (column <= query)[None]) | (column == query)[None]
    return position_ids, mask[:, None]


def layer_work(tokens: int, steps_sum: int) -> int:
    """Layer applications of the looped model over `tokens` tokens whose
    ponder steps add up to `steps_sum` (prelude and coda once each)."""
    return tokens * (PRELUDE + CODA) + BLOCK_LAYERS * steps_sum


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dynamic_cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers DynamicCache holds."""
    tensors = []
    for layer in cache.layers:
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return tensor_bytes(tensors)


def ragged_cache_bytes(caches):
    """(used, allocated) bytes of the keys and values our caches hold: the
    rows in use, and the buffers (grown by doubling)."""
    used = allocated = 0
    for cache in caches:
        for layer in cache.layers:
            row = layer.k[0].numel() * layer.k.element_size() if layer.k.shape[0] else 0
            used += 2 * layer.size * row
            allocated += tensor_bytes([layer.k, layer.v])
    return used, allocated


def capture_caches(looped):
    """Makes `looped.new_cache` keep what it returns in `looped.captured_caches`
    (the caches generate fills), on this instance only."""
    make = type(looped).new_cache.__get__(looped)

    def new_cache(batch_size):
        caches = make(batch_size)
        looped.captured_caches = caches
        return caches

    looped.new_cache = new_cache
    return looped


NEW_TOKENS = 48


def generate_ours(looped, ids, mask, schedule, new=NEW_TOKENS):
    """Sampled (temperature 1, a fixed generator): the controlled halting fixes each token's steps."""
    return looped.generate(ids, mask, max_new_tokens=new, do_sample=True, temperature=1.0, schedule=schedule,
                           generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)


def generate_hf(plain, ids, mask, new=NEW_TOKENS):
    """transformers' generate of the unrolled model: DynamicCache, greedy, no eos (new tokens each)."""
    return plain.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True)


def training_step(module, tokens, looped: bool):
    """Forward and backward of transformers' causal-LM loss (plus 0.01 x the mean ponder cost for ours)."""
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(tokens, labels=tokens)
    loss = out.loss + 0.01 * out.ponder_cost.mean() if looped else out.loss
    torch.autograd.grad(loss, params, allow_unused=True)


def interleaved(cases, rounds: int = 5, warmup: int = 1, timer=time.perf_counter):
    """{name: median seconds}: each round runs every case once, in turn."""
    times = {name: [] for name in cases}
    for r in range(warmup + rounds):
        for name, fn in cases.items():
            start = timer()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(timer() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
    """python bench/hf_workloads.py [--cpu-time] [train] [BATCH ...]: the
    benchmark's comparisons timed in alternation (one thread), medians and
    ratios; --cpu-time times with the process's CPU time (time.process_time)
    instead of the wall clock, less exposed to other processes on a shared
    machine."""
    torch.set_num_threads(1)
    timer = time.process_time if "--cpu-time" in argv else time.perf_counter
    argv = [a for a in argv if a != "--cpu-time"]
    looped, model = controlled_llama()
    plain = unrolled(model)
    which = argv or ["train", "1", "4", "16", "64"]
    if "train" in which:
        tokens = torch.randint(0, VOCAB, (8, 256), generator=torch.Generator().manual_seed(2))
        looped.train()
        plain.train()
        med = interleaved({"looped": lambda: training_step(looped, tokens, True),
                           "unrolled_hf": lambda: training_step(plain, tokens, False)}, timer=timer)
        looped.eval()
        plain.eval()
        steps = looped.token_steps[tokens]
        best = UNROLLED_LAYERS * tokens.numel() / layer_work(tokens.numel(), int(steps.sum()))
        speed = med["unrolled_hf"] / med["looped"]
        print(f"train 8 x 256: looped {med['looped'] * 1e3:.0f} ms, unrolled HF {med['unrolled_hf'] * 1e3:.0f} ms: "
              f"{speed:.2f}x, ideal {best:.2f}x, {100 * speed / best:.0f} % of ideal")
    for batch in (int(b) for b in which if b != "train"):
        ids, mask = left_padded(batch, 32, 128)
        new = NEW_TOKENS
        out = generate_ours(looped, ids, mask, "depthwise", new)
        sync_out = generate_ours(looped, ids, mask, "synchronous", new)
        valid = torch.cat([mask.bool(), torch.ones(batch, new, dtype=torch.bool)], 1)
        best = UNROLLED_LAYERS * int(valid.sum()) / layer_work(int(valid.sum()), int(out.steps[valid].sum()))
        med = interleaved({"depthwise": lambda: generate_ours(looped, ids, mask, "depthwise", new),
                           "synchronous": lambda: generate_ours(looped, ids, mask, "synchronous", new),
                           "unrolled_hf": lambda: generate_hf(plain, ids, mask, new)},
                          rounds=5 if batch <= 16 else 3, timer=timer)
        line = [f"generate batch {batch}, {new} new:"]
        for name in ("depthwise", "synchronous"):
            speed = med["unrolled_hf"] / med[name]
            line.append(f"{name} {batch * new / med[name]:.0f} tok/s, {speed:.2f}x HF ({100 * speed / best:.0f} % "
                        f"of {best:.2f}x)")
        line.append(f"HF {batch * new / med['unrolled_hf']:.0f} tok/s")
        dw = med["synchronous"] / med["depthwise"]
        it = sync_out.iterations / out.iterations
        line.append(f"depthwise/synchronous {dw:.2f}x (ideal {it:.2f}x, {100 * dw / it:.0f} %)")
        print("; ".join(line))


if __name__ == "__main__":
    main(sys.argv[1:])
