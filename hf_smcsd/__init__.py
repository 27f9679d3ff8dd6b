"""hf-smcsd: Sequential Monte Carlo speculative decoding behind transformers' generate().

    import hf_smcsd
    model = hf_smcsd.patch(AutoModelForCausalLM.from_pretrained(target_path))
    out = model.generate(input_ids, assistant_model=draft, smc_particles=8, do_sample=True)
"""

from .generate import SMC_KNOBS, SMCGenerateOutput, patch, smc_generate
from .smc import SMCResult, SMCSettings, smc_sample

__version__ = "0.1.0"

__all__ = [
    "patch",
    "smc_generate",
    "smc_sample",
    "SMCSettings",
    "SMCResult",
    "SMCGenerateOutput",
    "SMC_KNOBS",
]
