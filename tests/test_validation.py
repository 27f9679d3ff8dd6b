"""Validation of a generate() request with SMC-SD (hf_smcsd.validation): one table of knob
kinds, clear errors that name the argument, before any work is done."""

import math

import numpy as np
import pytest
import torch

import hf_smcsd
from hf_smcsd import validation
from hf_smcsd.generate import SMC_KNOBS

IDS = torch.tensor([[1, 2, 3]])


def run(pair, **kwargs):
    target, draft = pair
    kwargs = {"smc_particles": 2, "max_new_tokens": 4, **kwargs}
    return hf_smcsd.smc_generate(target, draft, IDS, **kwargs)


def test_every_knob_has_a_kind():
    assert set(SMC_KNOBS) <= set(validation.KNOB_KINDS)


@pytest.mark.parametrize(
    "kwargs, name, says",
    [
        (dict(smc_particles=True), "smc_particles", "bool"),
        (dict(smc_gamma=True), "smc_gamma", "bool"),
        (dict(smc_particles="4"), "smc_particles", "string"),
        (dict(smc_particles=4.0), "smc_particles", "integer"),
        (dict(smc_resample_threshold="0.5"), "smc_resample_threshold", "string"),
        (dict(smc_alpha=math.inf), "smc_alpha", "finite"),
        (dict(smc_alpha=math.nan), "smc_alpha", "finite"),
        (dict(smc_draft_temperature=math.inf), "smc_draft_temperature", "finite"),
        (dict(smc_draft_processors=1), "smc_draft_processors", "True or False"),
        (dict(smc_particles=torch.tensor([2, 3])), "smc_particles", "one number"),
        (dict(temperature=math.inf), "temperature", "finite"),
        (dict(max_new_tokens=True), "max_new_tokens", "bool"),
        (dict(num_return_sequences="2"), "num_return_sequences", "string"),
        (dict(guidance_scale=2.0), "guidance_scale", "classifier-free guidance"),
    ],
)
def test_bad_values_name_the_argument_and_what_to_pass(pair, kwargs, name, says):
    with pytest.raises(ValueError, match=rf"{name}.*{says}"):
        run(pair, **kwargs)


@pytest.mark.parametrize("particles", [np.int64(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int16)])
def test_numpy_and_torch_integers_are_integers(pair, particles):
    out = run(pair, smc_particles=particles, return_dict_in_generate=True)
    assert out.particle_sequences.shape[1] == 3


def test_numpy_floats_are_numbers(pair):
    run(pair, smc_resample_threshold=np.float32(0.25), smc_alpha=np.float64(1.0))


def test_guidance_scale_one_is_no_guidance(pair):
    run(pair, guidance_scale=1.0)


def test_a_draft_that_is_not_a_model_is_refused(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="assistant_model must be a loaded model.*from_pretrained"):
        hf_smcsd.smc_generate(target, "path/to/draft", IDS, max_new_tokens=4)


def test_smc_generate_samples_by_default(pair, recwarn):
    """Without do_sample it is SMC-SD (batch 2 works, particles differ), not greedy."""
    target, draft = pair
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, torch.tensor([[1, 2, 3], [4, 5, 6]]), smc_particles=8,
                                max_new_tokens=6, return_dict_in_generate=True)
    assert isinstance(out, hf_smcsd.SMCGenerateOutput)
    assert not [w for w in recwarn if "do_sample" in str(w.message)]


def test_kinds_for_the_mode_knobs():
    check = validation.check_knobs
    assert check({"smc_schedule": [4, np.int64(1)]}) == {"smc_schedule": (4, 1)}
    assert check({"smc_mode": "auto", "smc_auto_threshold": 0.5}) == {"smc_mode": "auto", "smc_auto_threshold": 0.5}
    for bad in ((0, 0), (-1, 2), (1,), "41", (True, 1)):
        with pytest.raises(ValueError, match="smc_schedule"):
            check({"smc_schedule": bad})
    with pytest.raises(ValueError, match="smc_mode.*'smc', 'exact'"):
        check({"smc_mode": "lossless"})
    with pytest.raises(ValueError, match="smc_auto_threshold"):
        check({"smc_auto_threshold": 1.5})
    with pytest.raises(KeyError, match="KNOB_KINDS"):
        check({"smc_unknown": 1})
