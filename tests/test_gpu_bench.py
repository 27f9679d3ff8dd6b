"""The GPU benchmark's pieces on the CPU: scripts/gpu_bench.sh --smoke with tiny random shapes
(without compiling, to stay quick: tests/test_static_runner.py covers that), the shape configs
(`hf-smcsd bench --shapes`), and clear errors for bad --runners / --shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_shapes_are_the_published_sizes_and_build_offline():
    from hf_smcsd.bench import shapes

    counts = {name: shapes.parameter_count(name) for name in ("llama-3.1-8b", "llama-3.2-1b", "smcsd-134m", "smcsd-18m")}
    assert 8.02e9 < counts["llama-3.1-8b"] < 8.04e9  # Llama 3.1 8B: 8.03B parameters
    assert 1.23e9 < counts["llama-3.2-1b"] < 1.24e9  # Llama 3.2 1B (tied embeddings): 1.24B
    assert 130e6 < counts["smcsd-134m"] < 140e6 and 16e6 < counts["smcsd-18m"] < 20e6
    a, b = shapes.random_model("tiny-target", seed=5), shapes.random_model("tiny-target", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    prompts = shapes.random_prompts(8, 512, seed=1)
    assert len({len(p) for p in prompts}) > 1 and all(40 <= len(p) <= 64 and min(p) >= 3 for p in prompts)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--runners", "eager,turbo"], "--runners"),
        (["--shapes", "tiny-target"], "--shapes"),
        (["--shapes", "no-such-shape,tiny-draft"], "--shapes"),
        (["--shapes", "tiny-target,tiny-draft", "--target", "x", "--draft", "y"], "--shapes"),
    ],
)
def test_bad_bench_arguments_name_the_argument(argv, named, capsys, tmp_path):
    from hf_smcsd.bench import bench

    with pytest.raises(SystemExit):
        bench.main(argv + ["--out-dir", str(tmp_path)])
    assert named in capsys.readouterr().err
