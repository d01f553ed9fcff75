#!/usr/bin/env bash
# The main job of the README: set up the environment (.venv, runtime + plot packages only), then run
# the embedded demo: HSR end to end on the shipped model organism (configs/demo.yaml): head scores,
# Wanda pruning at 60 %, realignment of 1 ‱ of the weights, the dense / pruned / realigned
# evaluation with baselines and the restored-weights curve, and the export. Outputs in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One torch thread: the organism's matrices are too small to gain from more, and a second thread
# competing for a busy core slows every step down several times.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"${HSR_VENV:-.venv}/bin/hsr-pl" validate --config configs/demo.yaml
