"""SMC-SD (Sequential Monte Carlo speculative decoding) as a transformers custom decoding method.

    model.generate(**inputs, custom_generate="<this repository or its hub id>", trust_remote_code=True,
                   assistant_model=draft, smc_particles=8, do_sample=True, max_new_tokens=256)

runs SMC-SD on an unpatched model, with `assistant_model` as the draft and the `smc_*` knobs
of the hf-smcsd package (see its README). Without `smc_particles` (as a keyword or on the
generation config) the call is transformers' own generate(). The code lives in the
`hf-smcsd` package (requirements.txt); this file only hands the call over to it.
"""

from hf_smcsd.generate import dispatch_generate


def generate(model, *args, **kwargs):
    """transformers calls this with every generate() argument, `model` instead of `self`."""
    return dispatch_generate(model, *args, **kwargs)
