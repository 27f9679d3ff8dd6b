"""Scaffolding for checking SMC-SD: tiny models and exact enumeration. The runtime (generate(),
the round loop, the runners, compat) never imports it.

- `tiny_models`: seeded random Llamas (`tiny_llama`) and drafts made from them by noise
  (`perturbed_copy`) or by dropping layers (`truncated_copy`); nothing is downloaded.
- `zoo`: a tiny config and seeded model of every family in `hf_smcsd.families`.
- `enumeration`: the exact output distribution of a tiny model by scoring every possible
  continuation, empirical distributions, total variation and its sampling noise floor.

It ships in the installed package because user-facing commands need it: `hf-smcsd fidelity`
(its exact section enumerates a tiny pair), `hf-smcsd gpu-check` (tiny engines) and the
examples (`examples/quickstart.py`, `examples/demo.py`).
"""
