#!/usr/bin/env bash
# The test command of the README: set up the environment, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "${HSR_VENV:-.venv}/bin/python" -m pytest -q "$@"
