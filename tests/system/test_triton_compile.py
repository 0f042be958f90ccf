"""Triton kernels compiled ahead of time for an sm_90 GPU, on any machine:
the ACT layers' step (gates, halting step with an extra state, and the
gates and halting step fused) and ragged
attention (forward and both backward kernels, every dtype, head dims 64 and
128, causal or not, at the tile sizes the launcher picks on a GPU): the interpreter that runs them in the CPU tests
accepts code the compiler rejects (dtype mixes, non-constexpr branches), so
this catches what would otherwise fail only on a GPU. It compiles and checks
that PTX came out; the values are checked by cells/test_cells.py and
act/test_act_kernels.py. It runs in a subprocess because the test session imports
the kernels under TRITON_INTERPRET=1, where they cannot be compiled."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        sys.exit(77)                      # a Triton without the ahead-of-time API
    import act_kernels.ops.act.triton_kernels as act_triton
    import act_kernels.ops.attention.triton_kernels as attention
    import act_kernels.ops.cells.triton_kernels as cells

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature, constexprs):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        ptx = triton.compile(src, target=target).asm["ptx"]
        assert ".entry" in ptx, fn.__name__
        print(fn.__name__, signature.get("gi_ptr", signature.get("s_ptr")), constexprs, "ok")

    FULL = sys.argv[1] == "full"
    for dtype in ("fp32", "fp16", "bf16", "fp64") if FULL else ("fp32", "bf16", "fp64"):
        p = "*" + dtype
        build(cells._gru_fwd_kernel, dict(gi_ptr=p, s_gi="i64", gh_ptr=p, s_gh="i64", h_ptr=p, s_h="i64",
                                          out_ptr=p, H="i32", BLOCK="constexpr"), {"BLOCK": 256})
        build(cells._gru_bwd_kernel, dict(g_ptr=p, s_g="i64", gi_ptr=p, s_gi="i64", gh_ptr=p, s_gh="i64",
                                          h_ptr=p, s_h="i64", dgi_ptr=p, dgh_ptr=p, dh_ptr=p, H="i32",
                                          BLOCK="constexpr"), {"BLOCK": 256})
        build(cells._lstm_fwd_kernel, dict(gi_ptr=p, s_gi="i64", gh_ptr=p, s_gh="i64", c_ptr=p, s_c="i64",
                                           h_out=p, c_out=p, H="i32", BLOCK="constexpr"), {"BLOCK": 256})
        build(cells._lstm_bwd_kernel, dict(gh_out_ptr=p, s_dh="i64", gc_out_ptr=p, s_dc="i64", gi_ptr=p,
                                           s_gi="i64", gh_ptr=p, s_gh="i64", c_ptr=p, s_c="i64", da_ptr=p,
                                           dc_ptr=p, H="i32", BLOCK="constexpr"), {"BLOCK": 256})
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        halting = dict(active_ptr="*i64", w_ptr=acc, c_ptr=acc, thr_ptr=acc, running_ptr=acc, acc_ptr=acc,
                       stride_acc="i64", steps_ptr="*i64", rem_ptr=acc, p_ptr=acc, hh_ptr=acc, halted_ptr="*i1")
        build(cells._gru_halting_kernel,
              dict(gi_ptr=p, s_gi="i64", gh_ptr=p, s_gh="i64", h_ptr=p, s_h="i64", out_ptr=p, **halting,
                   H="i32", step="i32", max_steps="i32", BLOCK="constexpr"), {"BLOCK": 256})
        build(cells._lstm_halting_kernel,
              dict(gi_ptr=p, s_gi="i64", gh_ptr=p, s_gh="i64", c_ptr=p, s_c="i64", h_out=p, c_out=p,
                   active_ptr="*i64", w_ptr=acc, bias_ptr=acc, thr_ptr=acc, running_ptr=acc, acc_ptr=acc,
                   stride_acc="i64", cacc_ptr=acc, stride_cacc="i64", steps_ptr="*i64", rem_ptr=acc, p_ptr=acc,
                   hh_ptr=acc, halted_ptr="*i1", H="i32", step="i32", max_steps="i32", BLOCK="constexpr"),
              {"BLOCK": 256})
    # a second state tensor (an LSTM's c), and a step per row (the depth-wise scheduler)
    for has_extra, per_row in ((False, False), (True, False), (False, True)):
        build(act_triton._halting_step_kernel,
              dict(s_ptr="*bf16", stride_s="i64", active_ptr="*i64", w_ptr="*fp32", c_ptr="*fp32",
                   thr_ptr="*fp32", running_ptr="*fp32", acc_ptr="*fp32", stride_acc="i64", steps_ptr="*i64",
                   rem_ptr="*fp32", p_ptr="*fp32", h_ptr="*fp32", halted_ptr="*i1", x_ptr="*bf16",
                   stride_x="i64", xacc_ptr="*fp32", stride_xacc="i64", HX="i32", H="i32", step="i32",
                   max_steps="i32", row_steps_ptr="*i64", BLOCK_H="constexpr", BLOCK_X="constexpr",
                   HAS_X="constexpr", PER_ROW_STEP="constexpr"),
              {"BLOCK_H": 256, "BLOCK_X": 128, "HAS_X": has_extra, "PER_ROW_STEP": per_row})

    tables = dict(k_off_ptr="*i64", v_off_ptr="*i64", cu_k_ptr="*i32", cu_q_ptr="*i32", q_rows_ptr="*i64")
    strides = dict(stride_qa="i64", stride_qh="i64", stride_kh="i64", stride_vh="i64")
    meta = dict(CAUSAL="constexpr", IEEE="constexpr", GROUP="constexpr", BLOCK_M="constexpr",
                BLOCK_N="constexpr", BLOCK_D="constexpr")
    full = [(d, ieee, dim, causal) for d, ieee in (("bf16", 0), ("fp16", 0), ("fp32", 1))
            for dim in (64, 128) for causal in (False, True)]
    quick = [("bf16", 0, 128, True), ("bf16", 0, 64, False), ("fp32", 1, 64, True)]
    for dtype, ieee, dim, causal in full if FULL else quick:
        p = "*" + dtype
        block_m, block_n = (64, 64) if dim <= 64 else (64, 32)   # a compile check; resources: test_triton_resources
        consts = dict(CAUSAL=causal, IEEE=ieee, GROUP=1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=dim)
        build(attention._attn_fwd_kernel,
              dict(q_ptr=p, k_ptr=p, v_ptr=p, **tables, o_ptr=p, lse_ptr="*fp32", **strides,
                   stride_oa="i64", stride_oh="i64", heads="i32", D="i32", qk_scale="fp32", **meta), consts)
        grads = dict(do_ptr=p, lse_ptr="*fp32", delta_ptr="*fp32")
        tail = dict(stride_doa="i64", stride_doh="i64", heads="i32", D="i32", qk_scale="fp32",
                    sm_scale="fp32", **meta)
        build(attention._attn_bwd_kv_kernel,
              dict(q_ptr=p, k_ptr=p, v_ptr=p, **tables, **grads, dk_ptr=p, dv_ptr=p, **strides, **tail), consts)
        build(attention._attn_bwd_q_kernel,
              dict(q_ptr=p, k_ptr=p, v_ptr=p, **tables, **grads, dq_ptr=p, **strides, **tail), consts)
''')


def _compile(matrix):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, matrix], env=env, capture_output=True, text=True,
                         timeout=1200)
    if run.returncode == 77:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.count(" ok")


def test_kernels_compile_for_sm90():
    """Every kernel once per dtype path: gates in fp32, bf16 and fp64; attention
    at bf16 d = 128 causal, bf16 d = 64, fp32 d = 64 causal (about a minute)."""
    assert _compile("quick") == 3 * 6 + 3 + 3 * 3


@pytest.mark.slow
def test_kernels_compile_for_sm90_every_configuration():
    """Every dtype, head dim 64 and 128, causal and not (minutes)."""
    assert _compile("full") == 4 * 6 + 3 + 12 * 3
