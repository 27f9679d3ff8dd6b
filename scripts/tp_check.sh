#!/usr/bin/env bash
# Tensor-parallel check of the PyTorch paths on N devices (see hf_smcsd/tp_check.py):
#   bash scripts/tp_check.sh N [--time] [other hf_smcsd.tp_check options]
# Saves a random Llama pair (16 heads over 8 KV heads: N = 1, 2, 4 or 8), then runs
# `torchrun --nproc-per-node N -m hf_smcsd.tp_check` on CUDA when `nvidia-smi` sees N GPUs,
# otherwise on N CPU processes (gloo). Per case (SMC-SD sampling, exact mode, greedy; eager and
# static runners) it prints whether every rank returned the same tokens and whether they equal
# a single-process run from the same seed, then checks that a rank with a different draft
# stops the run with an error. `--time` also times a replicated draft against a sharded one.
# Report: results/tp_check_<N>.json. Exit code 0 only if everything agreed.
# Set PYTHON to the environment's python (default python3); it needs torch with distributed.
set -euo pipefail
N="${1:?usage: bash scripts/tp_check.sh N [--time]}"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE=cpu
if command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge "$N" ]; then
    DEVICE=cuda
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p results
"$PY" -m hf_smcsd.tp_check --make "$WORK" --vocab 512 --hidden 512 --layers 4 --heads 16 --kv-heads 8
echo "tp_check: $N ranks on $DEVICE"
# A hang (a rank waiting in a collective the others never enter) is cut off after 20 minutes.
timeout 1200 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" -m hf_smcsd.tp_check \
    --models "$WORK" --device "$DEVICE" --out "results/tp_check_$N.json" "$@"
