"""Every launch configuration the Triton launchers can choose on a GPU,
compiled ahead of time for sm_90, against the device's limits: shared memory
per block within sm_90's 232,448 B, no local memory for spills, and a
per-thread stack frame within STACK_BOUND. The interpreter that runs the kernels in
the CPU tests knows neither limit, so an over-budget configuration would
otherwise first fail on a GPU (OutOfResources at launch).

The configurations come from the launchers' own tables
(`ops.attention.triton_kernels.gpu_configs`, the row kernels' BLOCK_H and
warps from `ops.triton_helpers.block_and_warps`), so a change there is what
this test compiles. Registers and local memory are read from the cubin with
the cuobjdump Triton ships. The default run compiles the largest tiles of
every kernel (the ones nearest the limits); `--run-slow` compiles them all.
It runs in a subprocess: the test session imports the kernels under
TRITON_INTERPRET=1, where they cannot be compiled."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = 232448      # sm_90: bytes of shared memory one block may use
LOCAL_BOUND = 0            # bytes of spilled registers per thread allowed
# Bytes of stack frame per thread allowed (local memory too). The float32
# attention kernels take full-precision dots (input_precision="ieee", so that
# they match PyTorch's float32 attention; not TF32): ptxas builds them from
# FMAs on a stack frame of up to about 8 KB per thread (32 registers). That
# costs speed, not correctness, and is stated here so that it cannot grow
# unseen; every other kernel has none.
STACK_BOUND = {"fp32": 16384}

SCRIPT = textwrap.dedent('''
    import json, os, subprocess, sys, tempfile
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        sys.exit(77)
    import act_kernels.ops.attention.triton_kernels as attention
    import act_kernels.ops.pondernet.triton_kernels as pondernet
    from act_kernels.ops.triton_helpers import block_and_warps

    FULL = sys.argv[1] == "full"
    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def usage(cubin):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(kv.split(":") for kv in text.split() if kv.count(":") == 1 and kv.split(":")[1].isdigit())
        return int(fields.get("REG", -1)), int(fields.get("LOCAL", -1)), int(fields.get("STACK", -1))

    def build(name, fn, signature, constexprs, warps, stages, config):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
        regs, local, stack = usage(k.asm["cubin"])
        print(json.dumps(dict(kernel=name, config=config, shared=k.metadata.shared, registers=regs,
                              local=local, stack=stack)), flush=True)

    tables = dict(k_off_ptr="*i64", v_off_ptr="*i64", cu_k_ptr="*i32", cu_q_ptr="*i32", q_rows_ptr="*i64")
    strides = dict(stride_qa="i64", stride_qh="i64", stride_kh="i64", stride_vh="i64")
    meta = dict(CAUSAL="constexpr", IEEE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                BLOCK_D="constexpr")
    for kernel, dtype, cfg in attention.gpu_configs():
        if not FULL and (cfg.block_d != 256 or dtype == "fp16"):
            continue
        p = "*" + dtype
        consts = dict(CAUSAL=True, IEEE=1 if dtype == "fp32" else 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_D=cfg.block_d)
        grads = dict(do_ptr=p, lse_ptr="*fp32", delta_ptr="*fp32")
        tail = dict(stride_doa="i64", stride_doh="i64", heads="i32", D="i32", qk_scale="fp32",
                    sm_scale="fp32", **meta)
        if kernel == "fwd":
            fn, sig = attention._attn_fwd_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, **tables, o_ptr=p,
                                                       lse_ptr="*fp32", **strides, stride_oa="i64",
                                                       stride_oh="i64", heads="i32", D="i32", qk_scale="fp32",
                                                       **meta)
        elif kernel == "bwd_kv":
            fn, sig = attention._attn_bwd_kv_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, **tables, **grads,
                                                          dk_ptr=p, dv_ptr=p, **strides, **tail)
        else:
            fn, sig = attention._attn_bwd_q_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, **tables, **grads,
                                                         dq_ptr=p, **strides, **tail)
        config = (f"{dtype} BLOCK_M {cfg.block_m} BLOCK_N {cfg.block_n} BLOCK_D {cfg.block_d} "
                  f"warps {cfg.warps} stages {cfg.stages}")
        build(f"attention {kernel}", fn, sig, consts, cfg.warps, cfg.stages, config)

    # PonderNet's row kernels: one program per row, BLOCK_H and warps from block_and_warps
    for hidden in ((512, 2048, 32768) if FULL else (32768,)):
        block, warps = block_and_warps(hidden)
        for dtype in (("fp32", "bf16", "fp16", "fp64") if FULL else ("fp32",)):
            acc = "*fp64" if dtype == "fp64" else "*fp32"
            sig = dict(s_ptr="*" + dtype, stride_s="i64", active_ptr="*i64", w_ptr=acc, c_ptr=acc,
                       unhalted_ptr=acc, steps_ptr="*i64", uniform_ptr=acc, limits_ptr=acc, p_ptr=acc,
                       lam_ptr=acc, u_ptr=acc, halted_ptr="*i1", H="i32", step="i32", max_steps="i32",
                       MODE="constexpr", BLOCK_H="constexpr")
            build("pondernet halting_step", pondernet._halting_step_kernel, sig, dict(MODE=1, BLOCK_H=block),
                  warps, 3, f"{dtype} BLOCK_H {block} warps {warps}")
''')


def _compile(matrix):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, matrix], env=env, capture_output=True, text=True,
                         timeout=1800)
    if run.returncode == 77:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    print("\n".join(f"{r['kernel']:24s} {r['config']:50s} shared {r['shared']:7d} B  registers {r['registers']:4d}"
                    f"  local {r['local']} B  stack {r['stack']} B" for r in rows))
    return rows


def _check(rows):
    assert rows
    over = [r for r in rows if r["shared"] > SHARED_LIMIT]
    assert not over, f"over sm_90's {SHARED_LIMIT} B of shared memory: {over}"
    spills = [r for r in rows if r["local"] < 0 or r["local"] > LOCAL_BOUND]
    assert not spills, f"local memory (spills) beyond {LOCAL_BOUND} B per thread, or unread: {spills}"
    stack = [r for r in rows if not 0 <= r["stack"] <= STACK_BOUND.get(r["config"].split()[0], 0)]
    assert not stack, f"a stack frame beyond {STACK_BOUND} B per thread (0 elsewhere), or unread: {stack}"


def test_largest_launch_configurations_fit_sm90():
    """The largest tile of every attention kernel in fp32 and bf16, and
    PonderNet's halting step at the largest H (about two minutes)."""
    rows = _compile("quick")
    assert len(rows) == 3 * 2 + 1
    _check(rows)


@pytest.mark.slow
def test_every_launch_configuration_fits_sm90():
    rows = _compile("full")
    assert len(rows) == 3 * 3 * 5 + 3 * 4
    _check(rows)
