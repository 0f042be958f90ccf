"""LoopedCausalLM over transformers' own decoder layers (design §15): exact
against the model itself when every token halts at step 1, generation equal
to the parallel forward, the model unchanged by wrapping, refusals, save and
load."""
import pytest
import torch

from tiny import MODELS, VOCAB, batch, llama, positions, qwen3, vary

transformers = pytest.importorskip("transformers")
from act_kernels.hf import LoopedCausalLM  # noqa: E402


def own_logits(model, ids, mask):
    return model(ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_halting_at_step_one_is_the_model_itself(arch, left, backend):
    model = MODELS[arch]()
    ids, mask = batch(seed=1, left=left)
    looped = LoopedCausalLM(model, (1, 3), max_steps=4, halting_bias_init=30.0, backend=backend)
    out = looped(ids, mask, labels=ids)
    real = mask.bool()
    ref = own_logits(model, ids, mask)
    torch.testing.assert_close(out.logits[real], ref[real], atol=1e-12, rtol=1e-10)
    assert torch.equal(out.steps, real.long())
    assert torch.equal(out.logits[~real], torch.zeros_like(out.logits[~real]))
    assert torch.equal(out.ponder_cost[~real], torch.zeros_like(out.ponder_cost[~real]))
    labels = ids.masked_fill(~real, -100)
    # transformers' own loss on the model's logits (0 at padding, where no row exists: a left-padded
    # row's last padding position would otherwise "predict" its first real token)
    expect = model.loss_function(ref.masked_fill(~real[..., None], 0), labels, vocab_size=VOCAB)
    got = looped(ids, mask, labels=labels).loss
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_generate_at_step_one_is_transformers_generate(arch):
    model = MODELS[arch]()
    ids, mask = batch(seed=2, left=True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    looped = LoopedCausalLM(model, (2, 4), max_steps=3, halting_bias_init=30.0)
    got = looped.generate(ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref)
    assert torch.equal(got.steps[:, :ids.shape[1]], mask)
    assert bool((got.steps[:, ids.shape[1]:] == 1).all())


def test_the_model_keeps_working_as_itself():
    model = llama()
    ids, mask = batch(seed=3)
    before = model(ids, attention_mask=mask).logits
    gen_before = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    implementation = model.config._attn_implementation
    looped = LoopedCausalLM(model, (1, 3), max_steps=4, halting_bias_init=0.0)
    looped(ids, mask).logits.sum().backward()
    looped.generate(ids, mask, max_new_tokens=3, return_dict_in_generate=True)
    model.zero_grad()
    assert model.config._attn_implementation == implementation
    assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       gen_before)
    assert looped.model is model
    # the model's own parameters, never copied: one set, plus the halting unit
    assert {id(p) for p in looped.parameters()} == {id(p) for p in model.parameters()} | {
        id(p) for p in looped.halting.parameters()}
    assert isinstance(looped.halting, torch.nn.Linear) and looped.halting.weight.shape == (1, 32)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_work_is_sum_n_rows_and_pools_keep_kv_heads(arch, monkeypatch):
    """Every block layer's MLP runs Σ N rows; attention runs Σ N query rows
    and, at the block's first layer, projects the keys and values of each
    token that has just halted (once). The layers run the lean math
    (layers/kinds/lean_decoder.py): rows are counted at the output and down
    products it calls and at its key_values."""
    from act_kernels.layers.kinds import LeanDecoderRows, lean_decoder
    model = MODELS[arch]()
    ids, mask = batch(seed=4)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=6))
    index = {id(layer.self_attn): i for i, layer in enumerate(model.model.layers)}
    mlp_rows, query_rows, kv_only_rows = ({i: 0 for i in range(4)} for _ in range(3))
    # in inference the lean math calls its products with the layers' weights, not their modules
    tables = {}
    for i, layer in enumerate(model.model.layers):
        tables[id(layer.mlp.down_proj.weight)] = (mlp_rows, i)
        tables[id(layer.self_attn.o_proj.weight)] = (query_rows, i)
    linear = lean_decoder.inference_linear

    def product(x, weight, bias):
        if id(weight) in tables:
            table, i = tables[id(weight)]
            table[i] += x.shape[0]
        return linear(x, weight, bias)

    monkeypatch.setattr(lean_decoder, "inference_linear", product)
    key_values = LeanDecoderRows.key_values

    def counted(rows, x, at=None):
        i = index[id(rows.p.attn)]
        kv_only_rows[i] += x.shape[0]
        return key_values(rows, x, at)

    monkeypatch.setattr(LeanDecoderRows, "key_values", counted)
    with torch.no_grad():
        out = looped(ids, mask)
    real = mask.bool()
    tokens, sum_n = int(real.sum()), int(out.steps.sum())
    assert out.steps[real].min() < out.steps[real].max()     # the test needs pondering that varies
    assert mlp_rows == {0: tokens, 1: sum_n, 2: sum_n, 3: tokens}
    assert query_rows == {0: tokens, 1: sum_n, 2: sum_n, 3: tokens}
    halted_before_last = int((out.steps[real] < int(out.steps.max())).sum())
    assert kv_only_rows == {0: 0, 1: halted_before_last, 2: 0, 3: 0}
    cache = looped.new_cache(2)
    assert cache[1].layers[0].k.shape[1:] == (2, 8)          # Hkv = 2 heads of 8, not 4


def test_greedy_generate_equals_the_forward_argmax_with_equal_steps():
    model = llama(seed=5)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=5), seed=5)
    ids, mask = batch(seed=5, left=True)
    gen = looped.generate(ids, mask, max_new_tokens=7, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    length = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], 7, dtype=mask.dtype)], 1)
    out = looped(gen.sequences, full_mask)
    assert torch.equal(out.steps, gen.steps)
    assert int(gen.steps[:, length:].min()) >= 1 and gen.steps.max() > gen.steps[full_mask.bool()].min()
    predicted = out.logits[:, length - 1:-1].argmax(-1)
    assert torch.equal(predicted, gen.sequences[:, length:])


def test_left_padded_batch_equals_one_prompt_at_a_time_and_continuous_batching():
    model = qwen3(seed=6)
    looped = vary(LoopedCausalLM(model, (1, 2), max_steps=4), seed=6)
    ids, mask = batch(seed=6, rows=4, left=True)
    together = looped.generate(ids, mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    slots = looped.generate(ids, mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0, max_batch_size=2,
                               return_dict_in_generate=True)
    assert torch.equal(together.sequences, slots.sequences) and torch.equal(together.steps, slots.steps)
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        alone = looped.generate(ids[b:b + 1, keep], None, max_new_tokens=5, eos_token_id=None, pad_token_id=0,
                                return_dict_in_generate=True)
        assert torch.equal(alone.sequences[0], together.sequences[b][torch.cat([keep, torch.ones(5, dtype=torch.bool)])])
        assert torch.equal(alone.steps[0, keep.sum():], together.steps[b, ids.shape[1]:])


def test_eos_then_padding_and_repeatable_sampling():
    model = llama(seed=7)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=4), seed=7)
    ids, mask = batch(seed=7)
    greedy = looped.generate(ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    eos = int(greedy.sequences[0, ids.shape[1] + 1])            # row 0 emits it as its second new token
    gen = looped.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=VOCAB - 1, return_dict_in_generate=True)
    row = gen.sequences[0, ids.shape[1]:]
    assert int(row[1]) == eos and bool((row[2:] == VOCAB - 1).all())
    assert gen.steps[0, ids.shape[1] + 1] >= 1 and bool((gen.steps[0, ids.shape[1] + 2:] == 0).all())
    draws = [looped.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                             eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(11),
                             return_dict_in_generate=True)
             for _ in range(2)]
    assert torch.equal(draws[0].sequences, draws[1].sequences)
    other = looped.generate(ids, mask, max_new_tokens=6, do_sample=True, eos_token_id=None, pad_token_id=0,
                            generator=torch.Generator().manual_seed(12), return_dict_in_generate=True)
    assert not torch.equal(other.sequences, draws[0].sequences)


def test_save_and_load_round_trip(tmp_path):
    model = qwen3(seed=8)
    looped = LoopedCausalLM(model, (1, 3), max_steps=5, eps=0.05, halting_bias_init=0.4, step_norm=True)
    with torch.no_grad():
        looped.halting.weight.normal_()
    ids, mask = batch(seed=8)
    looped.save_pretrained(str(tmp_path))
    loaded = LoopedCausalLM.from_pretrained(str(tmp_path))
    assert not loaded.training                       # transformers' from_pretrained returns the model in eval mode
    with torch.no_grad():
        # the loaded weights sit at the checkpoint's byte offsets (not 64-byte aligned), where BLAS takes
        # other kernels and rounds differently in the last place: aligned copies compare bit for bit
        for p in loaded.parameters():
            p.data = p.data.clone()
    a, b = looped.eval()(ids, mask), loaded(ids, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.steps, b.steps)
    assert loaded.block_range == (1, 3) and loaded.max_steps == 5 and loaded.step_norm
    with pytest.raises(OSError):
        LoopedCausalLM.from_pretrained(str(tmp_path / "missing"))


def test_training_step_updates_model_and_halting():
    model = llama(seed=9, dtype=torch.float32)
    looped = LoopedCausalLM(model, (1, 3), max_steps=4, halting_bias_init=0.0).train()
    ids, mask = batch(seed=9)
    opt = torch.optim.AdamW(looped.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in looped.parameters()]
    out = looped(ids, mask, labels=ids.masked_fill(~mask.bool(), -100))
    (out.loss + 0.01 * out.ponder_cost.sum() / mask.sum()).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in looped.parameters())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, looped.parameters()))


def test_bf16_autocast_runs():
    model = llama(seed=10, dtype=torch.float32)
    looped = LoopedCausalLM(model, (1, 3), max_steps=3, halting_bias_init=30.0)
    ids, mask = batch(seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = looped(ids, mask, labels=ids)
        with torch.autocast("cpu", enabled=False):
            pass
    ref = own_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real].float(), ref[real], atol=0.1, rtol=0.1)
    out.loss.backward()


# -- refused before anything runs --------------------------------------------------------

@pytest.mark.parametrize("over, match", [
    (dict(sliding_window=16), "sliding-window"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
          sliding_window=16, use_sliding_window=True), "sliding"),
])
def test_refuses_sliding_window(over, match):
    model = (qwen3 if "use_sliding_window" in over else
             lambda **o: transformers.MistralForCausalLM(transformers.MistralConfig(
                 vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, **o)))(**over)
    with pytest.raises(ValueError, match=match):
        LoopedCausalLM(model, (1, 3))


def test_refuses_settings_without_kernels():
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=None, layer_types=["full_attention"] * 2))
    with pytest.raises(ValueError, match="softcapping"):
        LoopedCausalLM(gemma2, (0, 1))
    model = llama()
    for block, error, match in [((0, 0), ValueError, "not empty"), ((2, 5), ValueError, "start < stop <= 4"),
                                ((-1, 2), ValueError, "0 <= start"), (3, TypeError, "pair of ints")]:
        with pytest.raises(error, match=match):
            LoopedCausalLM(model, block)
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match="not causal"):
        LoopedCausalLM(model, (0, 2))
    with pytest.raises(TypeError, match="transformers causal LM"):
        LoopedCausalLM(torch.nn.Linear(3, 3), (0, 1))
    with pytest.raises(ValueError, match="max_steps"):
        LoopedCausalLM(llama(), (0, 1), max_steps=0)


def test_refuses_layers_that_bypass_the_attention_interface():
    model = llama()

    class OwnAttention(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    model.model.layers[2].self_attn = OwnAttention()
    with pytest.raises(ValueError, match="does not route its attention"):
        LoopedCausalLM(model, (1, 3))


def test_refuses_encoder_decoders_and_cross_attention():
    model = llama()
    model.config.is_encoder_decoder = True
    with pytest.raises(ValueError, match="encoder-decoder"):
        LoopedCausalLM(model, (1, 3))
    model.config.is_encoder_decoder = False
    model.config.add_cross_attention = True
    with pytest.raises(ValueError, match="cross-attention"):
        LoopedCausalLM(model, (1, 3))


def test_bad_calls():
    looped = LoopedCausalLM(llama(), (1, 3))
    ids, mask = batch()
    with pytest.raises(ValueError, match="int64"):
        looped(ids.int(), mask)
    with pytest.raises(ValueError, match=r"lie in \[0, 61\)"):
        looped(ids + VOCAB, mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        looped(ids, mask * 2)
    with pytest.raises(ValueError, match="shaped like input_ids"):
        looped(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        looped.generate(ids, mask, max_new_tokens=-1, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="top_p"):
        looped.generate(ids, mask, max_new_tokens=2, do_sample=True, top_p=1.5, return_dict_in_generate=True)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        looped.generate(ids, empty, max_new_tokens=2, return_dict_in_generate=True)


def test_triton_kernels_under_the_interpreter_match_the_reference():
    pytest.importorskip("triton")
    model = llama(seed=11, dtype=torch.float32, initializer_range=0.1)
    ids, mask = batch(seed=11, rows=2, length=6)
    outs = []
    for backend in ("reference", "triton"):
        looped = vary(LoopedCausalLM(model, (1, 3), max_steps=3, eps=0.05, backend=backend), seed=12, scale=2.0)
        out = looped(ids, mask)
        out.logits.square().mean().backward()
        outs.append((out, {n: p.grad.clone() for n, p in looped.named_parameters()}))
        looped.zero_grad()
    (ref, g_ref), (tri, g_tri) = outs
    assert torch.equal(ref.steps, tri.steps)
    torch.testing.assert_close(tri.logits, ref.logits, atol=2e-5, rtol=2e-4)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=1e-4, rtol=1e-3, msg=name)


def test_torch_compile_runs_and_matches_eager():
    model = llama(seed=13, initializer_range=0.1)
    looped = vary(LoopedCausalLM(model, (1, 3), max_steps=4, eps=0.05), seed=13, scale=2.0)
    ids, mask = batch(seed=13)

    def loss(ids, mask):
        out = looped(ids, mask, labels=ids)
        return out.loss + 0.01 * out.ponder_cost.sum()

    eager = loss(ids, mask)
    eager.backward()
    expect = {n: p.grad.clone() for n, p in looped.named_parameters()}
    looped.zero_grad()
    compiled = torch.compile(loss)(ids, mask)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-10, rtol=1e-8)
    for name, grad in expect.items():
        # transformers' float32 RMSNorm, compiled: float32 rounding of the gradient's scale
        torch.testing.assert_close(dict(looped.named_parameters())[name].grad, grad,
                                   atol=1e-6 * float(grad.abs().max()), rtol=0, msg=name)


def test_readme_example_runs():
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "docs" / "examples" / "looped_llama.py"))
