"""The eager runner against full recomputes: expansion, K+1-token extends, reorders, drops."""

import torch

from hf_smcsd.resampling import CopyPlan
from hf_smcsd.runners import EagerRunner, Runner

from conftest import left_pad

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def test_runner_satisfies_interface(pair):
    assert isinstance(EagerRunner(pair[0]), Runner)


def test_prefill_and_k_plus_one_extend_equal_recompute(pair):
    """Left-padded prompts, expanded to N rows, then K+1 tokens per row in one forward."""
    model = pair[0]
    n, k_plus_1 = 3, 5
    ids, mask = left_pad(PROMPTS)
    runner = EagerRunner(model)
    first = runner.prefill(ids, mask, n)
    torch.manual_seed(0)
    new = torch.randint(0, 40, (len(PROMPTS) * n, k_plus_1))
    logits = runner.extend(new)
    assert first.shape == (len(PROMPTS), 40) and logits.shape == (len(PROMPTS) * n, k_plus_1, 40)
    for row in range(len(PROMPTS) * n):
        prompt = PROMPTS[row // n]
        expected = fresh_logits(model, prompt + new[row].tolist())
        torch.testing.assert_close(first[row // n], expected[len(prompt) - 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[row], expected[len(prompt):], atol=1e-4, rtol=1e-4)


def test_reorder_then_extend_equals_recompute(pair):
    """After a resample copies rows, each row's next logits are those of its own history."""
    for model in pair:  # target and draft alike
        n = 4
        ids, mask = left_pad(PROMPTS[:2])
        runner = EagerRunner(model)
        runner.prefill(ids, mask, n)
        torch.manual_seed(1)
        history = [[] for _ in range(2 * n)]
        for width in (2, 1, 3):
            step = torch.randint(0, 40, (2 * n, width))
            runner.extend(step)
            for row in range(2 * n):
                history[row] += step[row].tolist()
            # Rows 1, 2 die and take copies of row 3; row 5 takes a copy of row 4.
            plan = CopyPlan(dest=torch.tensor([1, 2, 5]), src=torch.tensor([3, 3, 4]))
            runner.reorder(plan)
            for d, s in zip(plan.dest.tolist(), plan.src.tolist()):
                history[d] = list(history[s])
        last = torch.randint(0, 40, (2 * n, 2))
        logits = runner.extend(last)
        for row in range(2 * n):
            tokens = PROMPTS[row // n] + history[row] + last[row].tolist()
            expected = fresh_logits(model, tokens)[-2:]
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


def test_reorder_writes_only_dead_rows(pair):
    runner = EagerRunner(pair[1])
    ids, mask = left_pad(PROMPTS[:1])
    runner.prefill(ids, mask, 4)
    runner.extend(torch.tensor([[1], [2], [3], [4]]))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in runner.cache.layers]
    runner.reorder(CopyPlan(dest=torch.tensor([2]), src=torch.tensor([0])))
    for (keys, values), layer in zip(before, runner.cache.layers):
        for row in (0, 1, 3):
            assert torch.equal(layer.keys[row], keys[row]) and torch.equal(layer.values[row], values[row])
        assert torch.equal(layer.keys[2], keys[0])
        assert not torch.equal(keys[2], keys[0])


def test_keep_drops_rows(pair):
    model = pair[0]
    n = 2
    ids, mask = left_pad(PROMPTS)
    runner = EagerRunner(model)
    runner.prefill(ids, mask, n)
    runner.extend(torch.arange(6).view(6, 1) + 15)
    runner.keep(torch.tensor([2, 3]))  # only the second prompt's particles stay
    logits = runner.extend(torch.tensor([[30], [31]]))
    for i, row in enumerate((2, 3)):
        expected = fresh_logits(model, PROMPTS[1] + [15 + row, 30 + i])[-1]
        torch.testing.assert_close(logits[i, 0], expected, atol=1e-4, rtol=1e-4)
