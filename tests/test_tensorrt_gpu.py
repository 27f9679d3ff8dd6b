"""TensorRT-LLM engines on a GPU: the checks of `hf-smcsd gpu-check` (hf_smcsd/engines/gpu_check.py)
under pytest - tiny float16 engines from a tiny seeded checkpoint against the eager model
(prefill, K+1 and narrower steps, the draft's steps, reorders and rollbacks against a
recompute, one SMC-SD and one exact-mode generate) - and, with 2 GPUs and mpirun, tensor
parallelism.

Skipped unless an NVIDIA GPU and tensorrt_llm (1.2) are present. Never run yet: nothing in this
file has been verified on a GPU.

    pytest -m gpu -s tests/test_tensorrt_gpu.py        # or: hf-smcsd gpu-check
"""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

from hf_smcsd.engines import build, gpu_check

HAS_GPU = torch.cuda.is_available()
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not HAS_TRTLLM, reason="needs tensorrt_llm 1.2 (pip install hf-smcsd[trt], NVIDIA index)"),
]
N, K = gpu_check.N, gpu_check.K


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return gpu_check.build_context(tmp_path_factory.mktemp("trt"))


@pytest.mark.parametrize("name, check", gpu_check.CHECKS, ids=[name for name, _ in gpu_check.CHECKS])
def test_gpu_check(context, name, check):
    print(f"\n{name}: {check(context)}")


@pytest.mark.skipif(torch.cuda.device_count() < 2 or shutil.which("mpirun") is None,
                    reason="tensor parallelism needs 2 GPUs and mpirun")
def test_tensor_parallel_ranks_agree(tmp_path):
    target, draft = gpu_check.tiny_pair()
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
