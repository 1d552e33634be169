#!/usr/bin/env bash
# Install fp8norm, saying what it does as it goes.
#
#   tools/setup.sh                 user install: torch if missing, then `pip install .` (no test extras)
#   tools/setup.sh --dev           developer install: editable, with the test extra (pytest, transformers,
#                                  compressed-tensors, hypothesis, matplotlib)
#   tools/setup.sh --venv DIR ...  first create the virtual environment DIR (--system-site-packages, so a
#                                  torch installed system-wide, e.g. CUDA on a GPU node, stays visible)
#
# torch: an existing torch is kept (a GPU node keeps its CUDA build). Without one, a machine with no
# NVIDIA GPU gets the CPU wheel from download.pytorch.org (PyPI's `torch` is the multi-GB CUDA build);
# a machine with one gets PyPI's CUDA build. PYTHON=... picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0
VENV=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) DEV=1 ;;
        --venv) VENV="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "setup.sh: $*"; }

if [ -n "$VENV" ]; then
    say "creating the virtual environment $VENV (system site packages visible: an installed torch is kept)"
    "$PY" -m venv --system-site-packages "$VENV"
    PY="$VENV/bin/python"
fi
say "using $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

if "$PY" -c "import torch" 2>/dev/null; then
    say "torch $("$PY" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, ")" if torch.version.cuda else "(CPU build)")') is installed: kept"
elif command -v nvidia-smi >/dev/null 2>&1; then
    say "no torch; an NVIDIA GPU is present: installing torch==2.13.0 from PyPI (CUDA build, several GB)"
    "$PY" -m pip install torch==2.13.0
else
    say "no torch and no NVIDIA GPU: installing the CPU wheel torch==2.13.0 from download.pytorch.org/whl/cpu"
    "$PY" -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi

if [ "$DEV" = 1 ]; then
    say "installing fp8norm editable with the test extra (pip install -e '.[test]')"
    "$PY" -m pip install -e '.[test]'
else
    say "installing fp8norm (pip install .; add the extras plot, stats or test as needed)"
    "$PY" -m pip install .
fi
say "done: $("$PY" -c 'import fp8norm; print("fp8norm", fp8norm.__version__)'); try: $(dirname "$PY")/fp8norm --help"
