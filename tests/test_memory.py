"""Memory up front (issue 10): the estimate matches the caches the runner builds, and a
request that does not fit is refused at once with the figures and the knobs that shrink it."""

import pytest
import torch

import hf_smcsd
from hf_smcsd import generate, memory
from hf_smcsd.runners.eager import EagerRunner


def cache_bytes(runner):
    return sum(t.numel() * t.element_size() for layer in runner.cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_estimate_matches_the_runners_cache(pair, dtype):
    target = pair[0].to(dtype)
    try:
        runner = EagerRunner(target)
        ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        runner.prefill(ids, torch.ones_like(ids), particles=3)
        runner.extend(torch.ones(6, 5, dtype=torch.long))
        assert cache_bytes(runner) == 6 * memory.kv_bytes_per_row(target, positions=9)
    finally:
        pair[0].to(torch.float32)


def test_sliding_window_layers_hold_their_window_only():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(config)
    full = memory.kv_bytes_per_row(model, positions=3)
    if getattr(config, "layer_types", None):  # 5.x / recent 4.x configs name each layer's kind
        assert memory.kv_bytes_per_row(model, positions=100) == full * 4 / 3
    assert full == 2 * 2 * 8 * 4 * 3 * 2  # K and V, kv heads, head dim, fp32, positions, layers


def test_estimate_grows_with_the_knobs(pair):
    target, draft = pair
    base = memory.estimate(target, draft, prompts=2, prompt_length=8, particles=4, max_new_tokens=32, gamma=4)
    assert memory.estimate(target, draft, 2, 8, 8, 32, 4).total > base.total
    assert memory.estimate(target, draft, 2, 8, 4, 64, 4).total > base.total
    exact = memory.estimate(target, draft, 2, 8, 4, 32, 4, exact_mode=True)
    assert exact.working - base.working == 4 * 8 * 4 * 40  # float32 x rows x K x V  # one round of draft distributions


def test_a_request_that_does_not_fit_is_refused_at_once(pair, monkeypatch):
    target, draft = pair
    monkeypatch.setattr(memory, "cpu_available_bytes", lambda: 64 * 1024**2)  # 64 MiB free

    def no_runner(*args):
        raise AssertionError("a runner was built: the check came too late")

    monkeypatch.setattr(generate, "make_runner", no_runner)
    with pytest.raises(memory.InsufficientMemoryError, match=r"GiB.*2048 particles.*smc_particles.*max_new_tokens"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[1, 2, 3]] * 2), smc_particles=2048, max_new_tokens=4096)
    monkeypatch.setenv("HF_SMCSD_MEMORY_CHECK", "0")
    assert memory.check_fits(target, draft, 2, 3, 2048, 4096, 4) is None


def test_available_memory_is_known_here():
    free = memory.free_bytes(torch.device("cpu"))
    assert free is None or free > 0
