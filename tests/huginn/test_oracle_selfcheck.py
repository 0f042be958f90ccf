"""Self-checks of the Huginn oracle and the tiny-checkpoint writer (no act_kernels)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from huginn.checkpoints import freqs_cis_table, huginn_config, write_huginn_checkpoint
from huginn.oracle import (AUTO_THRESHOLDS, PUBLISHED_CONFIG_KEYS, apply_rope, exit_steps, greedy_decode,
                           huginn_logits, huginn_step_logits, initial_state, last_real, rope_tables)

D = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huginn")
    config, params = write_huginn_checkpoint(folder, seed=0)
    return folder, config, params


def _ids(b, n, seed, v=61):
    return torch.randint(0, v, (b, n), generator=torch.Generator().manual_seed(seed))


def _state(config, b, n, seed):
    return initial_state(config, (b, n, D), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded(ckpt, side):
    _, config, params = ckpt
    lengths, width = [5, 9, 3], 9
    rows = [_ids(1, n, 10 + i)[0] for i, n in enumerate(lengths)]
    starts = [_state(config, 1, n, 20 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.full((3, width), 60)
    mask = torch.zeros(3, width, dtype=torch.bool)
    start = torch.full((3, width, D), 7.0, dtype=torch.float64)   # garbage at padding must not leak
    for i, (row, s0) in enumerate(zip(rows, starts)):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols], start[i, cols] = row, True, s0
    logits, states = huginn_logits(params, config, ids, mask, num_steps=3, initial_state=start)
    for i, (row, s0) in enumerate(zip(rows, starts)):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        alone, alone_states = huginn_logits(params, config, row[None], num_steps=3, initial_state=s0[None])
        torch.testing.assert_close(logits[i, cols], alone[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(states[:, i, cols], alone_states[:, 0], rtol=1e-12, atol=1e-12)
        assert torch.all(logits[i][~mask[i]] == 0) and torch.all(states[:, i][:, ~mask[i]] == 0)
    assert torch.all(last_real(logits, mask) == torch.stack([logits[i, mask[i].nonzero().max()] for i in range(3)]))


def test_causal(ckpt):
    _, config, params = ckpt
    ids = _ids(1, 8, 1)
    s0 = _state(config, 1, 8, 2)
    base, _ = huginn_logits(params, config, ids, initial_state=s0)
    changed_ids, changed_s0 = ids.clone(), s0.clone()
    changed_ids[0, 5] = (ids[0, 5] + 1) % 61
    changed_s0[0, 6] += 1.0
    for new_ids, new_s0 in ((changed_ids, s0), (ids, changed_s0)):
        other, _ = huginn_logits(params, config, new_ids, initial_state=new_s0)
        first = 5 if new_ids is changed_ids else 6
        torch.testing.assert_close(other[:, :first], base[:, :first], rtol=0, atol=0)
        assert (other[:, first:] - base[:, first:]).abs().amax(-1).min() > 1e-6   # every later position moves


def test_step_counts(ckpt):
    _, config, params = ckpt
    ids, s0 = _ids(2, 6, 3), _state(config, 2, 6, 4)
    per_step, states = huginn_step_logits(params, config, ids, num_steps=5, initial_state=s0)
    assert per_step.shape == (6, 2, 6, 64) and states.shape == (6, 2, 6, D)
    torch.testing.assert_close(states[0], s0, rtol=0, atol=0)
    for n in range(6):
        logits, st = huginn_logits(params, config, ids, num_steps=n, initial_state=s0)
        torch.testing.assert_close(logits, per_step[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st, states[: n + 1], rtol=1e-12, atol=1e-12)
    default, st = huginn_logits(params, config, ids, initial_state=s0)      # mean_recurrence = 4
    assert st.shape[0] == config["mean_recurrence"] + 1
    torch.testing.assert_close(default, huginn_step_logits(params, config, ids, num_steps=4, initial_state=s0)[0][4])
    # steps differ and logits are O(1)
    assert all((per_step[n] - per_step[n - 1]).abs().max() > 0.1 for n in range(1, 6))
    assert 0.3 < float(per_step[-1].std()) < 3


def test_zero_and_one_steps(ckpt):
    _, config, params = ckpt
    ids, other = _ids(2, 5, 5), _ids(2, 5, 6)
    zero, st = huginn_logits(params, config, ids, num_steps=0, initial_state=torch.zeros(2, 5, D))
    assert st.shape == (1, 2, 5, D) and torch.all(zero == 0)            # every block sees zeros
    s0 = _state(config, 2, 5, 7)
    a, _ = huginn_logits(params, config, ids, num_steps=0, initial_state=s0)
    b, _ = huginn_logits(params, config, other, num_steps=0, initial_state=s0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)                     # 0 steps: the tokens are never read
    assert a.abs().max() > 0.1
    a1, st1 = huginn_logits(params, config, ids, num_steps=1, initial_state=s0)
    b1, _ = huginn_logits(params, config, other, num_steps=1, initial_state=s0)
    assert (a1 - b1).abs().max() > 0.1 and (a1 - a).abs().max() > 0.1    # one step injects the prelude output
    # the step's state is the core applied to the adapter of cat([state, injected]): swapping halves changes it
    swapped = dict(params)
    w = params["transformer.adapter.weight"]
    swapped["transformer.adapter.weight"] = torch.cat([w[:, D:], w[:, :D]], dim=1)
    _, st_swapped = huginn_logits(swapped, config, ids, num_steps=1, initial_state=s0)
    assert (st_swapped[1] - st1[1]).abs().max() > 0.1
    with pytest.raises(ValueError):
        huginn_logits(params, config, ids, num_steps=-1)


def test_initial_state_rule():
    config = huginn_config()
    g = torch.Generator().manual_seed(0)
    x = initial_state(config, (3, 7, D), g)
    std = config["init_values"]["std"]
    assert config["init_values"]["std"] == pytest.approx(math.sqrt(2 / (5 * D)))
    assert x.dtype == torch.float64 and x.abs().max() <= 3 * std * math.sqrt(D) + 1e-6
    assert 0.8 * std * math.sqrt(D) < x.std() < 1.1 * std * math.sqrt(D)      # truncated at 3 sigma: ~0.986
    torch.testing.assert_close(x, initial_state(config, (3, 7, D), torch.Generator().manual_seed(0)), rtol=0, atol=0)
    for zero_config in (huginn_config(init_values={"std": 0.0}), huginn_config(state_init="zero")):
        assert torch.all(initial_state(zero_config, (2, 3, D), torch.Generator().manual_seed(1)) == 0)
    assert torch.all(initial_state(config, (2, 3, D), g, scale=0.0) == 0)


def test_rope_rotates_adjacent_pairs():
    hd, base = 16, 50000.0
    cos, sin = rope_tables(torch.tensor([[3]]), hd, base)
    x = torch.zeros(1, 1, 1, hd, dtype=torch.float64)
    x[..., 4] = 1.0                                                      # pair i = 2, first component
    y = apply_rope(x, cos, sin)[0, 0, 0]
    angle = 3 * base ** (-4 / hd)
    expected = torch.zeros(hd, dtype=torch.float64)
    expected[4], expected[5] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(y, expected)
    # the checkpoint's float32 freqs_cis holds the same table
    table = freqs_cis_table(hd, 10, base)
    cos, sin = rope_tables(torch.arange(10)[None], hd, base)
    torch.testing.assert_close(table[0, :, 0, :, 0].double(), cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(table[0, :, 0, :, 1].double(), sin[0], rtol=0, atol=1e-6)


def _one_hot_logits(tokens, v=8, scale=5.0):
    """(N+1, 1, v) logits, row n peaked at tokens[n]."""
    out = torch.zeros(len(tokens), 1, v, dtype=torch.float64)
    for n, t in enumerate(tokens):
        out[n, 0, t] = scale
    return out


def test_exit_steps_argmax_and_min_steps():
    states = torch.randn(9, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits = _one_hot_logits([0, 1, 2, 2, 2, 3, 3, 3, 3])          # argmax per step 1..8: 1 2 2 2 3 3 3 3
    # counts at steps 1..8 with every step checked: 0 0 1 2 0 1 2 3
    for thr, expected in ((1, 3), (2, 4), (3, 8), (4, 8)):
        assert int(exit_steps(logits, states, "argmax-stability", thr)[0]) == expected
    # min_steps=3: first check after 4 steps (memory starts at -1): counts at 4..8: 0 0 1 2 3
    assert int(exit_steps(logits, states, "argmax-stability", 1, min_steps=3)[0]) == 6
    assert int(exit_steps(logits, states, "argmax-stability", 3, min_steps=3)[0]) == 8
    # check every 2nd step from step 1: argmax at steps 1, 3, 5, 7 = 1 2 3 3 -> counts 0 0 0 1
    assert int(exit_steps(logits, states, "argmax-stability", 1, check_every=2)[0]) == 7
    # the period counts from min_steps: min_steps=1, every 2nd -> steps 2, 4, 6, 8: argmax 2 2 3 3 -> counts 0 1
    assert int(exit_steps(logits, states, "argmax-stability", 1, min_steps=1, check_every=2)[0]) == 4
    steps, values = exit_steps(logits, states, "argmax-stability", 9, min_steps=2, return_values=True)
    assert int(steps[0]) == 8 and torch.isnan(values[:3]).all() and values[3:, 0].tolist() == [0, 1, 0, 1, 2, 3]


def test_exit_steps_kl_entropy_latent():
    v = 8
    logits = _one_hot_logits([0, 1, 1, 1, 2, 2], v=v)
    states = torch.randn(6, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # argmax per step 1..5: 1 1 1 2 2. kl: step 1 vs the uniform start is large, step 2 repeats step 1 (KL 0)
    steps, values = exit_steps(logits, states[:, :1], "kl", "auto", return_values=True)
    p1 = torch.softmax(logits[1, 0], -1)
    assert values[1, 0].item() == pytest.approx(float((torch.full((v,), 1 / v) * (math.log(1 / v) - p1.log())).sum()))
    assert int(steps[0]) == 2 and values[2, 0] == 0 and not torch.isnan(values[1:]).any()
    # min_steps skips steps AND memory updates: first check (step 4) compares with the uniform start
    steps, skipped = exit_steps(logits, states[:, :1], "kl", "auto", min_steps=3, return_values=True)
    assert skipped[4, 0].item() == pytest.approx(values[1, 0].item()) and int(steps[0]) == 5
    assert torch.isnan(skipped[:4]).all() and skipped[5, 0] == 0
    # entropy-diff: the start is H = 100, so step 1 never exits; H2 = H1
    steps, values = exit_steps(logits, states[:, :1], "entropy-diff", "auto", return_values=True)
    assert int(steps[0]) == 2 and values[2, 0] == 0 and values[1, 0] > 90
    # latent-diff: make row 0's states stop moving after step 2, row 1 never
    st = states.clone()
    st[3:, 0] = st[2, 0]
    both = torch.cat([logits, logits], dim=1)
    got = exit_steps(both, st, "latent-diff", AUTO_THRESHOLDS["latent-diff"])
    assert got.tolist() == [3, 5]
    rel = ((st[1, 1] - st[0, 1]).norm(dim=-1) / st[1, 1].norm(dim=-1)).mean()
    assert exit_steps(both, st, "latent-diff", 0.0, return_values=True)[1][1, 1].item() == pytest.approx(rel.item())
    with pytest.raises(ValueError):
        exit_steps(logits, states[:, :1], "nope")


def test_greedy_decode(ckpt):
    _, config, params = ckpt
    prompt = _ids(1, 5, 9)[0]
    out = greedy_decode(params, config, prompt, 3, num_steps=2)
    assert out.shape == (8,) and torch.equal(out[:5], prompt)
    for k in range(3):
        logits, _ = huginn_logits(params, config, out[None, : 5 + k], num_steps=2)
        assert int(out[5 + k]) == int(logits[0, -1].argmax())
    # random initial states: each position's state is drawn once and kept
    g = torch.Generator().manual_seed(3)
    out = greedy_decode(params, config, prompt, 2, num_steps=2, generator=torch.Generator().manual_seed(3))
    s0 = initial_state(config, (1, 5, D), g)
    logits, _ = huginn_logits(params, config, prompt[None], num_steps=2, initial_state=s0)
    assert int(out[5]) == int(logits[0, -1].argmax())
    s1 = torch.cat([s0, initial_state(config, (1, 1, D), g)], dim=1)
    logits, _ = huginn_logits(params, config, out[None, :6], num_steps=2, initial_state=s1)
    assert int(out[6]) == int(logits[0, -1].argmax())


@pytest.mark.parametrize("shards", [1, 4])
def test_checkpoint_round_trip(tmp_path, shards):
    config, params = write_huginn_checkpoint(tmp_path, seed=1, shards=shards, dtype=torch.bfloat16)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == config and tuple(written) == PUBLISHED_CONFIG_KEYS
    assert written["model_type"] == "huginn_raven" and written["architectures"] == ["RavenForCausalLM"]
    assert written["torch_dtype"] == "bfloat16" and written["vocab_size"] == 61 and written["padded_vocab_size"] == 64
    assert written["n_layers"] == 4 and written["head_dim"] == 16 and written["effective_expected_depth"] == 1 + 1 + 2 * 4
    for remote in written["auto_map"].values():
        assert not (tmp_path / (remote.split(".")[0] + ".py")).exists()
    if shards == 1:
        assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
        loaded = load_file(tmp_path / "model.safetensors")
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        loaded = {}
        for file in files:
            part = load_file(tmp_path / file)
            assert all(index["weight_map"][name] == file for name in part)
            loaded.update(part)
        assert set(index["weight_map"]) == set(loaded) == set(params)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    assert set(loaded) == set(params)
    for name, tensor in params.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert loaded["freqs_cis"].dtype == torch.float32 and loaded["freqs_cis"].shape == (1, 128, 1, 8, 2)
    assert loaded["transformer.wte.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["lm_head.weight"], loaded["transformer.wte.weight"])       # tied: stored twice
    assert loaded["transformer.wte.weight"].shape == (64, D)
    assert loaded["transformer.adapter.weight"].shape == (D, 2 * D)
    assert loaded["transformer.core_block.1.attn.qk_bias"].shape == (2, 1, 4, 16)
    assert loaded["transformer.coda.0.mlp.fc.weight"].shape == (2 * 96, D)
    assert loaded["transformer.prelude.0.mlp.proj.weight"].shape == (D, 96)
    n_block = sum(1 for n in loaded if n.startswith("transformer.core_block.0."))
    assert n_block == 9 and len(loaded) == 4 * 9 + 5
    # the oracle runs on the loaded tensors as on the returned ones
    ids = _ids(1, 4, 2)
    torch.testing.assert_close(huginn_logits(loaded, config, ids)[0], huginn_logits(params, config, ids)[0])
    with pytest.raises(KeyError):
        write_huginn_checkpoint(tmp_path / "x", not_a_key=1)
