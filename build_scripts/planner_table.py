"""Enumeration table for the auto planner: total variation (TV) of each sampler's outputs
from the exact target distribution, for drafts from good to poor.

The target is the 6-token enumerable model of the tests (tests/conftest.py,
`enumerable_pair`), 4 new tokens, EOS a likely token; drafts are its copies with weight
noise, listed with the TV of their own output distribution from the target's (exact, by
enumeration). For each draft, N and K: SMC-SD, exact mode, and auto twice:

- `auto`: as a user runs it, costs measured during the run (on these tiny models drafting
  rarely pays, so this row is mostly plain target steps);
- `auto/d`: fixed costs under which drafting always pays (`smc_auto_costs`: free draft
  steps, a verify pass whose width is free), so every round drafts and the planner alone
  decides between SMC-SD and exact;
- `auto/d1`: the same with `planner.MIN_EVIDENCE` = 1 (SMC-SD allowed after one round of
  evidence instead of 16 drafted positions, which these short outputs never reach): the
  column that tests the bias bound itself.

`floor` is the mean TV of a perfect sampler at the same sample count (the noise floor);
the goal is auto within 0.03 of it everywhere. A last block repeats the middling draft
with a near-greedy draft temperature (1e-6): a draft too sharp to cover the target.

    PYTHONPATH=$PWD python build_scripts/planner_table.py                 # about 10 minutes on one core
    PYTHONPATH=$PWD python build_scripts/planner_table.py --samples 2000 --particles 4 --gammas 3
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_smcsd
from hf_smcsd import planner
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, sampling_noise_tv, total_variation
from hf_smcsd.testing.tiny_models import perturbed_copy, tiny_llama

EOS = 0
PROMPT = [1, 2, 3]
DRAFT_NOISES = {"0.1": 0.02, "0.3": 0.08, "0.5": 0.15, "0.9": 0.9}  # target TV -> weight noise (see --find)


def target_model():
    return tiny_llama(vocab_size=6, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      seed=0, initializer_range=0.5, eos_token_id=EOS)


def spec_costs() -> planner.CostModel:
    """Costs under which every round drafts the longest block: a draft step costs nothing,
    the verify pass is width-free."""
    costs = planner.CostModel()
    costs.verify.points = {1: 1.0}
    costs.draft_step.points = {1: 0.0}
    costs.overhead = {"plain": 0.0, "spec": 0.0}
    return costs


def sample_outputs(target, draft, samples, seed, new, **kwargs):
    ids = torch.tensor([PROMPT] * samples)
    torch.manual_seed(seed)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=1.0, max_new_tokens=new, return_dict_in_generate=True, **kwargs)
    result = []
    for row in out.sequences[:, len(PROMPT):].tolist():
        result.append(tuple(row[: row.index(EOS) + 1]) if EOS in row else tuple(row))
    modes = "".join(out.round_modes)
    share = {m: modes.count(m) / max(len(modes), 1) for m in "sepx"}
    return empirical_distribution(result), share


def draft_tv(target, draft, exact, new, draft_temperature=1.0) -> float:
    return total_variation(exact, exact_distribution(draft, PROMPT, new, temperature=draft_temperature,
                                                     eos_token_ids=(EOS,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--particles", default="1,4,8")
    parser.add_argument("--gammas", default="1,3")
    parser.add_argument("--drafts", default=",".join(DRAFT_NOISES), help="target TVs of the drafts (keys of DRAFT_NOISES)")
    parser.add_argument("--threshold", type=float, default=None, help="smc_auto_threshold (default: the library's)")
    parser.add_argument("--new", type=int, default=5, help="new tokens (the first round is exact: 5 leaves room for more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--find", action="store_true", help="print the draft TV over a grid of weight noises and exit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = target_model()
    exact = exact_distribution(target, PROMPT, args.new, eos_token_ids=(EOS,))
    if args.find:
        for noise in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.14, 0.15, 0.16, 0.8, 0.9, 1.0):
            print(f"noise {noise:5.2f}: draft TV {draft_tv(target, perturbed_copy(target, noise=noise, seed=1), exact, args.new):.3f}")
        return
    threshold = planner.DEFAULT_BIAS_BOUND if args.threshold is None else args.threshold
    floor = sampling_noise_tv(exact, args.samples)
    print(f"target: vocabulary 6, {args.new} new tokens, {args.samples} samples per cell; noise floor mean "
          f"{float(floor.mean()):.3f} (mean + 5 sd {float(floor.mean() + 5 * floor.std()):.3f}); "
          f"smc_auto_threshold {threshold}")
    methods = [("smc", dict(smc_mode="smc")), ("exact", dict(smc_mode="exact")),
               ("auto", dict(smc_mode="auto", smc_auto_threshold=threshold)),
               ("auto/d", dict(smc_mode="auto", smc_auto_threshold=threshold)),
               ("auto/d1", dict(smc_mode="auto", smc_auto_threshold=threshold))]
    cases = [(key, 1.0) for key in args.drafts.split(",")] + [("0.5", 1e-6)]
    print(f"{'draft TV':>9} {'T_q':>6} {'N':>2} {'K':>2}  " + "  ".join(f"{m:>9}" for m, _ in methods)
          + "   auto/d1 rounds s/e/p   auto-floor")
    worst = 0.0
    min_evidence = planner.MIN_EVIDENCE
    for key, draft_temperature in cases:
        draft = perturbed_copy(target, noise=DRAFT_NOISES[key], seed=1)
        tv_draft = draft_tv(target, draft, exact, args.new, draft_temperature)
        for n in map(int, args.particles.split(",")):
            for k in map(int, args.gammas.split(",")):
                cells, shares = [], None
                start = time.perf_counter()
                for name, knobs in methods:
                    knobs = dict(knobs)
                    if name.startswith("auto/d"):
                        knobs["smc_auto_costs"] = spec_costs()
                    planner.MIN_EVIDENCE = 1 if name == "auto/d1" else min_evidence
                    try:
                        got, share = sample_outputs(target, draft, args.samples, args.seed, args.new, smc_particles=n,
                                                    smc_gamma=k, smc_draft_temperature=draft_temperature, **knobs)
                    finally:
                        planner.MIN_EVIDENCE = min_evidence
                    cells.append(total_variation(exact, got))
                    if name == "auto/d1":
                        shares = share
                excess = max(cells[2:]) - float(floor.mean())
                worst = max(worst, excess)
                print(f"{tv_draft:9.3f} {draft_temperature:6.0e} {n:2d} {k:2d}  "
                      + "  ".join(f"{c:9.3f}" for c in cells)
                      + f"   {shares['s']:.2f}/{shares['e']:.2f}/{shares['p']:.2f}"
                      + f"   {excess:+.3f}   ({time.perf_counter() - start:.0f}s)", flush=True)
    print(f"largest excess of auto over the noise floor: {worst:+.3f} (goal: <= 0.03)")


if __name__ == "__main__":
    main()
