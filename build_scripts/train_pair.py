"""Train the project's small target/draft pair offline, from text every Python install has.

    python build_scripts/train_pair.py                      # the committed pair (about 55 min, 1 thread)
    python build_scripts/train_pair.py --out /tmp/pair --target-steps 50 --draft-steps 50   # a quick look
    python build_scripts/train_pair.py --target-from examples/models/target --out examples/models_weak \
        --draft-hidden 64 --draft-intermediate 256 --draft-steps 300 --draft-task-fraction 0.2   # the weak draft (3 min)

What it does, deterministically for a given `--seed` (same Python, torch and tokenizers
versions, one thread):

1. Corpus: the `.py` files of this Python's standard library (`sysconfig`'s `stdlib`, test
   suites and site-packages excluded, sorted by path; every 50th file held out), mixed with
   an arithmetic task: lines `a+b=c` with operands of 1 to 3 digits written at fixed width
   (`007+045=0052`, which small models learn far faster than unpadded numbers). A fixed
   pseudo-random 1-in-20 subset of all problems is never trained on (`hf_smcsd.bench.data`).
2. Tokenizer: a byte-level BPE (`tokenizers`, 4096 tokens) that splits digits one by one,
   so that numbers are written digit by digit. `<|endoftext|>` is EOS (and BOS), `<|pad|>` pad.
3. Target: Llama, 6 layers, hidden 192, 1500 steps at lr 1e-3, 40% of its training
   sequences arithmetic. Draft: Llama, 1 layer, hidden 128, 900 steps at lr 3e-3, 40%
   arithmetic. Sizing notes, measured on a 2-core CPU at one thread while choosing them:
   - per-token inference cost: at batch 1 a model this small is bound by per-layer call
     overhead, not by its weights, so depth sets the cost. One decoding step with a cache
     took 1.1 ms for the draft, 3.1 ms for a 2-layer / hidden-256 target and 5.6 ms for
     6 layers / hidden 192 (the target here: about 5x the draft; Llama-3.1-8B reads about
     6.5x the weights of Llama-3.2-1B).
   - on arithmetic alone (batches of 8 x 128 tokens, greedy accuracy on 200 problems),
     1 layer / hidden 128 reached 77% after 1000 steps, 2 layers / 256 at lr 1e-3 66% after
     800, but 4 layers / 256 only 9-13% after 600-700 steps. Deeper models need the full
     1500 steps: this 6-layer target reached 98% on held-out problems (a 2-layer / 256
     target with the same schedule: 89%).
   - a small model learns faster per second: given the same 40 minutes, a 1-layer draft
     reached a lower code loss than a 4-layer target. So the draft gets far fewer steps,
     and the pair behaves like a real one: the target is the better model at both code and
     arithmetic, the draft only partly learns the task.
4. With `--target-from DIR` only a draft is trained, for the target already in DIR: it
   reuses that target's tokenizer (its files are copied byte for byte, so both load the same
   one) and writes OUT/draft alone; the target is named by path in `training.json` and the
   model card, not copied. This is how the deliberately weak draft in `examples/models_weak`
   was made: minutes of training instead of the committed draft's seven. Measured: 1 layer,
   hidden 64, 300 steps, 20% arithmetic (2 min) scores 0.2% greedy on held-out problems
   (the committed draft: 76.6%), and sum min(p, q) with the committed target is 0.39 on code
   and 0.29 on answers (the committed draft: 0.56 and 0.88); 400 steps at 40% arithmetic
   still scored 0.0%, so at this width the task is learned late, if at all.
5. Each model is saved in float16 (safetensors, config, generation config, tokenizer with
   `tokenizer_class: PreTrainedTokenizerFast` so that transformers 4.57 and 5.x both load
   it), reloaded, and evaluated: held-out code loss (nats per token) and greedy accuracy on
   held-out problems. `training.json` next to the models records the settings and results,
   and how closely the draft follows the target: the mean of sum_v min(p(v), q(v)) over
   held-out positions at temperature 0.7 (the chance that speculative sampling accepts a
   draft token; 1 - the total variation between the two next-token distributions), on code
   and on the answers of held-out problems.
"""

from __future__ import annotations

import os

# Tokenizer training and encoding use one thread too (set before `tokenizers` loads).
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from hf_smcsd.bench import data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK_CHARS = "0123456789+=\n"


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with single-digit pre-tokenization, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(data.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=data.EOS,
        eos_token=data.EOS,
        pad_token=data.PAD,
        padding_side="left",
        model_max_length=1024,
    )


def task_token_map(tokenizer) -> dict[str, int]:
    """Each character of the task is one token; checked, so task text can skip the tokenizer."""
    table = {}
    for ch in TASK_CHARS:
        ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"the tokenizer splits {ch!r} into {ids}; the task needs one token per character")
        table[ch] = ids[0]
    rng = random.Random(0)
    for a, b in data.sample_problems(rng, 50):
        line = data.problem_line(a, b)
        if tokenizer(line, add_special_tokens=False)["input_ids"] != [table[c] for c in line]:
            raise RuntimeError(f"the tokenizer does not write {line!r} one token per character")
    return table


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each preceded by EOS."""
    eos = tokenizer.convert_tokens_to_ids(data.EOS)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(eos)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------- batches

class Batches:
    """Training sequences: a code window from the stream, or (with probability
    `task_fraction`) a block of arithmetic lines after EOS. Deterministic for a seed."""

    def __init__(self, stream: torch.Tensor, task_ids: dict[str, int], eos_id: int, seq_len: int,
                 batch_size: int, task_fraction: float, seed: int):
        if not 0.0 <= task_fraction <= 1.0:
            raise ValueError(f"task_fraction={task_fraction!r}: use a fraction in [0, 1].")
        if len(stream) <= seq_len + 1:
            raise ValueError(f"the code stream has {len(stream)} tokens, fewer than seq_len={seq_len}")
        self.stream, self.task_ids, self.eos_id = stream, task_ids, eos_id
        self.seq_len, self.batch_size, self.task_fraction = seq_len, batch_size, task_fraction
        self.rng = random.Random(seed)

    def task_sequence(self) -> list[int]:
        text = data.task_text(self.rng, self.seq_len)  # >= seq_len characters = tokens after EOS
        return ([self.eos_id] + [self.task_ids[c] for c in text[len(data.EOS):]])[: self.seq_len]

    def code_sequence(self) -> list[int]:
        start = self.rng.randrange(len(self.stream) - self.seq_len)
        return self.stream[start : start + self.seq_len].tolist()

    def next(self) -> tuple[torch.Tensor, int]:
        """A `[batch, seq_len]` batch and how many of its sequences are arithmetic."""
        rows, tasks = [], 0
        for _ in range(self.batch_size):
            if self.rng.random() < self.task_fraction:
                rows.append(self.task_sequence())
                tasks += 1
            else:
                rows.append(self.code_sequence())
        return torch.tensor(rows, dtype=torch.long), tasks


# ----------------------------------------------------------------------------- models

def build_model(vocab_size: int, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                eos_id: int, pad_id: int, seed: int, max_positions: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model


class Progress:
    """tqdm on a terminal; a line every `every` steps otherwise (logs stay readable)."""

    def __init__(self, total: int, desc: str, every: int = 25):
        self.total, self.desc, self.every = total, desc, every
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step")
            except ImportError:
                pass

    def update(self, step: int, **info):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in info.items()})
            return
        if step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.total - step)
            fields = " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            print(f"[{self.desc}] step {step}/{self.total} {fields} elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m",
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(model, batches: Batches, steps: int, lr: float, desc: str, warmup: int = 50) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )

    def schedule(step):  # linear warm-up, cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    progress = Progress(steps, desc)
    smoothed, tokens, task_rows = None, 0, 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, tasks = batches.next()
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        tokens += inputs.numel()
        task_rows += tasks
        progress.update(step, loss=smoothed, tok_s=round(tokens / (time.perf_counter() - start)))
    progress.close()
    model.eval()
    seconds = time.perf_counter() - start
    return {"steps": steps, "train_tokens": tokens, "task_sequences": task_rows, "final_loss_ema": smoothed,
            "train_seconds": seconds, "train_tokens_per_s": tokens / seconds}


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, windows: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over `windows` evenly spaced windows of the held-out code."""
    span = len(stream) - seq_len - 1
    starts = [int(i * span / max(1, windows - 1)) for i in range(windows)] if span > 0 else [0]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = torch.stack([stream[s : s + seq_len].long() for s in starts[i : i + batch_size]])
        loss = model(input_ids=chunk, labels=chunk).loss
        total += float(loss) * chunk.shape[0]
        count += chunk.shape[0]
    return total / count


@torch.no_grad()
def task_accuracy(model, tokenizer, problems: list[tuple[int, int]], batch_size: int = 100) -> float:
    """Greedy accuracy on `problems` (prompt `<EOS>a+b=`, answer up to the newline)."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    stops = [tokenizer.eos_token_id, newline]
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = tokenizer([data.problem_prompt(a, b) for a, b in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False, return_token_type_ids=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=data.MAX_DIGITS + 2, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        correct += sum(data.is_correct(a, b, t) for (a, b), t in zip(chunk, texts))
    return correct / len(problems)


def save_tokenizer(tokenizer, directory: Path) -> list[Path]:
    """Save the freshly trained tokenizer once (before any call sets padding state on it)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    # transformers 5.x writes "TokenizersBackend", which 4.57 cannot load; this loads on both.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Llama takes no token_type_ids; 4.57's PreTrainedTokenizerFast returns them unless told.
    config["model_input_names"] = ["input_ids", "attention_mask"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return sorted(p for p in directory.iterdir() if p.is_file())


# What `save_tokenizer` writes (4.57 adds special_tokens_map.json): the files a draft trained
# for an existing target copies from it, so that both load one tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def target_tokenizer(directory: Path):
    """(tokenizer, its files) of the saved target in `directory`, for training a draft to it."""
    from transformers import AutoTokenizer

    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not (directory / "tokenizer.json").is_file() or not (directory / "config.json").is_file():
        raise ValueError(f"--target-from={str(directory)!r}: no saved model with a tokenizer.json there; pass the "
                         "directory of a target written by this script (e.g. examples/models/target)")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab = json.loads((directory / "config.json").read_text()).get("vocab_size")
    if vocab != len(tokenizer):
        raise ValueError(f"--target-from={str(directory)!r}: the model's vocab_size ({vocab}) differs from its "
                         f"tokenizer's {len(tokenizer)} tokens; a draft must share the target's vocabulary")
    return tokenizer, files


@torch.no_grad()
def acceptance_rate(target, draft, sequences: torch.Tensor, positions: torch.Tensor, temperature: float = 0.7,
                    batch_size: int = 16) -> float:
    """Mean over the `positions` ([S, L] bool) of `sequences` ([S, L]) of sum_v min(p(v), q(v)),
    p and q the target's and the draft's next-token distributions at `temperature`: the
    chance that speculative sampling accepts a draft token there (1 - their total variation)."""
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids, mask = sequences[i : i + batch_size].long(), positions[i : i + batch_size]
        p = torch.softmax(target(input_ids=ids).logits.float() / temperature, dim=-1)[mask]
        q = torch.softmax(draft(input_ids=ids).logits.float() / temperature, dim=-1)[mask]
        total += float(torch.minimum(p, q).sum())
        count += int(mask.sum())
    return total / count


def pair_acceptance(target, draft, stream: torch.Tensor, task_ids: dict[str, int], eos_id: int,
                    problems: list[tuple[int, int]], seq_len: int, windows: int) -> dict:
    """`acceptance_rate` on held-out code windows (every position) and on held-out problems
    (the positions that predict the answer's digits and its newline)."""
    span = max(0, len(stream) - seq_len)
    starts = [int(i * span / max(1, windows - 1)) for i in range(windows)]
    code = torch.stack([stream[s : s + seq_len] for s in starts])
    lines = torch.tensor([[eos_id] + [task_ids[c] for c in data.problem_line(a, b)] for a, b in problems])
    answer = torch.zeros_like(lines, dtype=torch.bool)
    equals = 1 + 2 * data.MAX_DIGITS + 1  # index of "=" after EOS, "aaa" and "+bbb"
    answer[:, equals : equals + data.MAX_DIGITS + 1] = True  # predict the answer's digits and the newline
    return {"acceptance_code": acceptance_rate(target, draft, code, torch.ones_like(code, dtype=torch.bool)),
            "acceptance_task": acceptance_rate(target, draft, lines, answer)}


def save_half(model, tokenizer_files: list[Path], directory: Path) -> None:
    """The model in float16 (safetensors) with its config, generation config and tokenizer."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model.to(torch.float16).save_pretrained(directory)
    model.to(torch.float32)
    for path in tokenizer_files:
        shutil.copyfile(path, directory / path.name)


def load_float32(directory: Path):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True).eval()
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        return AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, local_files_only=True).eval()


def directory_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def write_model_card(out: Path, report: dict) -> Path:
    """OUT/README.md: what the models are, how they were made, how well they do."""
    target_from = report["args"].get("target_from")
    if target_from:
        intro = [
            "# A draft for an existing target",
            "",
            f"A draft trained by `build_scripts/train_pair.py --target-from {target_from}` for the target in",
            f"`{target_from}`, with that target's tokenizer (copied) on the same data: the Python standard",
            "library's source and `a+b=c` arithmetic (operands of 1 to 3 digits, written at fixed width:",
            "`007+045=0052`). The target is not copied here; use the pair as",
            f"`--target {target_from} --draft {out.as_posix()}/draft`.",
        ]
    else:
        intro = [
            "# The committed model pair",
            "",
            "A small target and draft that share one tokenizer, trained offline by",
            "`build_scripts/train_pair.py` on the Python standard library's source and on `a+b=c`",
            "arithmetic (operands of 1 to 3 digits, written at fixed width: `007+045=0052`). They are for",
            "the offline demo, the benchmark and the fidelity harness of hf-smcsd; they write Python-like",
            "code, not English.",
        ]
    dash = lambda value, fmt="{}": "-" if value is None else fmt.format(value)  # noqa: E731
    lines = intro + [
        "",
        f"Command: `{report['command'].strip()}` "
        f"({report['wall_seconds'] / 60:.0f} min wall time, {report['args']['threads']} thread(s); "
        f"python {report['versions']['python']}, torch {report['versions']['torch']}, "
        f"transformers {report['versions']['transformers']}, tokenizers {report['versions']['tokenizers']}).",
        "",
        "| model | parameters | layers | hidden | steps | arithmetic share | held-out code loss (nats/token) "
        "| greedy accuracy, held-out a+b= | checkpoint |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in report["models"].items():
        checkpoint = f"{m['checkpoint_mb']:.1f} MB" if m.get("checkpoint_mb") is not None else f"`{m['path']}`"
        lines.append(
            f"| {name} | {m['parameters'] / 1e6:.2f}M | {m['layers']} | {m['hidden']} | {dash(m.get('steps'))} "
            f"| {dash(m.get('task_fraction'), '{:.0%}')} | {m['heldout_code_loss']:.3f} "
            f"| {m['heldout_task_accuracy']:.1%} of {m['heldout_task_problems']} | {checkpoint} |"
        )
    draft = report["models"].get("draft", {})
    if "acceptance_task" in draft:
        lines += [
            "",
            "How closely the draft follows the target: the mean over held-out positions of",
            "sum_v min(p(v), q(v)) at temperature 0.7 (the chance that speculative sampling accepts a",
            f"draft token): {draft['acceptance_code']:.3f} on code, {draft['acceptance_task']:.3f} on the answers "
            "of the held-out problems.",
        ]
    lines += [
        "",
        f"Tokenizer: byte-level BPE, {report.get('tokenizer_tokens', report['args']['vocab_size'])} tokens, digits split "
        "one by one; `<|endoftext|>` (id 0) is BOS/EOS, `<|pad|>` (id 1) pads, on the left. Arithmetic prompts",
        "look like `<|endoftext|>123+045=` and the answer (`0168`) ends at the newline. Weights are stored in",
        "float16; load them in float32 on a CPU (`dtype=torch.float32`). Every 50th standard-library",
        "file and a fixed 1-in-20 subset of all problems were held out (`hf_smcsd/bench/data.py`).",
        "`training.json` holds every setting and number.",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "examples" / "models"), help="writes OUT/target and OUT/draft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other cores free)")
    p.add_argument("--stdlib", default=None, help="corpus root (default: this Python's standard library)")
    p.add_argument("--max-files", type=int, default=0, help="use only the first N corpus files (0: all); for quick runs")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings of both models")
    p.add_argument("--target-layers", type=int, default=6)
    p.add_argument("--target-hidden", type=int, default=192)
    p.add_argument("--target-intermediate", type=int, default=576)
    p.add_argument("--target-heads", type=int, default=4)
    p.add_argument("--target-kv-heads", type=int, default=2)
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--target-task-fraction", type=float, default=0.4, help="share of arithmetic sequences")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--draft-hidden", type=int, default=128)
    p.add_argument("--draft-intermediate", type=int, default=512)
    p.add_argument("--draft-heads", type=int, default=4)
    p.add_argument("--draft-kv-heads", type=int, default=2)
    p.add_argument("--draft-steps", type=int, default=900)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--draft-task-fraction", type=float, default=0.4, help="share of arithmetic sequences")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out code windows for the loss")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out problems for the accuracy")
    p.add_argument("--target-from", default=None,
                   help="train only a draft, for the target saved in this directory (e.g. examples/models/target): "
                   "its tokenizer is reused (--vocab-size and the --target-* options are ignored) and OUT/draft "
                   "is written alone")
    args = p.parse_args(argv)
    if args.target_from is not None:
        target = Path(args.target_from)
        if not ((target / "config.json").is_file() and (target / "tokenizer.json").is_file()):
            p.error(f"--target-from={args.target_from!r}: no saved model with a tokenizer.json there; pass the "
                    "directory of a target written by this script (e.g. examples/models/target)")
    for name in ("vocab_size", "seq_len", "batch_size", "target_steps", "draft_steps", "eval_windows",
                 "eval_problems", "target_layers", "draft_layers", "max_positions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.vocab_size < 300:
        p.error(f"--vocab-size must be >= 300 (the 256 byte tokens and the specials), got {args.vocab_size}")
    for name in ("target_task_fraction", "draft_task_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tokenizers
    import transformers

    wall = time.perf_counter()
    out = Path(args.out)
    files = data.stdlib_files(args.stdlib)
    if args.max_files:
        files = files[: args.max_files]
    train_files, heldout_files = data.split_files(files, every=data.HELDOUT_EVERY if len(files) >= 100 else 5)
    train_texts = [data.read_source(p) for p in train_files]
    heldout_texts = [data.read_source(p) for p in heldout_files]
    print(f"corpus: {len(train_files)} training files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
          f"{len(heldout_files)} held out, from {data.stdlib_root() if args.stdlib is None else args.stdlib}", flush=True)

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    target_from = Path(args.target_from) if args.target_from else None
    if target_from is not None:  # one tokenizer for both: the target's own files
        try:
            tokenizer, tokenizer_files = target_tokenizer(target_from)
        except ValueError as error:
            print(f"train_pair.py: error: {error}", file=sys.stderr)
            return 2
    else:
        task_sample = data.task_text(random.Random(args.seed), 200_000)  # digits and signs in the vocabulary
        tokenizer = train_tokenizer(train_texts + [task_sample], args.vocab_size)
        tokenizer_files = save_tokenizer(tokenizer, out / ".tokenizer")
    task_ids = task_token_map(tokenizer)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(data.EOS), tokenizer.convert_tokens_to_ids(data.PAD)
    train_stream = encode_stream(tokenizer, train_texts)
    heldout_stream = encode_stream(tokenizer, heldout_texts)
    tokenizer_seconds = time.perf_counter() - start
    print(f"tokenizer: {len(tokenizer)} tokens{f' (from {target_from})' if target_from else ''}; code stream "
          f"{len(train_stream) / 1e6:.2f}M tokens for training, {len(heldout_stream) / 1e3:.0f}k held out "
          f"({tokenizer_seconds:.0f} s)", flush=True)

    problems = data.heldout_problems(args.eval_problems, seed=args.seed + 1234)
    report = {
        "command": "python build_scripts/train_pair.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "corpus": {"train_files": len(train_files), "heldout_files": len(heldout_files),
                   "train_tokens": len(train_stream), "heldout_tokens": len(heldout_stream)},
        "tokenizer_seconds": tokenizer_seconds,
        "tokenizer_tokens": len(tokenizer),
        "models": {},
    }

    def evaluate(model) -> dict:
        loss = heldout_loss(model, heldout_stream, args.seq_len, args.eval_windows)
        accuracy = task_accuracy(model, tokenizer, problems)
        return {"heldout_code_loss": loss, "heldout_task_accuracy": accuracy, "heldout_task_problems": len(problems)}

    if target_from is not None:  # named, not copied; measured on the same held-out data as the draft
        config = json.loads((target_from / "config.json").read_text())
        target_model = load_float32(target_from)
        entry = {"path": target_from.as_posix(), "parameters": sum(p.numel() for p in target_model.parameters()),
                 "layers": config["num_hidden_layers"], "hidden": config["hidden_size"], **evaluate(target_model)}
        trained = target_from.parent / "training.json"
        if trained.is_file():  # how it was trained, when its own record is next to it
            recorded = json.loads(trained.read_text()).get("models", {}).get(target_from.name, {})
            entry.update({k: recorded[k] for k in ("steps", "task_fraction", "lr") if k in recorded})
        report["models"]["target"] = entry
        del target_model
        print(f"target (not retrained): {target_from}, greedy task accuracy {entry['heldout_task_accuracy']:.1%}",
              flush=True)
    specs = {
        "target": dict(layers=args.target_layers, hidden=args.target_hidden, intermediate=args.target_intermediate,
                       heads=args.target_heads, kv_heads=args.target_kv_heads, steps=args.target_steps,
                       lr=args.target_lr, task_fraction=args.target_task_fraction, seed=args.seed * 10 + 1),
        "draft": dict(layers=args.draft_layers, hidden=args.draft_hidden, intermediate=args.draft_intermediate,
                      heads=args.draft_heads, kv_heads=args.draft_kv_heads, steps=args.draft_steps,
                      lr=args.draft_lr, task_fraction=args.draft_task_fraction, seed=args.seed * 10 + 2),
    }
    if target_from is not None:
        del specs["target"]
    for name, spec in specs.items():
        model = build_model(len(tokenizer), spec["layers"], spec["hidden"], spec["intermediate"], spec["heads"],
                            spec["kv_heads"], eos_id, pad_id, spec["seed"], args.max_positions)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f}M parameters, {spec['layers']} layers, hidden {spec['hidden']}, "
              f"{spec['steps']} steps, {spec['task_fraction']:.0%} arithmetic", flush=True)
        batches = Batches(train_stream, task_ids, eos_id, args.seq_len, args.batch_size, spec["task_fraction"],
                          seed=spec["seed"])
        stats = train(model, batches, spec["steps"], spec["lr"], name)
        directory = out / name
        save_half(model, tokenizer_files, directory)
        del model
        reloaded = load_float32(directory)  # evaluate what was saved (float16 weights)
        entry = {"parameters": params, **spec, **stats, **evaluate(reloaded), "checkpoint_mb": directory_mb(directory)}
        loss, accuracy = entry["heldout_code_loss"], entry["heldout_task_accuracy"]
        stderr = math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / len(problems))
        report["models"][name] = entry
        print(f"{name}: held-out code loss {loss:.3f} nats/token, greedy task accuracy {accuracy:.1%} "
              f"(+-{1.96 * stderr:.1%}, {len(problems)} held-out problems), trained in {stats['train_seconds'] / 60:.1f} min "
              f"at {stats['train_tokens_per_s']:.0f} tokens/s, checkpoint {entry['checkpoint_mb']:.1f} MB", flush=True)

    # How often speculative sampling would accept this draft's tokens for this target.
    target_model = load_float32(target_from if target_from is not None else out / "target")
    acceptance = pair_acceptance(target_model, load_float32(out / "draft"), heldout_stream, task_ids, eos_id,
                                 problems, args.seq_len, args.eval_windows)
    report["models"]["draft"].update(acceptance)
    print(f"draft against target: sum min(p, q) at T=0.7 {acceptance['acceptance_code']:.3f} on held-out code, "
          f"{acceptance['acceptance_task']:.3f} on held-out answers", flush=True)

    if target_from is None:
        shutil.rmtree(out / ".tokenizer")
    report["wall_seconds"] = time.perf_counter() - wall
    report["total_mb"] = sum(m.get("checkpoint_mb") or 0.0 for m in report["models"].values())
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    print(f"done in {report['wall_seconds'] / 60:.1f} min; {report['total_mb']:.1f} MB in {out}; "
          f"wrote {out / 'training.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
