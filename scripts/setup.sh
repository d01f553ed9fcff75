#!/usr/bin/env bash
# Create (or reuse) a virtual environment with torch and hsr-pl installed editable.
#   HSR_VENV              the environment's folder (default .venv)
#   HSR_EXTRAS            the package extras (default "plot"; the tests use "dev,plot")
#   HSR_TORCH             the torch requirement (default torch==2.13.0, the CPU build on this project's
#                         machines; on a plain machine pip may pull a CUDA build for that spec)
#   HSR_TORCH_INDEX_URL   a pip index for torch, e.g. https://download.pytorch.org/whl/cpu for the CPU build
# torch is installed first, so the package's own torch range adds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HSR_VENV:-.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${HSR_EXTRAS:-plot}"
TORCH="${HSR_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ -n "${HSR_TORCH_INDEX_URL:-}" ]; then
  "$VENV/bin/python" -m pip install -q "$TORCH" --index-url "$HSR_TORCH_INDEX_URL"
else
  "$VENV/bin/python" -m pip install -q "$TORCH"
fi
# setuptools says "Editable installation" on every editable build: true, known, and noise here.
PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
