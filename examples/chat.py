"""Chat through SMC-SD, streaming the answer as an Instruct-model user would write it.

With hub access, any Instruct pair that shares a tokenizer, e.g.:

    python examples/chat.py --target Qwen/Qwen2.5-1.5B-Instruct --draft Qwen/Qwen2.5-0.5B-Instruct

Offline (the default) it uses the project's small trained pair in examples/models, which
knows Python code and arithmetic rather than chat, under a minimal chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import hf_smcsd

MODELS = Path(__file__).resolve().parent / "models"
# Used only when the tokenizer has no chat template of its own (the offline pair).
MINIMAL_TEMPLATE = (
    "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:{% endif %}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(MODELS / "target"))
    parser.add_argument("--draft", default=str(MODELS / "draft"))
    parser.add_argument("--message", default="Write a function that adds two numbers.")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = MINIMAL_TEMPLATE
    model = hf_smcsd.patch(AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32))
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32)

    messages = [{"role": "user", "content": args.message}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    torch.manual_seed(args.seed)
    out = model.generate(
        **inputs,
        assistant_model=draft,
        smc_particles=args.particles,
        smc_gamma=args.gamma,
        do_sample=True,
        temperature=0.7,
        max_new_tokens=args.max_new_tokens,
        streamer=streamer,  # tokens appear once every particle agrees on them
        return_dict_in_generate=True,
    )
    print(f"\n[{out.num_rounds} rounds, {int(out.num_resamples[0])} resamplings, "
          f"mean ESS {float(out.ess[0].mean()):.2f} of {args.particles}]")


if __name__ == "__main__":
    main()
