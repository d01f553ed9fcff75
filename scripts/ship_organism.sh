#!/usr/bin/env bash
# Replace an organism shipped in the package with a trained export, e.g.
#   hsr-pl fit --config configs/organism.yaml          # trains and exports to runs/organism/export
#   bash scripts/ship_organism.sh runs/organism/export                  # -> hsr_pl/assets/organism
#   hsr-pl fit --config configs/organism_v2.yaml       # v2 (LLaVA): runs/organism_v2/export
#   bash scripts/ship_organism.sh --version 2 runs/organism_v2/export   # -> hsr_pl/assets/organism_v2
# The export's architecture must be that version's (checked before anything is copied).
# Training never writes into the package; this explicit step is the only one that does.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1
if [ $# -ge 1 ] && [ "$1" = "--version" ]; then
  version="${2:-}"
  shift 2 || true
fi
if [ $# -ne 1 ] || ! [[ "$version" =~ ^[12]$ ]]; then
  echo "usage: bash scripts/ship_organism.sh [--version 1|2] <export folder written by hsr-pl fit --config configs/organism.yaml (v1) or configs/organism_v2.yaml (v2)>" >&2
  exit 2
fi
"${HSR_VENV:-.venv}/bin/python" -c 'import sys; from hsr_pl.models.organism import ship_organism; print("shipped to", ship_organism(sys.argv[1], version=int(sys.argv[2])))' "$1" "$version"
