"""The shortest complete use of hf-smcsd, offline (random tiny models, so tokens are arbitrary).

With real models: target = AutoModelForCausalLM.from_pretrained(...), draft = a small model
sharing the target's tokenizer, input_ids = tokenizer(prompt, return_tensors="pt").input_ids.
"""

import torch

import hf_smcsd
from hf_smcsd.testing.tiny_models import tiny_llama

target = tiny_llama(hidden_size=64, num_layers=2, seed=0, initializer_range=0.3)
draft = tiny_llama(hidden_size=32, num_layers=1, seed=1, initializer_range=0.3)
input_ids = torch.tensor([[1, 2, 3, 4]])
torch.manual_seed(0)

# 1. Patch the target: generate() runs SMC-SD when smc_particles is given.
model = hf_smcsd.patch(target)
out = model.generate(
    input_ids, assistant_model=draft, smc_particles=8, smc_gamma=4,
    do_sample=True, temperature=0.7, max_new_tokens=16, return_dict_in_generate=True,
)
print("sequences:", out.sequences.tolist())
print("particles:", tuple(out.particle_sequences.shape), "log weights:", out.log_weights.tolist())
print("ESS per round:", [e.tolist() for e in out.ess], "resamples:", out.num_resamples.tolist(),
      "rounds:", out.num_rounds, "log Z:", out.log_z.tolist())

# 2. Or without patching: smc_generate(target, draft, ...) returns the sequences tensor.
sequences = hf_smcsd.smc_generate(target, draft, input_ids, smc_particles=8, do_sample=True, max_new_tokens=16)
print("smc_generate:", sequences.tolist())
