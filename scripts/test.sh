#!/usr/bin/env bash
# The test command of the README: set up the test environment (its own venv, with the dev extra),
# then run the whole suite. Extra arguments go to pytest, e.g. -m "not slow" or tests/test_realign_algorithms.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HSR_VENV="${HSR_VENV:-.venv-test}" HSR_EXTRAS="${HSR_EXTRAS:-dev,plot}"
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$HSR_VENV/bin/python" -m pytest -q "$@"
