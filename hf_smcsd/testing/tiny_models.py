"""Tiny seeded causal LMs built from configs: for the tests, the examples, `hf-smcsd fidelity`'s
exact section and `hf-smcsd gpu-check`.

Nothing is downloaded: the weights come from `torch.manual_seed(seed)` and the config.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM


def tiny_llama(
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    initializer_range: float = 0.02,
    eos_token_id: int | None = None,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A random Llama in eval mode. `initializer_range` controls how peaked its
    next-token distributions are (0.02 is nearly uniform; 0.5+ gives confident models)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    return model


def perturbed_copy(model, noise: float, seed: int = 1):
    """A copy of `model` with Gaussian noise (std `noise` x each tensor's std) on every
    weight: a draft that approximates the target about as well as `noise` says."""
    import copy

    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            scale = parameter.std() if parameter.numel() > 1 else parameter.abs()
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise * scale)
    return draft


def truncated_copy(model, num_layers: int):
    """The first `num_layers` decoder layers of `model` with its embeddings and head: a
    cheaper draft that agrees with the target as far as its remaining layers matter
    (a layer-skip draft). For random models with a small `initializer_range` the residual
    stream is dominated by the embeddings, so the two agree closely."""
    import copy

    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:num_layers]
    draft.config.num_hidden_layers = num_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:num_layers]
    return draft
