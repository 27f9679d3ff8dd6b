"""hf-smcsd: Sequential Monte Carlo speculative decoding behind transformers' generate().

    import hf_smcsd
    model = hf_smcsd.patch(AutoModelForCausalLM.from_pretrained(target_path))
    out = model.generate(input_ids, assistant_model=draft, smc_particles=8, do_sample=True)
"""

from .generate import SMC_KNOBS, SMCGenerateOutput, dispatch_generate, patch, smc_generate
from .memory import InsufficientMemoryError
from .smc import SMCResult, SMCSettings, smc_sample

__version__ = "0.1.0"


def __getattr__(name):
    # TensorRT-LLM is optional and imported only when its engine model is asked for.
    if name == "TRTModel":
        from .runners.tensorrt import TRTModel

        return TRTModel
    raise AttributeError(f"module 'hf_smcsd' has no attribute {name!r}")


__all__ = [
    "TRTModel",
    "patch",
    "smc_generate",
    "smc_sample",
    "SMCSettings",
    "SMCResult",
    "SMCGenerateOutput",
    "SMC_KNOBS",
    "dispatch_generate",
    "InsufficientMemoryError",
]
