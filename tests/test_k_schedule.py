"""Adaptive K in fixed modes: transformers' `num_assistant_tokens_schedule` (issue 16).

The rule (policy.adapt_draft_tokens) on its own, then end to end through generate(): the
default leaves runs unchanged, K grows with a perfect draft and shrinks with a useless one,
"heuristic" stores the K reached on the assistant's config and "heuristic_transient" does
not, SMC-SD rounds keep the user's K, exact mode stays lossless, bad values are refused.
"""

import copy

import pytest
import torch

import hf_smcsd
from hf_smcsd import policy
from hf_smcsd.smc import SMCSettings
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, total_variation
from hf_smcsd.testing.tiny_models import tiny_llama

from conftest import ENUM_EOS, ENUM_NEW, ENUM_PROMPT, ENUM_SAMPLES, enumerable_pair, new_outputs, noise_bound


def _k(value):
    return torch.tensor(float(value), dtype=torch.float64)


def _adapt(k, accepted, drafted, limit=16):
    return float(policy.adapt_draft_tokens(_k(k), torch.tensor(accepted), torch.tensor(drafted), limit))


# --- The rule. ---


def test_one_group_follows_transformers_heuristic():
    """transformers' update_candidate_strategy: all drafts accepted -> K + 2, else K - 1, at least 1."""
    assert _adapt(4, [4], [4]) == 6
    assert _adapt(4, [3], [4]) == 3
    assert _adapt(1, [0], [1]) == 1
    assert _adapt(5, [2], [2]) == 7  # a walk cut by its budget (2 usable drafts) that took both counts as full


def test_groups_sharing_k_move_it_by_their_mean_vote():
    """One K per round for the whole batch: each group votes +2 (all accepted) or -1, K moves
    by the mean and keeps its fraction (a round drafts the integer part)."""
    assert _adapt(4, [4, 0], [4, 4]) == 4.5  # (+2 - 1) / 2
    assert _adapt(4, [4, 1, 0], [4, 4, 4]) == 4.0  # (+2 - 1 - 1) / 3
    assert _adapt(4, [0, 0, 0, 0], [4, 4, 4, 4]) == 3.0
    assert _adapt(15, [4], [4], limit=16) == 16  # capped
    assert _adapt(3, [], []) == 3  # no exact group this round: unchanged


def test_the_cap():
    assert policy.adaptive_k_limit(4, 100) == policy.ADAPTIVE_K_LIMIT == 16
    assert policy.adaptive_k_limit(20, 100) == 20  # a larger start is the cap
    assert policy.adaptive_k_limit(4, 9) == 9  # never more than a budget keeps
    assert policy.adaptive_k_limit(4, 2) == 4  # never below the start
    assert policy.adaptive_k_limit(4, 100, backend_limit=7) == 7  # what an engine verifies in one step
    assert policy.adaptive_k_limit(8, 100, backend_limit=7) == 8
    settings = SMCSettings(gamma=4, max_new_tokens=64, mode="exact", gamma_schedule="heuristic")
    assert settings.adapts_gamma and settings.max_gamma == 16
    assert SMCSettings(gamma=4, max_new_tokens=64, mode="exact", gamma_schedule="heuristic", gamma_limit=6).max_gamma == 6
    for mode in ("smc", "auto"):  # no adaptation there: sized as before
        settings = SMCSettings(gamma=4, max_new_tokens=64, mode=mode, gamma_schedule="heuristic")
        assert not settings.adapts_gamma and settings.max_gamma == 4


# --- End to end. ---


@pytest.fixture(scope="module")
def models():
    """A target without EOS (runs reach their budget), itself as a perfect draft, and an
    unrelated random model as a useless draft."""
    target = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=0, initializer_range=0.5)
    useless = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=7, initializer_range=0.5)
    return target, useless


def _run(target, draft, seed=0, **kwargs):
    kwargs = dict(dict(smc_particles=2, smc_mode="exact", max_new_tokens=40, top_k=0), **kwargs)
    torch.manual_seed(seed)
    return hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), return_dict_in_generate=True,
                                 pad_token_id=0, eos_token_id=None, **kwargs)


def test_constant_is_the_default_and_changes_nothing(models):
    target, useless = models
    plain = _run(target, useless)
    assert plain.num_assistant_tokens is None
    for draft_schedule in ("constant", None):
        draft = copy.deepcopy(useless)
        draft.generation_config.num_assistant_tokens_schedule = draft_schedule
        out = _run(target, draft)
        assert torch.equal(out.sequences, plain.sequences) and out.num_assistant_tokens is None
    assert torch.equal(_run(target, useless, num_assistant_tokens_schedule="constant").sequences, plain.sequences)


def test_k_grows_with_a_perfect_draft(models):
    target, _ = models
    draft = copy.deepcopy(target)
    out = _run(target, draft, num_assistant_tokens_schedule="heuristic_transient", max_new_tokens=100)
    accepted = out.accepted_draft_tokens[0].tolist()
    # Every round accepts all K drafts: K = 4, 6, 8, ... up to the cap, 16.
    assert accepted[:7] == [4, 6, 8, 10, 12, 14, 16]
    assert out.num_assistant_tokens == 16
    constant = _run(target, draft, max_new_tokens=100)
    assert set(constant.accepted_draft_tokens[0].tolist()[:-1]) == {4}  # the default: K stays 4
    assert len(accepted) < len(constant.accepted_draft_tokens[0])  # fewer rounds for the same tokens


def _draft_forwards(draft):
    """A list that counts the draft's forward calls (one per drafted depth after the first)."""
    calls = []
    draft.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_k_shrinks_with_a_useless_draft(models):
    target, useless = models
    draft = copy.deepcopy(useless)
    calls = _draft_forwards(draft)
    out = _run(target, draft, num_assistant_tokens_schedule="heuristic_transient", smc_gamma=8)
    accepted = out.accepted_draft_tokens[0]
    assert accepted.float().mean() < 1  # what makes the draft useless
    assert out.num_assistant_tokens == 1
    adaptive = (len(calls) - 1) / len(accepted)  # draft forwards per round, less the prefill
    calls.clear()
    constant = _run(target, draft, smc_gamma=8)
    constant = (len(calls) - 1) / len(constant.accepted_draft_tokens[0])
    # K = 8 drafts 8 depths a round (fewer in the last); the heuristic is down to 1 within 7 rounds.
    print(f"draft forwards per round: constant K=8 {constant:.2f}, heuristic {adaptive:.2f}")
    assert constant > 7 and adaptive < 3


def test_heuristic_persists_and_transient_does_not(models):
    target, _ = models
    draft = copy.deepcopy(target)
    before = draft.generation_config.num_assistant_tokens  # None (5.x) or 20 (4.57)
    out = _run(target, draft, num_assistant_tokens_schedule="heuristic_transient", max_new_tokens=20)
    assert out.num_assistant_tokens > 4
    assert draft.generation_config.num_assistant_tokens == before

    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    first = _run(target, draft, max_new_tokens=20)
    reached = first.num_assistant_tokens
    assert reached > 4 and draft.generation_config.num_assistant_tokens == reached
    second = _run(target, draft, max_new_tokens=20)  # starts where the first call ended
    assert second.accepted_draft_tokens[0][0] == reached
    # smc_gamma still wins over the assistant's config (the existing precedence).
    assert _run(target, draft, max_new_tokens=20, smc_gamma=3).accepted_draft_tokens[0][0] == 3


def test_greedy_adapts_and_stays_the_targets_greedy(models):
    target, useless = models
    expected = target.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=30, pad_token_id=0,
                               eos_token_id=None)
    for draft in (useless, copy.deepcopy(target)):
        out = _run(target, draft, do_sample=False, max_new_tokens=30, num_assistant_tokens_schedule="heuristic_transient")
        assert torch.equal(out.sequences, expected)
        assert out.num_assistant_tokens != 4


def test_mixed_smc_rounds_keep_the_users_k(models):
    """SMC-SD rounds accept every draft by construction (no signal): they draft smc_gamma and
    leave the adapted K to the exact rounds."""
    target, _ = models
    draft = copy.deepcopy(target)
    out = _run(target, draft, smc_mode="mixed", smc_schedule=(3, 1), smc_gamma=2, max_new_tokens=60,
               num_assistant_tokens_schedule="heuristic_transient")
    modes = out.round_modes[0]
    assert modes.startswith("eeese")
    assert out.accepted_draft_tokens[0].tolist()[:4] == [2, 4, 6, 8]  # exact rounds adapt K ...
    assert int(out.smc_tokens[0]) == 3 * modes.count("s")  # ... SMC-SD rounds add smc_gamma + 1 = 3 tokens


def test_ineffective_schedules_warn_and_store_nothing(models):
    target, _ = models
    draft = copy.deepcopy(target)
    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    before = draft.generation_config.num_assistant_tokens
    plain = _run(target, copy.deepcopy(target), smc_mode="smc")
    with pytest.warns(UserWarning, match="num_assistant_tokens_schedule='heuristic' has no effect with smc_mode='smc'"):
        out = _run(target, draft, smc_mode="smc")
    assert torch.equal(out.sequences, plain.sequences) and out.num_assistant_tokens is None
    with pytest.warns(UserWarning, match="has no effect with smc_mode='auto'"):
        _run(target, draft, smc_mode="auto")
    assert draft.generation_config.num_assistant_tokens == before


def test_bad_schedules_are_refused_by_name(models):
    target, useless = models
    with pytest.raises(ValueError, match=r"Invalid num_assistant_tokens_schedule='fast': pass one of 'constant', "
                                         r"'heuristic', 'heuristic_transient'"):
        _run(target, useless, num_assistant_tokens_schedule="fast")
    draft = copy.deepcopy(useless)
    draft.generation_config.num_assistant_tokens_schedule = "Heuristic"
    with pytest.raises(ValueError, match=r"Invalid assistant_model\.generation_config\.num_assistant_tokens_schedule"):
        _run(target, draft)
    with pytest.raises(ValueError, match="Invalid num_assistant_tokens_schedule=3"):
        SMCSettings(gamma_schedule=3)


def test_exact_mode_with_adaptive_k_stays_lossless(monkeypatch):
    """K changes between rounds from the batch's earlier walks only, never from the round's
    own draws, so exact rounds stay exact. Enumeration (test_exact_mode.py's setting: 6
    tokens, 4 new, 10,000 samples, bound mean + 5 sd of a perfect sampler's TV) with a
    middling draft; each run must really have drafted another K in a later round (it
    shrinks from 2 at N = 1 and grows from 1 at N = 3 here)."""
    target, draft = enumerable_pair(draft_noise=0.5)
    exact = exact_distribution(target, ENUM_PROMPT, ENUM_NEW, eos_token_ids=(ENUM_EOS,))
    noise = noise_bound(exact, ENUM_SAMPLES)
    ids = torch.tensor([ENUM_PROMPT] * ENUM_SAMPLES)
    adapt, ks = policy.adapt_draft_tokens, []

    def recording(*args):
        ks.append(int(adapt(*args)))
        return adapt(*args)

    monkeypatch.setattr(policy, "adapt_draft_tokens", recording)
    for seed, particles, start in ((0, 1, 2), (1, 3, 1)):
        ks.clear()
        torch.manual_seed(seed)
        out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=torch.ones_like(ids), smc_particles=particles,
                                    smc_gamma=start, smc_mode="exact", do_sample=True, temperature=1.0,
                                    max_new_tokens=ENUM_NEW, return_dict_in_generate=True,
                                    num_assistant_tokens_schedule="heuristic_transient")
        assert any(k != start for k in ks[:-1]), ks  # a round after the first drafted another K
        tv = total_variation(exact, empirical_distribution(new_outputs(out.sequences, len(ENUM_PROMPT))))
        print(f"exact N={particles}, heuristic K from {start} (K after each round {ks}): TV {tv:.4f} "
              f"(noise bound {noise:.4f})")
        assert tv <= noise


def test_runners_agree_while_k_changes(models):
    """K changes every round here (up with a perfect draft, down with a useless one): the static
    runner (buffers sized for the cap) and the paged runner return the eager runner's tokens."""
    from hf_smcsd.runners import EagerRunner
    from hf_smcsd.runners.paged import PagedRunner
    from hf_smcsd.runners.static import StaticRunner
    from hf_smcsd.smc import smc_sample

    from conftest import left_pad

    target, useless = models
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]])
    for draft, gamma in ((copy.deepcopy(target), 2), (useless, 6)):
        settings = SMCSettings(particles=2, gamma=gamma, max_new_tokens=48, mode="exact", gamma_schedule="heuristic")
        results = []
        for make in (EagerRunner, lambda m: StaticRunner(m, max_length=ids.shape[1] + 48 + 2 * (settings.max_gamma + 1)),
                     lambda m: PagedRunner(m, tokens_per_block=4)):
            torch.manual_seed(0)
            results.append(smc_sample(make(target), make(draft), ids, mask, settings))
        eager = results[0]
        assert eager.gamma_reached != gamma
        for other in results[1:]:
            assert torch.equal(eager.tokens, other.tokens) and torch.equal(eager.lengths, other.lengths)
            assert [a.tolist() for a in eager.accepted] == [a.tolist() for a in other.accepted]
