"""Triton kernels for ragged attention (design §9), flash-style, and their launchers.

Forward: one program per (block of BLOCK_M queries of one sequence, sequence,
head). It streams the sequence's keys and values in blocks of BLOCK_N with an
online softmax in float32 and writes the output and the logsumexp; no
(queries, keys) matrix is ever stored. Backward recomputes the scores from the
saved logsumexp: one kernel per (key block, sequence, kv head) accumulates dK
and dV over the sequence's running queries, one per (query block, sequence, head)
accumulates dQ. Each output element has exactly one writer, so the backward is
deterministic and needs no atomics.

Keys and values are read through a per-token element offset (see
`index.row_offsets`), so a pool of key/value rows spread over several tensors
is never copied.

Grouped-query attention: q has Hq = GROUP * Hkv heads, the pools Hkv, and
query head h reads kv head h // GROUP, in place (never repeated). The forward
and dQ programs run per query head; the dK/dV program runs per kv head and
loops over its GROUP query heads, so each dK/dV element still has one writer.
GROUP is a constexpr: GROUP = 1 compiles to the kernels of plain multi-head
attention.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ...backends import triton_interpreted
from ..launch import dense, on_device
from .index import PerStep, query_offsets, row_offsets

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    warps: int
    stages: int


# Tiles, warps and pipelining stages per kernel, half or full precision and
# BLOCK_D on a GPU: (BLOCK_M, BLOCK_N, warps, stages). Chosen from sm_90
# ahead-of-time compiles (tests/system/test_triton_resources.py checks every
# entry): shared memory within 232,448 B per block, and in half precision no
# stack frame (spills). What the first choices cost on sm_90: the float32
# dK/dV kernel at BLOCK_D 256 asked 296,960 B of shared memory with 3 stages;
# the half-precision kernels at 4 warps spilled at BLOCK_D 64 (dK/dV, 184 B
# of stack per thread), 128 (16..624 B) and 256 (264..976 B at 8 warps).
# Float32 takes full-precision dots (no TF32), which ptxas builds from FMAs on
# a stack frame: a cost the resource test bounds, not a spill it can remove.
# The dK/dV kernel's loop over a query group (GROUP > 1) asks more shared
# memory than GROUP 1, at most 174,080 B (float32, BLOCK_D 128, GROUP 4).
HALF = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 8, 3),
        128: {"fwd": (64, 32, 8, 3), "bwd_kv": (32, 32, 4, 3), "bwd_q": (64, 32, 8, 3)},
        256: (32, 32, 8, 3)}
FULL = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3),
        256: {"fwd": (32, 32, 8, 3), "bwd_kv": (32, 32, 8, 2), "bwd_q": (32, 32, 8, 3)}}
KERNELS = ("fwd", "bwd_kv", "bwd_q")


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """Tiles, warps and pipelining stages of `kernel` ("fwd", "bwd_kv", "bwd_q")
    for a head dim and dtype."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda" or triton_interpreted():
        return LaunchConfig(16, 16, block_d, 1, 1)   # the interpreter runs every program in Python: keep tiles small
    return gpu_config(kernel, block_d, dtype == torch.float32)


def gpu_config(kernel: str, block_d: int, fp32: bool) -> LaunchConfig:
    entry = (FULL if fp32 else HALF)[block_d]
    block_m, block_n, warps, stages = entry[kernel] if isinstance(entry, dict) else entry
    return LaunchConfig(block_m, block_n, block_d, warps, stages)


def gpu_configs():
    """Every (kernel, dtype name, LaunchConfig) the launchers can choose on a GPU."""
    for kernel in KERNELS:
        for dtype in ("fp32", "fp16", "bf16"):
            for block_d in (16, 32, 64, 128, 256):
                yield kernel, dtype, gpu_config(kernel, block_d, dtype == "fp32")


def _dot_mode(dtype: torch.dtype) -> int:
    """0: the tensor cores' native product (float16, bfloat16, float32 accumulation);
    1: float32 in full precision, not TF32, so the kernel matches PyTorch's
       float32 attention to float32 rounding;
    2: bfloat16 under the interpreter, whose bfloat16 dot is wrong: the
       operands are widened first, which gives the same exact products."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and triton_interpreted():
        return 2
    return 0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _rows(ptr, o_m, stride_a, stride_h, i_h, o_d, mask):
    """A (rows, BLOCK_D) tile of a (A, heads, d) tensor: rows o_m, head i_h."""
    return tl.load(ptr + o_m[:, None].to(tl.int64) * stride_a + i_h * stride_h + o_d[None, :], mask=mask, other=0.0)


@triton.jit
def _pool_rows(ptr, off_ptr, bos, o_n, m_n, stride_h, i_h, o_d, m_d):
    """The key (or value) tile of tokens bos + o_n, read through their pool offsets."""
    b_off = tl.load(off_ptr + bos + o_n, mask=m_n, other=0)
    return tl.load(ptr + b_off[:, None] + i_h * stride_h + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, k_off_ptr, v_off_ptr, cu_k_ptr, cu_q_ptr, q_rows_ptr,
    o_ptr, lse_ptr,
    stride_qa, stride_qh, stride_kh, stride_vh, stride_oa, stride_oh,
    heads, D, qk_scale,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b, i_m, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)   # i_h: the query head
    i_kv = i_h // GROUP
    q_bos = tl.load(cu_q_ptr + i_b)
    q_eos = tl.load(cu_q_ptr + i_b + 1)
    if i_m * BLOCK_M >= q_eos - q_bos:
        return
    bos = tl.load(cu_k_ptr + i_b)
    seq_len = tl.load(cu_k_ptr + i_b + 1) - bos

    o_m = q_bos + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < q_eos
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_q = _rows(q_ptr, o_m, stride_qa, stride_qh, i_h, o_d, m_m[:, None] & m_d[None, :])
    # position of each query in its sequence; key 0 is visible to every query,
    # so the running maximum is finite after the first key block
    b_pos = tl.where(m_m, tl.load(q_rows_ptr + o_m, mask=m_m, other=0).to(tl.int32) - bos, 0)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, tl.max(b_pos, axis=0) + 1)
    for start_n in range(0, hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        b_k = _pool_rows(k_ptr, k_off_ptr, bos, o_n, m_n, stride_kh, i_kv, o_d, m_d)
        b_s = _dot(b_q, tl.trans(b_k), IEEE) * qk_scale          # log2 domain
        valid = m_n[None, :]
        if CAUSAL:
            valid = valid & (o_n[None, :] <= b_pos[:, None])
        b_s = tl.where(valid, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_v = _pool_rows(v_ptr, v_off_ptr, bos, o_n, m_n, stride_vh, i_kv, o_d, m_d)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, IEEE)
        b_m = b_m_new

    b_acc = b_acc / b_l[:, None]
    p_o = o_ptr + o_m[:, None].to(tl.int64) * stride_oa + i_h * stride_oh + o_d[None, :]
    tl.store(p_o, b_acc.to(o_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    # natural-log logsumexp of the scaled scores
    tl.store(lse_ptr + o_m.to(tl.int64) * heads + i_h, (b_m + tl.log2(b_l)) / 1.4426950408889634, mask=m_m)


@triton.jit
def _attn_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_off_ptr, v_off_ptr, cu_k_ptr, cu_q_ptr, q_rows_ptr,
    do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qa, stride_qh, stride_kh, stride_vh, stride_doa, stride_doh,
    heads, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b, i_n, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)   # i_kv: the kv head
    kv_heads = heads // GROUP
    bos = tl.load(cu_k_ptr + i_b)
    seq_len = tl.load(cu_k_ptr + i_b + 1) - bos
    if i_n * BLOCK_N >= seq_len:
        return
    q_bos = tl.load(cu_q_ptr + i_b)
    q_eos = tl.load(cu_q_ptr + i_b + 1)

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < seq_len
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    b_k = _pool_rows(k_ptr, k_off_ptr, bos, o_n, m_n, stride_kh, i_kv, o_d, m_d)
    b_v = _pool_rows(v_ptr, v_off_ptr, bos, o_n, m_n, stride_vh, i_kv, o_d, m_d)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # the GROUP query heads that read this kv head, and every running query
    # of the sequence, may attend to this key block
    for i_g in range(GROUP):
        i_h = i_kv * GROUP + i_g
        for start_m in range(q_bos, q_eos, BLOCK_M):
            o_m = start_m + tl.arange(0, BLOCK_M)
            m_m = o_m < q_eos
            m_md = m_m[:, None] & m_d[None, :]
            b_q = _rows(q_ptr, o_m, stride_qa, stride_qh, i_h, o_d, m_md)
            b_do = _rows(do_ptr, o_m, stride_doa, stride_doh, i_h, o_d, m_md)
            b_lse = tl.load(lse_ptr + o_m.to(tl.int64) * heads + i_h, mask=m_m, other=0.0) * 1.4426950408889634
            b_delta = tl.load(delta_ptr + o_m.to(tl.int64) * heads + i_h, mask=m_m, other=0.0)
            valid = m_m[:, None] & m_n[None, :]
            if CAUSAL:
                b_pos = tl.load(q_rows_ptr + o_m, mask=m_m, other=0).to(tl.int32) - bos
                valid = valid & (o_n[None, :] <= b_pos[:, None])
            b_s = _dot(b_q, tl.trans(b_k), IEEE) * qk_scale
            b_p = tl.where(valid, tl.exp2(b_s - b_lse[:, None]), 0.0)          # (M, N)
            b_dv += _dot(tl.trans(b_p.to(b_do.dtype)), b_do, IEEE)
            b_dp = _dot(b_do, tl.trans(b_v), IEEE)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, IEEE)

    # dK and dV are written per token (T_tok, Hkv, d), contiguous
    p_out = (o_n[:, None].to(tl.int64) * kv_heads * D + bos.to(tl.int64) * kv_heads * D + i_kv * D
             + o_d[None, :])
    tl.store(dk_ptr + p_out, (b_dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=m_nd)
    tl.store(dv_ptr + p_out, b_dv.to(dv_ptr.dtype.element_ty), mask=m_nd)


@triton.jit
def _attn_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, k_off_ptr, v_off_ptr, cu_k_ptr, cu_q_ptr, q_rows_ptr,
    do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qa, stride_qh, stride_kh, stride_vh, stride_doa, stride_doh,
    heads, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b, i_m, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)   # i_h: the query head
    i_kv = i_h // GROUP
    q_bos = tl.load(cu_q_ptr + i_b)
    q_eos = tl.load(cu_q_ptr + i_b + 1)
    if i_m * BLOCK_M >= q_eos - q_bos:
        return
    bos = tl.load(cu_k_ptr + i_b)
    seq_len = tl.load(cu_k_ptr + i_b + 1) - bos

    o_m = q_bos + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < q_eos
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    b_q = _rows(q_ptr, o_m, stride_qa, stride_qh, i_h, o_d, m_md)
    b_do = _rows(do_ptr, o_m, stride_doa, stride_doh, i_h, o_d, m_md)
    b_lse = tl.load(lse_ptr + o_m.to(tl.int64) * heads + i_h, mask=m_m, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta_ptr + o_m.to(tl.int64) * heads + i_h, mask=m_m, other=0.0)
    b_pos = tl.where(m_m, tl.load(q_rows_ptr + o_m, mask=m_m, other=0).to(tl.int32) - bos, 0)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, tl.max(b_pos, axis=0) + 1)
    for start_n in range(0, hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        b_k = _pool_rows(k_ptr, k_off_ptr, bos, o_n, m_n, stride_kh, i_kv, o_d, m_d)
        b_v = _pool_rows(v_ptr, v_off_ptr, bos, o_n, m_n, stride_vh, i_kv, o_d, m_d)
        valid = m_m[:, None] & m_n[None, :]
        if CAUSAL:
            valid = valid & (o_n[None, :] <= b_pos[:, None])
        b_s = _dot(b_q, tl.trans(b_k), IEEE) * qk_scale
        b_p = tl.where(valid, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = _dot(b_do, tl.trans(b_v), IEEE)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _dot(b_ds.to(b_k.dtype), b_k, IEEE)

    p_dq = dq_ptr + o_m[:, None].to(tl.int64) * heads * D + i_h * D + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=m_md)


def uniform_pool(pool: Sequence[torch.Tensor]) -> list:
    """The kernels read every segment of a pool with pool[0]'s head stride and a
    unit feature stride; a segment that differs is copied once (rare: the rows
    of one projection output already agree)."""
    first = pool[0] if pool[0].stride(2) == 1 else pool[0].contiguous()
    out = [first]
    for seg in pool[1:]:
        ok = seg.stride(2) == 1 and (seg.shape[1] == 1 or seg.stride(1) == first.stride(1))
        out.append(seg if ok else _restride(seg, first.stride(1)))
    return out


def _restride(seg: torch.Tensor, head_stride: int) -> torch.Tensor:
    rows, heads, dim = seg.shape
    out = torch.empty_strided((rows, heads, dim), (heads * head_stride, head_stride, 1),
                              dtype=seg.dtype, device=seg.device)
    out.copy_(seg)
    return out


def _unit_features(t: torch.Tensor) -> torch.Tensor:
    """(rows, heads, d) with a unit feature stride: the kernels read d contiguously."""
    return t if t.shape[2] <= 1 or t.stride(2) == 1 else t.contiguous()


MAX_GRID_YZ = 65535   # CUDA's limit on grid axes y and z; axis x takes 2^31 - 1


def _grid(max_seqlen: int, block: int, batch: int, heads: int):
    # the batch on axis x, which has no practical limit: any number of sequences launches
    blocks = triton.cdiv(max(max_seqlen, 1), block)
    if blocks > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"the triton ragged attention takes sequences of at most {MAX_GRID_YZ * block} tokens "
                         f"and {MAX_GRID_YZ} heads, got a sequence of {max_seqlen} and {heads} heads")
    return (batch, blocks, heads)


def attention_forward(
    q: torch.Tensor, k_pool: Sequence[torch.Tensor], v_pool: Sequence[torch.Tensor],
    k_off: torch.Tensor, v_off: torch.Tensor, cu_seqlens: torch.Tensor, cu_q: torch.Tensor,
    q_rows: torch.Tensor, causal: bool, scale: float, max_seqlen: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out (A, Hq, d) in q's dtype and lse (A, Hq) float32; the pools
    hold (P, Hkv, d) with Hq = g * Hkv (grouped-query attention when g > 1).
    k_off / v_off (T_tok,) int64 are element offsets from k_pool[0] / v_pool[0]
    (`index.row_offsets` of the pools as given here)."""
    num_q, heads, dim = q.shape
    out = torch.empty(num_q, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_q, heads, dtype=torch.float32, device=q.device)
    if num_q == 0:
        return out, lse
    cfg = launch_config("fwd", dim, q.dtype, q.device)
    batch = cu_seqlens.shape[0] - 1
    k0, v0 = k_pool[0], v_pool[0]
    q = _unit_features(q)
    with on_device(q.device):
        _attn_fwd_kernel[_grid(max_seqlen, cfg.block_m, batch, heads)](
            q, k0, v0, k_off, v_off, cu_seqlens, cu_q, q_rows, out, lse,
            q.stride(0), q.stride(1), k0.stride(1), v0.stride(1), out.stride(0), out.stride(1),
            heads, dim, scale * LOG2E,
            CAUSAL=causal, IEEE=_dot_mode(q.dtype), GROUP=heads // k0.shape[1],
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.warps,
            num_stages=cfg.stages,
        )
    return out, lse


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k_pool: Sequence[torch.Tensor], v_pool: Sequence[torch.Tensor],
    k_off: torch.Tensor, v_off: torch.Tensor, cu_seqlens: torch.Tensor, cu_q: torch.Tensor,
    q_rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, max_seqlen: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq (A, Hq, d) and dk, dv per token (T_tok, Hkv, d), in q's dtype."""
    num_q, heads, dim = q.shape
    num_tokens, kv_heads = k_off.shape[0], k_pool[0].shape[1]
    dq = torch.empty(num_q, heads, dim, dtype=q.dtype, device=q.device)
    dk = torch.empty(num_tokens, kv_heads, dim, dtype=q.dtype, device=q.device)
    dv = torch.empty(num_tokens, kv_heads, dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return dq, dk, dv
    q, grad_out = _unit_features(q), _unit_features(grad_out)
    # delta = rowsum(dO * O), the softmax backward's correction term
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    batch = cu_seqlens.shape[0] - 1
    k0, v0 = k_pool[0], v_pool[0]
    common = (q.stride(0), q.stride(1), k0.stride(1), v0.stride(1), grad_out.stride(0), grad_out.stride(1),
              heads, dim, scale * LOG2E, scale)

    def meta(cfg: LaunchConfig):
        return dict(CAUSAL=causal, IEEE=_dot_mode(q.dtype), GROUP=heads // kv_heads, BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.warps, num_stages=cfg.stages)

    kv, dq_cfg = launch_config("bwd_kv", dim, q.dtype, q.device), launch_config("bwd_q", dim, q.dtype, q.device)
    with on_device(q.device):
        _attn_bwd_kv_kernel[_grid(max_seqlen, kv.block_n, batch, kv_heads)](   # one program per kv head
            q, k0, v0, k_off, v_off, cu_seqlens, cu_q, q_rows, grad_out, lse, delta, dk, dv, *common, **meta(kv))
        if num_q:
            _attn_bwd_q_kernel[_grid(max_seqlen, dq_cfg.block_m, batch, heads)](
                q, k0, v0, k_off, v_off, cu_seqlens, cu_q, q_rows, grad_out, lse, delta, dq, *common,
                **meta(dq_cfg))
    return dq, dk, dv


class Launch:
    """The Triton forward and backward for one call, with the index tables
    they share (built once per forward)."""

    def __init__(self, k_pool, v_pool, cu_seqlens, q_rows, kv_rows, num_tokens):
        # the kernels read the indices by position, and every pool segment
        # with one head stride and a unit feature stride
        self.cu_seqlens, self.q_rows = dense(cu_seqlens), dense(q_rows)
        self.k_pool, self.v_pool = uniform_pool(k_pool), uniform_pool(v_pool)
        self.k_off = row_offsets(self.k_pool, kv_rows, num_tokens)
        # keys and values split from one projection's rows sit at the same
        # offsets from their first segments: one table serves both
        self.v_off = self.k_off if same_layout(self.k_pool, self.v_pool) else row_offsets(self.v_pool, kv_rows,
                                                                                             num_tokens)
        self.cu_q = _query_offsets_of(self.cu_seqlens, self.q_rows)


# the layers of one ponder step share their running queries' offsets
_query_offsets_of = PerStep(query_offsets)


def same_layout(k_pool, v_pool) -> bool:
    """Whether every value segment lies where its key segment lies, relative
    to the first segment of each (same rows, strides and offsets): host
    metadata only, no device work."""
    if len(k_pool) != len(v_pool):
        return False
    k0, v0 = k_pool[0], v_pool[0]
    if k0.element_size() != v0.element_size():
        return False
    return all(k.shape[0] == v.shape[0] and k.stride() == v.stride()
               and k.data_ptr() - k0.data_ptr() == v.data_ptr() - v0.data_ptr() for k, v in zip(k_pool, v_pool))
