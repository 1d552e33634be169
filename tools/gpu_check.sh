#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests (Triton on the GPU against the torch twin on CPU) and
# every benchmark, in one go, with their summaries in $OUT (or ./gpu-check). Keeps the machine's torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
"$PY" -m pip install -q -e '.[test]' || exit 1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -m pytest -q tests/kernels tests/test_dispatch.py tests/test_quantize.py tests/test_convert.py \
    > "$OUT/cuda-tests.txt" 2>&1
echo "cuda tests: exit $? ($(tail -1 "$OUT/cuda-tests.txt"))"
FP8NORM_BENCH_GB=${FP8NORM_BENCH_GB:-8} "$PY" -m pytest benchmarks/ --benchmark-only -s -p no:cacheprovider \
    > "$OUT/benchmarks.txt" 2>&1
echo "benchmarks: exit $? (summary tables in $OUT/benchmarks.txt)"
"$PY" tools/aot_compile.py > "$OUT/aot.txt" 2>&1
