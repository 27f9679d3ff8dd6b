"""Issue 19: breaks and weak spots found by an adversarial round, each with its guard."""

import pytest
import torch

import hf_smcsd
from hf_smcsd import zoo

# --- Item 2: models with learned absolute positions (GPT-2 n_positions=16). ---


@pytest.fixture(scope="module")
def gpt2_pairs():
    return {n: _gpt2_pair(n) for n in (16, 32)}


def _gpt2_pair(n_positions: int):
    """A GPT-2 target and draft whose position tables hold `n_positions` rows: the first rows
    of one wide seeded pair, so that every narrower table agrees with it where both exist."""
    models = []
    for seed, layers in ((0, 2), (1, 1)):
        wide = zoo.tiny_model("gpt2", seed=seed, num_layers=layers, n_positions=32)
        narrow = zoo.tiny_model("gpt2", seed=seed, num_layers=layers, n_positions=n_positions)
        state = {k: v[tuple(slice(0, n) for n in narrow.state_dict()[k].shape)] for k, v in wide.state_dict().items()}
        narrow.load_state_dict(state)
        models.append(narrow.eval())
    return models


PROMPTS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
FILLS = dict(smc_particles=3, smc_gamma=7, max_new_tokens=11, eos_token_id=None, pad_token_id=0)  # 5 + 11 = 16


@pytest.mark.parametrize("mode,runner", [("smc", "eager"), ("exact", "eager"), ("auto", "eager"), ("smc", "static")])
def test_a_request_that_fills_the_position_table_runs_as_with_a_larger_table(mode, runner, gpt2_pairs):
    """Rows of groups with less budget left are fed past their budget in a round; they must
    not be fed positions the table lacks, and the tokens kept must be those a larger table
    gives (before the fix: IndexError in the position embedding in most seeds)."""
    narrow, wide = gpt2_pairs[16], gpt2_pairs[32]
    extra = dict(cache_implementation="static") if runner == "static" else {}
    for seed in range(3):
        outs = []
        for target, draft in (narrow, wide):
            torch.manual_seed(seed)
            outs.append(hf_smcsd.smc_generate(target, draft, PROMPTS, smc_mode=mode, return_dict_in_generate=True,
                                              **FILLS, **extra))
        assert torch.equal(outs[0].particle_sequences, outs[1].particle_sequences)
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        assert outs[0].sequences.shape[1] == 16


def test_a_request_that_cannot_fit_the_position_table_is_refused_with_the_figures(gpt2_pairs):
    target, draft = gpt2_pairs[16]
    stock = target.generate(PROMPTS, max_new_tokens=12, do_sample=False, pad_token_id=0)  # 5 + 11 fed: fits
    assert stock.shape[1] == 17
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, PROMPTS, **dict(FILLS, max_new_tokens=12))
    assert out.shape[1] == 17
    with pytest.raises(ValueError, match=r"holds 16 of them, but this request feeds 17.*at most 12"):
        hf_smcsd.smc_generate(target, draft, PROMPTS, **dict(FILLS, max_new_tokens=13))
