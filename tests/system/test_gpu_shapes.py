"""The shapes a GPU runs that the small CPU tests never reach: attention
sequences that cross many 64- and 32-row tiles (online-softmax rescaling
across key blocks, query blocks past the first, the causal bound across
blocks) at head dims that are not powers of two and at the largest one;
the encoder at L = 200; rows wide enough for the cell and PonderNet kernels'
multi-warp programs (where the halting row's barrier matters), run again
and again and compared exactly.

The `gpu` rows are skipped without a device, never passed. The CPU rows run
the same logic under the Triton interpreter where that takes seconds: the
attention rows with the GPU's own tile sizes (the interpreter's default is
16 x 16), the wide rows at the same H."""
import pytest
import torch
from torch import nn

import act_kernels as ak
from act_kernels.ops.attention import reference
from backends import KERNEL_BACKENDS
from helpers import DEVICE, TanhStep, make_problem, representative

GPU = DEVICE.type == "cuda"


def attention_problem(lengths, heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q_rows = torch.nonzero(torch.rand(total, generator=g) < 0.6).squeeze(1).to(DEVICE)
    q, k, v = (torch.randn(n, heads, dim, generator=g).to(DEVICE, dtype) for n in (q_rows.numel(), total, total))
    return q, k, v, cu, q_rows


def attention_check(lengths, dim, dtype, causal):
    """Forward and backward on Triton against the float64 reference twin.
    The error allowed is what the dtype's rounding of the inputs and output
    gives (float32: 2e-5 relative to the output's scale)."""
    q, k, v, cu, q_rows = attention_problem(lengths, 2, dim, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ak.ragged_attention(*leaves, cu, q_rows, causal=causal, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference.ragged_attention(*exact, cu, q_rows, None, causal, dim ** -0.5)
    want.backward(grad.double())
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for name, a, b in (("out", out.detach(), want.detach()), *zip(("dq", "dk", "dv"), (t.grad for t in leaves),
                                                                   (t.grad for t in exact))):
        assert bool(torch.isfinite(a).all()), name
        err = float((a.double() - b).abs().max())
        assert err <= tol * max(1.0, float(b.abs().max())), f"{name}: max error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [40, 128, 160, 256])
def test_attention_across_gpu_tiles(dim, dtype, causal):
    attention_check([150, 70, 1, 300], dim, dtype, causal)


@representative(dim=40, causal=True)
@pytest.mark.skipif(GPU, reason="the GPU runs these shapes natively (test_attention_across_gpu_tiles)")
@pytest.mark.parametrize("dim,causal", [(40, True), (160, False)])
def test_attention_with_gpu_tiles_under_the_interpreter(dim, causal, monkeypatch):
    """The launchers' GPU configuration (64 x 32 or 64 x 64 tiles) under the
    interpreter, over sequences that cross several of them."""
    pytest.importorskip("triton")
    from act_kernels.ops.attention import triton_kernels

    monkeypatch.setattr(triton_kernels, "launch_config", lambda kernel, head_dim, dtype, device:
                        triton_kernels.gpu_config(kernel, max(16, 1 << (head_dim - 1).bit_length()),
                                                  dtype == torch.float32))
    attention_check([150, 70, 1], dim, torch.float32, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_encoder_at_length_200(dtype):
    """The per-token encoder on the GPU backends at L = 200 (attention tiles
    crossed at every step), against the reference backend in float64."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=6, halting_bias_init=-1.0).to(DEVICE)
    x = torch.randn(3, 200, 64, device=DEVICE)
    pad = torch.arange(200, device=DEVICE)[None] >= torch.tensor([200, 130, 7], device=DEVICE)[:, None]
    ref = enc.double()
    ref.backend = "reference"
    want = ref(x.double(), src_key_padding_mask=pad, is_causal=False)
    want_steps = ref.steps.clone()
    enc = enc.to(dtype)
    enc.backend = "auto"
    got = enc(x.to(dtype), src_key_padding_mask=pad)
    tol = 2e-4 if dtype == torch.float32 else 5e-2
    # a token whose running sum lands within rounding of 1 - eps may halt a step apart
    assert float((enc.steps != want_steps).float().mean()) < 0.02
    same = (enc.steps == want_steps)[..., None]
    err = float(((got.double() - want) * same).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), err


def layer_outputs(kind, hidden, backend, runs):
    torch.manual_seed(0)
    layer = getattr(ak.nn, kind)(8, hidden, max_steps=6, backend=backend, halting_bias_init=-1.0).to(DEVICE)
    x = torch.randn(3, 4, 8, device=DEVICE)
    outs = []
    for _ in range(runs):
        layer.zero_grad()
        y, _ = layer(x)
        (y.square().sum() + layer.ponder_cost.sum()).backward()
        outs.append((y.detach(), layer.steps.clone(), layer.cell.weight_hh.grad.clone()))
    return outs


def repeated_exactly(outs):
    first = outs[0]
    for again in outs[1:]:
        for a, b in zip(first, again):
            assert torch.equal(a, b), "a rerun of the same call gave different bits"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hidden", [pytest.param(1500, id="H1500"),
                                    pytest.param(5000, id="H5000", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["ACTGRU", "ACTLSTM"])
def test_wide_cell_rows_repeat_exactly(kind, hidden, backend):
    """H > 1024: 128- or 512-thread CUDA blocks and multi-warp Triton
    programs. Six runs give the same bits, and the steps equal the reference's."""
    outs = layer_outputs(kind, hidden, backend, runs=6 if GPU else 2)
    repeated_exactly(outs)
    ref = layer_outputs(kind, hidden, "reference", runs=1)[0]
    assert torch.equal(outs[0][1], ref[1])
    torch.testing.assert_close(outs[0][0], ref[0], atol=1e-4, rtol=1e-4)


@representative(hidden=2048)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hidden", [512, 2048])
def test_wide_pondernet_rows_repeat_exactly(hidden, backend):
    """H >= 512: PonderNet's Triton step runs 2+ warps per row, where its
    barrier matters. Repeated runs agree bitwise and with the reference."""
    def once(name):
        s0, w, c = make_problem(64, hidden, torch.float32, -2.0)
        out = ak.pondernet(TanhStep(64, hidden, scale=2.0), s0, w, c, max_steps=10, backend=name)
        return out.steps, out.p.detach(), out.kl.detach()

    first = once(backend)
    for _ in range(5 if GPU else 1):
        for a, b in zip(first, once(backend)):
            assert torch.equal(a, b)
    ref = once("reference")
    assert torch.equal(first[0], ref[0])
    torch.testing.assert_close(first[1], ref[1], atol=1e-5, rtol=1e-5)
