"""Causal incremental evaluation on ACTTransformerEncoder (design §14):
`extend` over a ragged key/value cache gives, for any split of the
sequences into chunks, the outputs, steps and ponder costs of one causal
forward over the whole sequences; the cache keeps N + 1 rows per token at
the block's first layer and N at every other layer; bad input is refused
before anything runs."""
import random

import pytest
import torch
from torch import nn

import act_kernels as ak
from act_kernels.layers.kinds import EncoderLayerRows
from helpers import DEVICE

LENGTHS = [7, 4, 6]


def make(layers=1, *, dtype=torch.float64, max_steps=6, backend="reference", seed=0, norm_first=True):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    block = layer if layers == 1 else nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    enc = ak.nn.ACTTransformerEncoder(block, max_steps=max_steps, halting_bias_init=-1.0, backend=backend)
    enc = enc.to(DEVICE, dtype)
    with torch.no_grad():
        enc.halting.weight.mul_(4.0)
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc.eval()


def sequences(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, generator=g).to(DEVICE, dtype) for n in LENGTHS]


def whole(enc, seqs):
    """One causal forward over the whole sequences, packed."""
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    with torch.no_grad():
        y = enc.forward_packed(torch.cat(seqs), cu, is_causal=True)
    return y.split([len(s) for s in seqs]), enc.steps.split([len(s) for s in seqs]), \
        enc.ponder_cost.split([len(s) for s in seqs])


def incremental(enc, seqs, plan):
    """Runs `plan`: a list of calls, each a dict {sequence: number of new tokens}."""
    cache = enc.new_cache(len(seqs))
    done = [0] * len(seqs)
    outs = [[] for _ in seqs]
    steps = [[] for _ in seqs]
    costs = [[] for _ in seqs]
    for call in plan:
        ids = sorted(call)
        chunks = [seqs[s][done[s]:done[s] + call[s]] for s in ids]
        offsets = [0]
        for c in chunks:
            offsets.append(offsets[-1] + len(c))
        y = enc.extend(cache, torch.cat(chunks), offsets, ids)
        for i, s in enumerate(ids):
            outs[s].append(y[offsets[i]:offsets[i + 1]])
            steps[s].append(enc.steps[offsets[i]:offsets[i + 1]])
            costs[s].append(enc.ponder_cost[offsets[i]:offsets[i + 1]])
            done[s] += call[s]
    assert done == [len(s) for s in seqs]
    return cache, [torch.cat(o) for o in outs], [torch.cat(t) for t in steps], [torch.cat(c) for c in costs]


def plans():
    prefill = [{0: 7, 1: 4, 2: 6}]
    token_by_token = [{s: 1 for s in range(3) if t < LENGTHS[s]} for t in range(max(LENGTHS))]
    staggered = [{0: 3}, {1: 2, 2: 4}, {0: 4, 1: 1}, {1: 1, 2: 2}]        # subsets, mixed chunk sizes
    rng = random.Random(0)
    randomized, left = [], list(LENGTHS)
    while any(left):
        call = {s: rng.randint(1, left[s]) for s in range(3) if left[s] and rng.random() < 0.7}
        for s, n in call.items():
            left[s] -= n
        if call:
            randomized.append(call)
    prompt_then_decode = [{0: 5, 1: 2, 2: 3}] + [{s: 1 for s in range(3) if t < LENGTHS[s] - (5, 2, 3)[s]}
                                                 for t in range(3)]
    return dict(prefill=prefill, token_by_token=token_by_token, staggered=staggered, randomized=randomized,
                prompt_then_decode=prompt_then_decode)


@pytest.mark.parametrize("layers", [1, 2], ids=["layer", "block2"])
@pytest.mark.parametrize("plan", list(plans()))
def test_any_chunking_equals_the_causal_forward(layers, plan):
    enc = make(layers)
    seqs = sequences()
    y_w, steps_w, cost_w = whole(enc, seqs)
    _, y_i, steps_i, cost_i = incremental(enc, seqs, plans()[plan])
    all_steps = torch.cat(steps_w)
    assert len(set(all_steps.tolist())) > 2          # tokens halt at several different steps
    for s in range(3):
        assert torch.equal(steps_i[s], steps_w[s]), (s, steps_i[s], steps_w[s])
        torch.testing.assert_close(y_i[s], y_w[s], atol=1e-10, rtol=0)
        torch.testing.assert_close(cost_i[s], cost_w[s], atol=1e-10, rtol=0)


def test_cache_keeps_n_plus_one_rows_at_the_first_layer_and_n_at_the_others():
    enc = make(3)
    seqs = sequences(seed=4)
    cache, _, steps, _ = incremental(enc, seqs, plans()["staggered"])
    total_n = int(torch.cat(steps).sum())
    tokens = sum(LENGTHS)
    assert cache.rows() == [total_n + tokens, total_n, total_n]
    assert total_n < tokens * enc.max_steps                            # never max_steps rows per token
    for s in range(3):
        assert torch.equal(cache.sequence_steps(s), steps[s])


def test_extend_on_triton_under_the_interpreter():
    pytest.importorskip("triton")
    ref = make(2, dtype=torch.float32)
    enc = make(2, dtype=torch.float32, backend="triton")
    seqs = sequences(torch.float32)
    y_w, steps_w, _ = whole(ref, seqs)
    _, y_i, steps_i, _ = incremental(enc, seqs, plans()["prompt_then_decode"])
    for s in range(3):
        assert torch.equal(steps_i[s], steps_w[s])
        torch.testing.assert_close(y_i[s], y_w[s], atol=2e-5, rtol=2e-5)


def test_bad_extend_calls_are_refused_before_anything_runs(monkeypatch):
    enc, other = make(), make(seed=1)
    cache = enc.new_cache(2)
    x = torch.randn(3, 16, dtype=torch.float64, device=DEVICE)
    ran = []
    monkeypatch.setattr(EncoderLayerRows, "forward", lambda *a: ran.append(1))
    cases = [
        (dict(cache=other.new_cache(2)), ValueError, "belongs to another encoder"),
        (dict(is_causal=False), ValueError, "causal evaluation only"),
        (dict(x=x.float()), TypeError, "input has dtype torch.float32"),
        (dict(sequences=[0, 2]), ValueError, r"ints in \[0, 2\)"),
        (dict(sequences=[1, 1]), ValueError, "once per call"),
        (dict(cu_seqlens=[0, 3, 3]), ValueError, "at least one new token"),
        (dict(cu_seqlens=[0, 1, 2]), ValueError, "add up to 2"),
        (dict(cache="cache"), TypeError, "ACTCache"),
    ]
    for change, exc, match in cases:
        args = dict(cache=cache, x=x, cu_seqlens=[0, 1, 3], sequences=[0, 1], is_causal=True)
        args.update(change)
        with pytest.raises(exc, match=match):
            enc.extend(args.pop("cache"), args.pop("x"), args.pop("cu_seqlens"), args.pop("sequences"), **args)
    assert not ran and cache.rows() == [0] and cache.lengths == [0, 0]
    with pytest.raises(ValueError, match="batch_size"):
        enc.new_cache(0)


def test_plain_stack_decode_over_the_tables_equals_the_causal_forward():
    """A plain stack's decode call (one new token per listed sequence) reads the
    cache's per-sequence tables (`SlotLayout`): token by token past the tables'
    first widths (16, 32), on changing subsets of the sequences, and after a
    slot is reset for a new sequence, it gives the causal forward's outputs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    stack = ak.nn.CausalStack(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                              backend="reference").to(DEVICE, torch.float64).eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randn(n, 16, generator=g, dtype=torch.float64).to(DEVICE) for n in (40, 23, 35)]
    fresh = torch.randn(9, 16, generator=g, dtype=torch.float64).to(DEVICE)

    def forward(s):
        with torch.no_grad():
            return stack.forward_packed(s, torch.tensor([0, len(s)], dtype=torch.int32, device=DEVICE), len(s))

    cache = stack.new_cache(3)
    outs, done = [[] for _ in seqs], [0, 0, 0]
    for t in range(40):
        ids = [s for s in range(3) if done[s] < len(seqs[s]) and (t % 3 != s or t < 4)]
        x = torch.cat([seqs[s][done[s]:done[s] + 1] for s in ids])
        y = stack.extend(cache, x, list(range(len(ids) + 1)), ids)
        for i, s in enumerate(ids):
            outs[s].append(y[i:i + 1])
            done[s] += 1
    for s in range(3):
        while done[s] < len(seqs[s]):
            outs[s].append(stack.extend(cache, seqs[s][done[s]:done[s] + 1], [0, 1], [s]))
            done[s] += 1
        torch.testing.assert_close(torch.cat(outs[s]), forward(seqs[s]), atol=1e-10, rtol=0)
    cache.reset(1)
    again = torch.cat([stack.extend(cache, fresh[i:i + 1], [0, 1], [1]) for i in range(len(fresh))])
    torch.testing.assert_close(again, forward(fresh), atol=1e-10, rtol=0)


def test_plain_stack_decode_without_commit_reads_the_cache_and_leaves_it():
    """extend(..., commit=False) (what an exit rule that reads the coda peeks
    at): the outputs a committing call gives, from scratch rows past the
    cache's; the cache's lengths, rows and later outputs are as if it never ran."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    stack = ak.nn.CausalStack(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                              backend="reference").to(DEVICE, torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randn(n, 16, generator=g, dtype=torch.float64).to(DEVICE) for n in (21, 18)]
    cache = stack.new_cache(2)
    stack.extend(cache, torch.cat([seqs[0][:17], seqs[1][:14]]), [0, 17, 31], [0, 1])
    for t in range(4):
        x = torch.stack([seqs[0][17 + t], seqs[1][14 + t]])
        lengths, rows = list(cache.lengths), cache.rows()
        peeked = stack.extend(cache, torch.randn(2, 16, generator=g, dtype=torch.float64).to(DEVICE), [0, 1, 2],
                              [0, 1], commit=False)
        assert peeked.shape == (2, 16) and cache.lengths == lengths and cache.rows() == rows
        again = stack.extend(cache, x, [0, 1, 2], [0, 1], commit=False)
        y = stack.extend(cache, x, [0, 1, 2], [0, 1])
        torch.testing.assert_close(again, y, atol=1e-12, rtol=0)
    for s, n in ((0, 21), (1, 18)):
        with torch.no_grad():
            want = stack.forward_packed(seqs[s][:n], torch.tensor([0, n], dtype=torch.int32, device=DEVICE), n)
        torch.testing.assert_close(y[s], want[-1], atol=1e-10, rtol=0)


def test_commit_peeked_equals_a_committing_call_and_is_refused_after_a_change():
    """CausalStack.commit_peeked takes a subset of the last uncommitted decode
    call's rows into the cache: later calls then give the causal forward's
    outputs, as after a committing call; once anything was committed since
    the peek, or with no peek, it is refused."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    stack = ak.nn.CausalStack(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                              backend="reference").to(DEVICE, torch.float64).eval()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randn(20, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3)]
    cache = stack.new_cache(3)
    stack.extend(cache, torch.cat([s[:15] for s in seqs]), [0, 15, 30, 45], [0, 1, 2])
    with pytest.raises(RuntimeError, match="commit_peeked"):
        stack.commit_peeked(cache, [0], torch.tensor([0], device=DEVICE))
    done = [15, 15, 15]
    while min(done) < 18:
        x = torch.stack([seqs[s][done[s]] for s in range(3)])
        stack.extend(cache, x, [0, 1, 2, 3], [0, 1, 2], commit=False)
        stack.commit_peeked(cache, [0, 2], torch.tensor([0, 2], device=DEVICE))    # sequence 1 waits
        done[0] += 1
        done[2] += 1
        stack.extend(cache, seqs[1][done[1]:done[1] + 1], [0, 1], [1])
        done[1] += 1
    stack.extend(cache, torch.stack([seqs[0][18], seqs[1][18]]), [0, 1, 2], [0, 1], commit=False)
    stack.extend(cache, seqs[2][18:19], [0, 1], [2])                                # a commit since the peek
    with pytest.raises(RuntimeError, match="has changed"):
        stack.commit_peeked(cache, [0], torch.tensor([0], device=DEVICE))
    last = stack.extend(cache, torch.stack([seqs[0][18], seqs[1][18]]), [0, 1, 2], [0, 1])
    for s in (0, 1):
        with torch.no_grad():
            want = stack.forward_packed(seqs[s][:19], torch.tensor([0, 19], dtype=torch.int32, device=DEVICE), 19)
        torch.testing.assert_close(last[s], want[-1], atol=1e-10, rtol=0)
