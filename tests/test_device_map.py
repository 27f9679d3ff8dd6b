"""A target loaded with an accelerate `device_map` (layers offloaded to CPU or disk, or
placed automatically) runs SMC-SD exactly like the same model loaded plainly.

This machine has no GPU, so the maps put modules on "cpu" and "disk"; a disk-offloaded
module keeps its weights on the `meta` device and runs on its hook's execution device, so
`model.device` (even the embedding's weight device) says `meta`: the runner must not trust
it. The last test splits a model between a GPU and the CPU where one is present.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_smcsd
from hf_smcsd import compat
from hf_smcsd.testing import zoo
from hf_smcsd.resampling import CopyPlan
from hf_smcsd.runners import EagerRunner

from conftest import left_pad

# transformers 4.57's generate() warns that the inputs are not on `model.device` (`meta`).
pytestmark = pytest.mark.filterwarnings("ignore:You are calling .generate.. with the `input_ids`:UserWarning")

V = zoo.VOCAB_SIZE
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
NUM_LAYERS = 3

# Embedding and head on disk, layers alternating CPU / disk.
MANUAL_MAP = {
    "model.embed_tokens": "disk",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, and the same model loaded plainly."""
    path = tmp_path_factory.mktemp("tiny_llama")
    zoo.tiny_model("llama", num_layers=NUM_LAYERS, seed=3).save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, reference


@pytest.fixture(scope="module")
def draft():
    return zoo.tiny_model("llama", num_layers=1, seed=4)


def _load(path, tmp_path_factory, device_map, **kwargs):
    offload = tmp_path_factory.mktemp("offload")
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=offload, **kwargs).eval()


@pytest.fixture(scope="module", params=["manual_cpu_disk", "auto_cpu_disk", "auto"])
def mapped(request, checkpoint, tmp_path_factory):
    path, _ = checkpoint
    if request.param == "manual_cpu_disk":
        model = _load(path, tmp_path_factory, MANUAL_MAP)
        assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    elif request.param == "auto_cpu_disk":
        # Too little CPU memory for the whole model: accelerate offloads the rest to disk.
        model = _load(path, tmp_path_factory, "auto", max_memory={"cpu": "50KB"})
        assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values()
    else:
        model = _load(path, tmp_path_factory, "auto")
    return request.param, model


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def test_offloaded_model_reports_meta_device(checkpoint, tmp_path_factory):
    """Why the runner asks the embedding's hook, not `model.device`, where inputs go."""
    model = _load(checkpoint[0], tmp_path_factory, MANUAL_MAP)
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert compat.input_device(model) == torch.device("cpu")


def test_runner_on_mapped_model_equals_recompute(mapped, checkpoint):
    """Prefill, a K+1-token extend, a reorder and a keep on the mapped model: every row's
    logits equal a fresh forward of the plainly loaded model over its own tokens."""
    _, model = mapped
    reference = checkpoint[1]
    n = 3
    ids, mask = left_pad(PROMPTS)
    runner = EagerRunner(model)
    first = runner.prefill(ids, mask, n)
    torch.manual_seed(0)
    rows = len(PROMPTS) * n
    history = [list(PROMPTS[row // n]) for row in range(rows)]
    new = torch.randint(3, V, (rows, 5))
    logits = runner.extend(new)
    for row in range(rows):
        expected = fresh_logits(reference, history[row] + new[row].tolist())
        prompt_len = len(history[row])
        torch.testing.assert_close(first[row // n], expected[prompt_len - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row], expected[prompt_len:], atol=1e-5, rtol=1e-5)
        history[row] += new[row].tolist()
    plan = CopyPlan(dest=torch.tensor([0, 4]), src=torch.tensor([2, 3]))
    runner.reorder(plan)
    for d, s in zip(plan.dest.tolist(), plan.src.tolist()):
        history[d] = list(history[s])
    runner.keep(torch.tensor([0, 1, 4, 5]))
    last = torch.randint(3, V, (4, 2))
    logits = runner.extend(last)
    for i, row in enumerate((0, 1, 4, 5)):
        expected = fresh_logits(reference, history[row] + last[i].tolist())[-2:]
        torch.testing.assert_close(logits[i], expected, atol=1e-5, rtol=1e-5)


def _smc(target, draft):
    ids, mask = left_pad(PROMPTS)
    torch.manual_seed(7)
    return hf_smcsd.smc_generate(
        target,
        draft,
        ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=10,
        smc_particles=4,
        smc_gamma=3,
        return_dict_in_generate=True,
    )


def test_smc_generate_on_mapped_model_equals_plain(mapped, checkpoint, draft):
    """Same seed, same output: the mapped target gives SMC-SD exactly what the plain one does."""
    _, model = mapped
    expected = _smc(checkpoint[1], draft)
    got = _smc(model, draft)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.particle_sequences, expected.particle_sequences)
    torch.testing.assert_close(got.log_weights, expected.log_weights, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.num_resamples, expected.num_resamples)


def test_mapped_model_as_draft(checkpoint, tmp_path_factory, draft):
    """The draft may be offloaded too (and the roles of the models do not matter to the runner)."""
    model = _load(checkpoint[0], tmp_path_factory, MANUAL_MAP)
    expected = _smc(draft, checkpoint[1])
    got = _smc(draft, model)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.log_weights, expected.log_weights, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cpu_split_with_inputs_on_cpu(checkpoint, tmp_path_factory, draft):
    """Layers on the GPU and offloaded to the CPU, prompts and the draft on the CPU: logits
    come back to the caller's device and the output is the plain model's (up to GPU float
    rounding, hence the looser tolerance)."""
    device_map = dict(MANUAL_MAP, **{"model.embed_tokens": 0, "model.layers.1": 0, "lm_head": 0})
    model = _load(checkpoint[0], tmp_path_factory, device_map)
    runner = EagerRunner(model)
    ids, mask = left_pad(PROMPTS)
    first = runner.prefill(ids, mask, 2)
    assert first.device.type == "cpu"
    logits = runner.extend(torch.full((4, 3), 9))
    assert logits.device.type == "cpu"
    expected = fresh_logits(checkpoint[1], PROMPTS[1] + [9, 9, 9])[len(PROMPTS[1]) :]
    torch.testing.assert_close(logits[3], expected, atol=1e-3, rtol=1e-3)
    out = _smc(model, draft)
    assert out.sequences.device.type == "cpu" and out.sequences.shape[0] == 2
