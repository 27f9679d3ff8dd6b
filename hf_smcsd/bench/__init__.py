"""Benchmarks and fidelity checks of SMC-SD against the target alone and assisted generation.

- `hf-smcsd bench` (`hf_smcsd.bench.bench`): tokens/s, speedups, time split, ESS.
- `hf-smcsd fidelity` (`hf_smcsd.bench.fidelity`): exact total variation on enumerable
  models, task accuracy and target log-likelihood on the trained pair.
- `hf_smcsd.bench.common`: what both commands use (padding prompts, transformers' assistant
  settings, loading a pair, timing, intervals, CSV / JSON); the two command modules import
  it, never each other.
- `hf_smcsd.bench.data`: the corpus, the arithmetic task and the prompts they share with
  `build_scripts/train_pair.py`.
"""
