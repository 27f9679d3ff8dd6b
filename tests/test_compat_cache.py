"""Forward compatibility (issue 10): the cache goes in and comes back under the name the
installed transformers uses, a cache passed to generate() is refused under either name, and
the suite's guard against this library's deprecation warnings catches what it should."""

import inspect
import sys

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
