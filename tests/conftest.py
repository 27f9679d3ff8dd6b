import importlib.util
from pathlib import Path

import pytest
import torch

from hf_smcsd.tiny import tiny_llama

torch.set_num_threads(1)  # tiny models: threads only add overhead and nondeterminism


@pytest.fixture(scope="session")
def pair():
    """A target and a draft that disagree noticeably (different seeds and sizes)."""
    target = tiny_llama(vocab_size=40, hidden_size=48, num_layers=2, seed=0, initializer_range=0.25, eos_token_id=3)
    draft = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=1, initializer_range=0.25, eos_token_id=3)
    return target, draft


def left_pad(prompts, pad=0):
    """Left-pad lists of token ids into (input_ids, attention_mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def full_log_probs(model, tokens, temperature=1.0):
    """log softmax(logits / T) at every position of one unpadded sequence, by a fresh forward."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def random_resample(runner, history, groups, n, generator, seed):
    """Resample the runner's rows by random peaked weights, mirror the copies in `history`
    (one token list per row), and check the runner's block tables stay consistent."""
    from hf_smcsd.resampling import copy_plan, resample

    weights = torch.rand(groups, n, generator=generator) ** 3
    torch.manual_seed(seed)
    plan = copy_plan(resample(weights / weights.sum(1, keepdim=True)))
    runner.reorder(plan)
    for d, s in zip(plan.dest.tolist(), plan.src.tolist()):
        history[d] = list(history[s])
    runner.tables.check()


def load_train_pair():
    """build_scripts/train_pair.py as a module (build_scripts is not a package)."""
    path = Path(__file__).resolve().parent.parent / "build_scripts" / "train_pair.py"
    spec = importlib.util.spec_from_file_location("train_pair", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
