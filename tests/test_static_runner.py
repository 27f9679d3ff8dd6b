"""The static runner (preallocated per-row KV slots) against full recomputes, on tiny zoo models.

Random sequences of prefill (left padded), extend (1, 2 and K+1 tokens), reorder, rollback
and keep: after every extend each row's logits must equal a fresh forward over that row's
own tokens. Then a seeded SMC-SD generate must give the eager runner's tokens, and the
compiled path runs once on CPU with inductor.
"""

import functools
import shutil

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

import hf_smcsd
from hf_smcsd.testing import zoo
from hf_smcsd.resampling import copy_plan, resample
from hf_smcsd.runners.eager import EagerRunner
from hf_smcsd.runners.static import StaticRunner, length_bucket
from hf_smcsd.smc import SMCSettings, smc_sample

from conftest import left_pad

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]
ATOL = RTOL = 1e-4
# Sliding windows (Mistral, Gemma), per-layer-type masks (Gemma, Qwen), learned positions
# (GPT-2, OPT), partial rotary (GPT-NeoX), multi-query (Falcon), plain Llama.
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon"]


@functools.lru_cache(maxsize=None)
def _model(name, num_layers=2, seed=0):
    return zoo.tiny_model(name, seed=seed, num_layers=num_layers)


def model(name, **kwargs):
    fam = zoo.family(name)
    if not fam.available:
        pytest.skip(f"transformers {transformers.__version__} has no {fam.model_class}")
    return _model(name, **kwargs)


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def check_rows(model, history, logits, k):
    """Row r's last k logits equal a fresh forward over its own tokens."""
    for r, tokens in enumerate(history):
        expected = fresh_logits(model, tokens)[-k:]
        torch.testing.assert_close(logits[r], expected, atol=ATOL, rtol=RTOL)


def random_walk(runner, model, generator, rounds=6, n=3, gamma=4):
    """Prefill, then rounds of extend / reorder / rollback / keep with random choices,
    checking every extend against recomputes. Returns how many rows are still alive."""
    ids, mask = left_pad(PROMPTS)
    logits = runner.prefill(ids, mask, n)
    for p, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[p], fresh_logits(model, prompt)[-1], atol=ATOL, rtol=RTOL)
    history = [list(PROMPTS[r // n]) for r in range(len(PROMPTS) * n)]
    fed = [0] * len(history)  # tokens fed since prefill, per row (the most a rollback may drop)
    groups = len(PROMPTS)
    for round_ in range(rounds):
        for k in (2, 1, gamma + 1):  # the draft's [d_K, bonus], a draft step, a verify
            new = torch.randint(3, zoo.VOCAB_SIZE, (len(history), k), generator=generator)
            logits = runner.extend(new)
            assert logits.shape == (len(history), k, runner.vocab_size)
            for r, row in enumerate(new.tolist()):
                history[r] += row
                fed[r] += k
            check_rows(model, history, logits, k)
        drop = torch.tensor([int(torch.randint(0, min(f, gamma) + 1, (), generator=generator)) for f in fed])
        runner.rollback(drop)
        for r, d in enumerate(drop.tolist()):
            del history[r][len(history[r]) - d :]
            fed[r] -= d
        weights = torch.rand(groups, n, generator=generator) ** 3
        plan = copy_plan(resample(weights / weights.sum(1, keepdim=True), "multinomial"))
        runner.reorder(plan)
        for d, s in zip(plan.dest.tolist(), plan.src.tolist()):
            history[d], fed[d] = list(history[s]), fed[s]
        if round_ in (1, 3) and groups > 1:  # a group ends: its rows leave
            gone = int(torch.randint(0, groups, (), generator=generator))
            keep = [r for r in range(len(history)) if r // n != gone]
            runner.keep(torch.tensor(keep))
            history, fed = [history[r] for r in keep], [fed[r] for r in keep]
            groups -= 1
    return len(history)


@pytest.mark.parametrize("name", FAMILIES)
def test_random_operations_equal_recompute(name):
    target = model(name)
    runner = StaticRunner(target)
    assert random_walk(runner, target, torch.Generator().manual_seed(0)) == 3
    # Two groups left the batch: the physical rows shrank from 9 to a bucket of 4 (3 live, 1 inert).
    assert runner.cache.physical_rows == 4


def test_next_runner_reuses_the_buffers_with_stale_contents_masked():
    """A dropped runner's KV buffers go back to a pool; the next runner of the same shape
    writes into the same tensors (CUDA graphs replay on them) and still equals recomputes."""
    target = model("qwen2")
    first = StaticRunner(target)
    with torch.inference_mode():  # buffers taken in inference mode must serve outside it too
        random_walk(first, target, torch.Generator().manual_seed(3), rounds=2)
    used = list(first.cache.buffers())
    del first
    second = StaticRunner(target)
    random_walk(second, target, torch.Generator().manual_seed(4), rounds=2)
    assert all(any(t is u for u in used) for t in second.cache.buffers())


def test_buffers_grow_and_length_buckets():
    """Without max_length the slots start at prompt + 64 and double; the attended length is a
    power of two; rows longer than 64 slots still equal a recompute."""
    target = model("llama")
    runner = StaticRunner(target)
    ids, mask = left_pad(PROMPTS[:2])
    runner.prefill(ids, mask, 2)
    assert runner.cache.capacity == 6 + 64 and runner.cache.length == 64
    history = [list(PROMPTS[r // 2]) for r in range(4)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(15):
        new = torch.randint(3, zoo.VOCAB_SIZE, (4, 5), generator=generator)
        logits = runner.extend(new)
        for r, row in enumerate(new.tolist()):
            history[r] += row
    check_rows(target, history, logits, 5)
    assert runner.cache.capacity == 140 and runner.cache.length == 128
    assert length_bucket(3, 1000) == 64 and length_bucket(65, 1000) == 128 and length_bucket(300, 200) == 200


def test_sized_runner_writes_in_place_and_grows_past_its_size():
    target = model("llama")
    runner = StaticRunner(target, max_length=9)
    ids, mask = left_pad(PROMPTS[:1])
    runner.prefill(ids, mask, 2)
    keys = runner.cache.layers[0].keys
    runner.extend(torch.tensor([[3, 4], [3, 4]]))
    assert runner.cache.layers[0].keys is keys and runner.cache.capacity == 9  # written in place
    logits = runner.extend(torch.tensor([[3, 4, 5, 6, 8], [3, 4, 5, 7, 8]]))
    assert runner.cache.capacity == 18
    check_rows(target, [PROMPTS[0] + [3, 4, 3, 4, 5, 6, 8], PROMPTS[0] + [3, 4, 3, 4, 5, 7, 8]], logits, 5)


def test_clear_errors():
    with pytest.raises(ValueError, match="ALiBi"):
        StaticRunner(model("falcon_alibi"))
    runner = StaticRunner(model("llama"))
    with pytest.raises(ValueError, match="left-padded"):
        runner.prefill(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), 2)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_smc_sample_gives_the_eager_runners_tokens(name):
    """Same seed, same prompts: SMC-SD on static runners returns the eager runners' particles."""
    target, draft = model(name), model(name, num_layers=1, seed=1)
    ids, mask = left_pad(PROMPTS)
    settings = SMCSettings(particles=4, gamma=3, max_new_tokens=20, eos_token_ids=(zoo.EOS_TOKEN_ID,))
    results = []
    for make in (EagerRunner, StaticRunner):
        torch.manual_seed(0)
        results.append(smc_sample(make(target), make(draft), ids, mask, settings))
    eager, static = results
    assert eager.num_resamples.sum() > 0  # the copies were exercised
    assert torch.equal(eager.tokens, static.tokens) and torch.equal(eager.lengths, static.lengths)
    torch.testing.assert_close(eager.log_weights, static.log_weights, atol=1e-5, rtol=1e-5)


def test_generate_with_static_cache_gives_the_eager_tokens():
    """cache_implementation="static" selects the static runner in generate()."""
    target, draft = model("llama"), model("llama", num_layers=1, seed=1)
    target = hf_smcsd.patch(target)
    ids, mask = left_pad(PROMPTS)
    outs = []
    for extra in ({}, {"cache_implementation": "static"}):
        torch.manual_seed(0)
        outs.append(target.generate(
            input_ids=ids, attention_mask=mask, assistant_model=draft, smc_particles=4, smc_gamma=3,
            do_sample=True, max_new_tokens=12, return_dict_in_generate=True, **extra,
        ))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(outs[0].particle_sequences, outs[1].particle_sequences)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        target.generate(input_ids=ids, assistant_model=draft, smc_particles=2, do_sample=True, smc_compile=True)
    with pytest.raises(ValueError, match="cache_implementation='sliding_window'"):
        target.generate(input_ids=ids, assistant_model=draft, smc_particles=2, do_sample=True,
                        cache_implementation="sliding_window")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_steps_equal_the_uncompiled_ones():
    """compile=True runs the same steps through torch.compile (inductor on CPU): one graph for
    one-token steps, one for 2-token steps, and logits equal to the uncompiled runner's."""
    target = model("llama", num_layers=1)
    ids, mask = left_pad(PROMPTS[:2])
    runners = [StaticRunner(target), StaticRunner(target, compile=True)]
    generator = torch.Generator().manual_seed(2)
    for runner in runners:
        runner.prefill(ids, mask, 2)
    for k in (1, 1, 2, 1):
        new = torch.randint(3, zoo.VOCAB_SIZE, (4, k), generator=generator)
        plain, compiled = (runner.extend(new) for runner in runners)
        torch.testing.assert_close(compiled, plain, atol=ATOL, rtol=RTOL)
    plan = copy_plan(torch.tensor([[1, 1], [0, 0]]))
    for runner in runners:
        runner.reorder(plan)
        runner.rollback(torch.tensor([1, 0, 2, 0]))
    new = torch.randint(3, zoo.VOCAB_SIZE, (4, 1), generator=generator)
    torch.testing.assert_close(runners[1].extend(new), runners[0].extend(new), atol=ATOL, rtol=RTOL)
    # Shapes already seen compile nothing more, also from a strided slice (the loop feeds
    # `new_tokens[:, -2:]` to the draft) and in a new runner of the same model.
    graphs = counters["stats"]["unique_graphs"]
    again = StaticRunner(target, compile=True)
    again.prefill(ids, mask, 2)
    for k in (2, 1, 1):
        again.extend(torch.randint(3, zoo.VOCAB_SIZE, (4, 5), generator=generator)[:, -k:])
    assert counters["stats"]["unique_graphs"] == graphs


def test_static_runner_satisfies_the_runner_interface():
    from hf_smcsd.runners.base import Runner

    assert isinstance(StaticRunner(model("llama")), Runner)
