"""The lean decoder math (layers/kinds/lean_decoder.py) against transformers'
own decoder layers, on the same rows and the same attention: equal to the
last bits of a matrix product, in float64 and float32, with autograd on
(separate products, gradients reach the parameters) and off (packed
products, kept in sync with the parameters)."""
import pytest
import torch

from act_kernels.hf.attention import ours
from act_kernels.layers.kinds import DecoderLayers, LeanDecoderLayers, decoder_kind
from tiny import llama, qwen3

transformers = pytest.importorskip("transformers")


def qwen2(dtype=torch.float64):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.Qwen2ForCausalLM(config).to(dtype).eval()     # q/k/v with biases


MODELS = {"llama": lambda dtype: llama(layers=2, dtype=dtype), "qwen3": lambda dtype: qwen3(layers=2, dtype=dtype),
          "qwen2": qwen2}


def causal_attend(q, kv, scale, dropout_p):
    """Dense causal attention over the call's rows (all of them, in order)."""
    rows, heads = q.shape[:2]
    keys, values = kv().chunk(2, 1)
    kv_heads = keys.shape[1] // q.shape[2]
    keys = keys.reshape(rows, kv_heads, -1).repeat_interleave(heads // kv_heads, 1)
    values = values.reshape(rows, kv_heads, -1).repeat_interleave(heads // kv_heads, 1)
    s = torch.einsum("rhd,shd->hrs", q, keys) * scale
    s = s.masked_fill(torch.ones(rows, rows, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hrs,shd->rhd", s.softmax(-1), values)


def run(kind, x, positions):
    h = x
    for rows in kind.rows(False, positions):
        h = rows.forward(h, None, causal_attend)
    return h, kind.rows(False, positions)[0].key_values(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_lean_rows_equal_the_layers_own_forward(arch, dtype):
    model = MODELS[arch](dtype)
    inner = model.model
    positions = torch.tensor([3, 4, 5, 6, 7, 8, 9])
    x = torch.randn(7, 32, dtype=dtype)
    lean = decoder_kind(list(inner.layers), inner.rotary_emb, model.config)
    plain = DecoderLayers(list(inner.layers), inner.rotary_emb, model.config)
    assert isinstance(lean, LeanDecoderLayers)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    with ours(model.config):
        with torch.no_grad():    # packed q/k/v and gate/up products
            (out, kv), (want, want_kv) = run(lean, x, positions), run(plain, x, positions)
        torch.testing.assert_close(out, want, **tol)
        torch.testing.assert_close(kv, want_kv, **tol)
        # autograd on: the separate products, and every parameter gets the layer's own gradient
        grads = []
        for kind in (lean, plain):
            model.zero_grad()
            out, _ = run(kind, x, positions)
            out.square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in inner.layers.named_parameters()})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], **tol)


def test_packed_weights_follow_the_parameters():
    """An in-place write to a projection or a replaced parameter rebuilds the packed copy."""
    model = llama(layers=1)
    inner = model.model
    lean = decoder_kind(list(inner.layers), inner.rotary_emb, model.config)
    plain = DecoderLayers(list(inner.layers), inner.rotary_emb, model.config)
    positions, x = torch.arange(5), torch.randn(5, 32, dtype=torch.float64)
    with ours(model.config), torch.no_grad():
        run(lean, x, positions)
        inner.layers[0].self_attn.k_proj.weight.mul_(2.0)
        inner.layers[0].mlp.up_proj.weight = torch.nn.Parameter(inner.layers[0].mlp.up_proj.weight * 0.5)
        (out, kv), (want, want_kv) = run(lean, x, positions), run(plain, x, positions)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(kv, want_kv, rtol=0, atol=1e-12)


def test_unknown_layers_keep_their_own_forward():
    model = llama(layers=1)
    layer = model.model.layers[0]

    class Custom(type(layer)):
        pass

    layer.__class__ = Custom
    kind = decoder_kind([layer], model.model.rotary_emb, model.config)
    assert type(kind) is DecoderLayers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotary_rows_from_the_kept_table_equal_the_modules_call(dtype):
    """The (cos, sin) a call gathers from the table kept per rotary module are
    the module's own at those positions, bit for bit, past the table's first
    size and after the module's frequencies change in place."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from act_kernels.layers.kinds.transformers_decoder import RotaryTable

    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64,
                                                           max_position_embeddings=4096))
    for top in (10, 3000, 3000):
        positions = torch.randint(0, top, (37,), generator=torch.Generator().manual_seed(top))
        table = RotaryTable(rotary, positions, dtype)
        cos, sin = rotary(torch.empty(0, dtype=dtype), positions.view(1, -1))
        assert torch.equal(table.cos, cos[0]) and torch.equal(table.sin, sin[0])
        rotary.inv_freq.mul_(1.5)      # the next round must not read the table built before this


@pytest.mark.parametrize("rows", [0, 1, 3, 8, 16, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_products_equal_f_linear_and_follow_the_weight(rows, dtype):
    """The lean math's inference products (oneDNN on a packed copy of the
    weight in float32, the few-row form otherwise) equal F.linear to a matrix
    product's rounding, with and without a bias, and follow the weight when
    it is changed in place or replaced."""
    import torch.nn.functional as F

    from act_kernels.layers.kinds.lean_decoder import inference_linear as _linear

    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 40, generator=g, dtype=dtype)
    bias = torch.randn(48, generator=g, dtype=dtype)
    x = torch.randn(rows, 40, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-12)
    for b in (None, bias):
        out = torch.full((rows, 48), float("nan"), dtype=dtype)
        out.copy_(_linear(x, weight, b))
        torch.testing.assert_close(out, F.linear(x, weight, b), **tol)
    with torch.no_grad():
        weight.mul_(-2.0)                       # in place: the packed copy must be rebuilt
    torch.testing.assert_close(_linear(x, weight, bias), F.linear(x, weight, bias), **tol)
    weight = torch.randn(48, 40, generator=g, dtype=dtype)    # a new tensor
    torch.testing.assert_close(_linear(x, weight, None), F.linear(x, weight), **tol)
