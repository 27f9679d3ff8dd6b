"""GSM8K with a real model pair: the target alone, assisted generation and SMC-SD, side by side.

NOT RUNNABLE ON THE PROJECT'S OWN MACHINE: it needs access to the Hugging Face hub (the
`openai/gsm8k` dataset and the models) and, for sensible run times, a GPU. It is written
for users who have both; the offline equivalent on the committed small pair is
`hf-smcsd fidelity --sections task` (arithmetic instead of GSM8K).

    pip install -e ".[bench]" datasets
    python examples/gsm8k.py --target meta-llama/Llama-3.1-8B-Instruct \\
        --draft meta-llama/Llama-3.2-1B-Instruct --device cuda --dtype bfloat16 \\
        --limit 500 --particles 4,8,12 --gammas 4,8 --batch-size 16
    python examples/gsm8k.py ... --modes smc:4/8,exact:1/4/8,mixed:4/8,auto:4/8 --gammas 8   # the engine's modes

For every method: accuracy on the first `--limit` test problems with a Wilson 95% interval,
and generation speed in new tokens/s (generated tokens up to EOS over the wall time of the
method's generate() calls; assisted generation runs one problem per call, because
transformers supports it at batch size 1 only; the others run `--batch-size` problems per
call). The answer is the number after the last `####` in the output, or else its last
number, compared with the number after `####` in the reference solution. Same prompts,
temperature (0.7) and `max_new_tokens` for every method. Writes gsm8k.csv and gsm8k.json
into `--out-dir`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from hf_smcsd.bench import common
from hf_smcsd.bench.fidelity import engine_settings, sample_outputs

INSTRUCTION = ("Solve the following math problem step by step. End your answer with a line of the form "
               "'#### <number>'.\n\n")
COLUMNS = ["name", "method", "particles", "gamma", "schedule", "problems", "correct", "accuracy", "accuracy_low", "accuracy_high",
           "new_tokens", "seconds", "tokens_per_s", "speedup_vs_target"]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; None when there is no number."""
    match = NUMBER.search(text)
    if match is None:
        return None
    value = match.group(0).replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def gold_answer(solution: str) -> str:
    """The reference answer: the number after '####' in a GSM8K solution."""
    if "####" not in solution:
        raise ValueError(f"solution={solution[:60]!r}...: a GSM8K solution ends with '#### <answer>'")
    answer = normalize_number(solution.rsplit("####", 1)[1])
    if answer is None:
        raise ValueError(f"solution={solution[:60]!r}...: no number after '####'")
    return answer


def predicted_answer(output: str) -> str | None:
    """The number after the last '####' in a model's output, else its last number."""
    if "####" in output:
        return normalize_number(output.rsplit("####", 1)[1])
    numbers = NUMBER.findall(output)
    return normalize_number(numbers[-1]) if numbers else None


def build_prompt(tokenizer, question: str) -> list[int]:
    content = INSTRUCTION + question.strip()
    if getattr(tokenizer, "chat_template", None):
        # return_dict=False: a plain list of ids on transformers 4.57 and 5.x alike (5.x defaults to a dict).
        return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(content + "\nAnswer:", add_special_tokens=True)["input_ids"]


def load_problems(limit: int, split: str = "test"):
    try:
        from datasets import load_dataset  # lazily: only this script needs it
    except ImportError:
        raise SystemExit("this script needs the `datasets` package: pip install datasets") from None
    dataset = load_dataset("openai/gsm8k", "main", split=split)
    limit = min(limit, len(dataset))
    return [(row["question"], gold_answer(row["answer"])) for row in dataset.select(range(limit))]


def stop_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def run_method(method, target, draft, tokenizer, prompts, golds, *, particles=None, gamma=None, batch_size=8,
               max_new_tokens=512, temperature=0.7, stops=(), seed=0, device=None, schedule=None,
               auto_threshold=None):
    per_call = 1 if method == "assisted" else batch_size
    correct, new_tokens, seconds = 0, 0, 0.0
    for start in range(0, len(prompts), per_call):
        ids, mask = common.left_pad(prompts[start : start + per_call], tokenizer.pad_token_id)
        common.synchronize(device)
        begin = time.perf_counter()
        tokens = sample_outputs(method, target, draft, ids.to(device), mask.to(device), particles=particles,
                                gamma=gamma, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stops,
                                pad_id=tokenizer.pad_token_id, seed=seed + start, schedule=schedule,
                                auto_threshold=auto_threshold).cpu()
        common.synchronize(device)
        seconds += time.perf_counter() - begin
        lengths = common.new_token_counts(tokens, list(stops))
        new_tokens += int(lengths.sum())
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        correct += sum(predicted_answer(t) == g for t, g in zip(texts, golds[start : start + per_call]))
    low, high = common.wilson_interval(correct, len(prompts))
    return {"method": method, "particles": particles, "gamma": gamma, "schedule": schedule,
            "name": common.method_name(method, particles, gamma, schedule), "problems": len(prompts), "correct": correct,
            "accuracy": correct / len(prompts), "accuracy_low": low, "accuracy_high": high,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    common.add_model_arguments(parser)
    parser.add_argument("--limit", type=int, default=200, help="first N test problems")
    parser.add_argument("--particles", default="4,8,12")
    parser.add_argument("--gammas", default="8")
    common.add_mode_arguments(parser)
    parser.add_argument("--assisted-gamma", default="default", help="an int, or 'default' (transformers' own)")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per call (target alone and the engine's methods)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args(argv)
    try:
        particles = common.parse_int_list(args.particles, "--particles")
        gammas = common.parse_int_list(args.gammas, "--gammas")
        modes = common.parse_modes(args.modes, particles)
        schedule = common.parse_schedule(args.mixed_schedule)
        assisted_gamma = (args.assisted_gamma if args.assisted_gamma == "default"
                          else common.parse_int_list(args.assisted_gamma, "--assisted-gamma")[0])
        if args.limit < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
            raise ValueError("--limit, --batch-size and --max-new-tokens must be >= 1")
        if args.target is None:
            raise ValueError("--target and --draft: GSM8K needs real models (e.g. meta-llama/Llama-3.1-8B-Instruct "
                             "and meta-llama/Llama-3.2-1B-Instruct); the committed pair knows no English")
        device = common.resolve_device(args.device)
        dtype = common.resolve_dtype(args.dtype, device)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft, tokenizer, names = common.load_pair(args.target, args.draft, device, dtype)
    problems = load_problems(args.limit)
    prompts = [build_prompt(tokenizer, q) for q, _ in problems]
    golds = [g for _, g in problems]
    stops = stop_ids(target, tokenizer)
    settings = [{"method": "target"}, {"method": "assisted", "gamma": assisted_gamma}]
    settings += engine_settings(modes, gammas, particles, schedule)
    rows = []
    for setting in settings:
        row = run_method(**setting, target=target, draft=draft, tokenizer=tokenizer, prompts=prompts, golds=golds,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, stops=stops, seed=args.seed, device=device,
                         auto_threshold=args.auto_threshold)
        rows.append(row)
        print(f"{row['name']}: accuracy {row['accuracy']:.1%} [{row['accuracy_low']:.1%}, "
              f"{row['accuracy_high']:.1%}] ({row['correct']}/{row['problems']}), {row['tokens_per_s']:.1f} tokens/s",
              flush=True)
    for row in rows:
        row["speedup_vs_target"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    out = Path(args.out_dir)
    common.write_csv(out / "gsm8k.csv", rows, COLUMNS)
    common.write_json(out / "gsm8k.json", {"command": "python examples/gsm8k.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                           "models": names, "settings": vars(args), "hardware": common.hardware(),
                                           "rows": rows})
    print(f"wrote {out / 'gsm8k.csv'}, {out / 'gsm8k.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
