#!/usr/bin/env bash
# The first GPU contact of the TensorRT-LLM path, in one command (see hf_smcsd/engines/gpu_check.py):
#   bash scripts/gpu_check.sh [--workdir DIR] [--keep]
# Run it in the environment that has TensorRT-LLM 1.2.1 (its container, then `pip install -e .`),
# or set PYTHON to that environment's python. Exit code: 0 all checks passed, 1 a check failed,
# 2 could not run (no GPU / no TensorRT-LLM; it says which).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m hf_smcsd.cli gpu-check "$@"
