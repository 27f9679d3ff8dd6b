"""How `smc_mode="auto"` trades fidelity for speed, on a task where every round matters.

The target continues a list of additions (`007+045=0052`); every complete equation it then
writes itself is checked (x + y == z). Unlike the held-out task of `hf-smcsd fidelity`,
whose 5-token answer fits in the first round (which auto always runs exact), errors here
can appear in any round, so the mode chosen per round shows. Prints, per draft and method,
the share of correct equations with its standard error, seconds, tokens per second, and the
share of rounds run as SMC-SD / exact / plain (auto's K = 0).

    python build_scripts/auto_sweep.py --drafts examples/models/draft,examples/models_weak/draft
    python build_scripts/auto_sweep.py --draft examples/models_weak/draft --thresholds 0.05,0.02,0
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_smcsd
from hf_smcsd.bench.data import heldout_problems

ROOT = Path(__file__).resolve().parent.parent
EQUATION = re.compile(r"(\d{3})\+(\d{3})=(\d{4})")


def prompts(count: int, seed: int) -> list[str]:
    problems = heldout_problems(2 * count, seed=seed)
    return [f"<|endoftext|>{a:03d}+{b:03d}={a + b:04d}\n{c:03d}+{d:03d}="
            for (a, b), (c, d) in zip(problems[::2], problems[1::2])]


def correct_equations(texts: list[str]) -> tuple[int, int]:
    """(correct, total) over the complete lines after the first (which ends the prompt's problem)."""
    ok = total = 0
    for text in texts:
        for line in text.split("\n")[1:-1]:
            total += 1
            m = EQUATION.fullmatch(line)
            ok += bool(m and int(m.group(1)) + int(m.group(2)) == int(m.group(3)))
    return ok, total


def drafting_costs():
    """Fixed costs under which every auto round drafts the longest block."""
    from hf_smcsd.planner import CostModel

    costs = CostModel()
    costs.verify.points = {1: 1.0}
    costs.draft_step.points = {1: 0.0}
    costs.overhead = {"plain": 0.0, "spec": 0.0}
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(ROOT / "examples/models/target"))
    parser.add_argument("--draft", default=str(ROOT / "examples/models/draft"))
    parser.add_argument("--drafts", default=None, help="comma-separated drafts, each run in turn (overrides --draft)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--thresholds", default="default", help="auto's smc_auto_threshold values ('default': the library's)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--auto-only", action="store_true", help="skip SMC-SD and exact mode")
    parser.add_argument("--forced", action="store_true",
                        help="also run each auto threshold with drafting forced (/d: fixed costs under which every "
                             "round drafts), a stress test of the quality bound")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.target, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    inputs = tokenizer(prompts(args.prompts, args.seed), return_tensors="pt", padding=True)
    sampling = dict(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    methods = [("target alone", None)]
    if not args.auto_only:
        methods += [("smc", dict(smc_mode="smc")), ("exact", dict(smc_mode="exact"))]
    for t in args.thresholds.split(","):
        knobs = dict(smc_mode="auto") if t == "default" else dict(smc_mode="auto", smc_auto_threshold=float(t))
        methods.append((f"auto {t}", knobs))
        if args.forced:  # every round drafts: the quality bound alone picks SMC-SD or exact
            methods.append((f"auto {t} /d", dict(knobs, smc_auto_costs=drafting_costs())))
    for draft_path in (args.drafts or args.draft).split(","):
        draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).eval()
        print(f"draft {draft_path}: {args.prompts} prompts, N={args.particles} K={args.gamma}, "
              f"{args.max_new_tokens} new tokens, T=0.7")
        print(f"{'method':<14}{'correct':>24}{'seconds':>9}{'tok/s':>8}{'rounds s/e/p':>16}")
        for name, knobs in methods:
            torch.manual_seed(0)
            start = time.perf_counter()
            if knobs is None:
                sequences, share = target.generate(**inputs, **sampling), {}
            else:
                out = hf_smcsd.smc_generate(target, draft, **inputs, smc_particles=args.particles,
                                            smc_gamma=args.gamma, return_dict_in_generate=True, **knobs, **sampling)
                sequences = out.sequences
                modes = "".join(out.round_modes)
                share = {m: modes.count(m) / max(len(modes), 1) for m in "sep"}
            seconds = time.perf_counter() - start
            new = sequences[:, inputs.input_ids.shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            ok, total = correct_equations(texts)
            rate = ok / max(total, 1)
            se = (rate * (1 - rate) / max(total, 1)) ** 0.5
            rounds = "/".join(f"{share.get(m, 0):.2f}" for m in "sep") if share else "-"
            print(f"{name:<14}{f'{ok}/{total} = {rate:.3f} +- {se:.3f}':>24}{seconds:>9.1f}"
                  f"{new.numel() / seconds:>8.0f}{rounds:>16}", flush=True)

if __name__ == "__main__":
    main()
