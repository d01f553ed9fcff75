#!/usr/bin/env bash
# The main job of the README: set up the environment, then run the embedded demo — the shipped
# organism evaluated dense and after Wanda pruning (the safety it loses is what HSR repairs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
HSR="${HSR_VENV:-.venv}/bin/hsr-pl"
echo "== the shipped organism, dense =="
"$HSR" validate --config configs/organism_dense.yaml
echo "== the same organism after Wanda pruning at 60 % (calibrated on benign utility data) =="
"$HSR" validate --config configs/organism_wanda.yaml
