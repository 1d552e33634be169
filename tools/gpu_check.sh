#!/usr/bin/env bash
# One-shot GPU check of fp8norm (issue 14): <= 6 minutes on one H100/H200, offline, nothing pulled.
#
#   tools/gpu_check.sh              # on the GPU node; results in $OUT (default ./gpu-check)
#   tools/gpu_check.sh --dry-run    # the same steps on CPU, tiny shapes (< 3 min; tests/test_gpu_check.py)
#
# Installs fp8norm over the machine's own torch/triton (--no-deps --no-build-isolation: no index is
# reached), then runs each step in its own process under its own `timeout`, most important first:
#   meta (GPU, driver, versions) -> correctness (every kernel on the GPU vs the CPU twin, bytes equal)
#   -> bandwidth (kernel alone vs a device copy, x eager torch, wrapper overhead) -> checkpoint
#   (whole-checkpoint quantize vs cp, read/compute/write split) -> compiled (x torch.compile).
# The timeouts add up to 6 minutes.
# Each step appends its records to $OUT/gpu_check.json as they come (valid JSON at every moment) and
# refreshes $OUT/gpu_check.txt, so a step that dies or times out loses nothing before it.
# Env: PYTHON (default python3), OUT, FP8NORM_GPU_CHECK_GB (checkpoint size, default 8),
# FP8NORM_SCRATCH (where the checkpoint is written and deleted; default the system temp dir).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check}
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY=--dry-run; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
LOG="$OUT/gpu_check.log"

run_step() {  # name, timeout in seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    echo "== $name (timeout ${limit}s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        local status="failed (exit $rc)"
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out after ${limit}s"; fi
        "$PY" tools/gpu_check.py mark "$name" "$status" $((SECONDS - t0)) --out "$OUT" $DRY >> "$LOG" 2>&1
        echo "   $name: $status" | tee -a "$LOG"
    fi
    return 0
}

if [ -z "$DRY" ]; then
    # Over the machine's own torch/triton: no dependency resolution, no isolated build env, no index.
    run_step install 45 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
if ! "$PY" -c "import fp8norm.kernels" >> "$LOG" 2>&1; then
    # No install (e.g. no setuptools there): the package through links, kernels/ as fp8norm.kernels.
    SHIM=$(mktemp -d)
    mkdir "$SHIM/fp8norm"
    for f in "$PWD"/fp8norm/*; do ln -s "$f" "$SHIM/fp8norm/"; done
    ln -s "$PWD/kernels" "$SHIM/fp8norm/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "   fp8norm imported through $SHIM (not installed)" | tee -a "$LOG"
fi
run_step meta 30 "$PY" tools/gpu_check.py meta --out "$OUT" $DRY
run_step correctness 60 "$PY" tools/gpu_check.py correctness --out "$OUT" $DRY
run_step bandwidth 90 "$PY" tools/gpu_check.py bandwidth --out "$OUT" $DRY
run_step checkpoint 75 "$PY" tools/gpu_check.py checkpoint --out "$OUT" $DRY
run_step compiled 60 "$PY" tools/gpu_check.py compiled --out "$OUT" $DRY
"$PY" tools/gpu_check.py summary --out "$OUT" $DRY | tee -a "$LOG"
