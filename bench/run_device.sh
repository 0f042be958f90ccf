#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the whole test suite (every
# backend), the kernel bandwidth sweep, the end-to-end GRU ponder, the
# ragged-attention, encoder, PonderNet and layer benchmarks, and
# compute-sanitizer (ACT, attention, PonderNet and cell-gate kernels). Output goes to $OUT (or bench/results/ when OUT is unset):
# build.log (device, versions, build), tests.log, bench.log, sanitize.log, the
# results JSON (rewritten after every benchmark row), report.md and the plot.
# Each phase has its own time limit, so a slow one cannot take the others'
# output with it.
#   bash bench/run_device.sh                      # every phase
#   bash bench/run_device.sh build kernels        # some phases, in this order
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(build tests kernels ponder transformer layers sanitize)
export PYTHONUNBUFFERED=1 ACT_BENCH_RESULTS="$out"
# keep the earlier GPU rows: a run of some phases adds to them
for f in bench/results/*.json; do
  case "$f" in *cpu-*) ;; *) [ -e "$f" ] && [ "$out" != bench/results ] && cp "$f" "$out/" ;; esac
done

for phase in "${phases[@]}"; do
  start=$SECONDS
  case "$phase" in
    build)
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        nvcc --version | tail -2
        ACT_KERNELS_CUDA=1 ACT_KERNELS_CUDA_ARCHS="${ACT_KERNELS_CUDA_ARCHS:-90}" MAX_JOBS=16 \
          "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ; } > "$out/build.log" 2>&1 \
        || { tail -50 "$out/build.log"; exit 1; }
      head -4 "$out/build.log" ;;
    tests)
      # xdist spreads Triton's compile time over the cores; the one GPU is shared
      timeout "${TESTS_TIMEOUT:-200}" "$PY" -m pytest -q -rs -n 8 --timeout 120 -p no:cacheprovider \
        ${TESTS_ARGS:-tests} > "$out/tests.log" 2>&1; echo "tests exit $?" >> "$out/tests.log"
      tail -4 "$out/tests.log" ;;
    kernels)
      timeout "${KERNELS_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider bench \
        -k "copy or halting_step or combine_backward" --benchmark-only >> "$out/bench.log" 2>&1
      echo "kernels exit $?" | tee -a "$out/bench.log" ;;
    ponder)
      timeout "${PONDER_TIMEOUT:-180}" "$PY" -m pytest -q -p no:cacheprovider bench \
        -k "${PONDER_K:-ponder_gru}" --benchmark-only >> "$out/bench.log" 2>&1
      echo "ponder exit $?" | tee -a "$out/bench.log" ;;
    transformer)
      # ragged attention (Triton vs SDPA, equal work and ragged) and the encoder vs the dense loop
      timeout "${TRANSFORMER_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_transformer.py \
        --benchmark-only >> "$out/bench.log" 2>&1
      echo "transformer exit $?" | tee -a "$out/bench.log" ;;
    layers)
      # PonderNet against the padded unroll; the ACTGRU layer against the padded layer (flat, skewed)
      timeout "${LAYERS_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_pondernet.py \
        bench/test_bench_layers.py --benchmark-only >> "$out/bench.log" 2>&1
      echo "layers exit $?" | tee -a "$out/bench.log" ;;
    sanitize)
      # memcheck and racecheck over the GPU rows of each kernel family's tests:
      # name, test file, -k filter
      checks=("kernels tests/act/test_act_kernels.py ${SANITIZE_K:-cuda}"
              "attention tests/attention/test_attention.py triton and float32"
              "pondernet tests/pondernet/test_pondernet.py cuda or triton"
              "cells tests/cells/test_cells.py cuda or triton"
              "cell-halting tests/cells/test_cell_halting.py cuda or triton")
      for tool in memcheck racecheck; do
        for check in "${checks[@]}"; do
          read -r name file filter <<< "$check"
          timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            "$PY" -m pytest -q -x -p no:cacheprovider "$file" -k "$filter" >> "$out/sanitize.log" 2>&1
          echo "$tool $name exit $?" | tee -a "$out/sanitize.log"
        done
      done ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
  echo "phase $phase: $((SECONDS - start)) s"
done
"$PY" bench/report.py "$out" > "$out/report.md" 2>&1 || true
