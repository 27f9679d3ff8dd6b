"""Every check of a generate() request with SMC-SD, in one place, before any work is done.

Each knob has a *kind* (a positive integer, a fraction, a choice, ...): adding a knob is one
entry in `KNOB_KINDS`. A kind turns the value into the plain Python value the loop uses
(`np.int64(4)` -> `4`) or raises a `ValueError` that names the argument and says what to
pass instead. The rules: a bool is not a number (`True` is not 1 particle); numpy and torch
integer scalars are integers; numbers written as strings are refused (`"0.5"`); NaN and
infinities are refused.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch

from . import compat
from .policy import MODES
from .resampling import RESAMPLING_METHODS
from .smc import MIN_DRAFT_TEMPERATURE


class _Bad(Exception):
    """A value that does not fit a kind (turned into a ValueError naming the argument)."""


def _not_text(value):
    if isinstance(value, (str, bytes)):
        raise _Bad(f"got the string {value!r}; pass the value itself, not text")
    return value


def _scalar(value):
    """A torch 0-dim tensor as a Python number (keeps dtype kind); anything else unchanged."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise _Bad(f"got a tensor of shape {tuple(value.shape)}; pass one number")
        if value.dtype == torch.bool:
            return bool(value.item())
        return value.item()
    return value


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy.bool(_)


def as_int(value) -> int:
    value = _scalar(_not_text(value))
    if _is_bool(value):
        raise _Bad("got a bool; pass an integer")
    if not isinstance(value, numbers.Integral):
        raise _Bad("pass an integer")
    return int(value)


def as_float(value) -> float:
    value = _scalar(_not_text(value))
    if _is_bool(value):
        raise _Bad("got a bool; pass a number")
    if not isinstance(value, numbers.Real):
        raise _Bad("pass a number")
    value = float(value)
    if not math.isfinite(value):
        raise _Bad("pass a finite number")
    return value


# --- Kinds: value -> plain value, or _Bad with what is expected. ---


def positive_int(value) -> int:
    value = as_int(value)
    if value < 1:
        raise _Bad("pass an integer >= 1")
    return value


def positive_float(value) -> float:
    value = as_float(value)
    if value <= 0:
        raise _Bad("pass a number > 0")
    return value


def fraction(value) -> float:
    value = as_float(value)
    if not 0.0 <= value <= 1.0:
        raise _Bad("pass a number in [0, 1]")
    return value


def flag(value) -> bool:
    value = _scalar(value)
    if not _is_bool(value):
        raise _Bad("pass True or False")
    return bool(value)


def choice(*options: str) -> Callable[[Any], str]:
    def check(value) -> str:
        if value not in options:
            raise _Bad(f"pass one of {', '.join(repr(o) for o in options)}")
        return value

    return check


def schedule(value) -> tuple[int, int]:
    """Two rounds counts (e.g. exact rounds, SMC rounds): integers >= 0, not both 0."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise _Bad("pass a pair of integers, e.g. (4, 1)")
    pair = tuple(as_int(v) for v in value)
    if min(pair) < 0 or max(pair) == 0:
        raise _Bad("pass two integers >= 0, not both 0")
    return pair


def cost_model(value):
    from .planner import CostModel

    if not isinstance(value, CostModel):
        raise _Bad("pass an hf_smcsd.planner.CostModel (fixed costs), or None to measure them")
    return value


def optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else kind(value)


# knob -> (kind, hint on what the knob does; ends every error about it)
KNOB_KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "smc_particles": (optional(positive_int), "N particles per prompt (8 is a good start; None turns SMC-SD off)"),
    "smc_gamma": (positive_int, "K draft tokens per round (4 to 8 is typical)"),
    "smc_draft_temperature": (optional(positive_float), f"the draft's temperature (None: the target's, at least {MIN_DRAFT_TEMPERATURE})"),
    "smc_resample_threshold": (fraction, "resample when ESS < threshold * N (0 never, 1 every round)"),
    "smc_resample_method": (choice(*RESAMPLING_METHODS), "how ancestors are drawn"),
    "smc_alpha": (positive_float, "the power of the target (1.0 samples the target itself)"),
    "smc_draft_processors": (flag, "apply the target's logits processors to the draft too"),
    "smc_mode": (choice(*MODES), "how rounds verify the draft"),
    "smc_schedule": (schedule, "(exact rounds, SMC rounds) of the mixed mode"),
    "smc_auto_threshold": (fraction, "auto: the largest predicted total-variation bias of an SMC-SD round (0: never SMC-SD)"),
    "smc_auto_costs": (optional(cost_model), "auto: fixed costs for reproducible plans (None: measured during the run)"),
    "smc_compile": (optional(flag), "compile the static runner's steps (None: on CUDA only)"),
}


def check_value(name: str, value, kind: Callable[[Any], Any], hint: str = "") -> Any:
    """`kind(value)`, with a ValueError naming `name` if it does not fit."""
    try:
        return kind(value)
    except _Bad as bad:
        raise ValueError(f"Invalid {name}={value!r}: {bad}" + (f" ({hint})." if hint else ".")) from None


def check_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs with plain values (every name must be in KNOB_KINDS); None means the default
    and is only checked for knobs where None has a meaning of its own."""
    checked = {}
    for name, value in knobs.items():
        if name not in KNOB_KINDS:
            raise KeyError(f"{name} has no entry in hf_smcsd.validation.KNOB_KINDS")
        kind, hint = KNOB_KINDS[name]
        checked[name] = check_value(name, value, kind, hint)
    return checked


# --- The rest of the request: generate() arguments, and the two models. ---

# generate() arguments -> kind, checked when given (they reach the loop as numbers).
GENERATE_ARG_KINDS: dict[str, Callable[[Any], Any]] = {
    "max_new_tokens": positive_int,
    "num_return_sequences": positive_int,
    "temperature": positive_float,  # SMC-SD samples: a temperature of 0 or inf means nothing here
}


def non_negative_float(value) -> float:
    value = as_float(value)
    if value < 0:
        raise _Bad("pass a number >= 0")
    return value


# cache_implementation values SMC-SD takes: its runners build their own caches, dynamic or
# (with "static") preallocated per particle.
OWN_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


def check_generate_args(kwargs: dict, setting: Callable[[str], Any], generation_config=None) -> None:
    """Refuse what SMC-SD cannot do, with the reason and the fix. `setting(name)` resolves an
    argument as generate() does (keyword, else config); `generation_config` is the one passed
    to this call, if any."""
    greedy = not setting("do_sample")
    for name, kind in GENERATE_ARG_KINDS.items():
        if name == "temperature" and greedy:
            kind = non_negative_float  # greedy ignores it, as stock greedy does (0.0 included)
        if kwargs.get(name) is not None:
            kwargs[name] = check_value(name, kwargs[name], kind)
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "inputs_embeds is not supported with smc_particles: the draft proposes from token ids through its own "
            "embeddings, and SMC-SD prefills both models from input_ids. Pass the prompt's token ids as input_ids "
            "(or generate without smc_particles)."
        )
    # Only what the caller asks for: released checkpoints (e.g. Gemma 2/3) ship a default
    # cache_implementation that SMC-SD can ignore, since its runners build their own caches.
    cache_impl = kwargs.get("cache_implementation") or getattr(generation_config, "cache_implementation", None)
    passed = compat.passed_cache(kwargs)  # under the name 5.24+ uses (`cache`) or the old one
    # "static" selects SMC-SD's own static runner (preallocated per-particle KV); the others
    # are transformers' fixed-size caches, which cannot hold N rows per prompt.
    if cache_impl in compat.STATIC_CACHE_IMPLEMENTATIONS and cache_impl != "static" or compat.is_static_cache(passed):
        raise ValueError(
            f"cache_implementation={cache_impl!r} (a fixed-size or compiled cache) cannot be used with "
            "smc_particles: SMC-SD grows each prompt's cache to N rows and reorders rows in flight. "
            "Use cache_implementation='static' (SMC-SD's own preallocated per-particle cache) or drop it."
        )
    if cache_impl not in OWN_CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation={cache_impl!r} is not supported with smc_particles: SMC-SD builds its own caches "
            "(N rows per prompt, copied and rolled back per particle), which transformers' offloaded, quantized "
            "and paged caches cannot be. Drop cache_implementation, or pass 'static' for SMC-SD's own "
            "preallocated cache."
        )
    if passed is not None:
        name = next(n for n in compat.CACHE_KWARGS if kwargs.get(n) is not None)
        raise ValueError(
            f"{name} (a KV cache) cannot be passed with smc_particles: SMC-SD prefills both models itself. "
            "Pass the full prompt as input_ids instead."
        )
    not_supported = {
        # transformers numbers its rows by beam; SMC-SD's rows are particles.
        "prefix_allowed_tokens_fn": "it is called with a row index that does not name the prompt here",
        "negative_prompt_ids": "classifier-free guidance runs the model on its own inputs",
    }
    for name, why in not_supported.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported with smc_particles ({why}); remove it.")
    other_drafters = {
        "prompt_lookup_num_tokens": "prompt lookup drafts from the prompt's n-grams",
        "assistant_early_exit": "self-speculation drafts with the target's own early layers",
    }
    for name, what in other_drafters.items():
        if setting(name) is not None:
            raise ValueError(
                f"{name}={setting(name)!r} is not supported with smc_particles ({what}; SMC-SD drafts with "
                f"assistant_model). Remove {name}, or generate without smc_particles to use it."
            )
    guidance_scale = setting("guidance_scale")
    if guidance_scale is not None and as_float_or_none(guidance_scale) != 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale!r} (classifier-free guidance) is not supported with smc_particles: "
            "it needs an unconditional forward of every particle that SMC-SD does not run. Remove guidance_scale "
            "(or set it to 1), or generate without smc_particles."
        )
    num_beams = setting("num_beams")
    if num_beams is not None and check_value("num_beams", num_beams, positive_int) > 1:
        raise ValueError(f"num_beams={num_beams} is beam search; SMC-SD samples. Use num_beams=1.")


def check_prompts(input_ids, attention_mask, models) -> None:
    """An empty prompt, or a token id outside a model's vocabulary, would fail deep inside
    the model (as in stock generate()): refuse them up front, naming the argument. One read
    of the prompts' extremes (a host synchronisation before any work)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return
    if input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids has no token (shape {tuple(input_ids.shape)}): SMC-SD needs at least one prompt token per "
            "prompt. Start from the tokenizer's BOS token, e.g. input_ids=torch.tensor([[tokenizer.bos_token_id]])."
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}.")
    real = attention_mask.ne(0).sum(-1).min() if isinstance(attention_mask, torch.Tensor) else input_ids.new_tensor(1)
    low, high, shortest = (int(v) for v in torch.stack([input_ids.min(), input_ids.max(), real.to(input_ids)]).tolist())
    if shortest == 0:
        row = int(attention_mask.ne(0).sum(-1).argmin())
        raise ValueError(
            f"prompt {row} is empty: its attention_mask row is 0 everywhere. SMC-SD needs at least one real token "
            "per prompt (e.g. the tokenizer's BOS token)."
        )
    sizes = [(name, input_vocab_size(model)) for name, model in models]
    sizes = [(name, size) for name, size in sizes if size is not None]
    for name, size in sizes:
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds token id {bad}, outside {name}'s vocabulary of {size} ids (0..{size - 1}). "
                "Tokenize the prompt with the target's tokenizer (the draft must share it)."
            )


def input_vocab_size(model) -> int | None:
    """How many token ids a model embeds (None when it cannot be read)."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_input_embeddings):
        return None
    try:
        size = getattr(get_input_embeddings(), "num_embeddings", None)
    except (NotImplementedError, AttributeError):
        return None
    return size if isinstance(size, int) else None


# Knobs that only a mode other than the one requested reads: (knob, modes that read it).
# greedy (do_sample=False) runs exact rounds only.
MODE_KNOBS = {
    "smc_schedule": ("mixed",),
    "smc_auto_threshold": ("auto",),
    "smc_resample_threshold": ("smc", "mixed", "auto"),
    "smc_resample_method": ("smc", "mixed", "auto"),
}


def warn_ineffective_knobs(explicit: set[str], mode: str, greedy: bool) -> None:
    """One warning for every knob set for a mode this call does not run (as transformers
    warns about generation flags that have no effect)."""
    idle = [
        name for name, modes in MODE_KNOBS.items() if name in explicit and (greedy or mode not in modes)
    ]
    if not idle:
        return
    what = "do_sample=False (greedy: exact rounds only)" if greedy else f"smc_mode={mode!r}"
    readers = "; ".join(f"{name} is read by smc_mode {' / '.join(repr(m) for m in MODE_KNOBS[name])}" for name in idle)
    warnings.warn(
        f"{', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect with {what} ({readers}). "
        "Remove them or change the mode.",
        UserWarning,
        stacklevel=4,
    )


def draft_tokens(kwargs: dict, gamma_set: bool, gamma: int, draft) -> int:
    """K, draft tokens per round: `smc_gamma`, or else `num_assistant_tokens` as users of
    transformers' assisted generation set it (a keyword of this call, or the assistant's
    generation config, where transformers reads it). Pops the keyword."""
    keyword = kwargs.pop("num_assistant_tokens", None)
    if keyword is not None:
        keyword = check_value("num_assistant_tokens", keyword, positive_int, "K, draft tokens per round")
        if gamma_set and keyword != gamma:
            raise ValueError(
                f"smc_gamma={gamma} and num_assistant_tokens={keyword} both set K (draft tokens per round): "
                "pass one of them."
            )
        return keyword
    if gamma_set:
        return gamma
    configured = getattr(getattr(draft, "generation_config", None), "num_assistant_tokens", None)
    if configured is None or configured == _default_num_assistant_tokens():
        return gamma  # not set by the user (4.57's config default is 20, 5.x's None)
    return check_value(
        "assistant_model.generation_config.num_assistant_tokens",
        int(configured) if isinstance(configured, float) and configured.is_integer() else configured,
        positive_int,
        "K, draft tokens per round; smc_gamma overrides it",
    )


def draft_tokens_schedule(kwargs: dict, draft) -> str:
    """How K changes between rounds: transformers' `num_assistant_tokens_schedule`, a keyword
    of this call, else the assistant's generation config (where transformers reads it), else
    "constant" (transformers 5.x leaves it None, which means "constant"). Pops the keyword."""
    from .policy import K_SCHEDULES

    hint = "how K adapts between exact rounds; 'constant' keeps it"
    keyword = kwargs.pop("num_assistant_tokens_schedule", None)
    if keyword is not None:
        return check_value("num_assistant_tokens_schedule", keyword, choice(*K_SCHEDULES), hint)
    configured = getattr(getattr(draft, "generation_config", None), "num_assistant_tokens_schedule", None)
    if configured is None:
        return "constant"
    return check_value("assistant_model.generation_config.num_assistant_tokens_schedule", configured,
                       choice(*K_SCHEDULES), hint)


def warn_ineffective_schedule(schedule: str, mode: str, greedy: bool) -> None:
    """A heuristic K schedule adapts K from exact rounds' acceptance: say so where none run
    (smc_mode='smc' while sampling) or where auto's planner chooses K instead."""
    if schedule == "constant" or greedy or mode in ("exact", "mixed"):
        return
    why = ("SMC-SD rounds accept every draft, so acceptance says nothing about K; smc_mode='exact' or "
           "'mixed' adapts the K of exact rounds" if mode == "smc" else
           "auto's planner chooses each round's K (up to smc_gamma) itself")
    warnings.warn(
        f"num_assistant_tokens_schedule={schedule!r} has no effect with smc_mode={mode!r} ({why}); K stays "
        "as set and nothing is stored on the assistant's generation config.",
        UserWarning,
        stacklevel=4,
    )


def _default_num_assistant_tokens():
    from transformers import GenerationConfig

    return GenerationConfig().num_assistant_tokens


def as_float_or_none(value):
    try:
        return as_float(value)
    except _Bad:
        return None


def check_models(target, draft, kwargs: dict) -> int | None:
    """Check that SMC-SD can run this target with this draft; returns the vocabulary both
    run on when their logits differ in width only by padding (else None: same width)."""
    if isinstance(draft, (str, bytes)) or not callable(getattr(draft, "generate", None)) and not callable(
        getattr(draft, "smc_runner", None)
    ):
        raise ValueError(
            f"assistant_model must be a loaded model, got {type(draft).__name__} {draft!r:.80}: load it first, "
            "e.g. assistant_model=AutoModelForCausalLM.from_pretrained(path), with the target's tokenizer."
        )
    for model in (target, draft):
        if isinstance(model, torch.nn.Module):
            compat.check_supported_model(model)  # recurrent / hybrid caches cannot be reordered
    for name, model in (("model", target), ("assistant_model", draft)):
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"{name} is an encoder-decoder model ({type(model).__name__}); SMC-SD supports decoder-only "
                "causal LMs (AutoModelForCausalLM). Use a decoder-only target and draft."
            )
    tokenizer, assistant_tokenizer = kwargs.get("tokenizer"), kwargs.pop("assistant_tokenizer", None)
    if tokenizer is not None and assistant_tokenizer is not None and tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
        raise ValueError(
            "tokenizer and assistant_tokenizer differ: SMC-SD weighs the draft's tokens under the target, so the "
            "draft must share the target's tokenizer. For a draft with another tokenizer, use transformers' "
            "universal assisted generation (assistant_model=..., tokenizer=..., assistant_tokenizer=..., without "
            "smc_particles)."
        )
    return shared_vocabulary(target, draft, tokenizer)


def shared_vocabulary(target, draft, tokenizer=None) -> int | None:
    """None when the two logits have one width; the width both run on when they differ only
    by padding rows (embedding rows beyond every real token id); else a ValueError.

    The extra rows count as padding when the evidence says no real token lies there: the
    tokenizer passed to generate() has at most `shared` tokens, or both configs'
    `vocab_size` are at most `shared` (some checkpoints pad the LM head beyond the config).
    """
    widths = compat.output_vocab_size(target), compat.output_vocab_size(draft)
    if widths[0] == widths[1]:
        return None
    shared = min(widths)
    different = (
        f"assistant_model's vocabulary (logits width) is {widths[1]} but the target's is {widths[0]}. "
    )
    universal = (
        "If the two models use different tokenizers, SMC-SD cannot weigh one's tokens under the other: use "
        "transformers' universal assisted generation instead (assistant_model=..., tokenizer=..., "
        "assistant_tokenizer=..., without smc_particles), or a draft from the target's model family."
    )
    if tokenizer is not None:
        size = len(tokenizer)
        if size <= shared:
            return shared
        raise ValueError(
            different + f"The tokenizer has {size} tokens, so ids {shared}..{size - 1} are real tokens that the "
            "draft cannot propose: the vocabularies differ. " + universal
        )
    config_sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (target, draft)]
    if all(isinstance(s, int) and s <= shared for s in config_sizes):
        return shared
    raise ValueError(
        different + "If they share one tokenizer and the extra rows are padding (as in Qwen2.5-7B with "
        "Qwen2.5-0.5B), pass tokenizer=<the target's tokenizer> to generate() so that SMC-SD can check it; "
        f"both then run on the first {shared} ids. " + universal
    )


def warn_ignored_outputs(setting: Callable[[str], Any]) -> None:
    for name in ("output_attentions", "output_hidden_states"):
        if setting(name):
            warnings.warn(
                f"{name}=True: SMC-SD does not return them (its forwards run on particles, not on the returned "
                "sequence); the output's field is None.",
                UserWarning,
                stacklevel=4,
            )
