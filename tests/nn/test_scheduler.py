"""The slot scheduler's hooks (generation/scheduler.py: generate_slots), called
directly on a tiny ACTLanguageModel under both policies, with fewer slots than
prompts: stop ends a sequence after the token it fires on; on_token sees every
generated token in order; choose sees every sequence whole on the host; the
scores recorded are the ones choose returned."""
import pytest
import torch

from act_kernels.generation.scheduler import generate_slots
from test_depthwise import by_token
from test_language_model import make, prompts

POLICIES = [("synchronous", False), ("depthwise", False), ("depthwise", True)]
IDS = ["synchronous", "depthwise", "depthwise-fixed_rows"]
NEW = 6


def greedy(logits, seqs, histories):
    return logits.argmax(-1), logits


@torch.no_grad()
def generate(model, given, schedule, fixed_rows, choose=greedy, slots=2, **hooks):
    def prefill(caches, tokens, offsets, slot_list):
        return model.extend(caches, tokens, offsets, slot_list), model.block.steps

    return generate_slots(schedule, prefill=prefill, caches=model.new_cache(slots), prompts=given,
                          max_new_tokens=NEW, choose=choose, max_len=model.max_len,
                          embed=model._embed, prelude=model.prelude,
                          block=model.block, coda=model.coda, head=model._head,
                          attention=model.block.attention_backend(model.head.weight), fixed_rows=fixed_rows,
                          **hooks)


@pytest.fixture(scope="module")
def setup():
    model = make(seed=20).eval()
    by_token(model, seed=2)      # each token halts after its own steps, 1 included: read and chosen in one iteration
    given = prompts((4, 2, 5, 3, 1), seed=21)
    free = generate(model, given, "synchronous", False, slots=len(given))
    fed = torch.cat([torch.cat(s)[p.numel():] for s, p in zip(free.steps, given)])
    assert (fed == 1).any() and (fed > 1).any()
    return model, given, free


@pytest.mark.parametrize("schedule,fixed_rows", POLICIES, ids=IDS)
def test_stop_ends_a_sequence_after_the_token_it_fires_on(setup, schedule, fixed_rows):
    model, given, free = setup
    value = int(free.sequences[3][given[3].numel() + 1])     # the fourth sequence's second new token
    calls = []

    def stop(i, history):
        calls.append((i, list(history)))
        return (i == 1 and len(history) == given[1].numel() + 3) or history[-1] == value

    out = generate(model, given, schedule, fixed_rows, stop=stop)
    for i, (prompt, seq, whole) in enumerate(zip(given, out.sequences, free.sequences)):
        new = whole[prompt.numel():].tolist()
        ends = [k + 1 for k, v in enumerate(new) if v == value] + ([3] if i == 1 else []) + [NEW]
        assert torch.equal(seq, whole[:prompt.numel() + min(ends)])
        # its last token was still fed once, for its steps
        assert torch.cat(out.steps[i]).numel() == seq.numel()
        # stop saw every generated token once, when it came, with the sequence so far
        assert [h for j, h in calls if j == i] == [seq[:n].tolist() for n in range(prompt.numel() + 1, seq.numel() + 1)]
    assert out.sequences[1].numel() == given[1].numel() + 3
    assert out.sequences[3].numel() <= given[3].numel() + 2


@pytest.mark.parametrize("schedule,fixed_rows", POLICIES, ids=IDS)
def test_on_token_sees_every_generated_token_in_order(setup, schedule, fixed_rows):
    model, given, free = setup
    seen = {i: [] for i in range(len(given))}
    out = generate(model, given, schedule, fixed_rows, on_token=lambda i, value: seen[i].append(value))
    for i, (prompt, seq) in enumerate(zip(given, out.sequences)):
        assert torch.equal(seq, free.sequences[i])
        assert seen[i] == seq[prompt.numel():].tolist()


@pytest.mark.parametrize("schedule,fixed_rows", POLICIES, ids=IDS)
def test_choose_sees_each_sequence_so_far_and_its_scores_are_recorded(setup, schedule, fixed_rows):
    model, given, free = setup
    seen, returned = [], {i: [] for i in range(len(given))}

    def choose(logits, seqs, histories):
        assert logits.shape[0] == len(seqs) == len(histories)
        seen.extend((i, list(h)) for i, h in zip(seqs, histories))
        scores = torch.randn(logits.shape, dtype=logits.dtype)    # not the logits: the scheduler keeps these
        for i, row in zip(seqs, scores):
            returned[i].append(row)
        return logits.argmax(-1), scores

    out = generate(model, given, schedule, fixed_rows, choose=choose)
    for i, (prompt, seq) in enumerate(zip(given, out.sequences)):
        assert torch.equal(seq, free.sequences[i])
        # the k-th choice of sequence i saw its prompt and its k - 1 tokens before
        assert [h for j, h in seen if j == i] == [seq[:prompt.numel() + k].tolist() for k in range(NEW)]
        assert len(out.scores[i]) == NEW
        assert all(torch.equal(a, b) for a, b in zip(out.scores[i], returned[i]))
