"""Tiny seeded models of every family in `hf_smcsd.families`: test and demo scaffolding.

`SUPPORTED_CONFIGS` holds a tiny config (hidden 32, about 30k parameters) of each family in
`families.SUPPORTED`; `REJECTED_CONFIGS` of some refused families, to test that they are
refused with a clear error. `tiny_model(name)` builds a seeded random model of a family:
nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

# Token ids every zoo model shares (inside every vocabulary below).
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 2
VOCAB_SIZE = 96


@dataclass(frozen=True)
class Family:
    """A transformers model family and a tiny config of it."""

    name: str
    config_class: str  # attribute of `transformers`
    model_class: str  # attribute of `transformers`
    config: dict[str, Any]  # the tiny config; layers, vocabulary, init std, special tokens: see tiny_config
    layers_key: str = "num_hidden_layers"
    init_key: str = "initializer_range"  # the config field of the weights' init std

    @property
    def available(self) -> bool:
        """Whether the installed transformers has this family."""
        return hasattr(transformers, self.config_class) and hasattr(transformers, self.model_class)


def _decoder(**kwargs) -> dict[str, Any]:
    """The common Llama-like shape: hidden 32, 4 heads of 8, 2 KV heads, MLP 64."""
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    base.update(kwargs)
    return base


# Sliding windows are smaller than the test sequences (prompts of up to 6 tokens plus
# several extends), so the window really slides in the tests.
SLIDING_WINDOW = 4

# Gemma 2 and Gemma 3 text share the shape that matters here: alternating sliding / full
# layers and soft-capping (eager attention is what Gemma asks for with soft-capping).
_GEMMA = dict(
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=SLIDING_WINDOW,
    layer_types=["sliding_attention", "full_attention"],
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    attn_implementation="eager",
)

SUPPORTED_CONFIGS: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaConfig", "LlamaForCausalLM", _decoder()),
        Family(
            "mistral",
            "MistralConfig",
            "MistralForCausalLM",
            _decoder(sliding_window=SLIDING_WINDOW),
        ),
        Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _decoder()),
        Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", _decoder(head_dim=8)),
        Family(
            "gemma2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            _decoder(**_GEMMA),
        ),
        Family(
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            _decoder(**_GEMMA),
        ),
        Family(
            "phi3",
            "Phi3Config",
            "Phi3ForCausalLM",
            _decoder(original_max_position_embeddings=256),
        ),
        Family(
            "gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            dict(n_embd=32, n_head=4, n_positions=256),
            layers_key="n_layer",
        ),
        Family(
            "gpt_neox",
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=256),
        ),
        Family(
            "opt",
            "OPTConfig",
            "OPTForCausalLM",
            dict(
                hidden_size=32,
                ffn_dim=64,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=256,
            ),
            init_key="init_std",
        ),
        Family(
            "falcon",
            "FalconConfig",
            "FalconForCausalLM",
            dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=256),
        ),
        Family(
            "falcon_new_arch",
            "FalconConfig",
            "FalconForCausalLM",
            dict(hidden_size=32, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True),
        ),
        Family(
            "falcon_alibi",
            "FalconConfig",
            "FalconForCausalLM",
            dict(hidden_size=32, num_attention_heads=4, alibi=True, multi_query=False),
        ),
    )
}

# Tiny configs of some rejected families, to test that they are refused with a clear error.
REJECTED_CONFIGS: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mamba", "MambaConfig", "MambaForCausalLM", dict(hidden_size=32, state_size=4)),
        Family(
            "jamba",
            "JambaConfig",
            "JambaForCausalLM",
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                attn_layer_period=2,
                attn_layer_offset=1,
                expert_layer_period=2,
                expert_layer_offset=1,
                num_experts=2,
                mamba_d_state=4,
                mamba_expand=2,
            ),
        ),
        Family(
            "recurrent_gemma",
            "RecurrentGemmaConfig",
            "RecurrentGemmaForCausalLM",
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                lru_width=32,
                attention_window_size=8,
                block_types=["recurrent", "attention"],
            ),
        ),
        Family(
            "falcon_h1",
            "FalconH1Config",
            "FalconH1ForCausalLM",
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                mamba_d_ssm=32,
                mamba_n_heads=4,
                mamba_d_head=8,
                mamba_d_state=4,
                mamba_chunk_size=8,
                mamba_n_groups=1,
            ),
        ),
        Family(
            "qwen3_next",
            "Qwen3NextConfig",
            "Qwen3NextForCausalLM",
            _decoder(
                head_dim=8,
                linear_num_value_heads=2,
                linear_num_key_heads=2,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                num_experts=2,
                num_experts_per_tok=1,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
                layer_types=["linear_attention", "full_attention"],
            ),
        ),
    )
}


def family(name: str) -> Family:
    if name in SUPPORTED_CONFIGS:
        return SUPPORTED_CONFIGS[name]
    if name in REJECTED_CONFIGS:
        return REJECTED_CONFIGS[name]
    raise KeyError(f"no zoo family {name!r}; known: {', '.join(list(SUPPORTED_CONFIGS) + list(REJECTED_CONFIGS))}")


def tiny_config(
    name: str, num_layers: int = 2, vocab_size: int = VOCAB_SIZE, initializer_range: float = 0.2, **overrides
):
    """The tiny config of family `name` (hidden 32, `num_layers` layers). The default
    `initializer_range` 0.2 gives logits of magnitude ~3, so that comparisons mean something
    (transformers' default 0.02 gives nearly uniform next-token distributions)."""
    fam = family(name)
    if not fam.available:
        raise RuntimeError(f"transformers {transformers.__version__} has no {fam.model_class}")
    kwargs = dict(fam.config)
    kwargs[fam.layers_key] = num_layers
    if "layer_types" in kwargs:
        kwargs["layer_types"] = list(kwargs["layer_types"])[:num_layers]
    if "block_types" in kwargs:
        kwargs["block_types"] = list(kwargs["block_types"])[:num_layers]
    attn_implementation = kwargs.pop("attn_implementation", None)
    kwargs.update(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    kwargs[fam.init_key] = initializer_range
    kwargs.update(overrides)
    config = getattr(transformers, fam.config_class)(**kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def tiny_model(name: str, seed: int = 0, num_layers: int = 2, **config_overrides):
    """A seeded random model of family `name` in eval mode, float32."""
    config = tiny_config(name, num_layers=num_layers, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, family(name).model_class)(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, do_sample=True
    )
    return model


def tiny_pair(name: str, seed: int = 0):
    """A target (2 layers) and a draft of the same family and vocabulary (1 layer, other seed)."""
    return tiny_model(name, seed=seed, num_layers=2), tiny_model(name, seed=seed + 1, num_layers=1)
