"""Runner rollback (exact mode): rows of different lengths in one cache, against recomputes.

Random sequences of extend, rollback (each row drops its own count), reorder and keep, on a
tiny config of every supported family with left-padded prompts: after each step every row's
next logits equal a fresh forward over the tokens that row kept. Sliding-window families get
a window longer than the test sequences (exact rounds need the sequence to fit the window;
longer requests are refused, see test_sliding_window_refused_when_it_cannot_fit).
"""

import functools

import pytest
import torch
import transformers

from hf_smcsd import compat
from hf_smcsd.testing import zoo
from hf_smcsd.resampling import CopyPlan
from hf_smcsd.runners import EagerRunner

from conftest import left_pad

V = zoo.VOCAB_SIZE
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]
N = 3
ATOL = RTOL = 1e-4


@functools.lru_cache(maxsize=None)
def _model(name):
    fam = zoo.family(name)
    if not fam.available:
        pytest.skip(f"transformers {transformers.__version__} has no {fam.model_class}")
    overrides = {"sliding_window": 64} if "sliding_window" in fam.config else {}
    return zoo.tiny_model(name, num_layers=2, **overrides)


def fresh_last_logits(model, tokens, width):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -width:].float()


def check_rows(runner, model, history, generator):
    """Extend every row by 2 random tokens and compare with a recompute of its history."""
    step = torch.randint(3, V, (len(history), 2), generator=generator)
    logits = runner.extend(step)
    for row, tokens in enumerate(history):
        tokens += step[row].tolist()
        torch.testing.assert_close(logits[row], fresh_last_logits(model, tokens, 2), atol=ATOL, rtol=RTOL)


def run_random_script(runner, model, seed, steps=6, compact_every_round=False):
    generator = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(PROMPTS)
    runner.prefill(ids, mask, N)
    history = [list(PROMPTS[r // N]) for r in range(len(PROMPTS) * N)]
    fed = [0] * len(history)  # tokens each row received since the prefill
    for _ in range(steps):
        width = int(torch.randint(1, 5, (1,), generator=generator))
        step = torch.randint(3, V, (len(history), width), generator=generator)
        runner.extend(step)
        for row in range(len(history)):
            history[row] += step[row].tolist()
            fed[row] += width
        # Each group drops its own count (as exact rounds do), some rows nothing.
        per_group = torch.randint(0, width + 1, (len(history) // N,), generator=generator)
        drop = per_group.repeat_interleave(N)
        runner.rollback(drop)
        for row, d in enumerate(drop.tolist()):
            if d:
                del history[row][-d:]
            fed[row] -= d
        if torch.rand(1, generator=generator) < 0.5:
            rows = len(history)
            dest = torch.randperm(rows, generator=generator)[: rows // 3]
            src = torch.tensor([int(torch.randint(0, rows, (1,), generator=generator)) for _ in dest])
            keep = ~torch.isin(src, dest)  # sources never overwritten, as copy_plan guarantees
            plan = CopyPlan(dest=dest[keep], src=src[keep])
            runner.reorder(plan)
            copies = [(list(history[s]), fed[s]) for s in plan.src.tolist()]
            for d, (copy, count) in zip(plan.dest.tolist(), copies):
                history[d], fed[d] = copy, count
        check_rows(runner, model, history, generator)
        for row in range(len(history)):
            fed[row] += 2
    kept = torch.tensor([r for r in range(len(history)) if r // N != 1])
    runner.keep(kept)
    history = [history[r] for r in kept.tolist()]
    check_rows(runner, model, history, generator)


@pytest.mark.parametrize("name", list(zoo.SUPPORTED_CONFIGS))
def test_rollback_extend_reorder_keep_equal_recompute(name):
    model = _model(name)
    run_random_script(EagerRunner(model), model, seed=0)


def test_rollback_compacts_holes_and_stays_exact():
    """Many rounds of uneven rollbacks: the holes get compacted (the cache stays short)
    and logits still match recomputes."""
    model = _model("llama")
    runner = EagerRunner(model)
    generator = torch.Generator().manual_seed(3)
    ids, mask = left_pad(PROMPTS)
    runner.prefill(ids, mask, N)
    history = [list(PROMPTS[r // N]) for r in range(len(PROMPTS) * N)]
    longest = 0
    for step_index in range(40):
        step = torch.randint(3, V, (len(history), 5), generator=generator)
        runner.extend(step)
        drop = torch.tensor([4, 0, 2]).roll(step_index).repeat_interleave(N)  # groups take turns
        runner.rollback(drop)
        for row, d in enumerate(drop.tolist()):
            history[row] += step[row].tolist()[: 5 - d]
        longest = max(longest, max(len(h) for h in history))
    check_rows(runner, model, history, generator)
    # Without compaction the cache would hold 6 + 40 * 5 columns; holes are reclaimed.
    assert runner.attention_mask.shape[1] <= longest + 2 + max(16, runner.attention_mask.shape[1] // 4)
    assert runner.attention_mask.shape[1] < 6 + 40 * 5 - 40


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_window_refused_when_it_cannot_fit(name):
    fam = zoo.family(name)
    if not fam.available:
        pytest.skip(f"transformers {transformers.__version__} has no {fam.model_class}")
    model = zoo.tiny_model(name, num_layers=2, sliding_window=16)
    assert compat.sliding_window(model) == 16
    compat.check_rollback_fits(model, 15)
    with pytest.raises(ValueError, match="sliding-window attention.*smc_mode='smc'"):
        compat.check_rollback_fits(model, 16)
    assert compat.sliding_window(zoo.tiny_model("llama")) is None


def test_rollback_refuses_a_negative_drop():
    """A negative count would silently unmask another row's last token; refuse it."""
    model = _model("llama")
    runner = EagerRunner(model)
    ids, mask = left_pad(PROMPTS)
    runner.prefill(ids, mask, N)
    runner.extend(torch.ones(len(PROMPTS) * N, 3, dtype=torch.long) * 5)
    drop = torch.zeros(len(PROMPTS) * N, dtype=torch.long)
    drop[2] = -1
    with pytest.raises(ValueError, match="drop >= 0"):
        runner.rollback(drop)
