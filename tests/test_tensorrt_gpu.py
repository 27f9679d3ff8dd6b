"""TensorRT-LLM engines on a GPU: build tiny engines from a tiny seeded checkpoint, compare the
engine runner with the eager runner, check a reorder against recompute, run SMC-SD end to end,
time it against the eager path, and (with 2 GPUs and mpirun) tensor parallelism.

Skipped unless an NVIDIA GPU and tensorrt_llm (1.2) are present. Never run yet: nothing in this
file has been verified.

    pytest -m gpu -s tests/test_tensorrt_gpu.py
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from hf_smcsd.engines import build
from hf_smcsd.resampling import copy_plan, resample
from hf_smcsd.runners import EagerRunner
from hf_smcsd.smc import SMCSettings, smc_sample
from hf_smcsd.tiny import tiny_llama, truncated_copy

from conftest import left_pad

HAS_GPU = torch.cuda.is_available()
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not HAS_TRTLLM, reason="needs tensorrt_llm 1.2 (pip install hf-smcsd[trt], NVIDIA index)"),
]

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]
VOCAB, N, K = 256, 4, 3
ATOL = 3e-2  # float16 engine against the float16 eager model


def tiny_pair():
    target = tiny_llama(vocab_size=VOCAB, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                        initializer_range=0.25, seed=0)
    return target, truncated_copy(target, 1)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    target, draft = tiny_pair()
    target.save_pretrained(root / "hf-target")
    draft.save_pretrained(root / "hf-draft")
    build.main(["--target", str(root / "hf-target"), "--draft", str(root / "hf-draft"), "--output-dir",
                str(root / "engines"), "--dtype", "float16", "--max-prompts", "2", "--particles", str(N), "--gamma",
                str(K), "--max-input-len", "32", "--max-output-len", "32", "--tokens-per-block", "16"])
    return root / "engines" / "hf-target", root / "engines" / "hf-draft", target.half().cuda(), draft.half().cuda()


def test_engine_logits_equal_eager(engines):
    from hf_smcsd.runners.tensorrt import TRTModel

    target_dir, _, target, _ = engines
    runner = TRTModel.from_engine(target_dir).smc_runner()
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    eager = EagerRunner(target)
    torch.testing.assert_close(runner.prefill(ids, mask, N), eager.prefill(ids, mask, N), atol=ATOL, rtol=ATOL)
    step = torch.randint(0, VOCAB, (2 * N, K + 1), device="cuda")
    torch.testing.assert_close(runner.extend(step), eager.extend(step), atol=ATOL, rtol=ATOL)


def test_engine_reorder_equals_recompute(engines):
    from hf_smcsd.runners.tensorrt import TRTModel

    target_dir, _, target, _ = engines
    runner = TRTModel.from_engine(target_dir).smc_runner()
    ids, mask = left_pad(PROMPTS)
    runner.prefill(ids.cuda(), mask.cuda(), N)
    history = [list(PROMPTS[row // N]) for row in range(2 * N)]
    gen = torch.Generator().manual_seed(0)
    for width in (K + 1, 2, K + 1):
        step = torch.randint(0, VOCAB, (2 * N, width), generator=gen)
        runner.extend(step.cuda())
        for row in range(2 * N):
            history[row] += step[row].tolist()
        weights = torch.rand(2, N, generator=gen) ** 3
        plan = copy_plan(resample(weights / weights.sum(1, keepdim=True)))
        runner.reorder(plan)
        for d, s in zip(plan.dest.tolist(), plan.src.tolist()):
            history[d] = list(history[s])
    last = torch.randint(0, VOCAB, (2 * N, 2), generator=gen)
    logits = runner.extend(last.cuda())
    for row in range(2 * N):
        with torch.no_grad():
            expected = target(torch.tensor([history[row] + last[row].tolist()], device="cuda")).logits[0, -2:].float()
        torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=ATOL)


def test_smc_sd_end_to_end_and_timing(engines):
    from hf_smcsd.runners.tensorrt import TRTModel

    target_dir, draft_dir, target, draft = engines
    trt_target, trt_draft = TRTModel.from_engine(target_dir), TRTModel.from_engine(draft_dir)
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    torch.manual_seed(0)
    out = trt_target.generate(ids, attention_mask=mask, assistant_model=trt_draft, smc_particles=N, smc_gamma=K,
                              smc_resample_threshold=1.0, do_sample=True, max_new_tokens=24, top_k=0,
                              return_dict_in_generate=True)
    assert out.sequences.shape[0] == 2 and int(out.num_resamples.sum()) > 0
    settings = SMCSettings(particles=N, gamma=K, max_new_tokens=24, resample_threshold=1.0)
    timings = {}
    for name, make in (("engine", lambda m: m.smc_runner()), ("eager", EagerRunner)):
        pair = (trt_target, trt_draft) if name == "engine" else (target, draft)
        smc_sample(make(pair[0]), make(pair[1]), ids, mask, settings)  # warm up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            smc_sample(make(pair[0]), make(pair[1]), ids, mask, settings)
        torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) / 3
    print(f"\nSMC-SD, 2 prompts x {N} particles, K={K}, 24 new tokens: "
          f"engine {timings['engine'] * 1e3:.1f} ms, eager {timings['eager'] * 1e3:.1f} ms")


@pytest.mark.skipif(torch.cuda.device_count() < 2 or shutil.which("mpirun") is None,
                    reason="tensor parallelism needs 2 GPUs and mpirun")
def test_tensor_parallel_ranks_agree(tmp_path):
    target, draft = tiny_pair()
    target.save_pretrained(tmp_path / "hf-target")
    draft.save_pretrained(tmp_path / "hf-draft")
    build.main(["--target", str(tmp_path / "hf-target"), "--draft", str(tmp_path / "hf-draft"), "--output-dir",
                str(tmp_path / "engines"), "--dtype", "float16", "--tp-size", "2", "--max-prompts", "2", "--particles",
                str(N), "--gamma", str(K), "--max-input-len", "32", "--max-output-len", "32"])
    script = tmp_path / "run.py"
    script.write_text(f"""
import json, torch
from hf_smcsd.runners.tensorrt import TRTModel, world
target = TRTModel.from_engine({str(tmp_path / 'engines' / 'hf-target')!r})
draft = TRTModel.from_engine({str(tmp_path / 'engines' / 'hf-draft')!r})
ids = torch.tensor([[5, 6, 7, 8, 9]], device="cuda")
torch.manual_seed(world()[0])  # different seeds on purpose: generate() must share rank 0's
out = target.generate(ids, assistant_model=draft, smc_particles={N}, smc_gamma={K}, do_sample=True, max_new_tokens=16)
print("RESULT", world()[0], json.dumps(out.tolist()))
""")
    run = subprocess.run(["mpirun", "-n", "2", "--allow-run-as-root", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [line.split(" ", 2) for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2 and json.loads(results[0][2]) == json.loads(results[1][2])
