"""Exact mode (lossless multi-draft speculative sampling), mixed schedules, auto, greedy and
dead-round redos, end to end through generate().

Exactness by enumeration as in test_exactness.py: on a 6-token vocabulary and 4 new tokens
the (processed) target's output distribution is computed exactly, and the total variation
of 10,000 samples must stay within the sampling noise (mean + 5 sd of a perfect sampler's
TV at that sample size), for a draft that is wrong by a fair margin.
"""

import copy

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import hf_smcsd
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, total_variation
from hf_smcsd.testing.tiny_models import perturbed_copy, tiny_llama

from conftest import (ENUM_EOS, ENUM_NEW, ENUM_PROMPT, ENUM_SAMPLES, enumerable_pair, left_pad, new_outputs,
                      noise_bound, processed_target, processor_cases, sampled_distribution)

EOS, NEW, SAMPLES, PROMPT = ENUM_EOS, ENUM_NEW, ENUM_SAMPLES, ENUM_PROMPT


@pytest.fixture(scope="module")
def enumerable():
    return enumerable_pair(draft_noise=1.0)  # a poor draft


def outputs(target, draft, **kwargs):
    return sampled_distribution(target, draft, temperature=1.0, **kwargs)


@pytest.mark.parametrize("particles, gamma", [(1, 1), (1, 3), (4, 2), (8, 3), (3, 5)])
def test_exact_mode_matches_the_target(enumerable, particles, gamma):
    """Any N and K (K=5 > NEW: budgets end mid-round), stops inside the accepted span and on
    the corrected token (EOS is a likely token here)."""
    target, draft = enumerable
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    noise = noise_bound(exact, SAMPLES)
    tv = total_variation(exact, outputs(target, draft, smc_particles=particles, smc_gamma=gamma, smc_mode="exact"))
    print(f"exact N={particles} K={gamma}: TV {tv:.4f} (noise bound {noise:.4f})")
    assert tv <= noise


def test_the_draft_is_really_poor(enumerable):
    """What makes the test above mean something: SMC-SD at N=1 (the draft, uncorrected) is far off."""
    target, draft = enumerable
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    tv = total_variation(exact, outputs(target, draft, smc_particles=1, smc_gamma=2, smc_mode="smc"))
    assert tv > 5 * noise_bound(exact, SAMPLES)


@processor_cases()
def test_exact_mode_matches_the_processed_target(enumerable, generate_kwargs, processors):
    target, draft = enumerable
    exact, noise = processed_target(target, processors)
    tv = total_variation(exact, outputs(target, draft, smc_particles=4, smc_gamma=2, smc_mode="exact", **generate_kwargs))
    assert tv <= noise, (generate_kwargs, tv, noise)


def test_all_exact_schedule_and_mixed_schedules_stay_exact_where_they_should(enumerable):
    """mixed with (1, 0) is exact mode; (1, 1) alternates and is no longer exact at N=1 (its
    SMC-SD rounds are the draft, uncorrected), which shows the schedule really switches."""
    target, draft = enumerable
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    noise = noise_bound(exact, SAMPLES)
    all_exact = outputs(target, draft, smc_particles=2, smc_gamma=1, smc_mode="mixed", smc_schedule=(1, 0))
    assert total_variation(exact, all_exact) <= noise
    alternating = outputs(target, draft, smc_particles=1, smc_gamma=1, smc_mode="mixed", smc_schedule=(1, 1))
    assert total_variation(exact, alternating) > noise


def test_auto_at_threshold_zero_is_lossless(enumerable):
    """auto with smc_auto_threshold=0 never runs SMC-SD (a poor draft's bound is never 0):
    exact and plain rounds only."""
    target, draft = enumerable
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    got = outputs(target, draft, smc_particles=4, smc_gamma=1, smc_mode="auto", smc_auto_threshold=0.0)
    assert total_variation(exact, got) <= noise_bound(exact, SAMPLES)


def test_batch_with_different_acceptance_lengths_gives_each_prompt_its_own_distribution(enumerable):
    """Three prompts of different lengths (left padded) accept different numbers of tokens
    per round; each prompt's outputs must follow its own exact distribution, including under
    processors that read each row's sequence (min_new_tokens counts each row's own new tokens;
    the repetition penalty, where transformers keeps the prompts' padding out of it)."""
    from transformers import MinNewTokensLengthLogitsProcessor

    target, draft = enumerable
    prompts = [[1, 2, 3], [4], [5, 1, 4, 2, 3]]
    per_prompt = SAMPLES // 2
    width = max(map(len, prompts))
    ids, mask = left_pad([p for p in prompts for _ in range(per_prompt)])
    # transformers 4.57 penalises the left padding too: there the penalty would not be the
    # prompt's own distribution, so it is tested only where padding is kept out.
    try:  # per-prompt padding lengths: transformers >= 5.24
        RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0]))
        penalty = True
    except (TypeError, ValueError):
        penalty = False
    extra = dict(repetition_penalty=1.5) if penalty else {}
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, smc_gamma=2,
                                smc_mode="exact", do_sample=True, temperature=1.0, max_new_tokens=NEW,
                                min_new_tokens=2, return_dict_in_generate=True, **extra)
    assert len({len(a) for a in out.accepted_draft_tokens}) > 1  # rows really ran different round counts
    for i, p in enumerate(prompts):
        processors = [MinNewTokensLengthLogitsProcessor(len(p), 2, EOS)]
        processors += [RepetitionPenaltyLogitsProcessor(1.5)] if penalty else []
        exact = exact_distribution(target, p, NEW, eos_token_ids=(EOS,), logits_processor=LogitsProcessorList(processors))
        got = empirical_distribution(new_outputs(out.sequences[i * per_prompt:(i + 1) * per_prompt], width))
        assert total_variation(exact, got) <= noise_bound(exact, per_prompt), i


def test_greedy_equals_the_targets_greedy_at_batch_3(pair):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]])
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=17, pad_token_id=0,
                               eos_token_id=None)
    patched = hf_smcsd.patch(copy.deepcopy(target))  # the session fixture stays unpatched
    for particles, gamma in ((1, 4), (4, 3)):
        torch.manual_seed(0)
        got = patched.generate(ids, attention_mask=mask, assistant_model=draft, smc_particles=particles,
                               smc_gamma=gamma, do_sample=False, max_new_tokens=17, pad_token_id=0,
                               eos_token_id=None)
        assert torch.equal(got, expected), (particles, gamma)


def test_dead_rounds_are_redone_and_never_return_ruled_out_tokens(pair):
    """bad_words_ids and min_new_tokens rule tokens out; a temperature-only draft proposes
    them, so SMC-SD populations die. Every returned particle obeys the processors, in every mode."""
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12]] * 8)
    redos = 0
    for mode in ("smc", "mixed", "auto"):
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=2, smc_gamma=4,
                                    smc_mode=mode, do_sample=True, top_k=2, max_new_tokens=12, eos_token_id=3,
                                    bad_words_ids=[[4], [20]], min_new_tokens=5, return_dict_in_generate=True)
        redos += int(out.num_dead_redos.sum())
        for row, seq in enumerate(out.sequences[:, ids.shape[1]:].tolist()):
            assert 4 not in seq and 20 not in seq, (mode, seq)
            assert 3 not in seq[:4], (mode, seq)
        assert all(set(m) <= set("sexp") for m in out.round_modes)
    assert redos > 0  # the situation really happened


def test_diagnostics_count_rounds_and_tokens_per_mode(pair):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=4, smc_gamma=3,
                                smc_mode="mixed", smc_schedule=(2, 1), do_sample=True, max_new_tokens=30,
                                eos_token_id=None, return_dict_in_generate=True)
    for b in range(2):
        modes = out.round_modes[b]
        assert len(modes) >= 3 and modes == ("ees" * 30)[: len(modes)]  # the (2, 1) cycle, per prompt
        assert int(out.num_exact_rounds[b]) == modes.count("e") == len(out.accepted_draft_tokens[b])
        assert int(out.num_smc_rounds[b]) == modes.count("s")
        assert int(out.smc_tokens[b] + out.exact_tokens[b]) == 30
        assert int(out.smc_tokens[b]) == 4 * modes.count("s")  # K+1 per SMC-SD round
        # x0, then per exact round its accepted drafts and (unless the budget ran out) one more.
        accepted = int(out.accepted_draft_tokens[b].sum())
        assert 1 + accepted <= int(out.exact_tokens[b]) <= 1 + accepted + modes.count("e")


def test_bad_mode_settings_are_refused(pair):
    target, draft = pair
    ids = torch.tensor([[5, 6, 7]])
    for kwargs, pattern in (
        (dict(smc_mode="fast"), "smc_mode"),
        (dict(smc_mode="mixed", smc_schedule=(0, 0)), "smc_schedule"),
        (dict(smc_mode="auto", smc_auto_threshold=1.5), "smc_auto_threshold"),
        (dict(smc_mode="exact", smc_alpha=2.0), "smc_alpha.*exact"),
    ):
        with pytest.raises(ValueError, match=pattern):
            hf_smcsd.smc_generate(target, draft, ids, do_sample=True, max_new_tokens=4, **kwargs)


def test_exact_and_greedy_on_the_static_runner_match_the_eager_runner(pair):
    """Exact rounds' rollbacks and winner copies through the static runner: greedy gives the
    target's greedy text, and a seeded exact-mode run gives the eager runner's tokens."""
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]])
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=15, pad_token_id=0,
                               eos_token_id=None)
    got = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, smc_gamma=4,
                                do_sample=False, max_new_tokens=15, pad_token_id=0, eos_token_id=None,
                                cache_implementation="static")
    assert torch.equal(got, expected)
    runs = []
    for extra in ({}, dict(cache_implementation="static")):
        torch.manual_seed(3)
        runs.append(hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, smc_gamma=4,
                                          smc_mode="mixed", smc_schedule=(2, 1), do_sample=True, max_new_tokens=15,
                                          pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, **extra))
    assert runs[0].round_modes == runs[1].round_modes
    assert torch.equal(runs[0].sequences, runs[1].sequences)


def test_dead_first_round_redo_on_the_paged_runner_matches_eager():
    """A population that dies in the very first round is redone without rolling the draft
    into its prompt (the paged and engine runners refuse that), and the paged runner then
    writes the eager runner's tokens."""
    from hf_smcsd.runners import EagerRunner
    from hf_smcsd.runners.paged import PagedRunner
    from hf_smcsd.smc import SMCSettings, smc_sample
    from hf_smcsd.weights import log_probs

    def banned(logits, history):  # the target rules out most tokens; a temperature-only draft proposes them
        logits = logits.clone()
        logits[..., 2:14] = float("-inf")
        return log_probs(logits, 1.0)

    banned.reads_history = False
    target = tiny_llama(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, initializer_range=0.5)
    draft = perturbed_copy(target, noise=1.0, seed=1)
    results = []
    for make in (lambda m: PagedRunner(m, tokens_per_block=4), EagerRunner):
        torch.manual_seed(0)
        results.append(smc_sample(make(target), make(draft), torch.tensor([[1, 2, 3], [4, 5, 6]]), None,
                                  SMCSettings(particles=2, gamma=3, max_new_tokens=8), target_log_probs=banned))
    paged, eager = results
    assert int(eager.num_dead_redos.sum()) > 0 and eager.round_modes[0].startswith("x")
    assert torch.equal(paged.tokens, eager.tokens) and paged.round_modes == eager.round_modes
    returned = eager.tokens[torch.arange(2), eager.chosen[:, 0]]  # particles with weight zero are never returned
    assert not ((returned >= 2) & (returned < 14)).any()
