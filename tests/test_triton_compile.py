"""The Triton kernels of the ACT layers' step compiled ahead of time for an
sm_90 GPU, on any machine: the interpreter that runs them in the CPU tests
accepts code the compiler rejects (dtype mixes, non-constexpr branches), so
this catches what would otherwise fail only on a GPU. It compiles and checks
that PTX came out; the values are checked by test_cells.py and
test_kernels.py. It runs in a subprocess because the test session imports
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
    import act_kernels.ops.cells.triton_kernels as cells

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature, constexprs):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        ptx = triton.compile(src, target=target).asm["ptx"]
        assert ".entry" in ptx, fn.__name__
        print(fn.__name__, signature.get("gi_ptr", signature.get("s_ptr")), constexprs, "ok")

    for dtype in ("fp32", "fp16", "bf16", "fp64"):
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
    for has_extra in (False, True):
        build(act_triton._halting_step_kernel,
              dict(s_ptr="*bf16", stride_s="i64", active_ptr="*i64", w_ptr="*fp32", c_ptr="*fp32",
                   thr_ptr="*fp32", running_ptr="*fp32", acc_ptr="*fp32", stride_acc="i64", steps_ptr="*i64",
                   rem_ptr="*fp32", p_ptr="*fp32", h_ptr="*fp32", halted_ptr="*i1", x_ptr="*bf16",
                   stride_x="i64", xacc_ptr="*fp32", stride_xacc="i64", HX="i32", H="i32", step="i32",
                   max_steps="i32", BLOCK_H="constexpr", BLOCK_X="constexpr", HAS_X="constexpr"),
              {"BLOCK_H": 256, "BLOCK_X": 128, "HAS_X": has_extra})
''')


def test_layer_step_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 77:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" ok") == 18, run.stdout
