#!/usr/bin/env bash
# Set up the venv (see scripts/setup.sh) and run the offline demo: target alone vs SMC-SD.
#   bash scripts/demo.sh --batch-size 4 --particles 8 --gamma 4 --json results/demo.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh")"
cd "$ROOT"
exec "$VENV/bin/python" examples/demo.py "$@"
