"""The transformers glue: `patch(model)`, `smc_generate(...)`, knobs, output, greedy hand-over.

The only module that knows transformers' `generate()`. It lets generate() do its own
preparation (generation config merging, max_length, special tokens, logits processors)
and enters through upstream's extension point, a callable `custom_generate`, which then
builds the runners and calls the backend-agnostic loop in `hf_smcsd.smc`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import compat
from .runners.eager import EagerRunner
from .smc import SMCResult, SMCSettings, smc_sample
from .weights import log_probs

# Knob name -> default. Each can be passed to generate() or set on a GenerationConfig.
SMC_KNOBS: dict[str, Any] = {
    "smc_particles": None,  # None: not SMC-SD (the patched generate() is the stock one)
    "smc_gamma": 4,
    "smc_draft_temperature": None,  # None: the target's temperature
    "smc_resample_threshold": 0.5,
    "smc_resample_method": "systematic",
    "smc_alpha": 1.0,
}

# Logits processors that look at the scores only, never at the tokens so far: they can be
# applied to every verified position at once. transformers builds them from temperature,
# top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff (top_h in 5.x).
_POSITION_FREE_PROCESSORS = {
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "TopHLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
    "SuppressTokensLogitsProcessor",
    "LogitNormalization",
}
_HANDLED_STOPPING_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria"}


@dataclass
class SMCGenerateOutput(GenerateDecoderOnlyOutput):
    """generate()'s decoder-only output plus SMC-SD's diagnostics.

    `sequences` holds one particle per prompt (drawn by final weight), prompt included.
    `particle_sequences` `[B, N, new]` holds every particle's new tokens (pad after its end),
    `log_weights` `[B, N]` their final log weights, `log_z` `[B]` the log normalising
    constant estimate, `ess` the ESS after each round per prompt, `num_resamples` and
    `num_dead_resets` `[B]` the resampling events (the latter when every weight was zero).
    """

    particle_sequences: torch.LongTensor | None = None
    particle_lengths: torch.LongTensor | None = None
    log_weights: torch.DoubleTensor | None = None
    log_z: torch.DoubleTensor | None = None
    chosen_particles: torch.LongTensor | None = None
    ess: list | None = None
    num_resamples: torch.LongTensor | None = None
    num_dead_resets: torch.LongTensor | None = None
    num_rounds: int | None = None


def patch(model):
    """Give this one model object an SMC-SD-aware `generate()`; returns the model.

    With `smc_particles` (as a keyword or on the generation config) generate() runs SMC-SD
    with `assistant_model` as the draft; without it, the original generate() runs untouched.
    The model's class and other instances are not changed. Patching twice is harmless.
    """
    if getattr(model, "_hf_smcsd_original_generate", None) is not None:
        return model
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        return _dispatch(model, original, args, kwargs)

    model._hf_smcsd_original_generate = original
    model.generate = generate
    return model


def smc_generate(model, draft, input_ids=None, **kwargs):
    """SMC-SD with `model` as the target and `draft` as the proposal, without patching.

    Takes generate()'s keyword arguments and the `smc_*` knobs (`smc_particles` defaults to 4).
    """
    kwargs.setdefault("smc_particles", 4)
    stock_generate = functools.partial(type(model).generate, model)
    return _dispatch(model, stock_generate, (input_ids,) if input_ids is not None else (), dict(kwargs, assistant_model=draft))


def _knob(name: str, kwargs: dict, generation_config, model):
    if name in kwargs:
        return kwargs.pop(name)
    for config in (generation_config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, name, None) is not None:
            return getattr(config, name)
    return SMC_KNOBS[name]


def _setting(name: str, kwargs: dict, generation_config, model):
    """A plain generate() argument as generate() will resolve it (kwarg > config > model)."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (generation_config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def _dispatch(model, original_generate, args: tuple, kwargs: dict):
    generation_config = kwargs.get("generation_config")
    if generation_config is None and len(args) > 1:
        generation_config = args[1]
    knobs = {name: _knob(name, kwargs, generation_config, model) for name in SMC_KNOBS}
    if knobs["smc_particles"] is None:
        return original_generate(*args, **kwargs)

    draft = kwargs.pop("assistant_model", None)
    if draft is None:
        raise ValueError(
            "smc_particles is set but no draft model was given: pass assistant_model=<a small causal LM "
            "sharing the target's tokenizer>, or drop smc_particles for ordinary generation."
        )
    _check_models(model, draft, kwargs)
    if not _setting("do_sample", kwargs, generation_config, model):
        warnings.warn(
            "smc_particles with do_sample=False: SMC-SD is a sampling method, so this call runs "
            "transformers' exact greedy assisted decoding instead. Pass do_sample=True for SMC-SD.",
            UserWarning,
            stacklevel=3,
        )
        return original_generate(*args, assistant_model=draft, **kwargs)
    _check_unsupported(kwargs, generation_config, model)
    # Validate the knobs now, before generate() does any work (max_new_tokens is checked later).
    SMCSettings(**_settings_kwargs(knobs, temperature=_setting("temperature", kwargs, generation_config, model) or 1.0))
    return original_generate(*args, custom_generate=_smc_decode, smc_draft=draft, smc_knobs=knobs, **kwargs)


def _settings_kwargs(knobs: dict, **extra) -> dict:
    return dict(
        particles=knobs["smc_particles"],
        gamma=knobs["smc_gamma"],
        draft_temperature=knobs["smc_draft_temperature"],
        resample_threshold=knobs["smc_resample_threshold"],
        resample_method=knobs["smc_resample_method"],
        alpha=knobs["smc_alpha"],
        **extra,
    )


def _check_models(target, draft, kwargs: dict) -> None:
    for name, model in (("model", target), ("assistant_model", draft)):
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{name} is an encoder-decoder model ({type(model).__name__}); SMC-SD supports decoder-only "
                "causal LMs (AutoModelForCausalLM). Use a decoder-only target and draft."
            )
    target_vocab, draft_vocab = compat.output_vocab_size(target), compat.output_vocab_size(draft)
    if target_vocab != draft_vocab:
        raise ValueError(
            f"assistant_model has a vocabulary of {draft_vocab} tokens but the target has {target_vocab}: "
            "SMC-SD weighs the draft's tokens under the target, so both must share one tokenizer and "
            "vocabulary. Use a draft from the target's model family."
        )
    tokenizer, assistant_tokenizer = kwargs.pop("tokenizer", None), kwargs.pop("assistant_tokenizer", None)
    if tokenizer is not None and assistant_tokenizer is not None and tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
        raise ValueError(
            "tokenizer and assistant_tokenizer differ: SMC-SD needs a draft that shares the target's "
            "tokenizer (universal assisted decoding across tokenizers is not supported)."
        )


def _check_unsupported(kwargs: dict, generation_config, model) -> None:
    cache_impl = _setting("cache_implementation", kwargs, generation_config, model)
    if cache_impl in compat.STATIC_CACHE_IMPLEMENTATIONS or compat.is_static_cache(kwargs.get("past_key_values")):
        raise ValueError(
            f"cache_implementation={cache_impl!r} (a fixed-size or compiled cache) cannot be used with "
            "smc_particles: SMC-SD grows each prompt's cache to N rows and reorders rows in flight. "
            "Drop cache_implementation (the default dynamic cache is used)."
        )
    if kwargs.get("past_key_values") is not None:
        raise ValueError(
            "past_key_values cannot be passed with smc_particles: SMC-SD prefills both models itself. "
            "Pass the full prompt as input_ids instead."
        )
    not_yet = {
        "streamer": "streaming",
        "stopping_criteria": "custom stopping criteria",
        "prefix_allowed_tokens_fn": "prefix_allowed_tokens_fn",
        "negative_prompt_ids": "classifier-free guidance",
    }
    for name, what in not_yet.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported with smc_particles yet ({what}); remove it.")
    for name in ("num_return_sequences", "num_beams"):
        value = _setting(name, kwargs, generation_config, model)
        if value is not None and value > 1:
            raise ValueError(f"{name}={value} is not supported with smc_particles yet; use {name}=1.")
    if _setting("stop_strings", kwargs, generation_config, model):
        raise ValueError("stop_strings is not supported with smc_particles yet; use eos_token_id.")


def _processed_log_probs(logits_processor) -> callable:
    """Normalised log-probs of the target's sampling distribution at any positions.

    transformers' warpers (temperature, top-k, top-p, ...) act on scores alone, so they
    are applied to all positions of all rows at once.
    """
    for processor in logits_processor:
        if type(processor).__name__ not in _POSITION_FREE_PROCESSORS:
            raise ValueError(
                f"The logits processor {type(processor).__name__} is not supported with smc_particles yet "
                "(it depends on the tokens so far); remove the argument that adds it."
            )

    def target_log_probs(logits: torch.Tensor) -> torch.Tensor:
        shape = logits.shape
        scores = logits.reshape(-1, shape[-1])
        no_tokens = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
        for processor in logits_processor:
            scores = processor(no_tokens, scores)
        return log_probs(scores).view(shape)

    return target_log_probs


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _smc_decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    smc_draft=None,
    smc_knobs=None,
    **model_kwargs,
):
    """The `custom_generate` callable: generate() has prepared everything; run the loop."""
    for criterion in stopping_criteria:
        if type(criterion).__name__ not in _HANDLED_STOPPING_CRITERIA:
            raise ValueError(
                f"The stopping criterion {type(criterion).__name__} is not supported with smc_particles yet; "
                "remove the argument that adds it (max_time, stop_strings, stopping_criteria)."
            )
    prompt_length = input_ids.shape[1]
    max_new_tokens = generation_config.max_length - prompt_length
    if max_new_tokens < 1:
        raise ValueError(
            f"max_length={generation_config.max_length} leaves no room after the {prompt_length}-token prompt; "
            "set max_new_tokens instead."
        )
    eos = _token_ids(generation_config.eos_token_id)
    pad = generation_config.pad_token_id
    pad = _token_ids(pad)[0] if pad is not None else (eos[0] if eos else 0)
    temperature = generation_config.temperature or 1.0
    settings = SMCSettings(**_settings_kwargs(
        smc_knobs, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=eos, pad_token_id=pad
    ))
    attention_mask = model_kwargs.get("attention_mask")
    result = smc_sample(
        make_runner(model),
        make_runner(smc_draft),
        input_ids,
        attention_mask,
        settings,
        target_log_probs=_processed_log_probs(logits_processor),
    )
    return _to_output(input_ids, result, pad, generation_config.return_dict_in_generate)


def make_runner(model):
    """The backend for a model: an object that brings its own runner (e.g. a compiled
    engine) says so with a `smc_runner()` method; a transformers model gets the eager one."""
    factory = getattr(model, "smc_runner", None)
    return factory() if callable(factory) else EagerRunner(model)


def _to_output(input_ids: torch.Tensor, result: SMCResult, pad: int, return_dict: bool):
    batch = input_ids.shape[0]
    picked = torch.arange(batch, device=input_ids.device)
    chosen_tokens = result.tokens[picked, result.chosen]
    longest = int(result.lengths[picked, result.chosen].max())
    sequences = torch.cat([input_ids, chosen_tokens[:, :longest]], dim=1)
    if not return_dict:
        return sequences
    return SMCGenerateOutput(
        sequences=sequences,
        particle_sequences=result.tokens,
        particle_lengths=result.lengths,
        log_weights=result.log_weights,
        log_z=result.log_z,
        chosen_particles=result.chosen,
        ess=result.ess,
        num_resamples=result.num_resamples,
        num_dead_resets=result.num_dead_resets,
        num_rounds=result.num_rounds,
    )
