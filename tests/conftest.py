import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from transformers import LogitsProcessorList

import hf_smcsd
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, sampling_noise_tv, total_variation
from hf_smcsd.testing.tiny_models import perturbed_copy, tiny_llama

torch.set_num_threads(1)  # tiny models: threads only add overhead and nondeterminism

# --- No deprecation warnings from this library's own calls (issue 10). ---
# A FutureWarning / DeprecationWarning fails the test when the call that triggered it was made
# by hf_smcsd. The frame a warning blames (its stacklevel) is often call plumbing (torch's
# Module.__call__, transformers' deprecate_kwarg wrapper, a no_grad decorator): step outward
# over those to the code that made the call. Warnings that transformers raises on its own
# calls (a transformers frame made the call) are not ours and pass.
LIBRARY_DIR = str(Path(__file__).resolve().parent.parent / "hf_smcsd") + os.sep
_PLUMBING = tuple(
    os.path.join(*parts)
    for parts in (
        ("torch", "nn", "modules", "module.py"),
        ("torch", "utils", "_contextlib.py"),
        ("transformers", "utils", "deprecation.py"),
        ("transformers", "utils", "generic.py"),
        ("functools.py",),
        ("contextlib.py",),
    )
)


def calling_frame(frame):
    """The frame that made the call a warning is about: `frame` (the one the warning blames)
    or, if that is call plumbing, the first frame outward that is not."""
    while frame is not None and frame.f_code.co_filename.endswith(_PLUMBING):
        frame = frame.f_back
    return frame


def is_library_deprecation(category, frame) -> bool:
    if not (isinstance(category, type) and issubclass(category, (DeprecationWarning, FutureWarning))):
        return False
    caller = calling_frame(frame)
    return caller is not None and os.path.abspath(caller.f_code.co_filename).startswith(LIBRARY_DIR)


@pytest.fixture(autouse=True)
def no_library_deprecations(monkeypatch):
    caught = []
    original = warnings.warn

    def warn(message, category=None, stacklevel=1, *args, **kwargs):
        if category is None:
            category = message.__class__ if isinstance(message, Warning) else UserWarning
        try:
            frame = sys._getframe(stacklevel)
        except ValueError:
            frame = None
        if is_library_deprecation(category, frame):
            caller = calling_frame(frame)
            caught.append(f"{category.__name__} at {caller.f_code.co_filename}:{caller.f_lineno}: {message}")
        return original(message, category, stacklevel + 1, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    yield caught
    if caught:
        pytest.fail("deprecation warnings from hf_smcsd's own calls:\n" + "\n".join(dict.fromkeys(caught)))


@pytest.fixture(autouse=True)
def fresh_acceptance_memory():
    """Auto remembers each pair's acceptance across calls (`smc._ACCEPTANCE_MEMORY`): every
    test starts without it, so no test depends on which ran before."""
    from hf_smcsd import smc

    smc._ACCEPTANCE_MEMORY.clear()
    yield
    smc._ACCEPTANCE_MEMORY.clear()


@pytest.fixture(scope="session")
def pair():
    """A target and a draft that disagree noticeably (different seeds and sizes)."""
    target = tiny_llama(vocab_size=40, hidden_size=48, num_layers=2, seed=0, initializer_range=0.25, eos_token_id=3)
    draft = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=1, initializer_range=0.25, eos_token_id=3)
    return target, draft


def left_pad(prompts, pad=0):
    """Left-pad lists of token ids into (input_ids, attention_mask)."""
    from hf_smcsd.bench.common import left_pad as pad_left

    return pad_left(prompts, pad)


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


# --- Exactness by enumeration (test_exactness, test_generate_surface, test_exact_mode). ---
# A 6-token vocabulary and 4 new tokens: every output can be scored; 10,000 samples per check.

ENUM_EOS = 0  # a likely token of the enumerable model, so stops happen inside blocks
ENUM_PROMPT = [1, 2, 3]
ENUM_NEW = 4
ENUM_SAMPLES = 10_000


def enumerable_pair(draft_noise: float):
    """A 6-token target (outputs of a few tokens can be enumerated exactly) and a draft that
    is its copy with noise `draft_noise` on the weights (0.5: wrong by a fair margin, 1.0: poor)."""
    target = tiny_llama(vocab_size=6, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        seed=0, initializer_range=0.5, eos_token_id=ENUM_EOS)
    return target, perturbed_copy(target, noise=draft_noise, seed=1)


def noise_bound(exact, samples):
    """The TV a perfect sampler stays below with `samples` draws: mean + 5 sd of its noise floor."""
    floor = sampling_noise_tv(exact, samples)
    return float(floor.mean() + 5 * floor.std())


def new_outputs(sequences, prompt_length):
    """Each row's new tokens as a tuple, cut after its first ENUM_EOS: the enumeration's keys."""
    return [tuple(row[: row.index(ENUM_EOS) + 1]) if ENUM_EOS in row else tuple(row)
            for row in sequences[:, prompt_length:].tolist()]


def sampled_distribution(target, draft, prompt=ENUM_PROMPT, samples=ENUM_SAMPLES, seed=0, **generate_kwargs):
    """The empirical output distribution of `samples` independent SMC-SD generations (one
    batch, seeded, sampling, ENUM_NEW new tokens) of `prompt`."""
    ids = torch.tensor([prompt] * samples)
    torch.manual_seed(seed)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                max_new_tokens=ENUM_NEW, **generate_kwargs)
    return empirical_distribution(new_outputs(out, len(prompt)))


def processed_target(target, processors):
    """The exact output distribution of the target under `processors` and its noise bound at
    ENUM_SAMPLES, after checking that the processors change the distribution measurably (else
    a sampler that ignored them would pass)."""
    exact = exact_distribution(target, ENUM_PROMPT, ENUM_NEW, eos_token_ids=(ENUM_EOS,),
                               logits_processor=LogitsProcessorList(processors))
    plain = exact_distribution(target, ENUM_PROMPT, ENUM_NEW, eos_token_ids=(ENUM_EOS,))
    noise = noise_bound(exact, ENUM_SAMPLES)
    assert total_variation(exact, plain) > 3 * noise, "the processors must change the distribution measurably"
    return exact, noise


def processor_cases():
    """generate() arguments and the processors they stand for: truncation and a processor
    that reads the sequence."""
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    return pytest.mark.parametrize(
        "generate_kwargs, processors",
        [
            (dict(top_k=3), [TopKLogitsWarper(3)]),
            (dict(top_k=0, top_p=0.7), [TopPLogitsWarper(0.7)]),
            (dict(top_k=0, repetition_penalty=2.0), [RepetitionPenaltyLogitsProcessor(2.0)]),
        ],
        ids=["top_k", "top_p", "repetition_penalty"],
    )
