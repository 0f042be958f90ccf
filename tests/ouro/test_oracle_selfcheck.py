"""Self-checks of the Ouro float64 oracle (tests/ouro/oracle.py) and of the tiny-checkpoint
writer (tests/ouro/checkpoints.py). Neither imports act_kernels."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from .checkpoints import PUBLISHED_KEYS, write_ouro_checkpoint
from .oracle import greedy_decode, layer_names, ouro_logits, ouro_loops, rms_norm, rope_tables

F64 = torch.float64


def load_checkpoint(folder):
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    params = {}
    for file in files:
        params.update(load_file(os.path.join(folder, file)))
    return config, params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ouro_tiny")
    write_ouro_checkpoint(folder, seed=0)
    return load_checkpoint(folder)   # what a loader sees: the files, not the writer's return values


def ids_of(seed, *shape, vocab=61):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


# (a) padding ------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_give_their_unpadded_results(tiny, side):
    config, params = tiny
    lengths, L = [7, 4, 10], 10
    rows = [ids_of(10 + i, n) for i, n in enumerate(lengths)]
    ids = ids_of(99, len(rows), L)             # padding ids are arbitrary tokens: they must not leak
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = row, 1
    batch = ouro_loops(params, config, ids, mask)
    logits, exits = ouro_logits(params, config, ids, mask, threshold=0.6)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        alone = ouro_loops(params, config, row[None])
        alone_logits, alone_exits = ouro_logits(params, config, row[None], threshold=0.6)
        for got, want in zip(batch, alone):
            torch.testing.assert_close(got[:, b, sl], want[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logits[b, sl], alone_logits[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(exits[b, sl], alone_exits[0])
        pad = mask[b] == 0
        assert (batch.logits[:, b, pad] == 0).all() and (logits[b, pad] == 0).all()
        assert (batch.pdf[:, b, pad] == 0).all() and (batch.gate[:, b, pad] == 0).all()
        assert (exits[b, pad] == -1).all()


# (b) causality ----------------------------------------------------------------------------

def test_a_later_token_does_not_change_earlier_results(tiny):
    config, params = tiny
    ids = ids_of(3, 1, 11)
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] % 60) + 1       # another token
    a, b = ouro_loops(params, config, ids), ouro_loops(params, config, changed)
    for x, y in zip(a, b):
        assert torch.equal(x[:, :, :6], y[:, :, :6])
    assert (a.logits[:, 0, 6:] - b.logits[:, 0, 6:]).abs().amax(-1).min() > 1e-6   # every later position moved


# (c) exit pdf and exit rule ---------------------------------------------------------------

def test_exit_pdf_and_exit_rule(tiny):
    config, params = tiny
    ids = ids_of(4, 3, 12)
    out = ouro_loops(params, config, ids)
    T = config["total_ut_steps"]
    assert out.hidden.shape == (T, 3, 12, config["hidden_size"]) and out.logits.shape == (T, 3, 12, config["vocab_size"])
    assert ((out.gate > 0) & (out.gate < 1)).all()
    assert (out.pdf >= 0).all()
    torch.testing.assert_close(out.pdf.sum(0), torch.ones(3, 12, dtype=F64), rtol=0, atol=1e-14)
    # p_t = lambda_t prod_{j<t}(1 - lambda_j) for t < T-1
    survive = torch.cumprod(1 - out.gate, 0)
    torch.testing.assert_close(out.pdf[0], out.gate[0], rtol=0, atol=0)
    torch.testing.assert_close(out.pdf[1:T - 1], out.gate[1:T - 1] * survive[:T - 2], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(out.pdf[T - 1], survive[T - 2], rtol=1e-14, atol=1e-15)

    cum = out.pdf.cumsum(0)
    previous = None
    for threshold in (1.0, 0.95, 0.8, 0.6, 0.5, 0.3, 0.1, 0.0):
        logits, exits = ouro_logits(params, config, ids, threshold=threshold)
        if threshold == 1.0:
            assert (exits == T - 1).all()            # the published threshold: the last loop
        if previous is not None:
            assert (exits <= previous).all()         # a lower threshold never exits later
        previous = exits
        got = cum.gather(0, exits[None])[0]
        before = torch.where(exits > 0, cum.gather(0, (exits - 1).clamp_min(0)[None])[0], torch.zeros((), dtype=F64))
        assert ((got >= threshold) | (exits == T - 1)).all()
        assert (before < threshold).all() or threshold == 0.0
        want = out.logits.gather(0, exits[None, :, :, None].expand(1, 3, 12, config["vocab_size"]))[0]
        assert torch.equal(logits, want)
    assert (previous == 0).all()                     # threshold 0: the first loop
    _, mid = ouro_logits(params, config, ids, threshold=0.6)
    assert len(mid.unique()) >= 3, "the tiny checkpoint's gate should spread the exits"
    last, exits = ouro_logits(params, config, ids, threshold=None)
    assert (exits == T - 1).all() and torch.equal(last, out.logits[-1])


def test_one_loop(tmp_path):
    config, params = write_ouro_checkpoint(tmp_path, seed=2, total_ut_steps=1)
    ids = ids_of(5, 2, 9)
    out = ouro_loops(params, config, ids)
    assert out.pdf.shape == (1, 2, 9) and (out.pdf == 1).all()
    for threshold in (1.0, 0.5, 0.0):
        logits, exits = ouro_logits(params, config, ids, threshold=threshold)
        assert (exits == 0).all() and torch.equal(logits, out.logits[0])


def test_loops_reuse_the_normed_state(tiny):
    """Running the model for T-1 loops gives the first T-1 loops of the T-loop run (the loop
    input is the previous loop's normed output, the weights are shared)."""
    config, params = tiny
    ids = ids_of(6, 2, 8)
    full = ouro_loops(params, config, ids)
    short = ouro_loops(params, {**config, "total_ut_steps": 2}, ids)
    assert torch.equal(short.hidden, full.hidden[:2]) and torch.equal(short.gate, full.gate[:2])
    torch.testing.assert_close(short.pdf[1], 1 - full.gate[0], rtol=0, atol=1e-15)   # last loop takes the rest


# an independent forward from transformers' Llama building blocks ---------------------------

def test_against_transformers_building_blocks(tiny):
    """The loop rebuilt from transformers' LlamaAttention (RoPE rotate_half, repeat_kv GQA, causal
    SDPA), LlamaRotaryEmbedding and LlamaMLP, and torch.nn.RMSNorm, in the sandwich order of
    modeling_ouro.py; transformers computes RoPE angles in float32, hence the tolerance."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    config, params = tiny
    D, eps = config["hidden_size"], config["rms_norm_eps"]
    lc = transformers.LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=D, intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], head_dim=config["head_dim"], rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        max_position_embeddings=config["max_position_embeddings"], attention_bias=False, mlp_bias=False)
    lc._attn_implementation = "sdpa"
    p = {k: v.to(F64) for k, v in params.items()}

    def norm(name):
        m = torch.nn.RMSNorm(D, eps=eps, dtype=F64)
        m.weight.data.copy_(p[name])
        return m

    layers = []
    for i in range(config["num_hidden_layers"]):
        n = layer_names(i)
        attn, mlp = ml.LlamaAttention(lc, i).to(F64).eval(), ml.LlamaMLP(lc).to(F64)
        for mod, key in ((attn.q_proj, "q"), (attn.k_proj, "k"), (attn.v_proj, "v"), (attn.o_proj, "o"),
                         (mlp.gate_proj, "gate"), (mlp.up_proj, "up"), (mlp.down_proj, "down")):
            mod.weight.data.copy_(p[n[key]])
        layers.append((attn, mlp, norm(n["in1"]), norm(n["in2"]), norm(n["post1"]), norm(n["post2"])))
    final = norm("model.norm.weight")
    rope = ml.LlamaRotaryEmbedding(lc)

    ids = ids_of(7, 2, 13)
    x = p["model.embed_tokens.weight"][ids]
    position_embeddings = rope(x, torch.arange(13)[None].expand(2, 13))
    want_logits, want_gate = [], []
    with torch.no_grad():
        for _ in range(config["total_ut_steps"]):
            for attn, mlp, in1, in2, post1, post2 in layers:
                x = x + in2(attn(in1(x), position_embeddings=position_embeddings, attention_mask=None)[0])
                x = x + post2(mlp(post1(x)))
            x = final(x)
            want_logits.append(x @ p["lm_head.weight"].T)
            want_gate.append(torch.sigmoid(x @ p["model.early_exit_gate.weight"].T + p["model.early_exit_gate.bias"])[..., 0])
    out = ouro_loops(params, config, ids)
    torch.testing.assert_close(out.logits, torch.stack(want_logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.gate, torch.stack(want_gate), rtol=1e-5, atol=1e-6)

    # the oracle's tables and norm against transformers' / torch's at their own precision
    cos, sin = rope_tables(torch.arange(13)[None], config["head_dim"], config["rope_theta"])
    torch.testing.assert_close(cos, position_embeddings[0][:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, position_embeddings[1][:1], rtol=0, atol=1e-6)
    v = torch.randn(5, D, dtype=F64)
    w = p["model.norm.weight"]
    torch.testing.assert_close(rms_norm(v, w, eps), torch.nn.functional.rms_norm(v, (D,), w, eps), rtol=1e-14, atol=1e-14)


# (d) greedy decoding ----------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_greedy_decode(tiny, threshold):
    config, params = tiny
    prompt = ids_of(8, 6)
    tokens, exits = greedy_decode(params, config, prompt, 4, threshold, return_exits=True)
    assert tokens.shape == (4,) and exits.shape == (4,)
    seq = prompt
    for tok, ex in zip(tokens, exits):
        logits, idx = ouro_logits(params, config, seq[None], threshold=threshold)
        assert int(tok) == int(logits[0, -1].argmax()) and int(ex) == int(idx[0, -1])
        seq = torch.cat([seq, tok[None]])
    assert torch.equal(greedy_decode(params, config, prompt, 4, threshold), tokens)
    stop = int(tokens[1])
    first = tokens.tolist().index(stop)   # decoding stops after the first eos
    assert torch.equal(greedy_decode(params, config, prompt, 4, threshold, eos_token_id=stop), tokens[:first + 1])


# (e) the checkpoint writer ----------------------------------------------------------------

def expected_names(config):
    names = {"model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    for i in range(config["num_hidden_layers"]):
        names |= set(layer_names(i).values())
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    return names


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trip(tmp_path, shards, dtype):
    config, params = write_ouro_checkpoint(tmp_path, seed=1, dtype=dtype, shards=shards)
    files = sorted(os.listdir(tmp_path))
    assert "configuration_ouro.py" not in files and "modeling_ouro.py" not in files
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written == config and tuple(written) == PUBLISHED_KEYS
    assert written["model_type"] == "ouro" and written["architectures"] == ["OuroForCausalLM"]
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_ouro.OuroForCausalLM"
    assert written["torch_dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert written["layer_types"] == ["full_attention"] * written["num_hidden_layers"]
    assert set(params) == expected_names(config)
    assert all(t.dtype == dtype for t in params.values())
    assert params["model.early_exit_gate.weight"].shape == (1, config["hidden_size"])
    assert params["model.early_exit_gate.bias"].shape == (1,)
    if shards == 1:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        with open(tmp_path / "model.safetensors.index.json") as f:
            index = json.load(f)
        assert set(index) == {"metadata", "weight_map"}
        assert set(index["weight_map"]) == set(params)
        shard_files = sorted(set(index["weight_map"].values()))
        assert shard_files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in params.values())
        for file in shard_files:   # each shard holds exactly what the index says
            assert set(load_file(tmp_path / file)) == {n for n, f in index["weight_map"].items() if f == file}
    _, loaded = load_checkpoint(tmp_path)
    assert set(loaded) == set(params)
    for name, t in params.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t), name


def test_checkpoint_overrides_and_tied_head(tmp_path):
    config, params = write_ouro_checkpoint(tmp_path, seed=3, num_hidden_layers=3, tie_word_embeddings=True)
    assert config["layer_types"] == ["full_attention"] * 3 and config["max_window_layers"] == 3
    assert "lm_head.weight" not in params and set(params) == expected_names(config)
    ids = ids_of(9, 1, 5)
    out = ouro_loops(params, config, ids)
    h = out.hidden[-1]
    torch.testing.assert_close(out.logits[-1], h @ params["model.embed_tokens.weight"].to(F64).T, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        write_ouro_checkpoint(tmp_path / "bad", hidden_dim=8)
    a = write_ouro_checkpoint(tmp_path / "a", seed=5)[1]
    b = write_ouro_checkpoint(tmp_path / "b", seed=5)[1]
    c = write_ouro_checkpoint(tmp_path / "c", seed=6)[1]
    assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
