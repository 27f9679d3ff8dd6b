"""The real pair (SmolLM2-135M-Instruct and its distilled draft, `hf_smcsd.pretrained`) in the
bench and the fidelity harness: chat prompts, a checkable task, and fidelity without labels.

    hf-smcsd bench --target smollm2 --modes smc:4/8,exact:1/4,auto:4 --gammas 4,8 --batch-sizes 1,8
    hf-smcsd fidelity --target smollm2 --sections task,loglik --modes smc:4/8,exact:1/4,auto:4 --gammas 4,8

A real model has no enumerable output distribution, so fidelity is measured two ways:

- loglik: the target's mean log-likelihood per token (at the sampling temperature) of each
  method's replies to held-out chat prompts, up to and including `<|im_end|>`, with a
  standard error over replies. The target's own samples set the reference: a sampler that
  follows the draft where it disagrees with the target scores lower; SMC-SD with few
  particles may score higher (resampling favours the target's likelier continuations).
- task: short factual questions with one-word answers that the 135M model mostly knows
  (capitals, colours, counts), asked through the chat template; a reply is correct when it
  contains the expected word (or an accepted variant). Accuracy with a Wilson 95% interval.

None of these prompts or questions is among the 78 prompts whose replies the committed draft
was trained on (build_scripts/distill_smollm2.py; its prompt lists include capital questions,
so this was checked against the prompts actually used).
"""

from __future__ import annotations

import re

import torch

from . import common
from .common import is_real_pair, load_real_pair as load  # noqa: F401 (this module's names for them)

# Chat prompts for the bench, the loglik section and the demo (not in the draft's training set).
CHAT_PROMPTS = [
    "What are the benefits of drinking water every day?",
    "How do I make a cup of tea?",
    "Explain what a rainbow is.",
    "Give me three ideas for a weekend trip.",
    "Why do leaves change color in the fall?",
    "What is the difference between weather and climate?",
    "How can I improve my handwriting?",
    "Describe a typical day of a firefighter.",
    "What should I pack for a beach holiday?",
    "How does a refrigerator keep food cold?",
    "Write two sentences about the importance of kindness.",
    "What are some good habits for studying?",
    "Tell me about the planet Mars.",
    "How do birds know where to migrate?",
    "What makes a good friend?",
    "Suggest a healthy breakfast.",
]

# (question, accepted answers): one-word answers, asked with an instruction to answer briefly.
FACT_QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of England?", ["london"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of Russia?", ["moscow"]),
    ("What is the capital of Portugal?", ["lisbon"]),
    ("What is the capital of China?", ["beijing"]),
    ("What is the capital of the United States?", ["washington"]),
    ("What color is grass?", ["green"]),
    ("What color is the sky on a sunny day?", ["blue"]),
    ("What color is snow?", ["white"]),
    ("What color is a ripe banana?", ["yellow"]),
    ("What color are most fire trucks?", ["red"]),
    ("How many legs does a dog have?", ["four", "4"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many months are in a year?", ["twelve", "12"]),
    ("How many wheels does a bicycle have?", ["two", "2"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What star is at the center of our solar system?", ["sun"]),
    ("What do bees make?", ["honey"]),
    ("What animal is known as the king of the jungle?", ["lion"]),
    ("What is frozen water called?", ["ice"]),
    ("Which planet do we live on?", ["earth"]),
    ("What gas do humans need to breathe?", ["oxygen"]),
    ("Which ocean is the largest?", ["pacific"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of up?", ["down"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What language is spoken in Brazil?", ["portuguese"]),
]
TASK_INSTRUCTION = " Answer in one sentence."
TASK_NEW_TOKENS = 16


def chat_text(tokenizer, question: str) -> str:
    """`question` as one user turn in the chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def chat_prompts(tokenizer, count: int) -> list[str]:
    """`count` chat-templated prompts (cycling through CHAT_PROMPTS)."""
    return [chat_text(tokenizer, CHAT_PROMPTS[i % len(CHAT_PROMPTS)]) for i in range(count)]


def is_correct_answer(reply: str, answers: list[str]) -> bool:
    """True when a whole word of `reply` is one of `answers` (case-insensitive)."""
    words = set(re.findall(r"[a-z0-9]+", reply.lower()))
    return any(a in words for a in answers)


def run_task(target, draft, tokenizer, settings: list[dict], temperature: float = 0.7, seed: int = 0,
             seeds: int = 2, batch_size: int = 8, log=print, auto_threshold=None) -> dict:
    """Accuracy on FACT_QUESTIONS (each asked `seeds` times) of every setting (fidelity's
    settings: method, particles, gamma, schedule), with a Wilson 95% interval."""
    from .common import left_pad, sample_outputs

    device = target.get_input_embeddings().weight.device
    encoded = [tokenizer(chat_text(tokenizer, q + TASK_INSTRUCTION), add_special_tokens=False)["input_ids"]
               for q, _ in FACT_QUESTIONS]
    rows = []
    for setting in settings:
        correct = trials = 0
        for s in range(seeds):
            for start in range(0, len(encoded), batch_size):
                ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
                tokens = sample_outputs(**setting, target=target, draft=draft, input_ids=ids.to(device),
                                        attention_mask=mask.to(device), max_new_tokens=TASK_NEW_TOKENS,
                                        temperature=temperature, stop_ids=[tokenizer.eos_token_id],
                                        pad_id=tokenizer.pad_token_id, seed=seed + 1000 * s + start,
                                        auto_threshold=auto_threshold)
                replies = tokenizer.batch_decode(tokens, skip_special_tokens=True)
                for (_, answers), reply in zip(FACT_QUESTIONS[start : start + batch_size], replies):
                    correct += is_correct_answer(reply, answers)
                    trials += 1
        low, high = common.wilson_interval(correct, trials)
        rows.append({**setting, "name": common.row_name(setting), "problems": trials, "correct": correct,
                     "accuracy": correct / trials, "accuracy_low": low, "accuracy_high": high})
        log(f"fidelity task (factual questions): {rows[-1]['name']}: {correct}/{trials} = {correct / trials:.1%}")
    return {"rows": rows, "temperature": temperature, "max_new_tokens": TASK_NEW_TOKENS,
            "questions": [q + TASK_INSTRUCTION for q, _ in FACT_QUESTIONS], "seeds": seeds}


def reply_lengths(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per row: the number of new tokens up to and including the first eos (all when none)."""
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(tokens[:, 0], tokens.shape[1]))
    return first.long()


def run_loglik(target, draft, tokenizer, settings: list[dict], prompts: list[str], max_new_tokens: int = 48,
               temperature: float = 0.7, seeds: int = 2, seed: int = 0, log=print, auto_threshold=None) -> dict:
    """Target log-likelihood per token of each setting's replies to chat prompts (stopping at
    `<|im_end|>`, which is scored), with a standard error over replies."""
    from .common import left_pad, sample_outputs

    device = target.get_input_embeddings().weight.device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = left_pad(encoded, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    rows = []
    for setting in settings:
        values, lengths_all = [], []
        for s in range(seeds):
            tokens = sample_outputs(**setting, target=target, draft=draft, input_ids=ids.to(device),
                                    attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                    temperature=temperature, stop_ids=[eos], pad_id=tokenizer.pad_token_id,
                                    seed=seed + s, auto_threshold=auto_threshold).cpu()
            lengths = reply_lengths(tokens, eos)
            values += common.target_log_likelihood(target, ids, mask, tokens, lengths, temperature).tolist()
            lengths_all += lengths.tolist()
        mean, stderr = common.mean_and_stderr(values)
        rows.append({**setting, "name": common.row_name(setting), "samples": len(values),
                     "tokens_per_sample": sum(lengths_all) / len(lengths_all), "target_loglik_per_token": mean,
                     "stderr": stderr})
        log(f"fidelity loglik (chat): {rows[-1]['name']}: {mean:.3f} +- {stderr:.3f} nats/token "
            f"({rows[-1]['tokens_per_sample']:.1f} tokens per reply)")
    return {"rows": rows, "temperature": temperature, "prompts": prompts}
