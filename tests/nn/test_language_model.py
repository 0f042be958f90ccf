"""ak.nn.ACTLanguageModel (design §14): the teacher-forced forward, and
batched generation over the ragged cache, exact against the forward on the
completed sequences: the same tokens (greedy), the same steps per token,
logits within 1e-10 in float64; for mixed prompt lengths, with eos, with
continuous batching, and for every chunking of a prefill."""
import pytest
import torch
import torch.nn.functional as F

import act_kernels as ak
from helpers import DEVICE
from looped_lm import generate, padded

VOCAB = 40


def make(dtype=torch.float64, backend="reference", seed=0, **kw):
    torch.manual_seed(seed)
    options = dict(prelude_layers=1, block_layers=2, coda_layers=1, max_steps=6, halting_bias_init=-3.0)
    options.update(kw)
    model = ak.nn.ACTLanguageModel(VOCAB, 32, 4, 64, backend=backend, **options).to(DEVICE, dtype)
    with torch.no_grad():   # spread the halting steps over 1..max_steps
        model.block.halting.weight.normal_(0.0, 0.3)
    return model


def prompts(lengths=(5, 3, 8, 1, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).to(DEVICE) for n in lengths]


def check_against_forward(model, given, out, atol=1e-10, greedy=True):
    for prompt, seq, steps, scores in zip(given, out.sequences, out.steps, out.scores):
        assert torch.equal(seq[:prompt.numel()], prompt)
        with torch.no_grad():
            forward = model(seq[None])
        logits = forward.logits[0]
        assert torch.equal(forward.steps[0], steps), (forward.steps[0], steps)
        chosen = logits[prompt.numel() - 1:-1]
        torch.testing.assert_close(scores.to(chosen.dtype), chosen, atol=atol, rtol=0)
        if greedy:
            assert torch.equal(chosen.argmax(-1), seq[prompt.numel():])


def test_forward_shapes_padding_and_loss():
    model = make()
    tokens = torch.randint(0, VOCAB, (3, 7), device=DEVICE)
    lengths = torch.tensor([7, 4, 1], device=DEVICE)
    out = model(tokens, lengths=lengths)
    logits = out.logits
    assert logits.shape == (3, 7, VOCAB) and out.ponder_cost.shape == (3, 7) and out.steps.shape == (3, 7)
    pad = torch.arange(7, device=DEVICE)[None] >= lengths[:, None]
    assert bool((logits[pad] == 0).all()) and bool((out.steps[pad] == 0).all())
    assert bool((out.ponder_cost[pad] == 0).all()) and out.steps.dtype == torch.int64
    assert len(set(out.steps[~pad].tolist())) > 1
    real = ~pad[:, 1:]
    loss = F.cross_entropy(logits[:, :-1][real], tokens[:, 1:][real]) + 0.01 * out.ponder_cost.mean()
    loss.backward()
    assert model.block.halting.weight.grad is not None and bool(torch.isfinite(model.embed.weight.grad).all())
    # a padded row gives what the same sequence alone gives
    alone = model(tokens[1:2, :4]).logits
    torch.testing.assert_close(alone[0], logits[1, :4], atol=1e-10, rtol=0)


@pytest.mark.parametrize("left", [True, False])
def test_greedy_generation_equals_the_forward_mixed_lengths(left):
    model = make()
    given = prompts()
    out = generate(model, given, 7, left=left)
    assert [s.numel() for s in out.sequences] == [p.numel() + 7 for p in given]
    assert all(s.shape == q.shape for s, q in zip(out.steps, out.sequences))
    assert len(set(torch.cat(out.steps).tolist())) > 2
    check_against_forward(model, given, out)


def test_generation_stops_after_eos_and_continuous_batching_refills_slots():
    model = make(seed=2)
    given = prompts((4, 2, 7, 3, 5, 1), seed=3)
    free = generate(model, given, 8)
    eos = int(free.sequences[2][7 + 2])            # a token the third sequence generates third
    out = generate(model, given, 8, eos_token_id=eos, max_batch_size=2)
    for full, seq, prompt in zip(free.sequences, out.sequences, given):
        new = full[prompt.numel():].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert torch.equal(seq, full[:prompt.numel() + stop])
    assert any(seq.numel() < full.numel() for seq, full in zip(out.sequences, free.sequences))
    check_against_forward(model, given, out)


def test_every_chunking_of_a_prefill_gives_the_forward():
    model = make(seed=4)
    seq = prompts((7,), seed=5)[0]
    with torch.no_grad():
        forward = model(seq[None])
        want, want_steps = forward.logits[0], forward.steps[0]
    for mask in range(1 << 6):       # every split of 7 tokens into consecutive chunks
        cuts = [0] + [i + 1 for i in range(6) if mask >> i & 1] + [7]
        caches = model.new_cache(1)
        got, steps = [], []
        for a, b in zip(cuts, cuts[1:]):
            got.append(model.extend(caches, seq[a:b], [0, b - a], [0]))
            steps.append(model.block.steps)
        assert torch.equal(torch.cat(steps), want_steps), cuts
        torch.testing.assert_close(torch.cat(got), want, atol=1e-10, rtol=0)


def test_generation_on_triton_under_the_interpreter():
    pytest.importorskip("triton")
    ref = make(torch.float32)
    model = make(torch.float32, backend="triton")
    given = prompts((4, 2, 6))
    out = generate(model, given, 4)
    want = generate(ref, given, 4)
    for a, b in zip(out.sequences, want.sequences):
        assert torch.equal(a, b)
    check_against_forward(ref, given, out, atol=1e-4)


def test_sampling_is_repeatable_and_top_k_one_is_greedy():
    model = make(seed=6)
    given = prompts((3, 5))
    a = generate(model, given, 5, do_sample=True, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(0))
    b = generate(model, given, 5, do_sample=True, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences))
    check_against_forward(model, given, a, greedy=False)
    greedy = generate(model, given, 5)
    top1 = generate(model, given, 5, do_sample=True, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(greedy.sequences, top1.sequences))


def test_zero_new_tokens_and_max_len():
    model = make(max_len=10)
    given = prompts((4, 9))
    out = generate(model, given, 0)
    assert all(torch.equal(s, p) for s, p in zip(out.sequences, given))
    assert [s.numel() for s in out.steps] == [4, 9]
    capped = generate(model, given, 5)
    assert [s.numel() for s in capped.sequences] == [9, 10]


def test_block_cache_keeps_ragged_rows():
    model = make(seed=7)
    given = prompts((5, 3))
    caches = model.new_cache(2)
    model.extend(caches, torch.cat(given), [0, 5, 8], [0, 1])
    steps = int(model.block.steps.sum())
    prelude, block, coda = caches
    assert prelude.rows() == [8] and coda.rows() == [8]
    assert block.rows() == [steps + 8, steps]


def test_bad_generate_and_extend_calls():
    model, other = make(), make(seed=1)
    given = prompts((3, 4))
    ids, mask = padded(given)
    empty = mask.clone()
    empty[1] = 0                                      # a row without a real token: an empty prompt
    before = [p.clone() for p in given] + [ids.clone(), mask.clone()]
    cases = [
        (lambda: model.generate(ids, mask, max_new_tokens=-1), ValueError, "max_new_tokens"),
        (lambda: model.generate(ids, mask, max_new_tokens=2, top_k=0), ValueError, "top_k"),
        (lambda: model.generate(ids, mask, max_new_tokens=2, do_sample=True, temperature=-0.5), ValueError,
         "temperature"),
        (lambda: model.generate(ids, empty, max_new_tokens=2), ValueError, "attention_mask: rows .1. have no real"),
        (lambda: model.generate(torch.tensor([[1, VOCAB]], device=DEVICE), max_new_tokens=2), ValueError,
         "must lie in"),
        (lambda: make(max_len=3).generate(ids, mask, max_new_tokens=2), ValueError, "exceed max_len"),
        (lambda: model.generate(ids.float(), mask, max_new_tokens=2), ValueError, "int64"),
        (lambda: model.extend(other.new_cache(1), given[0], [0, 3], [0]), ValueError, "another encoder"),
        (lambda: model(torch.full((1, 3), VOCAB, device=DEVICE)), ValueError, "must lie in"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert all(torch.equal(a, b) for a, b in zip(given + [ids, mask], before))


def test_one_slot_one_token_prompts_and_an_immediate_eos():
    model = make(seed=8)
    given = prompts((1, 1, 2), seed=9)
    free = generate(model, given, 3)
    eos = int(free.sequences[0][1])                 # the first token sequence 0 generates
    out = generate(model, given, 3, eos_token_id=eos, max_batch_size=1)
    assert out.sequences[0].numel() == 2 and int(out.sequences[0][-1]) == eos
    for full, seq, prompt in zip(free.sequences, out.sequences, given):
        new = full[prompt.numel():].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert torch.equal(seq, full[:prompt.numel() + stop])
    check_against_forward(model, given, out)
