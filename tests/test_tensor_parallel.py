"""Tensor parallelism (transformers' tp_plan under torchrun) on CPU: two gloo processes.

The two-process test launches `python -m hf_smcsd.tp_check` under torchrun on a tiny Llama
saved to a temporary directory: SMC-SD sampling, exact mode and greedy verification, eager and
static runners, with the target sharded over 2 ranks, must return the same tokens on both
ranks and the tokens of a single-process run from the same seed (rank 1 seeds differently on
purpose), and a rank given a different draft must stop the run with an error on every rank.
A timeout kills the whole process group, so a deadlock fails the test instead of hanging it.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_smcsd import distributed
from hf_smcsd.distributed import TensorParallelError, check_pair, check_tp_config, fingerprint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a normal run takes about 40 s on a busy 2-core machine


def run_two_ranks(models: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "hf_smcsd.tp_check", "--models", str(models), "--out", str(out)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = process.communicate()
        pytest.fail(f"the two-rank run did not finish in {TIMEOUT_S} s (a deadlock?):\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def test_two_gloo_ranks_match_each_other_and_a_single_process(tmp_path):
    from hf_smcsd.tp_check import CASES, make_models

    make_models(tmp_path, vocab=128, hidden=64, layers=2, heads=4, kv_heads=2)
    result = run_two_ranks(tmp_path, tmp_path / "report.json")
    report_lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL", "      ", "ALL"))]
    print("\n".join(report_lines))
    assert result.returncode == 0, result.stdout[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and [case["case"] for case in report["cases"]] == [name for name, _ in CASES]
    for case in report["cases"]:
        first, second = case["tokens_per_rank"]
        assert first == second, case["case"]
        assert first == case["single_process"], case["case"]  # exact: same seed, same tokens
        assert case["max_log_weight_diff"] < 1e-3, case["case"]  # float sums differ in order only
    assert report["divergence_caught"] is True
    # The caches went through what they must keep in lockstep: reorders (resamples) in the
    # SMC-SD cases, rollbacks (exact rounds accepting fewer than the 3 drafted tokens) in the others.
    cases = {case["case"]: case for case in report["cases"]}
    assert all(cases[f"smc sample, {runner}"]["resamples"] > 0 for runner in ("eager", "static"))
    for name in ("exact", "greedy"):
        case = cases[f"{name}, eager"]
        assert case["exact_rounds"] > 0 and sum(case["accepted_draft_tokens"]) < 3 * case["exact_rounds"]


# ------------------------------------------------------------------ errors, in one process


def test_ranks_not_started_by_torchrun_are_refused(monkeypatch, tmp_path):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TensorParallelError, match="started by torchrun: RANK, WORLD_SIZE, LOCAL_RANK are not set"):
        distributed.load_tp_model(tmp_path)


def test_load_tp_model_sets_placement_itself(monkeypatch, tmp_path):
    with pytest.raises(TensorParallelError, match="drop device_map="):
        distributed.load_tp_model(tmp_path, device_map="auto")


def test_a_model_without_a_tp_plan_is_refused():
    from transformers import GPT2Config

    with pytest.raises(TensorParallelError, match="GPT2Config.*no tensor-parallel plan.*device_map='auto'"):
        check_tp_config(GPT2Config(n_head=4), 2)


@pytest.mark.parametrize("heads,kv_heads,world,message", [
    (4, 2, 3, "num_attention_heads=4 is not divisible by the world size 3.*--nproc-per-node 2 or 4"),
    (8, 2, 4, "num_key_value_heads=2 is not divisible by the world size 4.*--nproc-per-node 2"),
    (4, 2, 2, None),
])
def test_heads_must_split_over_the_ranks(heads, kv_heads, world, message):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads)
    if message is None:
        check_tp_config(config, world)
    else:
        with pytest.raises(TensorParallelError, match=message):
            check_tp_config(config, world)


def test_load_tp_model_checks_before_loading(monkeypatch, tmp_path):
    """A 4-head model and 3 ranks: refused from the config, before any weight is read or any
    process group is started."""
    from hf_smcsd.testing.tiny_models import tiny_llama

    tiny_llama(num_heads=4, num_kv_heads=2).save_pretrained(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(TensorParallelError, match="num_attention_heads=4 is not divisible by the world size 3"):
        distributed.load_tp_model(tmp_path)
    assert not torch.distributed.is_initialized()


def mesh(ranks, device_type="cpu"):
    return SimpleNamespace(mesh=torch.tensor(ranks), device_type=device_type, ndim=1)


def test_draft_on_a_different_mesh_is_refused():
    with pytest.raises(TensorParallelError, match=r"different mesh \(cpu ranks \[2, 3\]\).*\(cpu ranks \[0, 1\]\)"):
        check_pair(None, None, target_mesh=mesh([0, 1]), draft_mesh=mesh([2, 3]))
    with pytest.raises(TensorParallelError, match="different mesh"):
        check_pair(None, None, target_mesh=mesh([0, 1], "cuda"), draft_mesh=mesh([0, 1], "cpu"))
    same = mesh([0, 1])
    assert check_pair(None, None, target_mesh=same, draft_mesh=mesh([0, 1])) is same


def test_sharded_draft_with_an_unsharded_target_is_refused():
    with pytest.raises(TensorParallelError, match="draft .* is tensor-parallel but the target is not"):
        check_pair(None, None, draft_mesh=mesh([0, 1]))


def test_replicated_draft_must_be_on_the_ranks_device(pair):
    target, draft = pair
    with pytest.raises(TensorParallelError, match="replicated draft runs on cpu but this rank's target shard is on cuda:1"):
        check_pair(target, draft, target_mesh=mesh([0, 1], "cuda"), draft_device="cpu", target_device="cuda:1")
    assert check_pair(target, draft) is None  # no tensor parallelism: nothing to check


def test_paged_runner_refuses_a_tensor_parallel_model(pair, monkeypatch):
    from hf_smcsd.runners.paged import PagedRunner

    monkeypatch.setattr(distributed, "tp_mesh", lambda model: mesh([0, 1]))
    with pytest.raises(TensorParallelError, match="PagedRunner computes attention .* use the eager runner"):
        PagedRunner(pair[0])


def test_fingerprints_tell_calls_and_values_apart():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(fingerprint(2, tokens), fingerprint(2, tokens.clone()))
    assert not torch.equal(fingerprint(2, tokens), fingerprint(3, tokens))  # extend vs reorder
    assert not torch.equal(fingerprint(2, tokens), fingerprint(2, tokens.flip(1)))  # same sum, other order
    assert not torch.equal(fingerprint(2, tokens), fingerprint(2, torch.tensor([[1, 2, 3, 0], [4, 5, 6, 0]])))


def test_single_process_models_are_not_wrapped(pair):
    from hf_smcsd.runners import EagerRunner

    runner = EagerRunner(pair[0])
    assert distributed.tp_mesh(pair[0]) is None and distributed.lockstep(pair[0], runner) is runner
    assert distributed.prepare(pair[0], pair[1]) is None


def test_memory_estimate_counts_one_ranks_heads(pair, monkeypatch):
    from hf_smcsd.memory import kv_bytes_per_row

    whole = kv_bytes_per_row(pair[0], 100)
    monkeypatch.setattr(distributed, "tp_mesh", lambda model: mesh([0, 1]))
    assert kv_bytes_per_row(pair[0], 100) * 2 == whole
