"""Exact mode with a constant K against transformers' heuristic K schedule, side by side.

Runs the same prompts, seeds and settings with `num_assistant_tokens_schedule="constant"`
and `"heuristic_transient"` (plus the target alone), interleaved prompt by prompt and in
alternating order, so that a shared machine's drift hits every method alike. Prints tokens
per second per method, its ratio to constant K, the rounds per prompt, the mean accepted
drafts per exact round and the mean K the heuristic reached. Exact mode is lossless either
way: only speed can differ.

    python build_scripts/k_schedule_speed.py --particles 1,4 --batch 1,8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_smcsd
from hf_smcsd.bench.common import load_pair
from hf_smcsd.bench.data import heldout_problems

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ("constant", "heuristic_transient")


def prompts(count: int, seed: int) -> list[str]:
    problems = heldout_problems(2 * count, seed=seed)
    return [f"<|endoftext|>{a:03d}+{b:03d}={a + b:04d}\n{c:03d}+{d:03d}="
            for (a, b), (c, d) in zip(problems[::2], problems[1::2])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(ROOT / "examples/models/target"))
    parser.add_argument("--draft", default=str(ROOT / "examples/models/draft"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", default="1,8", help="prompts per generate() call, comma-separated")
    parser.add_argument("--particles", default="1,4", help="N values, comma-separated")
    parser.add_argument("--gamma", type=int, default=4, help="K (the heuristic's starting K)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, draft, tokenizer, _ = load_pair(args.target, args.draft, torch.device("cpu"), torch.float32)
    texts = prompts(args.prompts, args.seed)
    sampling = dict(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    print(f"{args.prompts} prompts, {args.max_new_tokens} new tokens each, T=0.7, exact mode, K from {args.gamma}, "
          f"{args.repeats} repeats, one thread")
    for batch in (int(b) for b in args.batch.split(",")):
        calls = [tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)
                 for i in range(0, len(texts), batch)]
        for particles in (int(n) for n in args.particles.split(",")):
            methods = ["target"] + list(SCHEDULES)
            seconds = dict.fromkeys(methods, 0.0)
            tokens = dict.fromkeys(methods, 0)
            rounds = dict.fromkeys(SCHEDULES, 0)
            accepted = {s: [] for s in SCHEDULES}
            reached = []
            for repeat in range(args.repeats):
                for call, inputs in enumerate(calls):
                    order = methods if (repeat + call) % 2 == 0 else methods[::-1]
                    for method in order:
                        torch.manual_seed(1000 * repeat + call)
                        start = time.perf_counter()
                        if method == "target":
                            sequences = target.generate(**inputs, **sampling)
                        else:
                            out = hf_smcsd.smc_generate(
                                target, draft, **inputs, smc_particles=particles, smc_gamma=args.gamma,
                                smc_mode="exact", num_assistant_tokens_schedule=method,
                                return_dict_in_generate=True, **sampling)
                            sequences = out.sequences
                            rounds[method] += sum(len(m) for m in out.round_modes)
                            accepted[method] += [int(a) for per in out.accepted_draft_tokens for a in per]
                            if out.num_assistant_tokens is not None:
                                reached.append(out.num_assistant_tokens)
                        seconds[method] += time.perf_counter() - start
                        tokens[method] += sequences[:, inputs.input_ids.shape[1]:].numel()
            rate = {m: tokens[m] / seconds[m] for m in methods}
            prompt_runs = args.repeats * len(texts)
            print(f"\nbatch {batch}, N={particles}")
            print(f"{'method':<22}{'tok/s':>8}{'vs constant':>13}{'vs target':>11}{'rounds/prompt':>15}"
                  f"{'accepted/round':>16}")
            for m in methods:
                extra = ("", "") if m == "target" else (
                    f"{rounds[m] / prompt_runs:.1f}", f"{sum(accepted[m]) / max(len(accepted[m]), 1):.2f}")
                print(f"{m:<22}{rate[m]:>8.1f}{rate[m] / rate['constant']:>13.2f}{rate[m] / rate['target']:>11.2f}"
                      f"{extra[0]:>15}{extra[1]:>16}")
            print(f"heuristic K reached at the end of a call: mean {sum(reached) / len(reached):.1f}, "
                  f"range {min(reached)}..{max(reached)}", flush=True)


if __name__ == "__main__":
    main()
