"""scripts/gpu_bench.sh --smoke: the GPU benchmark's command line, run on the CPU with tiny
random shapes (without compiling, to stay quick: tests/test_static_runner.py covers that)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke_writes_a_row_per_configuration(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RUNNERS="eager,static", OUT_DIR=str(tmp_path), MAX_NEW_TOKENS="5")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--smoke"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tok/s" in done.stdout and "static" in done.stdout
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    seen = {(r["method"], r["runner"], r["batch_size"]) for r in rows}
    assert seen == {(m, r, b) for m in ("target", "smc-sd") for r in ("eager", "static") for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 5 * r["batch_size"] for r in rows)
    # Same seeds, same tokens: the static runner writes what the eager one writes.
    loglik = {(r["method"], r["runner"], r["batch_size"]): r["target_loglik_per_token"] for r in rows}
    for b in (1, 2):
        assert loglik[("smc-sd", "eager", b)] == loglik[("smc-sd", "static", b)]
