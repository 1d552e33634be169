# Which Python environment tools/setup.sh installs into and tools/run_tests.sh tests with: one rule,
# sourced by both, so the tests run with the interpreter setup.sh installed into.
#
# choose_python_env VENV_DIR SYSTEM sets
#   ENV_KIND  venv (VENV_DIR, or .venv in the checkout root: created or reused by setup.sh),
#             active (PYTHON/python3 already runs in a virtual environment: used as is) or
#             system (SYSTEM=1: the interpreter itself, asked for explicitly)
#   ENV_PY    the interpreter to install into and run with
#   ENV_VENV  the virtual environment folder (empty for system)
# PYTHON=... picks the base interpreter (default python3).

FP8NORM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

choose_python_env() {
    local venv_dir=$1 system=$2 base=${PYTHON:-python3}
    if ! command -v "$base" >/dev/null 2>&1; then
        echo "$(basename "$0"): no Python interpreter '$base' (PYTHON=... picks one)" >&2
        exit 2
    fi
    if [ -n "$venv_dir" ]; then
        ENV_KIND=venv ENV_VENV=$venv_dir ENV_PY=$venv_dir/bin/python
    elif [ "$system" = 1 ]; then
        ENV_KIND=system ENV_VENV="" ENV_PY=$base
    elif "$base" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        ENV_KIND=active
        ENV_VENV=$("$base" -c 'import sys; print(sys.prefix)')
        ENV_PY=$("$base" -c 'import sys; print(sys.executable)')
    else
        ENV_KIND=venv ENV_VENV=$FP8NORM_ROOT/.venv ENV_PY=$FP8NORM_ROOT/.venv/bin/python
    fi
}
