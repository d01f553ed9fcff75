#!/usr/bin/env bash
# The main job of the README: set up the environment, then run the embedded demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
HSR="${HSR_VENV:-.venv}/bin/hsr-pl"
"$HSR" fit --config configs/tiny_llava.yaml
"$HSR" validate --config configs/tiny_llava.yaml
