"""Ragged attention: every backend against the reference twin, the reference
against an fp64 oracle written here, gradcheck, the pool layout, the op, and
bad input.

On the CPU the Triton kernels run under TRITON_INTERPRET=1: shapes stay small."""
import math

import pytest
import torch

import act_kernels as ak
from act_kernels.ops.attention import library as attn_fn
from act_kernels.ops.attention import reference
from helpers import DEVICE, assert_close, representative

ATTN_BACKENDS = [pytest.param("triton", id="triton")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def problem(lengths, heads, dim, dtype, running=0.6, seed=0, device=DEVICE, q_rows=None, kv_heads=None):
    """Packed sequences of the given lengths and a random running subset of the
    tokens; keys and values with kv_heads heads (default: as many as q)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    if q_rows is None:
        q_rows = torch.nonzero(torch.rand(total, generator=g) < running).squeeze(1)
    q_rows = q_rows.to(device)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(q_rows.numel(), heads, dim, generator=g).to(device, dtype)
    k = torch.randn(total, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(total, kv_heads, dim, generator=g).to(device, dtype)
    return q, k, v, cu, q_rows


def oracle(q, k, v, cu, q_rows, causal, scale=None, dtype=torch.float64):
    """Per-query attention written plainly: query a (token t in sequence b)
    attends to the tokens of b, up to position t when causal. Computed in
    `dtype` (float64: the oracle; the input dtype: PyTorch's own error)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    bounds = cu.tolist()
    for a, t in enumerate(q_rows.tolist()):
        b = max(i for i in range(len(bounds) - 1) if bounds[i] <= t)
        stop = t + 1 if causal else bounds[b + 1]
        keys, values = k[bounds[b]:stop].to(dtype), v[bounds[b]:stop].to(dtype)
        scores = torch.einsum("hd,khd->hk", q[a].to(dtype), keys) * scale
        out[a] = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), values)
    return out


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    got = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for d, x in zip(got, inputs)]


def run_both(backend, q, k, v, cu, q_rows, causal, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ak.ragged_attention(*leaves, cu, q_rows, causal=causal, backend=backend, **kw)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = ak.ragged_attention(*ref_leaves, cu, q_rows, causal=causal, backend="reference", **kw)
    return out, ref, grads(out, leaves), grads(ref, ref_leaves)


def test_reference_matches_plain_oracle():
    for causal in (False, True):
        q, k, v, cu, q_rows = problem([4, 1, 7, 3], 2, 8, torch.float64, seed=3)
        out = reference.ragged_attention(q, k, v, cu, q_rows, causal=causal)
        torch.testing.assert_close(out, oracle(q, k, v, cu, q_rows, causal), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pooled", [False, True], ids=["tokens", "pool"])
def test_reference_gradcheck_float64(causal, pooled):
    q, k, v, cu, q_rows = problem([3, 1, 4], 2, 4, torch.float64, seed=5)
    kv_rows = None
    if pooled:  # two segments, tokens read in a shuffled order
        kv_rows = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k[:5], k[5:], v[:5], v[5:])]

    def f(q, k0, k1, v0, v1):
        return reference.ragged_attention(q, [k0, k1], [v0, v1], cu, q_rows, kv_rows, causal)

    assert torch.autograd.gradcheck(f, leaves)


@representative(dtype=torch.float32, causal=True, lengths=[20, 3], heads=1, dim=24, running=0.5)
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths,heads,dim,running", [
    ([1, 2, 3, 4, 5, 6, 7, 8], 2, 16, 0.5),      # every length 1..L
    ([20, 3], 1, 24, 0.5),                         # d not a power of two, a sequence longer than a block
    ([9, 17], 3, 40, 1.0),                         # every token running
    ([5, 11], 2, 64, 0.3),
])
def test_matches_reference(backend, dtype, causal, lengths, heads, dim, running):
    q, k, v, cu, q_rows = problem(lengths, heads, dim, dtype, running=running)
    out, ref, g, rg = run_both(backend, q, k, v, cu, q_rows, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, rg):
        assert_close(a, b, dtype, name)


@representative(dim=128)
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dim", [16, 128], ids=lambda d: f"d{d}")
def test_head_dims_and_single_query(backend, dim):
    for rows in ([6], [0], [13]):  # one running token: mid, first, last of its sequence
        q, k, v, cu, q_rows = problem([9, 5], 1, dim, torch.float32, q_rows=torch.tensor(rows))
        for causal in (False, True):
            out, ref, g, rg = run_both(backend, q, k, v, cu, q_rows, causal)
            assert_close(out, ref, torch.float32, "out")
            for name, a, b in zip(("dq", "dk", "dv"), g, rg):
                assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend", ["reference", *ATTN_BACKENDS])
def test_no_running_query(backend):
    q, k, v, cu, q_rows = problem([4, 3], 2, 16, torch.float32, q_rows=torch.zeros(0, dtype=torch.int64))
    k.requires_grad_()
    out = ak.ragged_attention(q, k, v, cu, q_rows, backend=backend)
    assert out.shape == (0, 2, 16)
    (dk,) = torch.autograd.grad(out.sum(), [k], allow_unused=True)
    assert dk is None or bool((dk == 0).all())


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_empty_sequences_and_scale(backend):
    """Sequences of length 0 between others, and an explicit scale."""
    q, k, v, cu, q_rows = problem([0, 4, 0, 6, 0], 2, 16, torch.float32, running=0.7, seed=2)
    out, ref, g, rg = run_both(backend, q, k, v, cu, q_rows, True, scale=0.3)
    assert_close(out, ref, torch.float32, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, rg):
        assert_close(a, b, torch.float32, name)


@representative(dtype=torch.bfloat16)
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_error_within_twice_pytorch(backend, dtype):
    """flash-attention's rule: the kernel's error against an fp64 oracle is at
    most twice PyTorch's error doing the same computation in that dtype."""
    for causal in (False, True):
        q, k, v, cu, q_rows = problem([13, 7, 21], 2, 32, dtype, running=0.6, seed=11)
        exact = oracle(q, k, v, cu, q_rows, causal)
        same_dtype = oracle(q, k, v, cu, q_rows, causal, dtype=dtype)
        out = ak.ragged_attention(q, k, v, cu, q_rows, causal=causal, backend=backend)
        kernel_err = (out.double() - exact).abs().max().item()
        torch_err = (same_dtype.double() - exact).abs().max().item()
        assert kernel_err <= 2 * torch_err + 1e-5, (kernel_err, torch_err)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_pool_segments_and_row_index(backend):
    """Keys and values read from a pool of several segments (strided views
    among them) through a token -> row index, as the encoder keeps them."""
    q, k, v, cu, q_rows = problem([6, 9], 2, 16, torch.float32, seed=4)
    total = k.shape[0]
    g = torch.Generator().manual_seed(1)
    big = torch.randn(total + 5, 2, 3, 16, generator=g).to(DEVICE)   # strided segment source
    segs_k = [torch.randn(4, 2, 16, generator=g).to(DEVICE), big[:, :, 0], torch.randn(3, 2, 16, generator=g).to(DEVICE)]
    segs_v = [torch.randn(4, 2, 16, generator=g).to(DEVICE), big[:, :, 1], torch.randn(3, 2, 16, generator=g).to(DEVICE)]
    pool = sum(t.shape[0] for t in segs_k)
    kv_rows = torch.randperm(pool, generator=g)[:total].to(DEVICE)
    for causal in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, *segs_k, *segs_v)]
        ref_leaves = [t.detach().clone().requires_grad_() for t in (q, *segs_k, *segs_v)]
        out = ak.ragged_attention(leaves[0], leaves[1:4], leaves[4:], cu, q_rows, kv_rows=kv_rows,
                                  causal=causal, backend=backend)
        ref = ak.ragged_attention(ref_leaves[0], ref_leaves[1:4], ref_leaves[4:], cu, q_rows, kv_rows=kv_rows,
                                  causal=causal, backend="reference")
        assert_close(out, ref, torch.float32, "out")
        for a, b in zip(grads(out, leaves), grads(ref, ref_leaves)):
            assert a.shape == b.shape
            assert_close(a, b, torch.float32, "pool grad")


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_noncontiguous_and_stride0(backend):
    """Strided q, k, v (slices of larger tensors), a stride-0 value pool, and
    the all-stride-0 upstream gradient that `out.sum()` hands the backward."""
    q, k, v, cu, q_rows = problem([5, 8], 2, 16, torch.float32, seed=6)
    qs = torch.randn(q.shape[0], 4, 20, device=DEVICE)[:, 1:3, 2:18]
    ks = torch.randn(k.shape[0] * 2, 2, 16, device=DEVICE)[::2]
    vs = torch.randn(1, 2, 16, device=DEVICE).expand(k.shape[0], 2, 16)
    for causal in (False, True):
        leaves = [qs.clone().requires_grad_(), ks.clone().requires_grad_()]
        out = ak.ragged_attention(qs, ks, vs, cu, q_rows, causal=causal, backend=backend)
        ref = ak.ragged_attention(qs, ks, vs, cu, q_rows, causal=causal, backend="reference")
        assert_close(out, ref, torch.float32, "strided")
        lq, lk = (t.detach().clone().requires_grad_() for t in (qs, ks))
        rq, rk = (t.detach().clone().requires_grad_() for t in (qs, ks))
        a = torch.autograd.grad(ak.ragged_attention(lq, lk, vs, cu, q_rows, causal=causal, backend=backend).sum(), [lq, lk])
        b = torch.autograd.grad(ak.ragged_attention(rq, rk, vs, cu, q_rows, causal=causal, backend="reference").sum(), [rq, rk])
        for x, y in zip(a, b):
            assert_close(x, y, torch.float32, "grad with stride-0 upstream")
        del leaves


@pytest.mark.gpu
def test_deterministic_backward():
    """The backward has one writer per output element: two runs agree bitwise.
    Only a GPU can show a race; the CPU interpreter runs programs one by one."""
    q, k, v, cu, q_rows = problem([12, 7], 2, 16, torch.float32, seed=8)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ak.ragged_attention(*leaves, cu, q_rows, causal=True, backend="triton")
        runs.append([out, *grads(out, leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# the torch.library op
# ---------------------------------------------------------------------------

@representative(key="dtype", values=[torch.float32], causal=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck(dtype, causal):
    """float32 runs the op's Triton path (interpreted on the CPU), float64 its reference path."""
    q, k, v, cu, q_rows = problem([5, 3], 2, 16, dtype, seed=9)
    args = (q.requires_grad_(), [k[:4].requires_grad_(), k[4:].requires_grad_()], [v.requires_grad_()],
            cu, q_rows, None, causal, 0.25, 5)
    torch.library.opcheck(attn_fn.ragged_attention_op, args)


def test_op_matches_function_and_compiles_fullgraph():
    q, k, v, cu, q_rows = problem([5, 3], 2, 16, torch.float32, seed=10)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def loss_fn(q, k, v):
        out, _ = attn_fn.ragged_attention_op(q, [k], [v], cu, q_rows, None, True, 0.25, 5)
        return (out ** 2).sum()

    eager = loss_fn(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    ref = (ak.ragged_attention(*leaves, cu, q_rows, causal=True, scale=0.25, backend="reference") ** 2).sum()
    assert_close(eager, ref, torch.float32, "op vs reference")
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    comp = compiled(*leaves)
    for a, b in zip(torch.autograd.grad(comp, leaves), eager_grads):
        assert_close(a, b, torch.float32, "compiled grad")


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def good_args():
    q, k, v, cu, q_rows = problem([3, 4], 2, 8, torch.float32, q_rows=torch.tensor([0, 2, 4, 5]))
    return dict(q=q, k=k, v=v, cu_seqlens=cu, q_rows=q_rows)


BAD = [
    (dict(q=torch.randn(4, 8, device=DEVICE)), ValueError, r"q must have shape \(A, heads, d\)"),
    (dict(q=torch.ones(4, 2, 8, dtype=torch.int64, device=DEVICE)), TypeError, "q must be float16"),
    (dict(k=torch.randn(7, 2, 4, device=DEVICE)), ValueError, r"k must have shape \(P, 2, 8\)"),
    (dict(v=torch.randn(7, 2, 8, dtype=torch.float64, device=DEVICE)), TypeError, "v has dtype"),
    (dict(v=torch.randn(6, 2, 8, device=DEVICE)), ValueError, "same pool rows"),
    (dict(k=[1, 2]), TypeError, "k must be a tensor"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7])), TypeError, "int32"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens\\[-1\\] = 6"),
    (dict(cu_seqlens=torch.tensor([[0, 3, 7]], dtype=torch.int32)), ValueError, "1-D"),
    (dict(q_rows=torch.tensor([0, 2, 4, 7])), ValueError, r"q_rows must lie in \[0, 7\)"),
    (dict(q_rows=torch.tensor([0, 4, 2, 5])), ValueError, "strictly ascending"),
    (dict(q_rows=torch.tensor([0, 2, 2, 5])), ValueError, "strictly ascending"),
    (dict(q_rows=torch.tensor([0, 2, 4])), ValueError, "one per query"),
    (dict(q_rows=torch.tensor([0.0, 2, 4, 5])), TypeError, "q_rows must be int32 or int64"),
    (dict(kv_rows=torch.tensor([0, 1, 2, 3, 4, 5, 9])), ValueError, r"kv_rows must lie in \[0, 7\)"),
    (dict(kv_rows=torch.tensor([0, 1, 2])), ValueError, "kv_rows has 3 rows"),
    (dict(max_seqlen=2), ValueError, "max_seqlen = 2 is shorter"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(backend="cuda"), RuntimeError, "no CUDA C\\+\\+ kernel"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    # grouped-query attention: Hkv must divide Hq, and k and v share it
    (dict(k=torch.randn(7, 3, 8, device=DEVICE), v=torch.randn(7, 3, 8, device=DEVICE)), ValueError,
     r"k has Hkv = 3 heads, which does not divide q's Hq = 2"),
    (dict(q=torch.randn(4, 4, 8, device=DEVICE), k=torch.randn(7, 3, 8, device=DEVICE),
          v=torch.randn(7, 3, 8, device=DEVICE)), ValueError, r"Hkv = 3 heads, which does not divide q's Hq = 4"),
    (dict(k=torch.randn(7, 1, 8, device=DEVICE)), ValueError, r"v has Hkv = 2 heads and k 1"),
    (dict(k=torch.randn(7, 0, 8, device=DEVICE), v=torch.randn(7, 0, 8, device=DEVICE)), ValueError,
     r"k must have shape \(P, 2, 8\) like q, or \(P, Hkv, 8\) with Hkv >= 1"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_before_any_kernel(change, exc, match, monkeypatch):
    from act_kernels.ops.attention import triton_kernels

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(triton_kernels, "attention_forward", no_kernel)
    monkeypatch.setattr(reference, "ragged_attention_lse", no_kernel)
    kw = good_args()
    kw.update(change)
    with pytest.raises(exc, match=match):
        ak.ragged_attention(**kw)


def test_float64_on_triton_is_a_clear_error():
    kw = good_args()
    kw = {n: (t.double() if n in ("q", "k", "v") else t) for n, t in kw.items()}
    with pytest.raises(TypeError, match="use backend='reference' for float64"):
        ak.ragged_attention(**kw, backend="triton")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_backward_twin_matches_autograd(causal):
    """The reference's written-out backward (the Triton backward's twin) against autograd."""
    q, k, v, cu, q_rows = problem([5, 1, 8], 2, 8, torch.float64, seed=12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference.ragged_attention(*leaves, cu, q_rows, causal=causal)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, g)
    got = reference.ragged_attention_backward(g, q, k, v, cu, q_rows, causal=causal)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_public_reference_function_gradcheck_float64():
    """The recomputing Function on the reference backend (what the CPU path runs)."""
    q, k, v, cu, q_rows = problem([3, 5], 2, 4, torch.float64, seed=13)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: ak.ragged_attention(q, k, v, cu, q_rows, causal=causal, backend="reference"), leaves)


def test_grid_puts_the_batch_on_the_unlimited_axis():
    """More than 65,535 sequences must launch: CUDA limits grid axes y and z
    to 65,535, so the batch goes on axis x, and what would exceed y or z is
    a clear error before any launch."""
    pytest.importorskip("triton")
    from act_kernels.ops.attention import triton_kernels

    assert triton_kernels._grid(100, 64, 70_000, 4) == (70_000, 2, 4)
    with pytest.raises(ValueError, match="at most"):
        triton_kernels._grid(65_536 * 64 + 1, 64, 1, 4)


@pytest.mark.gpu
def test_more_sequences_than_a_grid_axis_holds():
    lengths = [1, 2] * 35_000
    q, k, v, cu, q_rows = problem(lengths, 1, 16, torch.float16, running=0.5)
    out = ak.ragged_attention(q, k, v, cu, q_rows, causal=True, backend="triton")
    assert_close(out, oracle(q, k, v, cu, q_rows, True).to(out.dtype), torch.float16, "out")


# ---------------------------------------------------------------------------
# grouped-query attention: q with Hq = g * Hkv heads, k and v with Hkv
# ---------------------------------------------------------------------------

GROUPS = [pytest.param(2, 2, id="g1"), pytest.param(4, 2, id="g2"), pytest.param(4, 1, id="g4")]


def dense_gqa_oracle(q, k, v, cu, q_rows, causal, scale=None):
    """Grouped-query attention written densely, one sequence at a time: the
    kv heads are expanded so that query head h has kv head h // g, then the
    sequence's queries attend to all its keys (positions <= their own when
    causal) with a plain softmax. Differentiable; returns the output (A, Hq, d)
    and the logsumexp (A, Hq) of the scaled scores."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kv_head = torch.arange(heads, device=q.device) // (heads // kv_heads)
    k, v = k[:, kv_head], v[:, kv_head]                       # (T_tok, Hq, d)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    bounds, rows = cu.tolist(), q_rows.tolist()
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mine = [a for a, t in enumerate(rows) if lo <= t < hi]   # q_rows ascend: q's order
        if not mine:
            continue
        scores = torch.einsum("nhd,khd->hnk", q[mine], k[lo:hi]) * scale
        if causal:
            pos = torch.tensor([rows[a] - lo for a in mine], device=q.device)
            later = torch.arange(hi - lo, device=q.device)[None, None, :] > pos[None, :, None]
            scores = scores.masked_fill(later, -math.inf)
        outs.append(torch.einsum("hnk,khd->nhd", torch.softmax(scores, -1), v[lo:hi]))
        lses.append(torch.logsumexp(scores, -1).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("heads,kv_heads", GROUPS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_reference_matches_dense_oracle(heads, kv_heads, causal):
    """The twins (forward, forward with logsumexp, written-out backward) and the
    reference backend, forward and backward, against the dense oracle in fp64;
    dk and dv have the pools' Hkv heads."""
    q, k, v, cu, q_rows = problem([4, 1, 7, 3], heads, 8, torch.float64, seed=3, kv_heads=kv_heads)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = dense_gqa_oracle(*leaves, cu, q_rows, causal)
    weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    want_grads = torch.autograd.grad(want, leaves, weight)
    tight = dict(atol=1e-12, rtol=1e-10)

    torch.testing.assert_close(reference.ragged_attention(q, k, v, cu, q_rows, causal=causal), want.detach(), **tight)
    out, lse = reference.ragged_attention_lse(q, k, v, cu, q_rows, causal=causal)
    torch.testing.assert_close(out, want.detach(), **tight)
    torch.testing.assert_close(lse, want_lse.detach(), **tight)
    twin = reference.ragged_attention_backward(weight, q, k, v, cu, q_rows, causal=causal)
    assert [t.shape for t in twin] == [q.shape, k.shape, v.shape]
    for name, a, b in zip(("dq", "dk", "dv"), twin, want_grads):
        torch.testing.assert_close(a, b, **tight, msg=name)

    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ak.ragged_attention(*ref_leaves, cu, q_rows, causal=causal, backend="reference")
    torch.testing.assert_close(out, want.detach(), **tight)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, ref_leaves, weight), want_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tight, msg=name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_reference_gradcheck_float64(causal):
    """The twin over a pool of two segments read through a shuffled index, and
    the reference backend's recomputing Function, with Hq = 2 Hkv."""
    q, k, v, cu, q_rows = problem([3, 1, 4], 4, 4, torch.float64, seed=5, kv_heads=2)
    kv_rows = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k[:5], k[5:], v[:5], v[5:])]

    def twin(q, k0, k1, v0, v1):
        return reference.ragged_attention(q, [k0, k1], [v0, v1], cu, q_rows, kv_rows, causal)

    def function(q, k0, k1, v0, v1):
        return ak.ragged_attention(q, [k0, k1], [v0, v1], cu, q_rows, kv_rows=kv_rows, causal=causal,
                                   backend="reference")

    assert torch.autograd.gradcheck(twin, leaves)
    assert torch.autograd.gradcheck(function, leaves)


@representative(heads=4, kv_heads=2, dtype=torch.float16, causal=True)   # float32 against the oracle: below
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_matches_reference(backend, dtype, causal, heads, kv_heads):
    """Triton (interpreted on the CPU: tiny shapes) against the reference
    backend at the dtype's tolerance, and in float32 against the dense oracle."""
    q, k, v, cu, q_rows = problem([3, 9, 1, 6], heads, 16, dtype, running=0.6, seed=14, kv_heads=kv_heads)
    out, ref, g, rg = run_both(backend, q, k, v, cu, q_rows, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, "out")
    for name, a, b, x in zip(("dq", "dk", "dv"), g, rg, (q, k, v)):
        assert a.shape == x.shape
        assert_close(a, b, dtype, name)
    if dtype == torch.float32:
        want, _ = dense_gqa_oracle(q.double(), k.double(), v.double(), cu, q_rows, causal)
        assert_close(out.double(), want, torch.float32, "out vs dense oracle")


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_gqa_pool_segments_and_row_index(backend):
    """Hkv-headed keys and values in a pool of several segments (a strided view
    among them) read through a token -> row index, as a layer keeps the frozen
    rows of earlier steps: the output against the dense oracle over the rows
    the index reads, the pool gradients (Hkv heads, one per segment) against
    the reference backend."""
    heads, kv_heads, dim = 4, 2, 16
    q, _, _, cu, q_rows = problem([6, 9], heads, dim, torch.float32, seed=4, kv_heads=kv_heads)
    total = cu[-1].item()
    g = torch.Generator().manual_seed(1)
    big = torch.randn(total + 5, kv_heads, 3, dim, generator=g).to(DEVICE)   # strided segment source
    segs_k = [torch.randn(4, kv_heads, dim, generator=g).to(DEVICE), big[:, :, 0],
              torch.randn(3, kv_heads, dim, generator=g).to(DEVICE)]
    segs_v = [torch.randn(4, kv_heads, dim, generator=g).to(DEVICE), big[:, :, 1],
              torch.randn(3, kv_heads, dim, generator=g).to(DEVICE)]
    pool = sum(t.shape[0] for t in segs_k)
    kv_rows = torch.randperm(pool, generator=g)[:total].to(DEVICE)   # some pool rows read by no token
    keys, values = torch.cat(segs_k)[kv_rows], torch.cat(segs_v)[kv_rows]
    for causal in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, *segs_k, *segs_v)]
        ref_leaves = [t.detach().clone().requires_grad_() for t in (q, *segs_k, *segs_v)]
        out = ak.ragged_attention(leaves[0], leaves[1:4], leaves[4:], cu, q_rows, kv_rows=kv_rows,
                                  causal=causal, backend=backend)
        ref = ak.ragged_attention(ref_leaves[0], ref_leaves[1:4], ref_leaves[4:], cu, q_rows, kv_rows=kv_rows,
                                  causal=causal, backend="reference")
        want, _ = dense_gqa_oracle(q.double(), keys.double(), values.double(), cu, q_rows, causal)
        assert_close(out.double(), want, torch.float32, "out vs dense oracle")
        assert_close(out, ref, torch.float32, "out")
        for a, b, x in zip(grads(out, leaves), grads(ref, ref_leaves), leaves):
            assert a.shape == b.shape == x.shape
            assert_close(a, b, torch.float32, "pool grad")


@representative(key="dtype", values=[torch.float32], causal=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_opcheck(dtype, causal):
    """The op with Hq = 2 Hkv: float32 runs its Triton path (interpreted on the
    CPU), float64 its reference path; the fake kernels give dk, dv like k, v."""
    q, k, v, cu, q_rows = problem([5, 3], 4, 16, dtype, seed=9, kv_heads=2)
    args = (q.requires_grad_(), [k[:4].requires_grad_(), k[4:].requires_grad_()], [v.requires_grad_()],
            cu, q_rows, None, causal, 0.25, 5)
    torch.library.opcheck(attn_fn.ragged_attention_op, args)
    out, lse = attn_fn.ragged_attention_op(*args)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    dq, dk, dv = attn_fn.ragged_attention_backward_op(torch.ones_like(out), q.detach(), [t.detach() for t in args[1]],
                                                      [v.detach()], cu, q_rows, None, out, lse, causal, 0.25, 5)
    assert dq.shape == q.shape and [t.shape for t in dk] == [(4, 2, 16), (4, 2, 16)] and dv[0].shape == v.shape


@pytest.mark.gpu
def test_gqa_deterministic_backward():
    """Each dK/dV program loops over its group's query heads: still one writer
    per element, so two runs agree bitwise."""
    q, k, v, cu, q_rows = problem([12, 7], 4, 16, torch.float32, seed=8, kv_heads=1)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ak.ragged_attention(*leaves, cu, q_rows, causal=True, backend="triton")
        runs.append([out, *grads(out, leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
