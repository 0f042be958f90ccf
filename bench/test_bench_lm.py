"""The looped ACT language model (design §14): batched generation over the
ragged cache against the same model decoding as looped LMs with batch > 1
do today (every token runs max_steps, with a dense per-step cache), and
against generation with no cache (each sequence recomputed per new token);
the cache's bytes against the dense per-step cache's; training forward and
backward against the same model with every token running max_steps (the
work of the dense masked loop). Ratios come from one process, with the
ideal ratio beside them: the layer applications per token of the baseline
over ACT's, (P + B M + C) / (P + B N + C) summed over the tokens processed.

Halting is controlled: the prelude and the block never change feature 0 of
the residual stream (the rows of out_proj and linear2 that write it are
zero), the halting unit reads only it, and each vocabulary entry's feature
0 is the logit that halts after a drawn N (skewed, mean about 2.5, capped at
max_steps). So every token halts after the steps of its byte, the same
in every run. Tokens are sampled (temperature 1, a fixed generator), so the
mean steps of generated tokens follow that distribution.

    python -m pytest bench/test_bench_lm.py --benchmark-only && python bench/report.py
"""
from __future__ import annotations

import math

import pytest
import torch

import act_kernels as ak
from conftest import sync
from workloads import skewed_steps
from conftest import median_of

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
ROUNDS = 3
# the CPU setting (16 prompts, d_model 256); the GPU rows are owed until a device runs them
SETTING = (dict(prompts=64, d_model=1024, heads=16) if GPU else dict(prompts=16, d_model=256, heads=4))
PRELUDE, BLOCK, CODA, MAX_STEPS, VOCAB = 1, 2, 1, 8, 256


def byte_steps(seed: int = 0) -> torch.Tensor:
    """(VOCAB,) the ponder steps after which each byte halts in the ACT model."""
    return skewed_steps(VOCAB, MAX_STEPS, 2.5, seed)


def controlled_model(fixed: bool, seed: int = 0) -> ak.nn.ACTLanguageModel:
    """The benchmark model; `fixed`: the same weights with halting off, so
    every token runs MAX_STEPS (the dense baseline)."""
    torch.manual_seed(seed)
    d = SETTING["d_model"]
    model = ak.nn.ACTLanguageModel(VOCAB, d, SETTING["heads"], prelude_layers=PRELUDE, block_layers=BLOCK,
                                   coda_layers=CODA, max_steps=MAX_STEPS, max_len=512)
    steps = byte_steps(seed)
    h = 0.99 / steps.double() + 1e-4
    with torch.no_grad():
        for stack in (model.prelude, model.block):
            for layer in stack.layers:
                for lin in (layer.self_attn.out_proj, layer.linear2):
                    lin.weight[0].zero_()
                    lin.bias[0].zero_()
        model.position.weight[:, 0] = 0.0
        model.embed.weight[:, 0] = torch.log(h / (1 - h)).float()
        model.block.halting.weight.zero_()
        if fixed:
            model.block.halting.bias.fill_(-40.0)
        else:
            model.block.halting.weight[0, 0] = 1.0
            model.block.halting.bias.zero_()
    model.token_steps = steps if not fixed else torch.full_like(steps, MAX_STEPS)
    return model.to(DEVICE, DTYPE).eval()


def prompts(count: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(64, 257, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).to(DEVICE) for n in lengths]


def layer_work(tokens: torch.Tensor, steps: torch.Tensor) -> int:
    """Layer applications of processing `tokens` whose ponder steps are `steps`."""
    return int(tokens.numel() * (PRELUDE + CODA) + BLOCK * int(steps.sum()))


def padded(given):
    """The prompts as one left-padded batch: (input_ids, attention_mask)."""
    width = max(p.numel() for p in given)
    ids = torch.zeros(len(given), width, dtype=torch.int64, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(given):
        ids[i, width - p.numel():], mask[i, width - p.numel():] = p, 1
    return ids, mask


def generate(model, batch, new_tokens):
    """Sampled generation of the padded prompts (sequences and steps, 0 steps at padding)."""
    ids, mask = batch
    out = model.generate(ids, mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                         generator=torch.Generator(device=DEVICE).manual_seed(0), return_dict_in_generate=True)
    sync()
    return out


def no_cache_generate(model, given, new_tokens):
    """Each new token recomputes every running sequence from scratch: the
    parallel forward over the sequences so far, padded, its last logits."""
    seqs = [p.clone() for p in given]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for _ in range(new_tokens):
            lengths = torch.tensor([s.numel() for s in seqs], device=DEVICE)
            tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
            logits = model(tokens, lengths=lengths).logits
            last = logits[torch.arange(len(seqs), device=DEVICE), lengths - 1].double()
            nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=g).squeeze(1)
            seqs = [torch.cat([s, n.view(1)]) for s, n in zip(seqs, nxt)]
    sync()
    return seqs


@pytest.mark.parametrize("impl", ["act_cache", "dense_cache"])
def test_generation_tokens_per_second(benchmark, record, impl):
    """16 prompts of 64..256 tokens (64 on a GPU), 128 new tokens each."""
    model = controlled_model(fixed=impl == "dense_cache")
    given = prompts(SETTING["prompts"])
    batch = padded(given)
    new = 128
    out = benchmark.pedantic(lambda: generate(model, batch, new), rounds=ROUNDS, warmup_rounds=1)
    real = out.steps > 0                              # the prompts' tokens and the new ones
    processed = out.sequences[real]
    act_steps = byte_steps().to(DEVICE)[processed]
    dense = layer_work(processed, torch.full_like(act_steps, MAX_STEPS))
    steps = out.steps[real]
    assert torch.equal(steps, model.token_steps.to(DEVICE)[processed]), "tokens did not halt where they should"
    record("lm_generate", impl, prompts=len(given), new_tokens=new, d_model=SETTING["d_model"],
           max_steps=MAX_STEPS, mean_steps=float(steps.double().mean()), tokens_per_s=len(given) * new /
           median_of(benchmark), ideal_speedup=dense / layer_work(processed, act_steps), dtype=str(DTYPE))


@pytest.mark.parametrize("impl", ["act_cache", "no_cache"])
def test_generation_against_no_cache(benchmark, record, impl):
    """The same prompts, 16 new tokens each (no cache recomputes everything per token)."""
    model = controlled_model(fixed=False)
    given = prompts(SETTING["prompts"])
    new = 16
    if impl == "act_cache":
        batch = padded(given)
        benchmark.pedantic(lambda: generate(model, batch, new), rounds=ROUNDS, warmup_rounds=0)
    else:
        benchmark.pedantic(lambda: no_cache_generate(model, given, new), rounds=1, warmup_rounds=0)
    lengths = [p.numel() for p in given]
    # no cache: token t of a sequence is processed once per later new token (and once in its own call)
    recomputed = sum(sum(n + k for k in range(new)) for n in lengths)
    once = sum(lengths) + len(given) * new
    record("lm_generate_no_cache", impl, prompts=len(given), new_tokens=new, d_model=SETTING["d_model"],
           tokens_per_s=len(given) * new / median_of(benchmark), ideal_speedup=recomputed / once,
           dtype=str(DTYPE))


@pytest.mark.parametrize("impl", ["act", "every_token_max_steps"])
def test_training_forward_backward(benchmark, record, impl):
    """B x L tokens of random bytes, forward and backward of the loss."""
    model = controlled_model(fixed=impl != "act").train()
    batch, length = (8, 256) if not GPU else (64, 512)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=g).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        out = model(tokens)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(),
                                                 tokens[:, 1:].reshape(-1)) + 0.01 * out.ponder_cost.mean()
        torch.autograd.grad(loss, params, allow_unused=True)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    act_steps = byte_steps().to(DEVICE)[tokens]
    dense = layer_work(tokens, torch.full_like(act_steps, MAX_STEPS))
    record("lm_train", impl, batch=batch, length=length, d_model=SETTING["d_model"], max_steps=MAX_STEPS,
           mean_steps=float(act_steps.double().mean()), ideal_speedup=dense / layer_work(tokens, act_steps),
           dtype=str(DTYPE))


def test_cache_bytes_against_a_dense_per_step_cache(benchmark, record):
    """Rows the ragged cache holds after a prefill of the prompts, against a
    dense per-step cache (every token, max_steps rows at every block layer
    plus one at the first for s^N, one per prelude and coda layer)."""
    model = controlled_model(fixed=False)
    given = prompts(SETTING["prompts"])
    offsets = [0, *torch.tensor([p.numel() for p in given]).cumsum(0).tolist()]

    def prefill():
        caches = model.new_cache(len(given))
        model.extend(caches, torch.cat(given), offsets, list(range(len(given))))
        sync()
        return caches

    caches = benchmark.pedantic(prefill, rounds=1, warmup_rounds=0)
    tokens = offsets[-1]
    ragged = sum(sum(c.rows()) for c in caches)
    dense = tokens * (PRELUDE + CODA + BLOCK * MAX_STEPS + 1)
    row_bytes = 2 * SETTING["d_model"] * torch.finfo(DTYPE).bits // 8
    record("lm_cache_bytes", "ragged", tokens=tokens, ragged_rows=ragged, dense_rows=dense,
           ragged_bytes=ragged * row_bytes, dense_bytes=dense * row_bytes, ideal_speedup=dense / ragged,
           mean_steps=float(model.block.steps.double().mean()), dtype=str(DTYPE))
    assert math.isclose(ragged, tokens * (PRELUDE + CODA + 1) + BLOCK * int(model.block.steps.sum()))
