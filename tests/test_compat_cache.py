"""Forward compatibility (issue 10): the cache goes in and comes back under the name the
installed transformers uses, a cache passed to generate() is refused under either name, and
the suite's guard against this library's deprecation warnings catches what it should."""

import copy
import inspect
import sys
import weakref

import pytest
import torch
from transformers import DynamicCache

import hf_smcsd
from hf_smcsd import compat

from conftest import LIBRARY_DIR, is_library_deprecation


def test_cache_kwarg_is_the_one_the_forward_declares(pair):
    target, _ = pair
    name = compat.cache_kwarg(target)
    assert name in inspect.signature(target.forward).parameters
    if compat.TRANSFORMERS_VERSION.release >= (5, 24):
        assert name == "cache"  # the old name warns until 5.40, then is gone


def _counting_signatures(monkeypatch):
    """Count the `inspect.signature` calls compat makes (transformers makes its own)."""
    calls = []
    original = inspect.signature

    def signature(obj, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename == compat.__file__:
            calls.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", signature)
    monkeypatch.setattr(compat, "_CACHE_KWARG_BY_FORWARD", weakref.WeakKeyDictionary(), raising=False)  # empty
    return calls


def test_cache_kwarg_reads_the_signature_once_per_forward(pair, monkeypatch):
    """Not once per forward call: a generate() of many rounds reads it once for the class's
    forward (target and draft are both Llamas), and a deepcopy shares its class's answer."""
    calls = _counting_signatures(monkeypatch)
    target, draft = pair
    forwards = []
    handle = target.register_forward_hook(lambda *_: forwards.append(1))
    try:
        hf_smcsd.smc_generate(target, draft, torch.tensor([[1, 2, 3]]), do_sample=True, max_new_tokens=12,
                              smc_particles=2, smc_gamma=2, smc_mode="exact")
    finally:
        handle.remove()
    assert len(forwards) >= 4
    assert len(calls) == 1
    assert compat.cache_kwarg(copy.deepcopy(draft)) == compat.cache_kwarg(target)
    assert len(calls) == 1


def test_cache_kwarg_of_a_wrapped_forward_is_its_own(pair, monkeypatch):
    """A forward replaced on one instance (remote code or a hook that still takes the old
    name) is looked up on its own, once, without changing the answer for its class."""
    calls = _counting_signatures(monkeypatch)
    target, _ = pair
    wrapped = copy.deepcopy(target)
    original_forward = wrapped.forward

    def old_style_forward(input_ids=None, attention_mask=None, past_key_values=None, use_cache=None):
        return original_forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                                **{compat.cache_kwarg(target): past_key_values})

    wrapped.forward = old_style_forward
    class_name = compat.cache_kwarg(target)
    for _ in range(3):
        assert compat.cache_kwarg(wrapped) == "past_key_values"
        assert compat.cache_kwarg(target) == class_name
    assert len(calls) == 2
    # Its deepcopy carries a copy of the wrapper: a new function, looked up again, same answer.
    assert compat.cache_kwarg(copy.deepcopy(wrapped)) == "past_key_values"

    def any_forward(**kwargs):
        return original_forward(**kwargs)

    wrapped.forward = any_forward  # forward(**kwargs): the installed version's name
    assert compat.cache_kwarg(wrapped) == ("cache" if compat.TRANSFORMERS_VERSION.release >= (5, 24) else
                                           "past_key_values")


def test_output_cache_reads_the_returned_cache(pair):
    target, _ = pair
    out = target(torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_passed_cache_is_refused_under_either_name(pair, name):
    target, draft = pair
    with pytest.raises(ValueError, match=f"{name} .*cannot be passed with smc_particles"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[1, 2]]), do_sample=True, max_new_tokens=4,
                              **{name: DynamicCache()})


def _frame_in(filename):
    namespace = {"sys": sys}
    exec(compile("frame = sys._getframe()", filename, "exec"), namespace)
    return namespace["frame"]


def test_guard_flags_library_calls_only():
    ours = _frame_in(LIBRARY_DIR + "runners/eager.py")
    theirs = _frame_in("/site-packages/transformers/generation/utils.py")
    assert is_library_deprecation(FutureWarning, ours)
    assert is_library_deprecation(DeprecationWarning, ours)
    assert not is_library_deprecation(UserWarning, ours)
    assert not is_library_deprecation(FutureWarning, theirs)


def _function_in(filename, source, name, **namespace):
    namespace["sys"] = sys
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def test_guard_steps_over_call_plumbing():
    """A deprecate_kwarg warning blames torch's Module.__call__: the call behind it decides."""
    module_call = _function_in("/site-packages/torch/nn/modules/module.py", "def call():\n    return sys._getframe()\n", "call")
    from_library = _function_in(LIBRARY_DIR + "runners/eager.py", "def forward(f):\n    return f()\n", "forward")
    from_transformers = _function_in("/site-packages/transformers/generation/utils.py", "def forward(f):\n    return f()\n", "forward")
    assert is_library_deprecation(FutureWarning, from_library(module_call))
    assert not is_library_deprecation(FutureWarning, from_transformers(module_call))


def test_smc_generate_emits_no_deprecation_from_its_forwards(pair, no_library_deprecations):
    target, draft = pair
    torch.manual_seed(0)
    hf_smcsd.smc_generate(target, draft, torch.tensor([[1, 2, 3]]), do_sample=True, max_new_tokens=6)
    assert no_library_deprecations == []
