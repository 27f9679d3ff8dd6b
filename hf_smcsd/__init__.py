"""hf-smcsd: Sequential Monte Carlo speculative decoding behind transformers' generate().

    import hf_smcsd
    model = hf_smcsd.patch(AutoModelForCausalLM.from_pretrained(target_path))
    out = model.generate(input_ids, assistant_model=draft, smc_particles=8, do_sample=True)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use, so that `import hf_smcsd`
# (and `hf-smcsd --help`) does not load torch and transformers; TensorRT-LLM is optional
# and imported only when its engine model is asked for.
_EXPORTS = {
    "patch": "generate",
    "smc_generate": "generate",
    "dispatch_generate": "generate",
    "SMC_KNOBS": "generate",
    "SMCGenerateOutput": "generate",
    "InsufficientMemoryError": "memory",
    "smc_sample": "smc",
    "SMCSettings": "smc",
    "SMCResult": "smc",
    "TRTModel": "runners.tensorrt",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_smcsd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if name != "TRTModel":
        globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
