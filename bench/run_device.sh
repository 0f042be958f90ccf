#!/usr/bin/env bash
# On a GPU machine, in two tiers that fit a short device loan:
#
#   bash bench/run_device.sh proof     # under 8 minutes on an H100-class device:
#                                      # build, warm, gpu-tests, sanitize, bench-rows
#   bash bench/run_device.sh tuning    # with what is left: the whole suite, every benchmark
#   bash bench/run_device.sh build kernels   # or any phases, in this order
#
# Output goes to $OUT (or bench/results/ when OUT is unset): build.log (device,
# versions, build), warm.log, tests.log, bench.log, sanitize.log, the results
# JSON (rewritten after every benchmark row), report.md and the plot. Each
# phase has its own time limit, so a slow one cannot take the others' output
# with it, and prints its planned and its elapsed seconds, so that the next
# run can be planned from this one's.
#
# The plan of the proof tier (seconds on an H100-class host with 16 cores):
#   build      90  nvcc for sm_90 only, 16 jobs (five .cu files, one .cpp)
#   warm     (90)  alongside the build: the proof tests' Triton rows once on
#                  16 processes (pytest-xdist), filling Triton's cache, so
#                  that the phases after it hit it; it adds no wall time
#                  unless it outlasts the build
#   gpu-tests 120  every kernel at least once, the shapes the CPU never runs
#                  (tests/system/test_gpu_shapes.py, test_gpu.py), the
#                  kernel backends' own rows, the encoder's block and cache
#                  and the looped LM (about 680 tests on 16 workers)
#   sanitize   90  memcheck on one small test per kernel family
#   bench-rows 60  one benchmark row per family against its baseline
#   total     360  (the limits add up to 480 s; the start of the machine is extra)
#
# The tuning tier, phase by phase (planned / limit seconds): tests 300/420,
# kernels 90/120, ponder 120/180, transformer 240/300, layers 240/300,
# racecheck 150/240: about 19 minutes in all, more than a 15-minute loan
# leaves after the proof tier, so name the phases that fit, e.g.
#   bash bench/run_device.sh tests ponder
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
JOBS="${JOBS:-16}"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(proof)
expanded=()
for p in "${phases[@]}"; do
  case "$p" in
    proof) expanded+=(warm-start build warm gpu-tests sanitize bench-rows) ;;
    tuning) expanded+=(tests kernels ponder transformer layers racecheck) ;;
    *) expanded+=("$p") ;;
  esac
done
export PYTHONUNBUFFERED=1 ACT_BENCH_RESULTS="$out"
# keep the earlier GPU rows: a run of some phases adds to them
for f in bench/results/*.json; do
  case "$f" in *cpu-*) ;; *) [ -e "$f" ] && [ "$out" != bench/results ] && cp "$f" "$out/" ;; esac
done

# The proof tier's tests: every kernel family's GPU rows (ACT, attention,
# PonderNet, the cell gates and fused step) and the large shapes.
PROOF_TESTS=(tests/system/test_gpu_shapes.py tests/system/test_gpu.py tests/act/test_act_kernels.py
             tests/pondernet/test_pondernet.py tests/cells/test_cell_halting.py tests/cells/test_cells.py)
PROOF_FILTER="not reference and not cpu"
# Per family: name, test file, -k filter of a few small tests (both kernel backends)
SANITIZE=("act tests/act/test_act_kernels.py float32 and 3-10-1 and (cuda or triton) or (combine_backward and float32 and 3-10 and (cuda or triton))"
          "attention tests/attention/test_attention.py lengths0-2-16-0.5 and float32"
          "pondernet tests/pondernet/test_pondernet.py 1-1-0.0-6-1.0-torch.float32-train"
          "cells tests/cells/test_cells.py test_kernels_match_twins and gru-1-1-dtype0"
          "cell-halting tests/cells/test_cell_halting.py gru-5-37-2-5-0.9-dtype0 and (cuda or triton)")

run_phase() {   # name, planned seconds, limit seconds, command...
  local name=$1 plan=$2 limit=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "phase $name: $((SECONDS - start)) s (planned $plan s, limit $limit s, exit $rc)"
}

sanitize() {   # tool, then the checks
  local tool=$1
  shift
  for check in "$@"; do
    read -r name file filter <<< "$check"
    compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -x -p no:cacheprovider "$file" -k "$filter" >> "$out/sanitize.log" 2>&1
    echo "$tool $name exit $?" | tee -a "$out/sanitize.log"
  done
}

for phase in "${expanded[@]}"; do
  case "$phase" in
    build)
      start=$SECONDS
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        nvcc --version | tail -2
        ACT_KERNELS_CUDA=1 ACT_KERNELS_CUDA_ARCHS="${ACT_KERNELS_CUDA_ARCHS:-90}" MAX_JOBS=$JOBS \
          timeout 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ; } > "$out/build.log" 2>&1 \
        || { tail -50 "$out/build.log"; exit 1; }
      head -4 "$out/build.log"
      echo "phase build: $((SECONDS - start)) s (planned 90 s, limit 150 s)" ;;
    warm-start)
      # Triton's cache is warmed while nvcc builds: a first pass over the
      # proof tests' Triton rows (no CUDA rows: the extension is not built
      # yet; python -m pytest imports the package from the source tree)
      # compiles most kernels on $JOBS processes, and the phases after it
      # hit the cache. `warm` waits for it and reports how long it took.
      warm_start=$SECONDS
      ( timeout 240 "$PY" -m pytest -q -n "$JOBS" -p no:cacheprovider "${PROOF_TESTS[@]}" \
          -k "$PROOF_FILTER and not cuda and (float32 or H1500 or 512)" > "$out/warm.log" 2>&1
        echo "warm exit $?" >> "$out/warm.log" ) &
      warm_pid=$! ;;
    warm)
      if [ -n "${warm_pid:-}" ]; then
        wait "$warm_pid"
        echo "phase warm: $((SECONDS - warm_start)) s from its start, alongside the build (planned 90 s, limit 240 s)"
      else
        run_phase warm 90 240 "$PY" -m pytest -q -n "$JOBS" -p no:cacheprovider "${PROOF_TESTS[@]}" \
          -k "$PROOF_FILTER and (float32 or H1500 or 512)" > "$out/warm.log" 2>&1
      fi
      tail -2 "$out/warm.log" ;;
    gpu-tests)
      # plus the per-token encoder's pool path, block and cache, the looped LM, and the host work of
      # an encoder training step and of a decode step
      run_phase gpu-tests 120 150 "$PY" -m pytest -q -rs -n "$JOBS" --timeout 120 -p no:cacheprovider \
        "${PROOF_TESTS[@]}" tests/attention/test_attention.py tests/nn/test_transformer_block.py \
        tests/nn/test_transformer_cache.py tests/nn/test_language_model.py tests/system/test_lm_host_work.py \
        tests/nn/test_transformer_whole_ponder.py tests/system/test_encoder_host_work.py \
        -k "$PROOF_FILTER" > "$out/tests.log" 2>&1
      tail -4 "$out/tests.log" ;;
    sanitize)
      run_phase sanitize 90 120 bash -c "$(declare -f sanitize); out=$out PY=$PY; sanitize memcheck \"\${@}\"" _ \
        "${SANITIZE[@]}" ;;
    bench-rows)
      run_phase bench-rows 60 60 "$PY" -m pytest -q -p no:cacheprovider bench --benchmark-only \
        --benchmark-min-rounds=3 -k "copy_bandwidth or (ponder_gru_fwd_bwd and 4096-256 and not compiled) \
or (pondernet_fwd_bwd and 4096-256) or (actgru_layer and 16-4096-1024-skewed) \
or (ragged_attention_fwd_bwd and 16-2048-16-64-causal-run0.4) or encoder_fwd_bwd or host_floor" >> "$out/bench.log" 2>&1
      tail -3 "$out/bench.log" ;;
    tests)
      # the whole suite; xdist spreads Triton's compile time over the cores
      run_phase tests 300 420 "$PY" -m pytest -q -rs -n "$JOBS" --timeout 120 -p no:cacheprovider \
        ${TESTS_ARGS:-tests} > "$out/tests.log" 2>&1
      tail -4 "$out/tests.log" ;;
    kernels)
      run_phase kernels 90 120 "$PY" -m pytest -q -p no:cacheprovider bench \
        -k "copy or halting_step or combine_backward" --benchmark-only >> "$out/bench.log" 2>&1 ;;
    ponder)
      run_phase ponder 120 180 "$PY" -m pytest -q -p no:cacheprovider bench \
        -k "${PONDER_K:-ponder_gru}" --benchmark-only >> "$out/bench.log" 2>&1 ;;
    transformer)
      # ragged attention (Triton vs SDPA, equal work and ragged) and the encoder vs the dense loop
      run_phase transformer 240 300 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_transformer.py \
        --benchmark-only >> "$out/bench.log" 2>&1 ;;
    layers)
      # PonderNet against the padded unroll; the ACTGRU layer against the padded layer (flat, skewed)
      run_phase layers 240 300 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_pondernet.py \
        bench/test_bench_layers.py --benchmark-only >> "$out/bench.log" 2>&1 ;;
    racecheck)
      run_phase racecheck 150 240 bash -c "$(declare -f sanitize); out=$out PY=$PY; sanitize racecheck \"\${@}\"" _ \
        "${SANITIZE[@]}" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
"$PY" bench/report.py "$out" > "$out/report.md" 2>&1 || true
