#!/usr/bin/env bash
# The test command (README and .ci/run): install, then the whole suite. Kernel tests run the Triton
# path under TRITON_INTERPRET=1 on CPU. pytest's exit code 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tools/setup.sh --dev || exit 1
"$PY" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
