"""Low target temperatures: how SMC-SD's answer accuracy depends on the draft's temperature.

At a target temperature near 0 the target is nearly a point mass on its argmax. A draft
proposing at the same temperature is nearly a point mass on *its* argmax: where the two
differ, every particle proposes the same wrong token, the weights are tiny but equal, and no
N recovers the target (issue 19). A draft proposing at a fixed temperature keeps some mass
on the target's token, and the weights find it. This script measures, on the committed
pair's held-out additions (`<|endoftext|>123+045=` -> `0168`), the share of right answers of
stock sampling and of SMC-SD for each target temperature, N, and draft temperature
(`target`: the target's own; a number: fixed).

    python build_scripts/draft_temperature_sweep.py --temperatures 1e-6,0.1,0.3,0.7,1.0 \
        --particles 4,32 --draft-temperatures target,0.7,1.0 --problems 200
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_smcsd
from hf_smcsd.bench.common import wilson_interval
from hf_smcsd.bench.data import heldout_problems, is_correct, problem_prompt

ROOT = Path(__file__).resolve().parent.parent


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(ROOT / "examples/models/target"))
    parser.add_argument("--draft", default=str(ROOT / "examples/models/draft"))
    parser.add_argument("--temperatures", default="1e-6,0.1,0.3,0.7,1.0")
    parser.add_argument("--particles", default="4,32")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--draft-temperatures", default="target,0.7,1.0",
                        help="'target' (the target's own), 'default' (the library's default) or numbers")
    parser.add_argument("--mode", default="smc")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = AutoTokenizer.from_pretrained(args.target, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    problems = heldout_problems(args.problems)
    common = dict(max_new_tokens=6, top_k=0, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)

    def accuracy(run) -> tuple[int, float]:
        right, start = 0, time.perf_counter()
        for first in range(0, len(problems), args.batch):
            chunk = problems[first : first + args.batch]
            inputs = tokenizer([problem_prompt(a, b) for a, b in chunk], return_tensors="pt", padding=True,
                               add_special_tokens=False)
            torch.manual_seed(args.seed + first)
            out = run(inputs)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
            right += sum(is_correct(a, b, t) for (a, b), t in zip(chunk, texts))
        return right, time.perf_counter() - start

    def report(temperature, method, right, seconds):
        low, high = wilson_interval(right, len(problems))
        print(f"T={temperature:g}\t{method}\t{right}/{len(problems)}\t{100 * right / len(problems):.1f}% "
              f"[{100 * low:.1f}, {100 * high:.1f}]\t{seconds:.1f}s", flush=True)

    print("target temperature\tmethod\tright\taccuracy [95% Wilson]\tseconds")
    for temperature in floats(args.temperatures):
        right, seconds = accuracy(lambda inputs: target.generate(**inputs, temperature=temperature, **common))
        report(temperature, "stock sampling", right, seconds)
        for particles in (int(v) for v in args.particles.split(",")):
            for draft_temperature in args.draft_temperatures.split(","):
                knobs = dict(smc_particles=particles, smc_gamma=args.gamma, smc_mode=args.mode)
                if draft_temperature == "target":
                    knobs["smc_draft_temperature"] = temperature
                elif draft_temperature != "default":
                    knobs["smc_draft_temperature"] = float(draft_temperature)
                right, seconds = accuracy(lambda inputs: hf_smcsd.smc_generate(
                    target, draft, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    temperature=temperature, **knobs, **common))
                report(temperature, f"{args.mode} N={particles} K={args.gamma} draft T={draft_temperature}", right,
                       seconds)


if __name__ == "__main__":
    main()
