"""Depth-wise batching (design §17) in LoopedCausalLM.generate over
transformers' own layers: the same sequences and steps as the synchronous
scheduler and as the forward's argmax, for Llama (GQA) and Qwen3, left
padding, eos, continuous batching and fixed rows; sampling that does not
depend on the schedule; the Triton kernels under the interpreter."""
import pytest
import torch

from tiny import VOCAB, batch, llama, qwen3, vary

transformers = pytest.importorskip("transformers")
from act_kernels.hf import LoopedCausalLM  # noqa: E402


def same(a, b):
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.steps, b.steps)


def against_forward(looped, ids, mask, gen):
    new = gen.sequences.shape[1] - ids.shape[1]
    full = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)
    out = looped(gen.sequences, full)
    assert torch.equal(out.steps, gen.steps)
    return out.logits[:, ids.shape[1] - 1:-1]


@pytest.mark.parametrize("make", [llama, qwen3])
def test_depthwise_equals_synchronous_and_the_forward_argmax(make):
    model = make(seed=21)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=5), seed=21, scale=3.0)
    ids, mask = batch(seed=21, rows=4, left=True)
    sync = looped.generate(ids, mask, max_new_tokens=7, schedule="synchronous", return_dict_in_generate=True)
    deep = looped.generate(ids, mask, max_new_tokens=7, return_dict_in_generate=True)
    same(sync, deep)
    assert deep.iterations <= sync.iterations
    for kw in (dict(max_batch_size=2), dict(max_batch_size=3, fixed_rows=True)):
        same(sync, looped.generate(ids, mask, max_new_tokens=7, **kw, return_dict_in_generate=True))
    assert len(set(deep.steps[:, ids.shape[1]:].flatten().tolist())) > 1
    predicted = against_forward(looped, ids, mask, deep).argmax(-1)
    assert torch.equal(predicted, deep.sequences[:, ids.shape[1]:])


def test_eos_padding_and_sampling_do_not_depend_on_the_schedule():
    model = llama(seed=22)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=4), seed=22, scale=3.0)
    ids, mask = batch(seed=22, rows=3)
    greedy = looped.generate(ids, mask, max_new_tokens=6, return_dict_in_generate=True)
    new = greedy.sequences[1, ids.shape[1]:].tolist()
    eos = new[2]
    at = new.index(eos)                                  # where row 1 first emits it
    for schedule in ("synchronous", "depthwise"):
        out = looped.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=VOCAB - 1,
                              schedule=schedule, max_batch_size=2, return_dict_in_generate=True)
        row = out.sequences[1, ids.shape[1]:]
        assert int(row[at]) == eos and bool((row[at + 1:] == VOCAB - 1).all())
        assert bool((out.steps[1, ids.shape[1] + at + 1:] == 0).all())
        if schedule == "synchronous":
            want = out
    same(want, out)

    def draw(**kw):
        return looped.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.9,
                               generator=torch.Generator().manual_seed(5), **kw, return_dict_in_generate=True)

    base = draw(schedule="synchronous")
    same(base, draw())
    same(base, draw(max_batch_size=1))
    same(base, draw(max_batch_size=2, fixed_rows=True))


def test_bad_schedule_is_refused_before_anything_runs():
    looped = LoopedCausalLM(llama(seed=23), (1, 3), max_steps=3)
    ids, mask = batch(seed=23)
    with pytest.raises(ValueError, match="schedule must be one of"):
        looped.generate(ids, mask, max_new_tokens=2, schedule="wavefront", return_dict_in_generate=True)
    with pytest.raises(ValueError, match="fixed_rows applies to schedule='depthwise'"):
        looped.generate(ids, mask, max_new_tokens=2, schedule="synchronous", fixed_rows=True, return_dict_in_generate=True)


def test_depthwise_on_triton_under_the_interpreter():
    pytest.importorskip("triton")
    model = llama(seed=24, dtype=torch.float32, initializer_range=0.1)
    ids, mask = batch(seed=24, rows=2, length=5)
    ref = vary(LoopedCausalLM(model, (1, 3), max_steps=3, eps=0.05), seed=24, scale=2.0)
    tri = vary(LoopedCausalLM(model, (1, 3), max_steps=3, eps=0.05, backend="triton"), seed=24, scale=2.0)
    want = ref.generate(ids, mask, max_new_tokens=3, schedule="synchronous", return_dict_in_generate=True)
    got = tri.generate(ids, mask, max_new_tokens=3, return_dict_in_generate=True)
    same(want, got)
