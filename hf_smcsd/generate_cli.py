"""`hf-smcsd generate`: one-shot SMC-SD generation from the command line.

    hf-smcsd generate --target examples/models/target --draft examples/models/draft \
        --prompt "def add(a, b):" --particles 8 --gamma 4 --max-new-tokens 64

One prompt streams its completion to stdout as it is decided (tokens appear once every
particle shares them). `--prompts-file` takes one prompt per line and prints each completion
after the batch ends. `--json` prints one JSON object instead: the prompts, completions,
token ids and SMC-SD's diagnostics (log Z, resampling events, ESS per round).
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-smcsd generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="target model (path or hub id)")
    parser.add_argument("--draft", required=True, help="draft model sharing the target's tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (its completion is streamed unless --json)")
    source.add_argument("--prompts-file", help="a file of prompts, one per line")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--particles", "-N", type=int, default=8, help="smc_particles (default 8)")
    parser.add_argument("--gamma", "-K", type=int, default=4, help="smc_gamma, draft tokens per round (default 4)")
    parser.add_argument("--mode", default=None, help="smc_mode (smc, exact, mixed, auto); default: the library's")
    parser.add_argument("--k-schedule", default=None, choices=["constant", "heuristic_transient"],
                        help="num_assistant_tokens_schedule: heuristic_transient adapts the exact rounds' K from their "
                        "accepted drafts, as transformers' assisted generation does (default: constant)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 (the default here) samples the untruncated target")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--json", action="store_true", help="print sequences and diagnostics as JSON")
    return parser.parse_args(argv)


class UsageError(ValueError):
    """A bad invocation: one line on stderr, exit status 2 (as argparse does)."""


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {getattr(error, 'strerror', None) or error}") from None
    if not prompts:
        raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt")
    return prompts


def load(loader, option: str, path: str, **kwargs):
    """`loader(path)`, or a UsageError naming the option when the path is no model."""
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load {option} {path}: {reason}") from None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        return run(args, read_prompts(args))
    except (ValueError, MemoryError) as error:  # the library's clear errors, without a traceback
        print(f"hf-smcsd generate: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, prompts: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from .generate import smc_generate

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    tokenizer = load(AutoTokenizer.from_pretrained, "--target", args.target, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target = load(AutoModelForCausalLM.from_pretrained, "--target", args.target, dtype=dtype).to(device).eval()
    draft = load(AutoModelForCausalLM.from_pretrained, "--draft", args.draft, dtype=dtype).to(device).eval()

    texts = prompts
    if args.chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not args.chat).to(device)
    stream = len(prompts) == 1 and not args.json
    knobs = {"smc_particles": args.particles, "smc_gamma": args.gamma}
    if args.mode is not None:
        knobs["smc_mode"] = args.mode
    if args.k_schedule is not None:
        knobs["num_assistant_tokens_schedule"] = args.k_schedule
    sampling = {"temperature": args.temperature, "top_k": args.top_k}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p

    torch.manual_seed(args.seed)
    out = smc_generate(
        target, draft, inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=True,
        max_new_tokens=args.max_new_tokens, return_dict_in_generate=True, tokenizer=tokenizer,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
        **knobs, **sampling,
    )
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if args.json:
        json.dump(
            {
                "prompts": prompts,
                "completions": completions,
                "sequences": out.sequences.tolist(),
                "prompt_length": inputs["input_ids"].shape[1],
                "log_z": out.log_z.tolist(),
                "num_resamples": out.num_resamples.tolist(),
                "num_dead_redos": out.num_dead_redos.tolist(),
                "num_rounds": out.num_rounds,
                "round_modes": out.round_modes,
                "smc_tokens": out.smc_tokens.tolist(),
                "exact_tokens": out.exact_tokens.tolist(),
                "plain_tokens": out.plain_tokens.tolist(),
                "round_plans": [[_json_plan(plan) for plan in plans] for plans in out.round_plans],
                "accepted_draft_tokens": [a.tolist() for a in out.accepted_draft_tokens],
                "num_assistant_tokens": out.num_assistant_tokens,
                "ess": [e.tolist() for e in out.ess],
                "settings": {**knobs, **sampling, "max_new_tokens": args.max_new_tokens, "seed": args.seed},
            },
            sys.stdout,
        )
        print()
    elif not stream:
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            print(f"### {i}: {prompt}\n{completion}\n")
    return 0


def _json_plan(plan: dict) -> dict:
    """A round's plan with NaN (no evidence yet) as null: strict JSON has no NaN."""
    return {key: None if isinstance(value, float) and value != value else value for key, value in plan.items()}
