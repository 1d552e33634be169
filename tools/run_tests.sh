#!/usr/bin/env bash
# The test command (README and .ci/run): install with setup.sh --dev, then the whole suite with the
# interpreter it installed into (tools/python_env.sh: the same rule). Extra arguments go to pytest.
# Kernel tests run the Triton path under TRITON_INTERPRET=1 on CPU. pytest's exit code 5 (no tests
# collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --dev || exit 1
# shellcheck source=tools/python_env.sh
. tools/python_env.sh
choose_python_env "" 0
# Both cores (pytest-xdist): the suite's wall time halves on the 2-core machines CI runs on;
# FP8NORM_TEST_WORKERS=0 runs it in one process.
"$ENV_PY" -m pytest -n "${FP8NORM_TEST_WORKERS:-2}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
