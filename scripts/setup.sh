#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the CPU build of torch and hsr-pl installed editable
# with its dev and plot extras. torch is pinned first so that no CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HSR_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${HSR_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[dev,plot]"
