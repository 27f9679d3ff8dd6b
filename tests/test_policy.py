"""Mode policy (hf_smcsd.policy): schedules, the auto rule, and its agreement signal."""

import math

import torch

from hf_smcsd import policy


def test_fixed_modes_and_mixed_schedule():
    rounds = torch.arange(10)
    nan = torch.full((10,), float("nan"), dtype=torch.float64)
    assert not policy.exact_rounds("smc", rounds, nan).any()
    assert policy.exact_rounds("exact", rounds, nan).all()
    mixed = policy.exact_rounds("mixed", rounds, nan, schedule=(2, 1)).tolist()
    assert mixed == [True, True, False] * 3 + [True]
    assert policy.exact_rounds("mixed", rounds, nan, schedule=(0, 1)).sum() == 0
    assert policy.exact_rounds("mixed", rounds, nan, schedule=(1, 0)).all()


def test_auto_is_exact_without_evidence_and_below_the_threshold():
    agreement = torch.tensor([float("nan"), 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    rounds = torch.zeros(5, dtype=torch.long)
    assert policy.exact_rounds("auto", rounds, agreement, threshold=0.5).tolist() == [True, True, True, False, False]
    assert policy.exact_rounds("auto", rounds, agreement, threshold=1.0).all()


def test_round_agreement_is_the_smaller_of_acceptance_and_ess_fraction():
    k = 3
    counted = torch.ones(8, k, dtype=torch.bool)
    same = torch.log(torch.full((8, k), 0.3))
    # Draft proposes as the target would: acceptance 1, every increment 0 (ESS = N).
    assert policy.round_agreement(same, same, counted, particles=4).tolist() == [1.0, 1.0]
    # One row of each group gets all the weight (p = 1 on its drafts, ~0 on the others):
    # acceptance (1 + 3 * ~0) / 4, ESS fraction 1/N: the minimum is the ESS fraction.
    log_p = torch.full((8, k), -40.0)
    log_p[[1, 6]] = 0.0
    agreement = policy.round_agreement(log_p, same, counted, particles=4)
    assert torch.allclose(agreement, torch.tensor([0.25, 0.25], dtype=torch.float64), atol=1e-6)
    # Every row equally poor (p = q / 10 everywhere): ESS = N, but acceptance 0.1 decides.
    poor = policy.round_agreement(same + torch.log(torch.tensor(0.1)), same, counted, particles=4)
    assert torch.allclose(poor, torch.tensor([0.1, 0.1], dtype=torch.float64), atol=1e-6)
    # Tokens that are not counted (finished rows, past the budget) do not weigh.
    none = torch.zeros_like(counted)
    assert torch.isnan(policy.round_agreement(log_p, same, none, particles=4)).all()


def test_round_agreement_with_one_particle_is_the_acceptance_estimate():
    log_p = torch.log(torch.tensor([[0.5, 0.2]]))
    log_q = torch.log(torch.tensor([[0.25, 0.4]]))
    got = policy.round_agreement(log_p, log_q, torch.ones(1, 2, dtype=torch.bool), particles=1)
    assert math.isclose(float(got[0]), (1.0 + 0.5) / 2, rel_tol=1e-6)


def test_update_agreement_averages_and_ignores_missing_evidence():
    old = torch.tensor([float("nan"), 0.4, 0.4], dtype=torch.float64)
    new = torch.tensor([0.8, float("nan"), 0.8], dtype=torch.float64)
    assert torch.allclose(policy.update_agreement(old, new, decay=0.5), torch.tensor([0.8, 0.4, 0.6], dtype=torch.float64))
