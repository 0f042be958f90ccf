"""Ragged attention's CPU forward kernel (csrc/attention/ragged_cpu.cpp,
ops/attention/cpu_kernels.py) against the reference twin and the plain
oracle: float32 and float64, grouped-query heads, causal and full, empty
sequences and no queries, B = 1, head dims off the kernel's 8 lanes, a pool
read through a row index, non-contiguous and stride-0 inputs; bad rows; and
where `attend` sends a call (backends.cpu_attention_serves)."""
import pytest
import torch

import act_kernels.ops.attention.function as attention_function
from act_kernels.backends import cpu_kernels_serve, resolve_attention
from act_kernels.ops.attention import attend, reference
from test_attention import oracle, problem

pytestmark = pytest.mark.skipif(not cpu_kernels_serve(torch.device("cpu"), torch.float32),
                                reason="needs the compiled extension (its CPU kernels)")

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def kernel(*args):
    from act_kernels.ops.attention.cpu_kernels import attention_forward

    return attention_forward(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (4, 2, 64), (6, 2, 13), (3, 1, 8), (2, 2, 5)])
@pytest.mark.parametrize("lengths,running", [([7, 0, 12, 1, 30], 0.5), ([9], 1.0), ([3, 5, 4], 0.2)])
def test_matches_reference_and_oracle(dtype, causal, heads, kv_heads, dim, lengths, running):
    q, k, v, cu, q_rows = problem(lengths, heads, dim, dtype, running=running, seed=dim, kv_heads=kv_heads)
    out = kernel(q, [k], [v], cu, q_rows, None, causal, 0.37)
    torch.testing.assert_close(out, reference.ragged_attention(q, k, v, cu, q_rows, causal=causal, scale=0.37),
                               **TOL[dtype])
    expect = oracle(q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1), cu,
                    q_rows, causal, scale=0.37)
    torch.testing.assert_close(out.double(), expect, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_read_through_a_row_index(dtype):
    """Token j's key and value sit at pool row kv_rows[j] of a larger pool
    (a cache with rows of other sequences and steps between)."""
    q, k, v, cu, q_rows = problem([6, 11, 4], 4, 16, dtype, running=0.7, seed=3, kv_heads=2)
    g = torch.Generator().manual_seed(4)
    pool_k = torch.randn(40, 2, 16, generator=g).to(dtype)
    pool_v = torch.randn(40, 2, 16, generator=g).to(dtype)
    kv_rows = torch.randperm(40, generator=g)[:k.shape[0]]
    pool_k[kv_rows], pool_v[kv_rows] = k, v
    out = kernel(q, [pool_k], [pool_v], cu, q_rows, kv_rows, True, 0.25)
    torch.testing.assert_close(out, reference.ragged_attention(q, k, v, cu, q_rows, causal=True, scale=0.25),
                               **TOL[dtype])
    same = kernel(q, [pool_k], [pool_v], cu, q_rows, kv_rows.to(torch.int32), True, 0.25)
    assert torch.equal(out, same)


def test_no_query_and_one_query():
    q, k, v, cu, _ = problem([5, 3], 2, 8, torch.float32, seed=5)
    none = torch.zeros(0, dtype=torch.int64)
    out = kernel(q[:0], [k], [v], cu, none, None, True, 0.5)
    assert out.shape == (0, 2, 8)
    one = torch.tensor([6])
    torch.testing.assert_close(kernel(q[:1], [k], [v], cu, one, None, True, 0.5),
                               reference.ragged_attention(q[:1], k, v, cu, one, causal=True, scale=0.5), **TOL[q.dtype])


def test_noncontiguous_and_stride0_inputs():
    q, k, v, cu, q_rows = problem([8, 5, 9], 4, 16, torch.float64, running=0.6, seed=6, kv_heads=2)
    # q with its heads and rows strided (features contiguous), and q with strided features
    wide = torch.randn(q.shape[0], 8, 16, dtype=torch.float64)
    wide[:, ::2] = q
    strided_features = torch.randn(q.shape[0], 4, 32, dtype=torch.float64)
    strided_features[..., ::2] = q
    # a stride-0 (expanded) kv head, and cu_seqlens as a strided view
    k0 = k[:, :1].expand(-1, 2, -1)
    spread = torch.zeros(2 * cu.numel() - 1, dtype=torch.int32)
    spread[::2] = cu
    expect = reference.ragged_attention(q, k0, v, cu, q_rows, causal=True, scale=0.3)
    for query in (wide[:, ::2], strided_features[..., ::2]):
        assert not query.is_contiguous()
        out = kernel(query, [k0], [v], spread[::2], q_rows, None, True, 0.3)
        torch.testing.assert_close(out, expect, **TOL[torch.float64])


def test_a_query_outside_the_sequences_is_an_error():
    q, k, v, cu, _ = problem([4, 4], 2, 8, torch.float32, seed=7)
    with pytest.raises(ValueError, match="outside cu_seqlens"):
        kernel(q[:1], [k], [v], cu, torch.tensor([8]), None, True, 0.5)


def test_auto_resolves_to_the_kernel_backend_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.float32) == "cpu"
    assert resolve_attention("auto", cpu, torch.float64) == "cpu"
    assert resolve_attention("auto", cpu, torch.bfloat16) == "reference"   # the kernel takes float32/float64
    assert resolve_attention("reference", cpu, torch.float32) == "reference"


@pytest.fixture
def kernel_calls(monkeypatch):
    import act_kernels.ops.attention.cpu_kernels as cpu_kernels

    seen = []
    original = cpu_kernels.attention_forward

    def recorded(*args):
        seen.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(cpu_kernels, "attention_forward", recorded)
    return seen


def test_attend_takes_the_kernel_for_a_decode_step_only(kernel_calls, monkeypatch):
    """"cpu": the kernel for a call with no gradient and at most one query
    per sequence; the reference's fused attention (and its autograd) for a
    call that needs a gradient or has more queries than sequences."""
    q, k, v, cu, _ = problem([6, 9, 4], 4, 16, torch.float64, seed=8, kv_heads=2)
    decode = torch.tensor([5, 14, 18])
    expect = reference.ragged_attention(q[:3], k, v, cu, decode, causal=True, scale=0.25)
    with torch.no_grad():
        out = attend(q[:3], [k], [v], cu, decode, None, True, 0.25, 9, "cpu")
    torch.testing.assert_close(out, expect, **TOL[torch.float64])
    assert kernel_calls == [3]
    prompt = torch.arange(19)
    with torch.no_grad():
        attend(torch.randn(19, 4, 16, dtype=torch.float64), [k], [v], cu, prompt, None, True, 0.25, 9, "cpu")
    assert kernel_calls == [3]
    leaf = q[:3].clone().requires_grad_()
    out = attend(leaf, [k], [v], cu, decode, None, True, 0.25, 9, "cpu")
    assert kernel_calls == [3] and out.requires_grad
    torch.testing.assert_close(out, expect, **TOL[torch.float64])
    assert attention_function.cpu_attention_serves(q[:3], [k], [v], 3)


@pytest.mark.parametrize("q_rows,kv_rows,cu,match", [
    ([2 ** 32 + 1], None, None, "outside cu_seqlens"),        # would pass as 1 once narrowed to int32
    ([-1], None, None, "outside cu_seqlens"),
    ([4], [0, 1, 2, 3, 10 ** 9, 5, 6, 7], None, "outside the pools"),
    ([4], [0, 1, 2, 3, -1, 5, 6, 7], None, "outside the pools"),
    ([2], None, [0, 5, 3], "non-decreasing"),
    ([2], None, [0, 4, 40], "past the tokens"),
    ([2], None, [-1, 4, 8], "start at 0"),
], ids=["int64 query", "negative query", "row past the pool", "negative row", "decreasing cu", "cu past the pool",
        "negative cu"])
def test_bad_indices_raise_before_anything_is_read(q_rows, kv_rows, cu, match):
    """The kernel checks every index it reads through: bad input is an error,
    never a read outside the pools."""
    q, k, v, good_cu, _ = problem([4, 4], 2, 8, torch.float32, seed=7)
    table = None if kv_rows is None else torch.tensor(kv_rows)
    offsets = good_cu if cu is None else torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        kernel(q[:1], [k], [v], offsets, torch.tensor(q_rows), table, True, 0.5)


def test_autocast_half_precision_takes_the_reference(kernel_calls):
    """Under CPU autocast the backend is chosen from the module's float32,
    while q and the pools reach attention in bfloat16: the kernel (float32 /
    float64 only) must not be handed them."""
    q, k, v, cu, _ = problem([6, 9, 4], 4, 16, torch.float32, seed=9, kv_heads=2)
    decode = torch.tensor([5, 14, 18])
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q[:3], k, v))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q16, [k16], [v16], cu, decode, None, True, 0.25, 9, "cpu")
    assert kernel_calls == [] and out.dtype == torch.bfloat16
    expect = reference.ragged_attention(q16, k16, v16, cu, decode, causal=True, scale=0.25)
    torch.testing.assert_close(out, expect, atol=2e-2, rtol=2e-2)


def test_forward_mode_tangents_are_not_dropped(kernel_calls):
    """A dual tensor does not require grad, yet carries a tangent: the
    forward kernel would return a plain tensor and lose it. Inside a dual
    level the call goes to the reference, which either carries the tangent
    or says it cannot."""
    import torch.autograd.forward_ad as fwAD

    q, k, v, cu, _ = problem([6, 9, 4], 4, 16, torch.float64, seed=10, kv_heads=2)
    decode = torch.tensor([5, 14, 18])
    with fwAD.dual_level():
        dual = fwAD.make_dual(q[:3].clone(), torch.ones_like(q[:3]))
        try:
            out = attend(dual, [k], [v], cu, decode, None, True, 0.25, 9, "cpu")
        except (NotImplementedError, RuntimeError) as error:
            assert "jvp" in str(error) or "forward" in str(error).lower()
        else:
            assert fwAD.unpack_dual(out).tangent is not None
    assert kernel_calls == []
