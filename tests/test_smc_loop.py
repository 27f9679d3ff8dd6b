"""The round loop: weights against recomputes, stops at the exact token, budgets, groups.

`ScriptedRunner` is a model whose next-token logits depend only on (prompt, number of new
tokens so far), so stop tokens can be placed exactly where a test needs them.
"""

import math

import pytest
import torch

from hf_smcsd.runners import EagerRunner
from hf_smcsd.smc import SMCSettings, smc_sample

from conftest import full_log_probs, left_pad

V, EOS, SURE = 12, 3, 60.0


class ScriptedRunner:
    """table[prompt_id, index] are the logits for new token `index`; the prompt id is the
    prompt's last token."""

    def __init__(self, table):
        self.table = table
        self.vocab_size = table.shape[-1]
        self.extend_widths = []

    def prefill(self, input_ids, attention_mask, particles):
        self.prompt = input_ids[:, -1].repeat_interleave(particles)
        self.seen = torch.zeros_like(self.prompt)
        return self.table[input_ids[:, -1], 0]

    def extend(self, tokens):
        k = tokens.shape[1]
        self.extend_widths.append(k)
        index = (self.seen.unsqueeze(1) + 1 + torch.arange(k)).clamp(max=self.table.shape[1] - 1)
        self.seen = self.seen + k
        return self.table[self.prompt.unsqueeze(1), index]

    def reorder(self, plan):
        self.prompt[plan.dest] = self.prompt[plan.src]
        self.seen[plan.dest] = self.seen[plan.src]

    def keep(self, rows):
        self.prompt, self.seen = self.prompt[rows], self.seen[rows]

    def rollback(self, drop):
        assert (drop >= 0).all() and (drop <= self.seen + 1).all()
        self.seen = self.seen - drop


def script(*columns, length=16, prompts=1):
    """Logits that make token `columns[i]` (an int, or a dict token -> logit) certain at index i;
    uniform over every token but EOS after the script ends."""
    table = torch.zeros(prompts, length, V)
    table[:, len(columns):, EOS] = float("-inf")
    for i, column in enumerate(columns):
        if isinstance(column, dict):
            for token, logit in column.items():
                table[:, i, token] = logit
        else:
            table[:, i, column] = SURE
    return table


def run(target_table, draft_table=None, prompts=1, **settings):
    target = ScriptedRunner(target_table)
    draft = ScriptedRunner(draft_table if draft_table is not None else target_table)
    ids = torch.arange(prompts).view(prompts, 1)
    defaults = dict(particles=4, gamma=3, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=0)
    result = smc_sample(target, draft, ids, None, SMCSettings(**{**defaults, **settings}))
    return result, target, draft


def test_stop_inside_block_cuts_tokens_and_weight():
    # gamma=3: index 0 is x0, 1..3 drafted, 4 bonus. EOS drafted at index 2.
    target = script(5, 6, EOS, 7, 8)
    draft = script(5, 6, EOS, 9, 8)  # after the stop the models disagree totally: must not count
    result, target_runner, _ = run(target, draft)
    assert result.lengths.tolist() == [[3] * 4]
    assert result.tokens[0, :, :3].tolist() == [[5, 6, EOS]] * 4
    assert (result.tokens[0, :, 3:] == 0).all()
    assert torch.allclose(result.log_weights, torch.zeros(1, 4, dtype=torch.float64), atol=1e-6)
    assert result.num_rounds == 1  # every particle finished: the group ends at once
    assert target_runner.extend_widths == [4]


def test_stop_in_bonus_position_keeps_bonus():
    result, _, _ = run(script(5, 6, 7, 8, EOS, 9, 9, 9))
    assert result.lengths.tolist() == [[5] * 4]
    assert result.tokens[0, 0, :5].tolist() == [5, 6, 7, 8, EOS]
    assert result.num_rounds == 1


def test_stop_as_first_token():
    result, target, draft = run(script(EOS, 6, 7))
    assert result.lengths.tolist() == [[1] * 4]
    assert result.num_rounds == 0 and target.extend_widths == [] and draft.extend_widths == []


def test_stop_in_some_particles_only():
    # At index 2 both models say EOS or 7 with equal odds: some particles stop, others go on.
    coin = {EOS: SURE, 7: SURE}
    table = script(5, 6, coin, 8, 9, length=16)
    torch.manual_seed(0)
    result, _, _ = run(table, particles=32, max_new_tokens=10)
    stopped = result.lengths[0] == 3
    assert 0 < int(stopped.sum()) < 32
    assert (result.tokens[0, stopped, 2] == EOS).all()
    assert (result.lengths[0, ~stopped] == 10).all()
    assert (result.tokens[0, ~stopped, 2] == 7).all()


@pytest.mark.parametrize("budget", [1, 2, 5, 6, 7, 9, 13])
def test_budget_not_a_multiple_of_block(budget):
    result, target, draft = run(script(5, 6, 7, 8, 9, 10, length=32), max_new_tokens=budget, gamma=3)
    assert (result.lengths == budget).all()
    rounds = math.ceil((budget - 1) / 4)
    assert result.num_rounds == rounds
    # The last round drafts and verifies only what the budget keeps.
    remaining = (budget - 1) - 4 * (rounds - 1)
    if rounds:
        assert target.extend_widths[-1] == (remaining if remaining <= 3 else 4)
        # draft: 1 (x0) or 2 ([d_K, b]) pending tokens, then single steps
        assert len(draft.extend_widths) == 3 * (rounds - 1) + min(3, remaining)


def test_draft_runs_the_two_token_head():
    """Round 1 feeds [x0]; later rounds feed [d_K, b] in one forward, then K-1 single steps."""
    _, target, draft = run(script(5, 6, 7, 8, 9, 10, length=32), max_new_tokens=13, gamma=3)
    assert draft.extend_widths == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert target.extend_widths == [4, 4, 4]


def test_finished_groups_leave_the_batch():
    # Prompt 0 stops at index 1; prompt 1 runs the whole budget.
    table = torch.zeros(2, 16, V)
    table[0, 0, 5] = table[0, 1, EOS] = SURE
    table[1, :, 6] = SURE
    result, target, _ = run(table, prompts=2, max_new_tokens=9, gamma=3)
    assert result.lengths.tolist() == [[2] * 4, [9] * 4]
    assert target.prompt.tolist() == [1] * 4  # only prompt 1's rows remained


def test_dead_round_is_redone_in_exact_mode_without_nan():
    """The target puts -inf on the draft's only token at index 1: every weight of the round
    becomes 0. The round is discarded and redone exactly: index 1 then holds a token the
    target allows (6 or 7), drawn by the walk's residual, and nothing is NaN."""
    target = script(5, {6: 0.0, 7: 0.0}, 8, 8, 8, 8, 8, 8, 8, 8, length=32)
    target[:, 1, [t for t in range(V) if t not in (6, 7)]] = float("-inf")
    draft = script(5, 9, 8, 8, 8, 8, 8, 8, 8, 8, length=32)
    torch.manual_seed(0)
    result, _, _ = run(target, draft, max_new_tokens=12, gamma=3)
    assert int(result.num_dead_redos[0]) == 1 and result.round_modes[0].startswith("xe")
    assert set(result.tokens[0, :, 1].tolist()) <= {6, 7}
    assert (result.tokens[0, :, 2:10] == 8).all() and (result.lengths == 12).all()
    assert not torch.isnan(result.log_weights).any() and torch.isfinite(result.log_z).all()
    assert all(not torch.isnan(e).any() for e in result.ess)


def test_draft_equal_target_gives_zero_increments(pair):
    target, _ = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12]])
    torch.manual_seed(0)
    result = smc_sample(EagerRunner(target), EagerRunner(target), ids, mask,
                        SMCSettings(particles=6, gamma=3, max_new_tokens=17, temperature=0.8))
    assert result.log_weights.abs().max() < 1e-4
    for ess in result.ess:
        assert torch.allclose(ess, torch.full_like(ess, 6.0), atol=1e-3)
    assert result.num_resamples.sum() == 0


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_weights_equal_recompute_on_own_unpadded_sequence(pair, alpha):
    """Without resampling (tau=0), a particle's log weight is the sum over its drafted tokens
    of alpha*log p - log q (plus log Z of each kept bonus at alpha != 1), all recomputed here
    by fresh forwards over the particle's own unpadded prompt and tokens."""
    target, draft = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    ids, mask = left_pad(prompts)
    gamma, budget, t_p, t_q = 3, 14, 0.9, 1.3
    torch.manual_seed(0)
    result = smc_sample(EagerRunner(target), EagerRunner(draft), ids, mask,
                        SMCSettings(particles=5, gamma=gamma, max_new_tokens=budget, temperature=t_p,
                                    draft_temperature=t_q, resample_threshold=0.0, alpha=alpha,
                                    eos_token_ids=[3]))
    assert result.num_resamples.sum() == 0
    for b, prompt in enumerate(prompts):
        for i in range(5):
            tokens = result.tokens[b, i, : result.lengths[b, i]].tolist()
            assert (3 in tokens and tokens.index(3) == len(tokens) - 1) or len(tokens) == budget
            lp = full_log_probs(target, prompt + tokens, t_p)[len(prompt) - 1:]
            lq = full_log_probs(draft, prompt + tokens, t_q)[len(prompt) - 1:]
            expected = 0.0
            for j, token in enumerate(tokens):
                if j == 0:
                    continue  # x0 comes from the target (its log Z is per prompt, not per particle)
                if (j - 1) % (gamma + 1) < gamma:  # a drafted position
                    expected += alpha * float(lp[j, token]) - float(lq[j, token])
                else:  # a bonus position
                    expected += float(torch.logsumexp(alpha * lp[j], dim=-1))
            assert abs(expected - float(result.log_weights[b, i])) < 1e-3, (b, i, tokens)


def test_huge_budget_allocates_as_tokens_come(pair):
    """max_new_tokens=10**7 with N=64: the token buffer grows with the clocks (300 tokens here)
    instead of 64 x 10**7 up front; the particles' tokens come back trimmed to the longest."""
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7]])
    class StopAt300:
        def __call__(self, sequences, width):
            return torch.zeros(sequences.shape[0], width, dtype=torch.bool) | (sequences.shape[1] - 3 >= 300)

    torch.manual_seed(0)
    result = smc_sample(EagerRunner(target), EagerRunner(draft), ids, mask,
                        SMCSettings(particles=64, gamma=4, max_new_tokens=10**7, eos_token_ids=[]),
                        stop_fn=StopAt300())
    assert result.tokens.shape[:2] == (1, 64) and result.tokens.shape[2] < 310
    assert int(result.lengths.min()) >= 300 - 5


def test_token_buffer_grows_enough_for_a_huge_gamma(pair):
    """gamma larger than the initial buffer: the buffer grows to what the round needs."""
    target, draft = pair
    torch.manual_seed(0)
    result = smc_sample(EagerRunner(target), EagerRunner(draft), torch.tensor([[5, 6, 7]]), None,
                        SMCSettings(particles=1, gamma=600, max_new_tokens=1250, eos_token_ids=[]))
    assert result.lengths.tolist() == [[1250]]
