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
from transformers import LogitsProcessorList, StoppingCriteriaList
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
    "smc_draft_processors": False,  # True: the draft proposes from the processed distribution too
    "smc_compile": None,  # static runner: compile its steps (None: on CUDA only, as transformers does)
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
# Handled natively by the loop (the length budget and the EOS ids): not evaluated per token.
_NATIVE_STOPPING_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria"}


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


def _setting(name: str, kwargs: dict, generation_config, model, default=None):
    """A generate() argument as generate() resolves it: keyword, else the generation config
    passed in, else the model's generation config, else `default`."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (generation_config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, name, None) is not None:
            return getattr(config, name)
    return default


def _dispatch(model, original_generate, args: tuple, kwargs: dict):
    generation_config = kwargs.get("generation_config")
    if generation_config is None and len(args) > 1:
        generation_config = args[1]
    knobs = {name: _setting(name, kwargs, generation_config, model, default) for name, default in SMC_KNOBS.items()}
    for name in SMC_KNOBS:  # stock generate() would reject them as unused model kwargs
        kwargs.pop(name, None)
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
    # cache_implementation="static" selects the static runner (SMC-SD builds its caches itself).
    knobs["static"] = (kwargs.pop("cache_implementation", None) or getattr(generation_config, "cache_implementation", None)) == "static"
    if knobs["smc_compile"] and not knobs["static"]:
        raise ValueError("smc_compile=True compiles the static runner's steps: pass cache_implementation='static' too.")
    # Validate the knobs now, before generate() does any work (max_new_tokens is checked later).
    SMCSettings(**_settings_kwargs(knobs, temperature=_setting("temperature", kwargs, generation_config, model) or 1.0))
    _stop_strings_to_criteria(kwargs, generation_config, model)
    # generate() drops a streamer on the custom_generate path and never ends it: carry it
    # under our own name, and end it here, also when generation fails (a consumer thread
    # of a TextIteratorStreamer would otherwise wait forever).
    streamer = kwargs.pop("streamer", None)
    handle = _StreamerHandle(streamer) if streamer is not None else None
    try:
        return original_generate(
            *args, custom_generate=_smc_decode, smc_draft=draft, smc_knobs=knobs, smc_streamer=handle, **kwargs
        )
    finally:
        if handle is not None:
            handle.streamer.end()


class _StreamerHandle:
    """The user's streamer, and how many new tokens it has been given."""

    def __init__(self, streamer):
        self.streamer = streamer
        self.count = 0

    def put(self, tokens: torch.Tensor) -> None:
        self.count += tokens.numel()
        if tokens.numel():
            self.streamer.put(tokens.cpu())


def _stop_strings_to_criteria(kwargs: dict, generation_config, model) -> None:
    """generate() builds StopStringCriteria from `tokenizer`, which the custom_generate path
    drops: build it here and hand it over as an ordinary stopping criterion."""
    stop_strings = _setting("stop_strings", kwargs, generation_config, model)
    if not stop_strings:
        return
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass tokenizer=<the target's tokenizer> to generate().")
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
    kwargs["stop_strings"] = None  # already handled; keeps generate() from asking for a tokenizer


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
    for model in (target, draft):
        if isinstance(model, torch.nn.Module):
            compat.check_supported_model(model)  # recurrent / hybrid caches cannot be reordered
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
    tokenizer, assistant_tokenizer = kwargs.get("tokenizer"), kwargs.pop("assistant_tokenizer", None)
    if tokenizer is not None and assistant_tokenizer is not None and tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
        raise ValueError(
            "tokenizer and assistant_tokenizer differ: SMC-SD needs a draft that shares the target's "
            "tokenizer (universal assisted decoding across tokenizers is not supported)."
        )


def _check_unsupported(kwargs: dict, generation_config, model) -> None:
    # Only what the caller asks for: released checkpoints (e.g. Gemma 2/3) ship a default
    # cache_implementation that SMC-SD can ignore, since its runners build their own caches.
    cache_impl = kwargs.get("cache_implementation") or getattr(generation_config, "cache_implementation", None)
    if cache_impl in compat.STATIC_CACHE_IMPLEMENTATIONS and cache_impl != "static" or compat.is_static_cache(kwargs.get("past_key_values")):
        raise ValueError(
            f"cache_implementation={cache_impl!r} (a fixed-size or compiled cache) cannot be used with "
            "smc_particles: SMC-SD grows each prompt's cache to N rows and reorders rows in flight. Use "
            "cache_implementation='static' (SMC-SD's own preallocated per-particle cache) or drop it."
        )
    if kwargs.get("past_key_values") is not None:
        raise ValueError(
            "past_key_values cannot be passed with smc_particles: SMC-SD prefills both models itself. "
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
    num_beams = _setting("num_beams", kwargs, generation_config, model)
    if num_beams is not None and num_beams > 1:
        raise ValueError(f"num_beams={num_beams} is beam search; SMC-SD samples. Use num_beams=1.")



def processed_log_probs(logits_processor: LogitsProcessorList):
    """A `smc.LogProbsFn` for the distribution transformers' sampling draws from: the
    processors applied to the logits at each position, then softmax.

    Processors that read scores alone (temperature, top-k, top-p, ...) run once over all
    positions of all rows. Any other processor (repetition penalty, bad words, min length,
    ...) runs position by position, batched over rows, each row seeing its own sequence
    up to that position, as in transformers' sampling loop.
    """
    position_free = all(type(p).__name__ in _POSITION_FREE_PROCESSORS for p in logits_processor)

    def log_probs_fn(logits: torch.Tensor, history) -> torch.Tensor:
        rows, width, vocab = logits.shape
        if not logits_processor:
            return log_probs(logits)
        if position_free:
            scores = logits.reshape(-1, vocab)
            no_tokens = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
            return log_probs(logits_processor(no_tokens, scores)).view(rows, width, vocab)
        sequences = history()
        start = sequences.shape[1] - width + 1
        return torch.stack(
            [log_probs(logits_processor(sequences[:, : start + j], logits[:, j])) for j in range(width)], dim=1
        )

    return log_probs_fn


def _draft_processors(logits_processor: LogitsProcessorList, temperature: float) -> LogitsProcessorList:
    """The target's processors with the draft's temperature in place of the target's."""
    from transformers import TemperatureLogitsWarper

    processors = [p for p in logits_processor if not isinstance(p, TemperatureLogitsWarper)]
    first_warper = next(
        (i for i, p in enumerate(processors) if type(p).__name__ in _POSITION_FREE_PROCESSORS), len(processors)
    )
    if temperature != 1.0:
        processors.insert(first_warper, TemperatureLogitsWarper(temperature))
    return LogitsProcessorList(processors)


def stopping_fn(stopping_criteria: StoppingCriteriaList):
    """A `smc.StopFn` from transformers' stopping criteria (those not handled natively):
    evaluated at each new position, batched over rows, on each row's own sequence."""
    criteria = StoppingCriteriaList(
        c for c in stopping_criteria if type(c).__name__ not in _NATIVE_STOPPING_CRITERIA
    )
    if not criteria:
        return None

    def stop_fn(sequences: torch.Tensor, width: int) -> torch.Tensor:
        start = sequences.shape[1] - width + 1
        return torch.stack([criteria(sequences[:, : start + j], None) for j in range(width)], dim=1)

    return stop_fn


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
    smc_streamer=None,
    **model_kwargs,
):
    """The `custom_generate` callable: generate() has prepared everything; run the loop."""
    streamer = smc_streamer
    attention_mask = model_kwargs.get("attention_mask")
    # generate() repeats each prompt num_return_sequences times; SMC-SD returns that many
    # particles of one population instead, so run each prompt once.
    num_return = generation_config.num_return_sequences or 1
    if num_return > 1:
        input_ids = input_ids[::num_return]
        attention_mask = attention_mask[::num_return] if attention_mask is not None else None
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
        smc_knobs, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=eos, pad_token_id=pad,
        num_return_sequences=num_return,
    ))
    draft_temperature = settings.draft_temperature or temperature
    draft_log_probs = (
        processed_log_probs(_draft_processors(logits_processor, draft_temperature))
        if smc_knobs["smc_draft_processors"]
        else None  # temperature only: the draft's support then covers the target's
    )
    if streamer is not None:
        if input_ids.shape[0] != 1:
            raise ValueError(f"streamer works with one prompt at a time (as in transformers); got {input_ids.shape[0]}.")
        streamer.streamer.put(input_ids.cpu())  # the prompt first, as transformers does
    runner_options = dict(static=smc_knobs["static"], compile=smc_knobs["smc_compile"],
                          max_length=prompt_length + max_new_tokens + 2 * (settings.gamma + 1))
    result = smc_sample(
        make_runner(model, **runner_options),
        make_runner(smc_draft, **runner_options),
        input_ids,
        attention_mask,
        settings,
        target_log_probs=processed_log_probs(logits_processor),
        draft_log_probs=draft_log_probs,
        stop_fn=stopping_fn(stopping_criteria),
        stream=streamer.put if streamer is not None else None,
    )
    if streamer is not None:  # the rest of the returned particle (the caller ends the stream)
        chosen = int(result.chosen[0, 0])
        streamer.put(result.tokens[0, chosen, streamer.count : result.lengths[0, chosen]])
    return _to_output(input_ids, result, pad, generation_config.return_dict_in_generate)


def make_runner(model, static: bool = False, compile: bool | None = None, max_length: int | None = None):
    """The backend for a model: an object that brings its own runner (e.g. a compiled
    engine) says so with a `smc_runner()` method; a transformers model gets the eager one,
    or with `static` the static one (compiled when `compile`, or on CUDA when it is None)."""
    factory = getattr(model, "smc_runner", None)
    if callable(factory):
        return factory()
    if static:
        from .runners.static import StaticRunner

        compile = compat.input_device(model).type == "cuda" if compile is None else bool(compile)
        return StaticRunner(model, max_length=max_length, compile=compile)
    return EagerRunner(model)


def _to_output(input_ids: torch.Tensor, result: SMCResult, pad: int, return_dict: bool):
    batch, num_return = result.chosen.shape
    prompts = torch.arange(batch, device=input_ids.device).repeat_interleave(num_return)
    chosen = result.chosen.flatten()
    chosen_tokens = result.tokens[prompts, chosen]  # [B * num_return, max_new], prompt-major
    longest = int(result.lengths[prompts, chosen].max())
    sequences = torch.cat([input_ids[prompts], chosen_tokens[:, :longest]], dim=1)
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
