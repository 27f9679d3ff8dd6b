"""The model zoo (`hf_smcsd.testing.zoo`): the eager runner's correctness checks and an
end-to-end SMC-SD run on a tiny seeded config of every supported family, and a clear error
for the rejected ones.

Tolerances are float32's: atol 1e-4 on logits of magnitude ~3 (the observed error is ~3e-6
on every family, sliding windows and soft-capping included).
"""

import functools

import pytest
import torch
import transformers

import hf_smcsd
from hf_smcsd import compat, families
from hf_smcsd.testing import zoo
from hf_smcsd.resampling import CopyPlan
from hf_smcsd.runners import EagerRunner

from conftest import left_pad

V = zoo.VOCAB_SIZE
# Left padded, and longer than the sliding window (4) once extended, so windows slide.
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]
ATOL = RTOL = 1e-4

SUPPORTED = list(zoo.SUPPORTED_CONFIGS)
REJECTED = list(zoo.REJECTED_CONFIGS)


def _require(name):
    fam = zoo.family(name)
    if not fam.available:
        pytest.skip(f"transformers {transformers.__version__} has no {fam.model_class}")


@functools.lru_cache(maxsize=None)
def _pair(name):
    return zoo.tiny_pair(name)


def pair(name):
    _require(name)
    return _pair(name)


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", SUPPORTED)
def test_prefill_and_k_plus_one_extend_equal_recompute(name):
    """Left-padded prompts expanded to N rows, then K+1 tokens per row in one forward, then
    a 2-token extend: every position equals a fresh forward over the row's own tokens."""
    model = pair(name)[0]
    n, k_plus_1 = 3, 5
    ids, mask = left_pad(PROMPTS)
    runner = EagerRunner(model)
    first = runner.prefill(ids, mask, n)
    torch.manual_seed(0)
    new = torch.randint(3, V, (len(PROMPTS) * n, k_plus_1))
    logits = runner.extend(new)
    more = torch.randint(3, V, (len(PROMPTS) * n, 2))
    logits2 = runner.extend(more)
    assert first.shape == (len(PROMPTS), V) and logits.shape == (len(PROMPTS) * n, k_plus_1, V)
    assert first.dtype == torch.float32 and logits2.shape == (len(PROMPTS) * n, 2, V)
    for row in range(len(PROMPTS) * n):
        prompt = PROMPTS[row // n]
        expected = fresh_logits(model, prompt + new[row].tolist() + more[row].tolist())
        assert_close(first[row // n], expected[len(prompt) - 1])
        assert_close(logits[row], expected[len(prompt) : len(prompt) + k_plus_1])
        assert_close(logits2[row], expected[-2:])


@pytest.mark.parametrize("name", SUPPORTED)
def test_reorder_keep_then_extend_equal_recompute(name):
    """After resampling copies (CopyPlan), further extends, and a group leaving the batch,
    each row's logits are those of its own history."""
    for model in pair(name):  # target and draft alike
        n = 4
        prompts = PROMPTS[1:] + PROMPTS[:1]  # 3 groups, the longest prompt first
        ids, mask = left_pad(prompts)
        runner = EagerRunner(model)
        runner.prefill(ids, mask, n)
        rows = 3 * n
        torch.manual_seed(1)
        history = [list(prompts[row // n]) for row in range(rows)]  # each row's whole sequence
        for width, plan in (
            (2, CopyPlan(dest=torch.tensor([1, 2, 5]), src=torch.tensor([3, 3, 4]))),
            (1, CopyPlan(dest=torch.tensor([0, 7, 8]), src=torch.tensor([2, 6, 11]))),
            (3, CopyPlan(dest=torch.tensor([4, 9]), src=torch.tensor([9, 4]))),  # a swap across groups
        ):
            step = torch.randint(3, V, (rows, width))
            runner.extend(step)
            for row in range(rows):
                history[row] += step[row].tolist()
            runner.reorder(plan)
            copies = [list(history[s]) for s in plan.src.tolist()]
            for d, copy in zip(plan.dest.tolist(), copies):
                history[d] = copy
        # The middle group leaves the batch.
        kept = torch.tensor([r for r in range(rows) if r // n != 1])
        runner.keep(kept)
        last = torch.randint(3, V, (len(kept), 2))
        logits = runner.extend(last)
        for i, row in enumerate(kept.tolist()):
            tokens = history[row] + last[i].tolist()
            assert_close(logits[i], fresh_logits(model, tokens)[-2:])


def _generate(target, draft, seed=0, **kwargs):
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    torch.manual_seed(seed)
    out = hf_smcsd.smc_generate(
        target,
        draft,
        ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,  # the untruncated target (vocabulary 96 > generate()'s default top_k=50)
        temperature=1.0,
        max_new_tokens=9,
        smc_gamma=3,
        return_dict_in_generate=True,
        **kwargs,
    )
    return ids, out


@pytest.mark.parametrize("name", SUPPORTED)
def test_smc_generate_end_to_end(name):
    """Batch 2 with left padding, a draft of the same family: valid sequences out."""
    target, draft = pair(name)
    n = 4
    ids, out = _generate(target, draft, smc_particles=n)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    new = out.sequences[:, ids.shape[1] :]
    assert 1 <= new.shape[1] <= 9 and int(new.min()) >= 0 and int(new.max()) < V
    assert out.particle_sequences.shape == (2, n, 9) and out.log_weights.shape == (2, n)
    lengths = out.particle_lengths
    assert bool(((lengths >= 1) & (lengths <= 9)).all())
    for b in range(2):
        for p in range(n):
            tokens = out.particle_sequences[b, p, : lengths[b, p]].tolist()
            # A particle ends at its first EOS or at the budget.
            assert zoo.EOS_TOKEN_ID not in tokens[:-1]
            assert len(tokens) == 9 or tokens[-1] == zoo.EOS_TOKEN_ID
        chosen = int(out.chosen_particles[b])
        got = out.sequences[b, ids.shape[1] : ids.shape[1] + lengths[b, chosen]]
        assert torch.equal(got, out.particle_sequences[b, chosen, : lengths[b, chosen]])
    assert bool(torch.isfinite(out.log_z).all())


@pytest.mark.parametrize("name", SUPPORTED)
def test_draft_equal_to_target_has_zero_weights(name):
    """With q = p every importance weight is 1: final log weights ~0, no resampling. (The
    target scores K+1 positions per forward, the draft one or two: the tiny float32
    differences between the two add up over 9 tokens to far below 1e-3.)"""
    target = pair(name)[0]
    _, out = _generate(target, target, smc_particles=4, smc_resample_threshold=0.99)
    assert out.log_weights.abs().max().item() < 1e-3
    assert int(out.num_resamples.sum()) == 0 and int(out.num_dead_redos.sum()) == 0


def test_zoo_lists_are_consistent():
    """The tiny zoo has a config of every family the runtime lists as supported (and only
    those), and its rejected examples are families the runtime refuses."""
    assert set(SUPPORTED) == set(families.SUPPORTED)
    assert not set(SUPPORTED) & set(families.REJECTED)
    assert set(REJECTED) <= set(families.REJECTED)
    for name in SUPPORTED:
        if zoo.SUPPORTED_CONFIGS[name].available:
            compat.check_supported_model(_pair(name)[0])  # does not raise


@functools.lru_cache(maxsize=None)
def _rejected_model(name):
    return zoo.tiny_model(name, initializer_range=0.02)


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_family_fails_clearly(name):
    """Recurrent and hybrid models are refused with an error naming the model type and the way out."""
    _require(name)
    model = _rejected_model(name)
    model_type = model.config.model_type
    clear = rf"model_type='{model_type}'.*(recurrent|hybrid|stateful).*supported families"
    with pytest.raises(ValueError, match=clear):
        EagerRunner(model)
    ids, mask = left_pad([[5, 6, 7]])
    with pytest.raises(ValueError, match=rf"SMC-SD does not support .*model_type='{model_type}'"):
        hf_smcsd.smc_generate(model, model, ids, attention_mask=mask, do_sample=True, max_new_tokens=4)


def test_unlisted_stateful_models_are_refused():
    """Families not in families.REJECTED are still refused when transformers flags them stateful
    or their config declares recurrent / linear-attention layers."""
    from types import SimpleNamespace

    class FutureSSMForCausalLM:
        _is_stateful = True
        config = SimpleNamespace(model_type="future_ssm")

    class FutureHybridForCausalLM:
        config = SimpleNamespace(model_type="future_hybrid", layer_types=["full_attention", "linear_attention"])

    with pytest.raises(ValueError, match=r"FutureSSMForCausalLM \(model_type='future_ssm'\).*stateful"):
        compat.check_supported_model(FutureSSMForCausalLM())
    with pytest.raises(ValueError, match=r"model_type='future_hybrid'.*linear_attention layers"):
        compat.check_supported_model(FutureHybridForCausalLM())


def test_unknown_cache_layers_are_refused():
    """A cache the runner cannot copy row by row (here a hybrid cache's layers, or not a
    DynamicCache at all) fails the prefill with a clear error instead of producing wrong text."""
    model = pair("llama")[0]

    class LinearAttentionLayer:  # stands in for a recurrent state layer
        keys = values = None

    class FakeCache:
        layers = [LinearAttentionLayer()]

    with pytest.raises(ValueError, match="needs a DynamicCache"):
        compat.check_supported_cache(FakeCache(), model)
    cache = transformers.DynamicCache()
    cache.layers = [LinearAttentionLayer()]
    with pytest.raises(ValueError, match="LinearAttentionLayer layers"):
        compat.check_supported_cache(cache, model)


def test_layer_with_extra_state_is_copied_by_its_own_reorder():
    """Layers that keep more per-row state than keys / values (e.g. a sparse-attention
    indexer) are copied with their own `reorder_cache`, so every per-row tensor follows."""
    from transformers import cache_utils

    if not hasattr(cache_utils, "DynamicIndexedLayer"):
        pytest.skip(f"transformers {transformers.__version__} has no DynamicIndexedLayer")
    layer = cache_utils.DynamicIndexedLayer()
    keys = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 3, 2).contiguous()
    layer.update(keys, keys + 10)
    layer.update_indexer(torch.arange(4.0).view(4, 1, 1).expand(4, 3, 5).contiguous())
    cache = transformers.DynamicCache()
    cache.layers = [layer]
    compat.copy_cache_rows(cache, torch.tensor([0, 3]), torch.tensor([2, 1]), total_rows=4)
    assert layer.keys[:, 0, 0, 0].tolist() == [2, 1, 2, 1]
    assert layer.values[:, 0, 0, 0].tolist() == [12, 11, 12, 11]
    assert layer.indexer_keys[:, 0, 0].tolist() == [2, 1, 2, 1]


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_checkpoint_default_cache_implementation_is_ignored(name):
    target = pair(name)[0]
    original = target.generation_config.cache_implementation
    target.generation_config.cache_implementation = "hybrid"  # as in the released checkpoints
    try:
        _, out = _generate(target, target, smc_particles=2)
    finally:
        target.generation_config.cache_implementation = original
    assert out.sequences.shape[0] == 2
