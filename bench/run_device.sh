#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the whole test suite
# (every backend), then the benchmarks. Everything lands in $OUT (or
# bench/results/ when OUT is unset): test log, benchmark JSON and report.
#   bash bench/run_device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
ACT_KERNELS_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m pytest -q -rs tests > "$out/tests.log" 2>&1; echo "tests exit $?" >> "$out/tests.log"
tail -5 "$out/tests.log"
python -m pytest -q bench --benchmark-only --benchmark-json="$out/pytest-benchmark.json" > "$out/bench.log" 2>&1
tail -5 "$out/bench.log"
cp bench/results/*.json "$out/" 2>/dev/null || true
python bench/report.py > "$out/report.md" 2>&1
