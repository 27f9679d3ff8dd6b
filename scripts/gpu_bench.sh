#!/usr/bin/env bash
# SMC-SD on one GPU with only torch and transformers (no TensorRT-LLM), random-weight models of
# the published Llama 3.1 8B / Llama 3.2 1B shapes (speed does not depend on the weights), bf16:
#   target alone: eager (dynamic cache) and transformers' static cache + torch.compile;
#   SMC-SD N=4,8 x K=4,8: eager runner and the static runner with compiled steps (CUDA graphs);
#   batch sizes 1 and 8; 128 new tokens. Prints a table, writes results/gpu_bench/bench.{json,csv}.
# Aimed at under ten minutes on one H100/H200, compiles included (an estimate: not yet run on a GPU).
#
#   bash scripts/gpu_bench.sh            # the GPU run (needs CUDA)
#   bash scripts/gpu_bench.sh --smoke    # tiny shapes on the CPU, ~1 min with compiles: checks the script
#
# Environment: PYTHON (default python3, with torch and transformers; this repo's root is put
# on PYTHONPATH), RUNNERS (default eager,static-compiled), OUT_DIR, MAX_NEW_TOKENS, REPEATS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
RUNNERS="${RUNNERS:-eager,static-compiled}"

if [[ "${1:-}" == "--smoke" ]]; then
    args=(--shapes tiny-target,tiny-draft --device cpu --dtype float32 --batch-sizes 1,2 --particles 2
          --gammas 2 --max-new-tokens "${MAX_NEW_TOKENS:-8}" --repeats "${REPEATS:-1}" --warmup 1)
    out="${OUT_DIR:-results/gpu_bench_smoke}"
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_bench.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False)." >&2
        echo "Run it on a GPU machine, or 'bash scripts/gpu_bench.sh --smoke' for the CPU smoke run." >&2
        exit 2
    fi
    args=(--shapes llama-3.1-8b,llama-3.2-1b --device cuda --dtype bfloat16 --batch-sizes 1,8 --particles 4,8
          --gammas 4,8 --max-new-tokens "${MAX_NEW_TOKENS:-128}" --repeats "${REPEATS:-2}" --warmup 1)
    out="${OUT_DIR:-results/gpu_bench}"
fi

start=$(date +%s)
"$PYTHON" -m hf_smcsd.bench "${args[@]}" --runners "$RUNNERS" --assisted-gammas "" --no-plots --out-dir "$out"
echo "gpu_bench.sh: $(( $(date +%s) - start )) s in all; table above, JSON in $out/bench.json"
