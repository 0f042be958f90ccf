"""Every launch configuration the Triton launchers can choose on a GPU,
compiled ahead of time for sm_90, against the device's limits: shared memory
per block within sm_90's 232,448 B, no local memory for spills, and a
per-thread stack frame within the bound `stack_bound` states. The interpreter that runs the kernels in
the CPU tests knows neither limit, so an over-budget configuration would
otherwise first fail on a GPU (OutOfResources at launch).

The configurations come from the launchers' own tables
(`ops.attention.triton_kernels.gpu_configs`; ACT's, the fused cells' and
PonderNet's row kernels take BLOCK_H and warps from
`ops.triton_helpers.block_and_warps`), so a change there is what this test
compiles, each attention kernel at GROUP 1 and 4 (query heads per kv head).
Registers and local memory are read from the cubin with
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
# Bytes of stack frame per thread allowed (local memory too), by what the
# kernel is; 0 everywhere else:
# - the float32 attention kernels take full-precision dots
#   (input_precision="ieee", so that they match PyTorch's float32 attention;
#   not TF32), which ptxas builds from FMAs on a stack frame of up to about
#   14 KB per thread: a cost to measure on a GPU, not a spill to remove;
# - the row kernels (one program per row, the whole row in registers) at
#   the largest rows the launchers take, BLOCK_H 32768 on 16 warps (64
#   values per thread against 128 registers), spill part of the row: 40 B
#   (PonderNet, float32) to 3.7 KB (the fused LSTM step) per thread; at
#   BLOCK_H 8192 only ACT's combine backward keeps 16 B; below, nothing.
# Stated here so that none can grow unseen.


def stack_bound(row) -> int:
    if row["kernel"].startswith("attention"):
        return 16384 if row["config"].startswith("fp32") else 0
    if "32768" in row["config"]:
        return 4096
    return 16 if row["kernel"] == "act combine_backward" and "8192" in row["config"] else 0


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
    meta = dict(CAUSAL="constexpr", IEEE="constexpr", GROUP="constexpr", BLOCK_M="constexpr",
                BLOCK_N="constexpr", BLOCK_D="constexpr")
    # GROUP: query heads per kv head (grouped-query attention); 1 is plain
    # multi-head attention, 4 stands for every GROUP > 1 (the dK/dV kernel
    # loops over the group's query heads, the others index the kv head)
    for (kernel, dtype, cfg), group in ((c, g) for c in attention.gpu_configs() for g in (1, 4)):
        if not FULL and (cfg.block_d not in (128, 256) or dtype == "fp16"):
            continue
        p = "*" + dtype
        consts = dict(CAUSAL=True, IEEE=1 if dtype == "fp32" else 0, GROUP=group, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
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
                  f"warps {cfg.warps} stages {cfg.stages} GROUP {group}")
        build(f"attention {kernel}", fn, sig, consts, cfg.warps, cfg.stages, config)

    # ACT's and the fused cells' row kernels: one program per row, BLOCK_H and
    # warps from block_and_warps (the largest H is the one near the limits)
    import act_kernels.ops.act.triton_kernels as act_triton
    import act_kernels.ops.cells.triton_kernels as cells

    acc = "*fp32"
    halting = dict(active_ptr="*i64", w_ptr=acc, c_ptr=acc, thr_ptr=acc, running_ptr=acc, acc_ptr=acc,
                   stride_acc="i64", steps_ptr="*i64", rem_ptr=acc, p_ptr=acc, hh_ptr=acc, halted_ptr="*i1")
    for hidden in ((1500, 5000, 32768) if FULL else (32768,)):   # BLOCK_H 2048, 8192, 32768
        block, warps = block_and_warps(hidden)
        for state in (("fp32", "bf16") if FULL else ("bf16",)):
            s = "*" + state
            # PER_ROW_STEP: each row's step read from a tensor (the depth-wise scheduler)
            for per_row in ((False, True) if FULL else (True,)):
                build("act halting_step", act_triton._halting_step_kernel,
                      dict(s_ptr=s, stride_s="i64", active_ptr="*i64", w_ptr=acc, c_ptr=acc, thr_ptr=acc,
                           running_ptr=acc, acc_ptr=acc, stride_acc="i64", steps_ptr="*i64", rem_ptr=acc, p_ptr=acc,
                           h_ptr=acc, halted_ptr="*i1", x_ptr=s, stride_x="i64", xacc_ptr=acc, stride_xacc="i64",
                           HX="i32", H="i32", step="i32", max_steps="i32", row_steps_ptr="*i64",
                           BLOCK_H="constexpr", BLOCK_X="constexpr", HAS_X="constexpr", PER_ROW_STEP="constexpr"),
                      dict(BLOCK_H=block, BLOCK_X=block, HAS_X=True, PER_ROW_STEP=per_row), warps, 3,
                      f"{state} BLOCK_H {block} warps {warps} PER_ROW_STEP {int(per_row)}")
            build("act combine_backward", act_triton._combine_backward_kernel,
                  dict(base_ptr=s, table_ptr="*i64", S="i32", order_ptr="*i64", first_ptr="*i64", steps_ptr="*i64",
                       p_ptr=acc, h_ptr=acc, extra_ptr=acc, gS_ptr=s, stride_gS="i64", grho_ptr=acc, w_ptr=acc,
                       gs_ptr=s, gw_part_ptr=acc, gc_part_ptr=acc, B="i32", H="i32", HAS_EXTRA="constexpr",
                       BLOCK_H="constexpr"), dict(HAS_EXTRA=True, BLOCK_H=block), warps, 3,
                  f"{state} BLOCK_H {block} warps {warps}")
            build("cells gru_halting", cells._gru_halting_kernel,
                  dict(gi_ptr=s, s_gi="i64", gh_ptr=s, s_gh="i64", h_ptr=s, s_h="i64", out_ptr=s, **halting,
                       H="i32", step="i32", max_steps="i32", BLOCK="constexpr"), dict(BLOCK=block), warps, 3,
                  f"{state} BLOCK {block} warps {warps}")
            build("cells lstm_halting", cells._lstm_halting_kernel,
                  dict(gi_ptr=s, s_gi="i64", gh_ptr=s, s_gh="i64", c_ptr=s, s_c="i64", h_out=s, c_out=s,
                       active_ptr="*i64", w_ptr=acc, bias_ptr=acc, thr_ptr=acc, running_ptr=acc, acc_ptr=acc,
                       stride_acc="i64", cacc_ptr=acc, stride_cacc="i64", steps_ptr="*i64", rem_ptr=acc, p_ptr=acc,
                       hh_ptr=acc, halted_ptr="*i1", H="i32", step="i32", max_steps="i32", BLOCK="constexpr"),
                  dict(BLOCK=block), warps, 3, f"{state} BLOCK {block} warps {warps}")

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
    print("\n".join(f"{r['kernel']:24s} {r['config']:58s} shared {r['shared']:7d} B  registers {r['registers']:4d}"
                    f"  local {r['local']} B  stack {r['stack']} B" for r in rows))
    return rows


def _check(rows):
    assert rows
    over = [r for r in rows if r["shared"] > SHARED_LIMIT]
    assert not over, f"over sm_90's {SHARED_LIMIT} B of shared memory: {over}"
    spills = [r for r in rows if r["local"] < 0 or r["local"] > LOCAL_BOUND]
    assert not spills, f"local memory (spills) beyond {LOCAL_BOUND} B per thread, or unread: {spills}"
    stack = [r for r in rows if not 0 <= r["stack"] <= stack_bound(r)]
    assert not stack, f"a stack frame beyond the stated bound (stack_bound), or unread: {stack}"


def test_largest_launch_configurations_fit_sm90():
    """Every attention kernel at head-dim buckets 128 and 256 in fp32 and
    bf16, at GROUP 1 and 4; ACT's halting and combine kernels, the fused cell
    kernels and PonderNet's halting step at the largest H, the halting step
    with a step per row (a few minutes)."""
    rows = _compile("quick")
    assert len(rows) == 3 * 2 * 2 * 2 + 4 + 1
    _check(rows)


@pytest.mark.slow
def test_every_launch_configuration_fits_sm90():
    rows = _compile("full")
    assert len(rows) == 3 * 3 * 5 * 2 + 3 * 2 * 5 + 3 * 4   # halting: per-call and per-row steps
    _check(rows)
