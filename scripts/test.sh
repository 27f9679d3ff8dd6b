#!/usr/bin/env bash
# Set up the venv (see scripts/setup.sh: TRANSFORMERS_VERSION, VENV) and run pytest in it.
#   bash scripts/test.sh                          # latest transformers 5.x, pytest -q
#   TRANSFORMERS_VERSION=4.57.3 bash scripts/test.sh -q -m "not slow"
# The exit code is pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh")"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
  set -- -q
fi
exec "$VENV/bin/python" -m pytest "$@"
