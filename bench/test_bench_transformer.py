"""Benchmarks of per-token pondering (design §9): ragged attention alone, and
the ACT encoder forward + backward against the dense loop and a
tensor2tensor-style Universal Transformer.

    pytest bench/test_bench_transformer.py --benchmark-only

Every figure is a median time next to a baseline timed in the same process,
with the ideal ratio beside it. CPU rows run here; the GPU rows (B = 16,
L = 2048, D = 1024, 16 heads, bf16) skip without a device.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import act_kernels as ak
from act_kernels.backends import why_unavailable
from conftest import sync
from workloads import EncoderPonder, dense_act_encoder, ut_act_encoder

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROUNDS = 10 if GPU else 5
DTYPE = torch.bfloat16 if GPU else torch.float32


def triton_row():
    reason = why_unavailable("triton", DEVICE) if GPU else "GPU-only benchmark row"
    return pytest.mark.skipif(bool(reason), reason=reason or "available")


# ---------------------------------------------------------------------------
# ragged attention alone
# ---------------------------------------------------------------------------

ATTN_SIZES = ([(16, 2048, 16, 64), (16, 2048, 8, 128)] if GPU else [(4, 256, 4, 32), (4, 512, 4, 64)])
RUNNING = [0.4, 1.0]   # the fraction of tokens that run: 1.0 is equal work to dense attention


def attention_problem(batch, length, heads, dim, running, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = batch * length
    cu = torch.arange(0, total + 1, length, dtype=torch.int32, device=DEVICE)
    q_rows = torch.nonzero(torch.rand(total, generator=g) < running).squeeze(1).to(DEVICE) if running < 1 \
        else torch.arange(total, device=DEVICE)
    make = lambda n: torch.randn(n, heads, dim, generator=g).to(DEVICE, DTYPE).requires_grad_()  # noqa: E731
    return make(q_rows.numel()), make(total), make(total), cu, q_rows


def attention_flops(q_rows, length, heads, dim, causal):
    """Useful FLOPs of forward + backward (2 matmuls forward, 5 backward, 2 FLOPs
    per multiply-add): keys seen per query are its sequence length, or its
    position + 1 when causal."""
    pos = q_rows % length
    keys = (pos + 1).sum() if causal else torch.full_like(pos, length).sum()
    return 2 * 7 * heads * dim * int(keys)


@pytest.mark.parametrize("impl", ["ragged", pytest.param("ragged_triton", marks=triton_row()), "sdpa_dense"])
@pytest.mark.parametrize("running", RUNNING, ids=lambda r: f"run{r}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch,length,heads,dim", ATTN_SIZES)
def test_ragged_attention_fwd_bwd(benchmark, record, impl, running, causal, batch, length, heads, dim):
    """ragged: our op (the reference backend on the CPU: PyTorch's fused CPU
    attention per padded sequence); sdpa_dense: PyTorch's SDPA on every token
    of every sequence, what the dense loop computes. Ideal = T_tok / A."""
    q, k, v, cu, q_rows = attention_problem(batch, length, heads, dim, running)
    if impl == "sdpa_dense":
        qd = torch.randn(batch, heads, length, dim, device=DEVICE, dtype=DTYPE, requires_grad=True)
        kd, vd = (t.detach().reshape(batch, length, heads, dim).transpose(1, 2).requires_grad_() for t in (k, v))
        inputs = [qd, kd, vd]
        fn = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)  # noqa: E731
        flops = attention_flops(torch.arange(batch * length, device=DEVICE), length, heads, dim, causal)
    else:
        backend = "triton" if impl == "ragged_triton" else "auto"
        inputs = [q, k, v]
        fn = lambda: ak.ragged_attention(q, k, v, cu, q_rows, causal=causal, max_seqlen=length,  # noqa: E731
                                         backend=backend)
        flops = attention_flops(q_rows, length, heads, dim, causal)

    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    row = record("ragged_attention", impl, batch=batch, length=length, heads=heads, dim=dim, causal=causal,
                 running=running, queries=q_rows.numel() if impl != "sdpa_dense" else batch * length,
                 ideal_speedup=batch * length / q_rows.numel(), flops=flops, dtype=str(DTYPE))
    row["TFLOPs"] = flops / row["median_s"] / 1e12


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flex_attention_forward(benchmark, record, causal):
    """FlexAttention with a scattered query subset (positions captured in
    mask_mod), forward only: it has no CPU backward."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        pytest.skip(f"no FlexAttention: {exc}")
    batch, length, heads, dim = ATTN_SIZES[0]
    q, k, v, cu, q_rows = attention_problem(batch, length, heads, dim, RUNNING[0])
    per_seq = (q_rows // length).bincount(minlength=batch)
    if int(per_seq.min()) != int(per_seq.max()):
        keep = int(per_seq.min())  # flex needs one query count per sequence: trim to the smallest
        q_rows = torch.cat([q_rows[q_rows // length == b][:keep] for b in range(batch)])
    q_pos = (q_rows % length).reshape(batch, -1)
    qf = torch.randn(batch, heads, q_pos.shape[1], dim, device=DEVICE, dtype=DTYPE)
    kf = k.detach().reshape(batch, length, heads, dim).transpose(1, 2)
    vf = v.detach().reshape(batch, length, heads, dim).transpose(1, 2)

    def causal_mod(b, h, qi, kv):
        return kv <= q_pos[b, qi]

    try:
        mask = create_block_mask(causal_mod, batch, None, q_pos.shape[1], length, device=str(DEVICE)) \
            if causal else None
        flex_attention(qf, kf, vf, block_mask=mask)
    except Exception as exc:  # noqa: BLE001 - report why it does not run here
        pytest.skip(f"FlexAttention does not run here: {type(exc).__name__}: {exc}"[:300])

    def run():
        with torch.no_grad():
            flex_attention(qf, kf, vf, block_mask=mask)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    record("flex_attention_forward", "flex_eager", batch=batch, length=length, heads=heads, dim=dim,
           causal=causal, queries=q_rows.numel(), dtype=str(DTYPE))


# ---------------------------------------------------------------------------
# the encoder, forward + backward
# ---------------------------------------------------------------------------

def time_fwd_bwd(benchmark, forward, params):
    """Times forward() -> (output, ponder cost) and the gradients of a loss of both in params."""
    def run():
        y, cost = forward()
        torch.autograd.grad(y.float().square().mean() + 0.01 * cost.sum(), params, allow_unused=True)
        sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)


ENCODER_SIZES = [(16, 2048, 1024)] if GPU else [(4, 128, 128), (4, 256, 256), (4, 512, 512)]
ENCODER_IMPLS = ["act_encoder", "dense_loop", "ut_t2t"]


@pytest.mark.parametrize("impl", ENCODER_IMPLS)
@pytest.mark.parametrize("batch,length,d_model", ENCODER_SIZES)
def test_encoder_fwd_bwd(benchmark, record, impl, batch, length, d_model):
    """max_steps 8, mean N about 2.5, every sequence with a token at 8.
    Ideal speedup over the dense loop: T_tok * max N / sum N."""
    work = EncoderPonder(batch, length, d_model, max_steps=8, mean=2.5, dtype=DTYPE, device=DEVICE,
                         heads=16 if GPU else None)
    enc = work.enc
    params = [work.x, *enc.parameters()]

    def forward():
        if impl == "act_encoder":
            return enc(work.x), enc.ponder_cost
        if impl == "dense_loop":
            y, cost, _ = dense_act_encoder(enc.layer, enc.halting, work.x, None, False, 8, 0.01)
            return y, cost
        return ut_act_encoder(enc.layer, enc.halting, work.x, 8)

    time_fwd_bwd(benchmark, forward, params)
    if impl == "act_encoder":
        assert torch.equal(enc.steps, work.target), "the workload did not halt where it should"
    record("act_encoder", impl, batch=batch, length=length, d_model=d_model, max_steps=8,
           sum_n=int(work.target.sum()), tokens=work.target.numel(), ideal_speedup=work.ideal_speedup,
           dtype=str(DTYPE))


EQUAL_SIZES = [(16, 2048, 1024)] if GPU else [(4, 256, 256)]


@pytest.mark.parametrize("impl", ["act_encoder", "dense_loop"])
@pytest.mark.parametrize("batch,length,d_model", EQUAL_SIZES)
def test_encoder_equal_work(benchmark, record, impl, batch, length, d_model):
    """Every token runs all 8 steps (halting bias -40), so the encoder and
    the dense loop compute the same rows: the ratio is what the encoder's
    ragged bookkeeping costs or saves at equal work. Ideal 1.0."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model, 16 if GPU else max(1, d_model // 64), 4 * d_model, dropout=0.0,
                                             batch_first=True, norm_first=True).to(DEVICE, DTYPE)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=8, halting_bias_init=-40.0).to(DEVICE, DTYPE)
    x = torch.randn(batch, length, d_model, device=DEVICE, dtype=DTYPE, requires_grad=True)
    params = [x, *enc.parameters()]

    def forward():
        if impl == "act_encoder":
            return enc(x), enc.ponder_cost
        y, cost, _ = dense_act_encoder(enc.layer, enc.halting, x, None, False, 8, 0.01)
        return y, cost

    time_fwd_bwd(benchmark, forward, params)
    if impl == "act_encoder":
        assert int(enc.steps.min()) == 8, "every token must run every step"
    record("act_encoder_equal_work", impl, batch=batch, length=length, d_model=d_model, max_steps=8,
           sum_n=8 * batch * length, tokens=batch * length, ideal_speedup=1.0, dtype=str(DTYPE))
