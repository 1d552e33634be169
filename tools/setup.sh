#!/usr/bin/env bash
# Install fp8norm into a virtual environment, saying what it does as it goes.
#
#   tools/setup.sh            user install: torch if missing, then `pip install .` (no test extras)
#   tools/setup.sh --dev      developer install: editable, with the test extra (pytest, transformers,
#                             compressed-tensors, hypothesis, matplotlib)
#   --venv DIR                install into the virtual environment DIR (created if missing)
#   --system                  install into the interpreter itself (PYTHON, default python3): no
#                             virtual environment; asked for explicitly, never done silently
#
# Where: an interpreter that already runs in a virtual environment (an activated one) is used as is.
# Otherwise .venv in the checkout root is created (or reused) without the system site packages, so a
# fresh machine gets the newest allowed versions; when the system interpreter has torch (a GPU node's
# CUDA build) it is created with them (--system-site-packages), so that torch stays visible.
# Afterwards: `. .venv/bin/activate`, or run .venv/bin/fp8norm.
#
# torch: an installed torch is kept. A machine with nvidia-smi gets PyPI's CUDA build. Otherwise the
# CPU wheel from the CPU index, probed once first (5 s, no retries); when it is unreachable, pip's
# default index: a local wheel cache or mirror may give the CPU build, public PyPI gives the multi-GB
# CUDA build.
#
# Environment:
#   PYTHON=...               the base interpreter (default python3)
#   FP8NORM_TORCH_INDEX=URL  the CPU torch index (default https://download.pytorch.org/whl/cpu),
#                            e.g. a reachable mirror of it
#   FP8NORM_PIP=CMD          developer hook (tests/test_setup_script.py): run `CMD PYTHON install ARGS`
#                            instead of `PYTHON -m pip install ARGS`, e.g. to record the pip command
#                            lines without installing; a virtual environment is then made without pip
set -euo pipefail
CALLER_DIR=$PWD
DEV=0
SYSTEM=0
VENV_DIR=""
say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) DEV=1 ;;
        --system) SYSTEM=1 ;;
        --venv)
            [ $# -ge 2 ] || die "--venv needs a folder (see --help)"
            case "$2" in /*) VENV_DIR=$2 ;; *) VENV_DIR=$CALLER_DIR/$2 ;; esac
            shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[ "$SYSTEM" = 1 ] && [ -n "$VENV_DIR" ] && die "--system and --venv exclude each other (see --help)"
cd "$(dirname "$0")/.."
# shellcheck source=tools/python_env.sh
. tools/python_env.sh
choose_python_env "$VENV_DIR" "$SYSTEM"
PY=$ENV_PY
BASE_PY=${PYTHON:-python3}

# A path as the caller types it: relative when inside the folder setup.sh was started from.
shown() { case "$1" in "$CALLER_DIR"/*) echo "${1#"$CALLER_DIR"/}" ;; *) echo "$1" ;; esac; }

pip_install() {
    if [ -n "${FP8NORM_PIP:-}" ]; then
        "$FP8NORM_PIP" "$PY" install "$@"
    else
        "$PY" -m pip install "$@"
    fi
}

# Prints nothing and succeeds when the index answers for torch; prints why not and fails otherwise.
probe_index() {
    "$PY" - "$1" <<'EOF'
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
except urllib.error.HTTPError as e:
    why = f"HTTP {e.code}"
except urllib.error.URLError as e:
    why = str(e.reason)
except OSError as e:  # e.g. a timeout while reading the answer
    why = str(e) or type(e).__name__
else:
    sys.exit(0)
print(why)
sys.exit(1)
EOF
}

case "$ENV_KIND" in
    system) say "installing into the interpreter itself (--system), not a virtual environment" ;;
    active) say "$BASE_PY runs in the virtual environment $(shown "$ENV_VENV"): installing there" ;;
    venv)
        if [ -x "$ENV_VENV/bin/python" ]; then
            say "using the existing virtual environment $(shown "$ENV_VENV")"
        elif [ -e "$ENV_VENV" ] && [ -n "$(ls -A "$ENV_VENV")" ]; then
            die "$(shown "$ENV_VENV") exists but is not a virtual environment (no bin/python): remove it or pick another folder with --venv DIR"
        else
            venv_args=()
            if "$BASE_PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
                venv_args+=(--system-site-packages)
                say "creating the virtual environment $(shown "$ENV_VENV") with the system site packages visible ($BASE_PY has torch: kept)"
            else
                say "creating the virtual environment $(shown "$ENV_VENV") (without the system site packages)"
            fi
            [ -n "${FP8NORM_PIP:-}" ] && venv_args+=(--without-pip)
            "$BASE_PY" -m venv "${venv_args[@]}" "$ENV_VENV"
        fi ;;
esac
say "using $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

TORCH=torch==2.13.0
CPU_INDEX=${FP8NORM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if "$PY" -c "import torch" 2>/dev/null; then
    say "torch $("$PY" -c 'import torch; cuda = torch.version.cuda; print(torch.__version__, f"(CUDA {cuda} build)" if cuda else "(CPU build)")') is installed: kept"
elif command -v nvidia-smi >/dev/null 2>&1; then
    say "no torch; an NVIDIA GPU is present: installing $TORCH from PyPI (CUDA build, several GB)"
    pip_install "$TORCH"
elif unreachable=$(probe_index "$CPU_INDEX"); then
    say "no torch and no NVIDIA GPU: installing the CPU wheel $TORCH from $CPU_INDEX"
    # just probed: a failure now is not worth pip's five retries
    pip_install "$TORCH" --index-url "$CPU_INDEX" --retries 0 --timeout 30
else
    say "no torch and no NVIDIA GPU; the CPU index $CPU_INDEX is unreachable ($unreachable): installing $TORCH from pip's default index instead (a local wheel cache or mirror gives the CPU build, public PyPI the multi-GB CUDA build; for the CPU wheel set FP8NORM_TORCH_INDEX to a reachable copy of the CPU index)"
    pip_install "$TORCH"
fi

if [ "$DEV" = 1 ]; then
    say "installing fp8norm editable with the test extra (pip install -e '.[test]')"
    pip_install -e '.[test]'
else
    say "installing fp8norm (pip install .; add the extras hub, plot, stats or test as needed)"
    pip_install .
fi

version=$("$PY" -c 'import importlib.metadata as m; print(m.version("fp8norm"))')
if [ "$ENV_KIND" = system ]; then
    scripts=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    say "done: fp8norm $version; try: $(shown "$scripts")/fp8norm --help"
elif [ "${VIRTUAL_ENV:-}" = "$ENV_VENV" ]; then
    say "done: fp8norm $version in the active $(shown "$ENV_VENV"); try: fp8norm --help"
else
    venv=$(shown "$ENV_VENV")
    say "done: fp8norm $version in $venv; try: $venv/bin/fp8norm --help, or activate it (. $venv/bin/activate) and run fp8norm --help"
fi
