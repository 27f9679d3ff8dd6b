"""The repository's `custom_generate/` folder (issue 10): transformers' convention for
decoding methods, so an unpatched model runs SMC-SD with `custom_generate=<path>`."""

from pathlib import Path

import torch

import hf_smcsd

REPO = str(Path(__file__).resolve().parent.parent)  # holds custom_generate/generate.py
IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])
MASK = torch.ones_like(IDS)


def test_custom_generate_runs_smc_sd_on_an_unpatched_model(pair):
    target, draft = pair
    torch.manual_seed(0)
    out = target.generate(IDS, attention_mask=MASK, custom_generate=REPO, trust_remote_code=True, assistant_model=draft,
                          smc_particles=8, smc_gamma=3, do_sample=True, max_new_tokens=6, return_dict_in_generate=True)
    assert isinstance(out, hf_smcsd.SMCGenerateOutput) and out.particle_sequences.shape[:2] == (2, 8)
    torch.manual_seed(0)
    expected = hf_smcsd.smc_generate(target, draft, IDS, attention_mask=MASK, smc_particles=8, smc_gamma=3,
                                     max_new_tokens=6)
    assert torch.equal(out.sequences, expected)
    assert "generate" not in vars(target)  # nothing patched


def test_custom_generate_without_smc_particles_is_stock_generate(pair):
    target, _ = pair
    torch.manual_seed(0)
    got = target.generate(IDS, attention_mask=MASK, custom_generate=REPO, trust_remote_code=True, do_sample=True,
                          max_new_tokens=6)
    torch.manual_seed(0)
    assert torch.equal(got, target.generate(IDS, attention_mask=MASK, do_sample=True, max_new_tokens=6))


def test_requirements_name_this_package():
    requirements = (Path(REPO) / "custom_generate" / "requirements.txt").read_text().split()
    assert any(line.startswith("hf-smcsd") for line in requirements)
