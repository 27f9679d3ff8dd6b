"""Exactness against enumeration: on a 6-token vocabulary and 4 new tokens, the target's
output distribution is computed exactly and compared with SMC-SD samples by total variation.

Bounds come from the sample size: `sampling_noise_tv` gives the TVs that a perfect sampler
shows with the same number of samples (the noise floor); "within noise" means below its
mean plus 5 standard deviations.
"""

import pytest
import torch

import hf_smcsd
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, total_variation

from conftest import (ENUM_EOS, ENUM_NEW, ENUM_PROMPT, ENUM_SAMPLES, enumerable_pair, new_outputs, noise_bound,
                      sampled_distribution)

EOS, NEW, SAMPLES, PROMPT = ENUM_EOS, ENUM_NEW, ENUM_SAMPLES, ENUM_PROMPT


@pytest.fixture(scope="module")
def enumerable():
    target, draft = enumerable_pair(draft_noise=0.5)  # a draft that is wrong by a fair margin
    exact = exact_distribution(target, PROMPT, NEW, temperature=1.0, eos_token_ids=(EOS,))
    return target, draft, exact, noise_bound(exact, SAMPLES)


def smc_tv(target, draft, exact, particles, gamma, **kwargs):
    """TV to `exact` of SAMPLES independent SMC-SD runs (one batch)."""
    return total_variation(exact, sampled_distribution(target, draft, smc_particles=particles, smc_gamma=gamma,
                                                       temperature=1.0, **kwargs))


def test_exact_distribution_is_normalised(enumerable):
    _, _, exact, _ = enumerable
    assert abs(sum(exact.values()) - 1.0) < 1e-9
    assert all(len(key) == NEW or key[-1] == EOS for key in exact)


@pytest.mark.parametrize("gamma", [1, 2])
def test_draft_equal_target_is_exact(enumerable, gamma):
    target, _, exact, noise = enumerable
    tv = smc_tv(target, target, exact, particles=4, gamma=gamma)
    assert tv <= noise, f"TV {tv:.4f} above the sampling noise bound {noise:.4f}"


def test_total_variation_shrinks_as_particles_grow(enumerable):
    """gamma=1 gives two rounds in 4 tokens, so resampling happens between them."""
    target, draft, exact, noise = enumerable
    tvs = {n: smc_tv(target, draft, exact, particles=n, gamma=1) for n in (1, 4, 16)}
    print("TV by N (gamma=1):", {n: round(tv, 4) for n, tv in tvs.items()}, "noise bound:", round(noise, 4))
    assert tvs[1] > 3 * noise, "the draft must be distinguishable from the target for this test to mean anything"
    assert tvs[4] < tvs[1] - noise
    assert tvs[16] < tvs[4] - noise


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_power_target_is_approached_as_particles_grow(enumerable, alpha):
    """smc_alpha targets prod p^alpha over whole outputs (not each token's p^alpha / Z)."""
    target, draft, exact, _ = enumerable
    powered = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,), alpha=alpha)
    noise = noise_bound(powered, SAMPLES)
    assert total_variation(powered, exact) > 3 * noise
    tvs = {n: smc_tv(target, draft, powered, particles=n, gamma=1, smc_alpha=alpha) for n in (1, 16)}
    print(f"alpha={alpha} TV by N:", {n: round(tv, 4) for n, tv in tvs.items()}, "noise bound", round(noise, 4))
    assert tvs[16] < tvs[1] - noise


def test_batch_of_prompts_behaves_like_each_alone(enumerable):
    """Three prompts of different lengths (left padded) in one call: each prompt's TV to its
    own exact distribution matches the TV of running that prompt alone."""
    target, draft, _, _ = enumerable
    prompts = [[1, 2, 3], [4], [5, 1, 4, 2, 3]]
    per_prompt = SAMPLES // 2
    width = max(map(len, prompts))
    ids = torch.zeros(3 * per_prompt, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i * per_prompt:(i + 1) * per_prompt, width - len(p):] = torch.tensor(p)
        mask[i * per_prompt:(i + 1) * per_prompt, width - len(p):] = 1
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=4, smc_gamma=1,
                                do_sample=True, temperature=1.0, max_new_tokens=NEW)
    for i, p in enumerate(prompts):
        exact = exact_distribution(target, p, NEW, eos_token_ids=(EOS,))
        noise = noise_bound(exact, per_prompt)
        batched = total_variation(exact, empirical_distribution(new_outputs(out[i * per_prompt:(i + 1) * per_prompt], width)))
        alone_ids = torch.tensor([p] * per_prompt)
        torch.manual_seed(1)
        alone_out = hf_smcsd.smc_generate(target, draft, alone_ids, attention_mask=torch.ones_like(alone_ids),
                                          smc_particles=4, smc_gamma=1, do_sample=True, temperature=1.0,
                                          max_new_tokens=NEW)
        alone = total_variation(exact, empirical_distribution(new_outputs(alone_out, len(p))))
        # Both estimate the same bias; their difference is sampling noise of two runs.
        assert abs(batched - alone) < noise, (i, batched, alone, noise)
