"""How `smc_mode="auto"` trades fidelity for speed, on a task where every round matters.

The target continues a list of additions (`007+045=0052`); every complete equation it then
writes itself is checked (x + y == z). Unlike the held-out task of `hf-smcsd fidelity`,
whose 5-token answer fits in the first round (which auto always runs exact), errors here
can appear in any round, so the mode chosen per round shows. Prints, per method, the share
of correct equations, seconds, and the share of rounds run as SMC-SD.

    python build_scripts/auto_sweep.py --draft examples/models_weak/draft --thresholds 0.5,0.3,0.2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(ROOT / "examples/models/target"))
    parser.add_argument("--draft", default=str(ROOT / "examples/models/draft"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--thresholds", default="0.5,0.3,0.2")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.target, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    inputs = tokenizer(prompts(args.prompts, args.seed), return_tensors="pt", padding=True)
    sampling = dict(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    methods = [("target alone", None), ("smc", dict(smc_mode="smc")), ("exact", dict(smc_mode="exact"))]
    methods += [(f"auto {t}", dict(smc_mode="auto", smc_auto_threshold=float(t))) for t in args.thresholds.split(",")]
    print(f"{'method':<14}{'correct':>16}{'seconds':>9}{'SMC rounds':>12}")
    for name, knobs in methods:
        torch.manual_seed(0)
        start = time.perf_counter()
        if knobs is None:
            sequences, share = target.generate(**inputs, **sampling), 0.0
        else:
            out = hf_smcsd.smc_generate(target, draft, **inputs, smc_particles=args.particles, smc_gamma=args.gamma,
                                        return_dict_in_generate=True, **knobs, **sampling)
            sequences = out.sequences
            modes = "".join(out.round_modes)
            share = modes.count("s") / max(len(modes), 1)
        seconds = time.perf_counter() - start
        texts = tokenizer.batch_decode(sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        ok, total = correct_equations(texts)
        print(f"{name:<14}{f'{ok}/{total} = {ok / max(total, 1):.3f}':>16}{seconds:>9.1f}{share:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
