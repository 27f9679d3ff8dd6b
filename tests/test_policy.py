"""Mode policy (hf_smcsd.policy): fixed modes and mixed schedules (auto: test_planner.py)."""

import pytest
import torch

from hf_smcsd import policy


def test_fixed_modes_and_mixed_schedule():
    rounds = torch.arange(10)
    assert not policy.exact_rounds("smc", rounds).any()
    assert policy.exact_rounds("exact", rounds).all()
    mixed = policy.exact_rounds("mixed", rounds, schedule=(2, 1)).tolist()
    assert mixed == [True, True, False] * 3 + [True]
    assert policy.exact_rounds("mixed", rounds, schedule=(0, 1)).sum() == 0
    assert policy.exact_rounds("mixed", rounds, schedule=(1, 0)).all()


def test_auto_starts_exact_and_unknown_modes_are_refused():
    """auto's first round has no evidence: exact (the planner decides every later round)."""
    assert policy.exact_rounds("auto", torch.zeros(3, dtype=torch.long)).all()
    with pytest.raises(ValueError, match="smc_mode"):
        policy.exact_rounds("fast", torch.zeros(1, dtype=torch.long))
