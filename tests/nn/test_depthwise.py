"""Continuous depth-wise batching (design §17) in ACTLanguageModel.generate:
every interleaving of the sequences' tokens gives what the synchronous
scheduler gives (sequences, steps, scores in float64) and the forward's argmax
on the completed sequences; block iterations hold rows at different steps;
the block runs fewer times than the synchronous scheduler's max-N per decode
call; fixed rows change nothing but the row count; sampling does not depend
on the schedule."""
import pytest
import torch

import act_kernels as ak
from act_kernels.generation.depthwise import DepthwiseBlock
from act_kernels.models.core import LoopedCore
from looped_lm import generate
from test_language_model import VOCAB, check_against_forward, make, prompts


def same(a, b, scores=True):
    assert len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences):
        assert torch.equal(x, y)
    for x, y in zip(a.steps, b.steps):
        assert torch.equal(x, y)
    if scores:
        for x, y in zip(a.scores, b.scores):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


@pytest.fixture
def row_steps(monkeypatch):
    """Records the distinct ponder steps of the rows of every block iteration."""
    seen = []
    original = DepthwiseBlock.iterate

    def iterate(self, slots, positions, active=None, read_with=None):
        live = [s for k, s in enumerate(slots) if active is None or active[k]]
        seen.append(sorted({self.host_step[s] + 1 for s in live}))
        return original(self, slots, positions, active, read_with)

    monkeypatch.setattr(DepthwiseBlock, "iterate", iterate)
    return seen


def by_token(model, seed=0):
    """Every token halts after its own number of steps (1..max_steps, drawn
    per vocabulary entry): the prelude and the block never write feature 0
    of the residual stream, the halting unit reads only it, and a token's
    embedding sets it to the logit that halts after its steps."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, model.block.max_steps + 1, (VOCAB,), generator=g)
    h = 0.99 / steps.double() + 1e-4
    with torch.no_grad():
        for stack in (model.prelude, model.block):
            for layer in stack.layers:
                for lin in (layer.self_attn.out_proj, layer.linear2):
                    lin.weight[0].zero_()
                    lin.bias[0].zero_()
        model.position.weight[:, 0] = 0.0
        model.embed.weight[:, 0] = torch.log(h / (1 - h)).to(model.embed.weight.dtype)
        model.block.halting.weight.zero_()
        model.block.halting.weight[0, 0] = 1.0
        model.block.halting.bias.zero_()
    return steps


def test_depthwise_equals_synchronous_and_the_forward(row_steps):
    model = make(seed=8)
    given = prompts((5, 3, 8, 1, 6, 2), seed=9)
    sync = generate(model, given, 9, schedule="synchronous")
    deep = generate(model, given, 9)
    same(sync, deep)
    check_against_forward(model, given, deep)
    assert any(len(steps) > 1 for steps in row_steps)     # one iteration holds tokens at different steps


def test_the_block_runs_about_mean_n_times_per_token_not_max_n():
    model = make(seed=8)
    steps = by_token(model, seed=1)
    given = prompts((5, 3, 8, 1, 6, 2), seed=9)

    def run(schedule):
        return generate(model, given, 12, do_sample=True, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              schedule=schedule)

    sync, deep = run("synchronous"), run("depthwise")
    same(sync, deep)
    check_against_forward(model, given, deep, greedy=False)
    for seq, got in zip(deep.sequences, deep.steps):       # the halting is the controlled one
        assert torch.equal(got, steps[seq])
    # iterations past the prefill: the synchronous scheduler pays the deepest
    # token of every decode call, the depth-wise one the deepest sequence's sum
    prefill = max(int(s[:p.numel()].max()) for s, p in zip(deep.steps, given))
    fed = [s[p.numel():] for s, p in zip(deep.steps, given)]
    assert sync.iterations - prefill == sum(int(torch.stack(col).max()) for col in zip(*fed))
    assert deep.iterations - prefill == max(int(f.sum()) for f in fed)
    assert deep.iterations < 0.8 * sync.iterations


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_continuous_batching_and_eos_under_both_schedules(slots, monkeypatch):
    model = make(seed=10)
    given = prompts((4, 2, 7, 3, 5, 1, 6), seed=11)
    free = generate(model, given, 8, schedule="synchronous")
    eos = int(free.sequences[1][2 + 3])            # the second sequence's fourth new token
    sync = generate(model, given, 8, eos_token_id=eos, max_batch_size=slots, schedule="synchronous")
    rows, prefills = [], []
    original, extend = DepthwiseBlock.iterate, LoopedCore._extend

    def iterate(self, slots_, positions, active=None, read_with=None):
        rows.append(len(slots_))
        return original(self, slots_, positions, active, read_with)

    def prefill(self, caches, tokens, offsets, sequences, *args, **kwargs):
        prefills.append(len(sequences))
        return extend(self, caches, tokens, offsets, sequences, *args, **kwargs)

    monkeypatch.setattr(DepthwiseBlock, "iterate", iterate)
    monkeypatch.setattr(LoopedCore, "_extend", prefill)
    deep = generate(model, given, 8, eos_token_id=eos, max_batch_size=slots)
    same(sync, deep)
    assert any(s.numel() < f.numel() for s, f in zip(deep.sequences, free.sequences))
    check_against_forward(model, given, deep)
    assert max(rows) <= slots        # prompts prefilled ahead never step beyond max_batch_size
    # the prompts that wait are prefilled ahead in groups of max_batch_size, not as each slot frees
    assert prefills == [slots] * (len(given) // slots) + [len(given) % slots] * (len(given) % slots > 0)
    if slots == 1:   # one slot: every decode iteration steps one token, one per step of every fed token
        fed = sum(int(s[p.numel():].sum()) for s, p in zip(deep.steps, given))
        assert rows == [1] * fed


def test_fixed_rows_give_the_same_output_at_a_fixed_row_count(monkeypatch):
    model = make(seed=12)
    given = prompts((6, 2, 5, 3, 1), seed=13)
    counts = []
    original = DepthwiseBlock.iterate

    def iterate(self, slots, positions, active=None, read_with=None):
        counts.append(len(slots))
        return original(self, slots, positions, active, read_with)

    monkeypatch.setattr(DepthwiseBlock, "iterate", iterate)
    eos = int(generate(model, given, 6).sequences[0][6 + 1])
    counts.clear()
    fixed = generate(model, given, 6, eos_token_id=eos, max_batch_size=3, fixed_rows=True)
    assert set(counts) == {3}
    counts.clear()
    free = generate(model, given, 6, eos_token_id=eos, max_batch_size=3)
    assert len(set(counts)) > 1                  # without it the row count follows the running sequences
    same(fixed, free)
    check_against_forward(model, given, fixed)


def test_sampling_does_not_depend_on_the_schedule_or_the_batch():
    model = make(seed=14)
    given = prompts((3, 5, 2, 4), seed=15)

    def draw(**kw):
        return generate(model, given, 6, do_sample=True, temperature=0.9, top_k=12,
                        generator=torch.Generator().manual_seed(3), **kw)

    base = draw(schedule="synchronous")
    for kw in (dict(), dict(max_batch_size=1), dict(max_batch_size=3, fixed_rows=True),
               dict(schedule="synchronous", max_batch_size=2)):
        same(base, draw(**kw), scores=False)
    other = generate(model, given, 6, do_sample=True, temperature=0.9, top_k=12, generator=torch.Generator().manual_seed(4))
    assert any(not torch.equal(a, b) for a, b in zip(base.sequences, other.sequences))
    check_against_forward(model, given, base, greedy=False)


def test_all_halting_at_step_one_and_none_before_max_steps():
    for bias in (40.0, -40.0):       # h = 1: every token halts at step 1; h = 0: every token runs max_steps
        model = make(seed=16)
        with torch.no_grad():
            model.block.halting.weight.zero_()
            model.block.halting.bias.fill_(bias)
        given = prompts((4, 1, 3), seed=17)
        deep = generate(model, given, 4)
        same(generate(model, given, 4, schedule="synchronous"), deep)
        want = 1 if bias > 0 else model.block.max_steps
        assert all(bool((s == want).all()) for s in deep.steps)
        assert deep.iterations == want + 4 * want      # the prefill, then 4 fed tokens: no waiting to remove
        check_against_forward(model, given, deep)


def test_zero_new_tokens_max_len_and_bad_schedules():
    model = make(max_len=9, seed=18)
    given = prompts((4, 8), seed=19)
    out = generate(model, given, 0)
    assert all(torch.equal(s, p) for s, p in zip(out.sequences, given))
    assert out.iterations == max(int(s.max()) for s in out.steps)      # the prefill's only
    same(generate(model, given, 5, schedule="synchronous"), generate(model, given, 5))
    with pytest.raises(ValueError, match="schedule must be one of"):
        generate(model, given, 2, schedule="eager")
    with pytest.raises(ValueError, match="fixed_rows applies to schedule='depthwise'"):
        generate(model, given, 2, schedule="synchronous", fixed_rows=True)
    with pytest.raises(TypeError, match="fixed_rows must be a bool"):
        generate(model, given, 2, fixed_rows=1)


def test_depthwise_on_triton_under_the_interpreter():
    pytest.importorskip("triton")
    ref = make(torch.float32, seed=20)
    model = make(torch.float32, backend="triton", seed=20)
    given = prompts((4, 2, 5), seed=21)
    out = generate(model, given, 4)
    want = generate(ref, given, 4, schedule="synchronous")
    same(out, want, scores=False)
    check_against_forward(ref, given, out, atol=1e-4)


def test_float32_and_bfloat16_models_generate_under_both_schedules():
    for dtype in (torch.float32, torch.bfloat16):
        model = make(dtype, seed=22)
        given = prompts((3, 6), seed=23)
        a = generate(model, given, 4)
        b = generate(model, given, 4, schedule="synchronous")
        assert [s.numel() for s in a.sequences] == [7, 10] and all(torch.isfinite(x).all() for x in a.scores)
        if dtype == torch.float32:
            same(a, b, scores=False)


def test_a_language_model_without_prelude_or_coda():
    model = make(seed=24, prelude_layers=0, coda_layers=0)
    assert isinstance(model, ak.nn.ACTLanguageModel)
    given = prompts((5, 2, 4), seed=25)
    same(generate(model, given, 5, schedule="synchronous"), generate(model, given, 5, max_batch_size=2))
    check_against_forward(model, given, generate(model, given, 5))


def count_calls(monkeypatch, stack) -> list:
    """A list that grows by one at each call of this stack's `extend` (the
    prelude's or the coda's: one layer call per iteration that needs it)."""
    from act_kernels.layers.transformer import CausalStack

    calls, extend = [], CausalStack.extend

    def counted(self, *args, **kwargs):
        if self is stack:
            calls.append(1)
        return extend(self, *args, **kwargs)

    monkeypatch.setattr(CausalStack, "extend", counted)
    return calls


def test_sequences_ahead_wait_for_the_coda_without_changing_anything(monkeypatch):
    """With no prompt waiting for a slot, the tokens of sequences HOLD_AHEAD or
    more tokens ahead of the slowest one wait for their coda until one of the
    slowest halts (scheduler.hold): the same tokens, steps and iterations,
    with fewer coda calls, under both row modes."""
    import act_kernels.generation.scheduler as scheduler

    model = make(seed=8)
    given = prompts((5, 3, 8, 1, 6, 2), seed=9)
    coda_calls = count_calls(monkeypatch, model.coda)
    for fixed_rows in (False, True):
        runs = {}
        for ahead in (10 ** 9, 2):
            monkeypatch.setattr(scheduler, "HOLD_AHEAD", ahead)
            coda_calls.clear()
            runs[ahead] = generate(model, given, 12, fixed_rows=fixed_rows), len(coda_calls)
        (plain, plain_calls), (held, held_calls) = runs[10 ** 9], runs[2]
        same(plain, held)
        check_against_forward(model, given, held)
        assert held.iterations == plain.iterations
        assert 0 < held_calls < plain_calls, (held_calls, plain_calls)



def test_sequences_ahead_wait_for_their_next_token_under_a_rule_that_reads_the_coda(monkeypatch):
    """Under kl the coda ran at the exit step (the peek, committed there), so
    a held sequence waits for the choice of its next token and that token's
    prelude: the same tokens, steps, scores and iterations, fewer prelude calls."""
    import act_kernels.generation.scheduler as scheduler

    model = make(seed=8)
    given = prompts((5, 3, 8, 1, 6, 2), seed=9)
    prelude_calls = count_calls(monkeypatch, model.prelude)
    runs = {}
    for ahead in (10 ** 9, 2):
        monkeypatch.setattr(scheduler, "HOLD_AHEAD", ahead)
        prelude_calls.clear()
        runs[ahead] = generate(model, given, 12, exit="kl", threshold=1e-2, prefill_steps=2), len(prelude_calls)
    (plain, plain_calls), (held, held_calls) = runs[10 ** 9], runs[2]
    same(plain, held)
    assert len({int(n) for s in held.steps for n in s}) > 2          # tokens exit at different steps
    assert held.iterations == plain.iterations
    assert 0 < held_calls < plain_calls, (held_calls, plain_calls)
