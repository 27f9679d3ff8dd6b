"""Random-weight models of real shapes, built offline, for speed runs (`hf-smcsd bench --shapes`).

SMC-SD's speed does not depend on the weights: every round yields K+1 tokens per particle
whatever the models say (only the fidelity does). So a model of a published shape with random
weights costs what the real one costs per step, and needs no hub. The shapes are JSON configs in
`shape_configs/` (`names()` lists them): Llama 3.1 8B and Llama 3.2 1B as published, a ~134M /
~18M pair whose cost ratio is about theirs (for CPUs), and a tiny pair for smoke runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "shape_configs"


def names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def shape_config(name: str):
    """The transformers config of shape `name` (a file in `shape_configs/`, or a JSON path)."""
    from transformers import AutoConfig

    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"--shapes: no shape {name!r}; known: {', '.join(names())} (or a path to a config .json)")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A seeded random-weight causal LM of shape `name`, built directly on `device` in
    `dtype` (an 8B shape in bfloat16 never exists in float32 or on the CPU)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0, do_sample=True
    )
    return model


def parameter_count(name: str) -> int:
    """Parameters of shape `name`, counted without allocating them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(name))
    return sum(p.numel() for p in model.parameters())


def random_prompts(count: int, vocab_size: int, seed: int = 0, shortest: int = 40, longest: int = 64) -> list[list[int]]:
    """`count` seeded prompts of random token ids (ids from 3 up: clear of pad, bos and eos in
    every shape here) with lengths spread over [shortest, longest], so batches are left padded."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        length = shortest + (i * 7) % (longest - shortest + 1)
        prompts.append(torch.randint(3, vocab_size, (length,), generator=generator).tolist())
    return prompts
