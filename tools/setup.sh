#!/usr/bin/env bash
# Install fp8norm (editable, with its test extra) on a fresh machine.
# A CPU machine without torch gets the CPU wheel 2.13.0 first, so nothing pulls a multi-GB CUDA build;
# an existing torch (e.g. a CUDA build on a GPU node) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e '.[test]'
