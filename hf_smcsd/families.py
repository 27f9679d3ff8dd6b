"""Which transformers families SMC-SD runs and which it refuses: what the runtime knows.

`SUPPORTED` names the families the eager runner is tested on (tests/test_zoo.py runs the same
correctness checks on a tiny config of each, built by `hf_smcsd.testing.zoo`, on
transformers 4.57 and 5.x), with what is special about each. `REJECTED` maps the
`model_type`s that `compat.check_supported_model` refuses to why.

Why families are rejected: SMC-SD grows each prompt's cache to N particle rows and, on
resampling, overwrites the rows of dying particles with copies of surviving ones. An
attention KV cache is a tensor per layer with a batch axis, which the runner copies row by
row. Recurrent or hybrid models (state-space / Mamba layers, linear attention, gated
recurrences, short convolutions) keep a running state per layer that transformers stores in
cache classes of their own, which the runner does not know how to expand and copy row by
row; rather than risk silently wrong text, `compat.check_supported_model` refuses them.
(SMC-SD never rolls a cache back, so such models could be supported later by expanding and
copying their recurrent states per particle as well.)
"""

from __future__ import annotations

# family -> what the tests exercise beyond a plain Llama-style decoder ("" where nothing).
SUPPORTED: dict[str, str] = {
    "llama": "",
    "mistral": "sliding window on every layer",
    "qwen2": "",
    "qwen3": "",
    "gemma2": "alternating sliding / full layers, attention and final logit soft-capping",
    "gemma3": "text-only Gemma 3: sliding / full layers with their own RoPE bases, soft-capping",
    "phi3": "",
    "gpt2": "learned absolute positions",
    "gpt_neox": "partial rotary, parallel residual",
    "opt": "learned positions (offset 2), derived from the attention mask when not given",
    "falcon": "multi-query attention, rotary, parallel attention",
    "falcon_new_arch": "Falcon-40B / 180B style: grouped KV heads, two layer norms",
    "falcon_alibi": "Falcon-RW style: ALiBi position bias instead of rotary",
}

# model_type -> why SMC-SD refuses it. `compat.check_supported_model` also refuses any model
# flagged `_is_stateful` by transformers, and any cache it cannot copy row by row.
_CANNOT_COPY = "that the SMC-SD runner cannot copy per particle"
_RECURRENT = f"keeps a recurrent state (state-space / Mamba layers) {_CANNOT_COPY}"
_HYBRID = (
    "is a hybrid of attention and recurrent layers (Mamba / linear attention / convolution): "
    "its recurrent state cannot be copied per particle by the SMC-SD runner"
)
REJECTED: dict[str, str] = {
    "mamba": _RECURRENT,
    "mamba2": _RECURRENT,
    "falcon_mamba": _RECURRENT,
    "rwkv": f"keeps a recurrent state (RWKV) {_CANNOT_COPY}",
    "xlstm": f"keeps a recurrent state (xLSTM) {_CANNOT_COPY}",
    "recurrent_gemma": f"keeps a recurrent state (Griffin RG-LRU layers) {_CANNOT_COPY}",
    "jamba": _HYBRID,
    "bamba": _HYBRID,
    "zamba": _HYBRID,
    "zamba2": _HYBRID,
    "falcon_h1": _HYBRID,
    "granitemoehybrid": _HYBRID,
    "nemotron_h": _HYBRID,
    "qwen3_next": _HYBRID,
    "qwen3_5": _HYBRID,
    "qwen3_5_moe": _HYBRID,
    "olmo_hybrid": _HYBRID,
    "kimi_linear": _HYBRID,
    "minimax": _HYBRID,
    "lfm2": _HYBRID,
    "lfm2_moe": _HYBRID,
    "bailing_hybrid": _HYBRID,
}
