#!/usr/bin/env bash
# Replace the organism shipped in the package (hsr_pl/assets/organism) with a trained export, e.g.
#   hsr-pl fit --config configs/organism.yaml          # trains and exports to runs/organism/export
#   bash scripts/ship_organism.sh runs/organism/export
# Training never writes into the package; this explicit step is the only one that does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  echo "usage: bash scripts/ship_organism.sh <export folder written by hsr-pl fit --config configs/organism.yaml>" >&2
  exit 2
fi
"${HSR_VENV:-.venv}/bin/python" -c 'import sys; from hsr_pl.models.organism import ship_organism; print("shipped to", ship_organism(sys.argv[1]))' "$1"
