"""The transformers glue: `patch(model)`, `smc_generate(...)`, knobs, output, greedy hand-over.

The only module that knows transformers' `generate()`. It lets generate() do its own
preparation (generation config merging, max_length, special tokens, logits processors)
and enters through upstream's extension point, a callable `custom_generate`, which then
builds the runners and calls the backend-agnostic loop in `hf_smcsd.smc`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import compat, distributed, memory, planner, policy, validation
from .runners.eager import EagerRunner
from .runners.shared_vocab import SharedVocabulary
from .smc import SMCResult, SMCSettings, smc_sample
from .weights import log_probs

# Knob name -> default. Each can be passed to generate() or set on a GenerationConfig.
SMC_KNOBS: dict[str, Any] = {
    "smc_particles": None,  # None: not SMC-SD (the patched generate() is the stock one)
    "smc_gamma": 4,
    "smc_draft_temperature": None,  # None: the target's temperature, at least smc.MIN_DRAFT_TEMPERATURE
    "smc_resample_threshold": 0.5,
    "smc_resample_method": "systematic",
    "smc_alpha": 1.0,
    "smc_draft_processors": False,  # True: the draft proposes from the processed distribution too
    "smc_mode": "smc",  # "smc", "exact" (lossless), "mixed" (smc_schedule), "auto" (smc_auto_threshold)
    "smc_schedule": policy.DEFAULT_SCHEDULE,  # mixed: (exact rounds, SMC-SD rounds), repeating
    "smc_auto_threshold": planner.DEFAULT_BIAS_BOUND,  # auto: largest predicted bias of an SMC-SD round
    "smc_auto_costs": None,  # auto: a planner.CostModel to plan with (reproducible); None measures the costs
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
    constant estimate (over the SMC-SD rounds), `ess` the ESS after each round per prompt,
    `num_resamples` `[B]` the resampling events, `num_dead_redos` `[B]` the SMC-SD rounds
    that left no particle any weight and were redone in exact mode. Per mode:
    `round_modes` (per prompt, one letter per round: `s` SMC-SD, `e` exact, `x` an SMC-SD
    round discarded and redone, `p` a plain target step of `smc_mode="auto"`),
    `num_smc_rounds` / `num_exact_rounds` / `num_plain_rounds` and `smc_tokens` /
    `exact_tokens` / `plain_tokens` `[B]`, and `accepted_draft_tokens` (per prompt, the
    drafted tokens each exact round accepted). With `smc_mode="auto"`, `round_plans`: per
    prompt, one dict per round with its `mode` letter, `k` (drafted tokens, 0 for a plain
    step), `chains` (rows per prompt the round ran on: N, or 1 for plain steps and exact
    rounds of one draft chain, where the runners can narrow), `bias_bound` (the planner's bound on the total variation an SMC-SD round of that
    K would add: the quality measure compared with `smc_auto_threshold`; None for plain
    steps, NaN before any evidence) and `predicted_tokens_per_s` (the batch's, by the
    measured costs, for the K chosen). Plain steps run in bursts planned once: each step is
    its own round and entry, with the burst's plan. With an adaptive
    `num_assistant_tokens_schedule` ("heuristic" or "heuristic_transient") in exact, mixed
    or greedy runs, `num_assistant_tokens`: the K the schedule reached (what the next exact round would
    draft; "heuristic" also stores it on the assistant's generation config); else None.
    """

    particle_sequences: torch.LongTensor | None = None
    particle_lengths: torch.LongTensor | None = None
    log_weights: torch.DoubleTensor | None = None
    log_z: torch.DoubleTensor | None = None
    chosen_particles: torch.LongTensor | None = None
    ess: list | None = None
    num_resamples: torch.LongTensor | None = None
    num_dead_redos: torch.LongTensor | None = None
    num_rounds: int | None = None
    round_modes: list | None = None
    num_smc_rounds: torch.LongTensor | None = None
    num_exact_rounds: torch.LongTensor | None = None
    smc_tokens: torch.LongTensor | None = None
    exact_tokens: torch.LongTensor | None = None
    accepted_draft_tokens: list | None = None
    num_plain_rounds: torch.LongTensor | None = None
    plain_tokens: torch.LongTensor | None = None
    round_plans: list | None = None
    num_assistant_tokens: int | None = None


def patch(model):
    """Give this one model object an SMC-SD-aware `generate()`; returns the model.

    With `smc_particles` (as a keyword or on the generation config) generate() runs SMC-SD
    with `assistant_model` as the draft; without it, the original generate() runs untouched.
    The model's class and other instances are not changed. Patching twice is harmless.

    The patch is a `PatchedGenerate` object in the instance's `__dict__` that refers back to
    its model, so it travels with the object: `copy.deepcopy` gives an independent patched
    copy whose generate() uses the copy's weights, and pickling / `torch.save` keep the patch
    (`torch.load(..., weights_only=False)` returns a patched model). `save_pretrained` saves
    the weights and the generation config (smc_* settings included), not the patch: patch
    the model `from_pretrained` returns.
    """
    if isinstance(vars(model).get("generate"), PatchedGenerate):
        return model
    model.generate = PatchedGenerate(model, vars(model).get("generate"))
    return model


class PatchedGenerate:
    """A model's SMC-SD-aware `generate`, as an instance attribute (see `patch`).

    Holds the model and, if the instance had its own `generate` before (e.g. one set by
    transformers' `custom_generate` adjustment), that one; otherwise the class's generate()
    is looked up at call time, so nothing bound to one object is stored.
    """

    def __init__(self, model, instance_generate=None):
        self.model = model
        self.instance_generate = instance_generate

    def original(self):
        if self.instance_generate is not None:
            return self.instance_generate
        return functools.partial(type(self.model).generate, self.model)

    def __call__(self, *args, **kwargs):
        return _dispatch(self.model, self.original(), args, kwargs)

    @property
    def __signature__(self):  # help() and inspect show generate()'s own arguments
        return inspect.signature(functools.partial(type(self.model).generate, self.model))


def smc_generate(model, draft, input_ids=None, **kwargs):
    """SMC-SD with `model` as the target and `draft` as the proposal, without patching.

    Takes generate()'s keyword arguments and the `smc_*` knobs (`smc_particles` defaults to 4).
    It samples unless told otherwise (`do_sample=True` by default; `do_sample=False` is greedy).
    """
    kwargs.setdefault("smc_particles", 4)
    kwargs.setdefault("do_sample", True)
    stock_generate = functools.partial(type(model).generate, model)
    return _dispatch(model, stock_generate, (input_ids,) if input_ids is not None else (), dict(kwargs, assistant_model=draft))


def dispatch_generate(model, *args, **kwargs):
    """What a patched model's generate() runs, for an unpatched model: SMC-SD when
    `smc_particles` is set (keyword or generation config), else the class's own generate().
    The repository's `custom_generate/generate.py` enters here."""
    return _dispatch(model, functools.partial(type(model).generate, model), args, kwargs)


def _setting(name: str, kwargs: dict, generation_config, model, default=None):
    """A generate() argument as generate() resolves it: keyword, else the generation config
    passed in, else the model's generation config, else `default`."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (generation_config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, name, None) is not None:
            return getattr(config, name)
    return default


def _knob(name: str, kwargs: dict, generation_config, model):
    """A knob as the call sets it: a keyword wins even when it is None (None: the default;
    `smc_particles=None` turns SMC-SD off for this call), as in stock generate()."""
    if name in kwargs:
        return SMC_KNOBS[name] if kwargs[name] is None else kwargs[name]
    return _setting(name, kwargs, generation_config, model, SMC_KNOBS[name])


def _knob_is_set(name: str, kwargs: dict, generation_config, model) -> bool:
    """Whether the call sets a knob (a keyword, or a generation config carrying it)."""
    if name in kwargs:
        return kwargs[name] is not None
    return any(
        getattr(config, name, None) is not None for config in (generation_config, getattr(model, "generation_config", None))
    )


def _check_request(model, draft, knobs: dict, explicit: set, args: tuple, kwargs: dict,
                   generation_config) -> tuple[dict, int | None]:
    """Every check before any work (`hf_smcsd.validation`): the knobs with plain values, and
    the vocabulary both models run on when their widths differ by padding (else None)."""
    knobs["smc_gamma"] = validation.draft_tokens(kwargs, "smc_gamma" in explicit, knobs["smc_gamma"], draft)
    schedule = validation.draft_tokens_schedule(kwargs, draft)
    knobs = validation.check_knobs(knobs)
    knobs["num_assistant_tokens_schedule"] = schedule
    shared_vocab = validation.check_models(model, draft, kwargs)

    def setting(name):
        return _setting(name, kwargs, generation_config, model)

    validation.check_generate_args(kwargs, setting, generation_config)
    prompts = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    validation.check_prompts(prompts, kwargs.get("attention_mask"), (("model", model), ("assistant_model", draft)))
    validation.warn_ignored_outputs(setting)
    validation.warn_ineffective_knobs(explicit, knobs["smc_mode"], greedy=not setting("do_sample"))
    validation.warn_ineffective_schedule(schedule, knobs["smc_mode"], greedy=not setting("do_sample"))
    return knobs, shared_vocab


def _dispatch(model, original_generate, args: tuple, kwargs: dict):
    generation_config = kwargs.get("generation_config")
    if generation_config is None and len(args) > 1:
        generation_config = args[1]
    knobs = {name: _knob(name, kwargs, generation_config, model) for name in SMC_KNOBS}
    explicit = {name for name in SMC_KNOBS if _knob_is_set(name, kwargs, generation_config, model)}
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
    knobs, shared_vocab = _check_request(model, draft, knobs, explicit, args, kwargs, generation_config)
    # do_sample=False: greedy verification of the N sampled draft chains (exact, any batch size).
    greedy = not _setting("do_sample", kwargs, generation_config, model)
    # cache_implementation="static" selects the static runner (SMC-SD builds its caches itself).
    knobs["static"] = (kwargs.pop("cache_implementation", None) or getattr(generation_config, "cache_implementation", None)) == "static"
    if knobs["smc_compile"] and not knobs["static"]:
        raise ValueError("smc_compile=True compiles the static runner's steps: pass cache_implementation='static' too.")
    # Validate the knobs now, before generate() does any work (max_new_tokens is checked later).
    SMCSettings(**_settings_kwargs(
        knobs, temperature=_setting("temperature", kwargs, generation_config, model) or 1.0, greedy=greedy
    ))
    _stop_strings_to_criteria(kwargs, generation_config, model)
    # generate() drops a streamer on the custom_generate path and never ends it: carry it
    # under our own name, and end it here, also when generation fails (a consumer thread
    # of a TextIteratorStreamer would otherwise wait forever).
    streamer = kwargs.pop("streamer", None)
    handle = _StreamerHandle(streamer) if streamer is not None else None
    try:
        return original_generate(
            *args, custom_generate=_smc_decode, smc_draft=draft, smc_knobs=knobs, smc_streamer=handle,
            smc_vocab=shared_vocab, **kwargs
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
        mode=knobs["smc_mode"],
        schedule=knobs["smc_schedule"],
        auto_threshold=knobs["smc_auto_threshold"],
        auto_costs=knobs["smc_auto_costs"],
        gamma_schedule=knobs.get("num_assistant_tokens_schedule", "constant"),
        gamma_limit=knobs.get("gamma_limit"),
        **extra,
    )


def processed_log_probs(logits_processor: LogitsProcessorList, prompt_stride: int = 1):
    """A `smc.LogProbsFn` for the distribution transformers' sampling draws from: the
    processors applied to the logits at each position, then softmax.

    Processors that read scores alone (temperature, top-k, top-p, ...) run once over all
    positions of all rows. Any other processor (repetition penalty, bad words, min length,
    ...) runs position by position, batched over rows, each row seeing its own sequence
    up to that position, as in transformers' sampling loop.
    """
    position_free = all(type(p).__name__ in _POSITION_FREE_PROCESSORS for p in logits_processor)
    # Processors that carry one value per prompt of generate()'s batch (transformers 5.24's
    # repetition penalty keeps each prompt's padding length): rows here are particles, so
    # each call gets the values of its rows' prompts (`history.prompts`).
    per_prompt = [(p, values[::prompt_stride]) for p, values in _processor_row_state(logits_processor)]

    def log_probs_fn(logits: torch.Tensor, history) -> torch.Tensor:
        rows, width, vocab = logits.shape
        if not logits_processor:
            return log_probs(logits)
        if position_free:
            scores = logits.reshape(-1, vocab)
            no_tokens = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
            return log_probs(logits_processor(no_tokens, scores)).view(rows, width, vocab)
        sequences = history()
        for processor, values in per_prompt:
            processor.prompt_ignore_length = values.to(sequences.device)[history.prompts.to(sequences.device)]
        start = sequences.shape[1] - width + 1
        return torch.stack(
            [log_probs(logits_processor(sequences[:, : start + j], logits[:, j])) for j in range(width)], dim=1
        )

    log_probs_fn.reads_history = not position_free
    return log_probs_fn


def _processor_row_state(logits_processor) -> list[tuple[Any, torch.Tensor]]:
    """Processors holding one value per row of generate()'s batch (transformers 5.24's
    repetition penalty keeps each row's padding length), with those values."""
    return [
        (p, p.prompt_ignore_length)
        for p in logits_processor
        if isinstance(getattr(p, "prompt_ignore_length", None), torch.Tensor)
    ]


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
    smc_vocab=None,
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
    greedy = not generation_config.do_sample
    # A round drafts at most what some budget can keep (K = min(smc_gamma, tokens left)), so
    # a K beyond max_new_tokens changes nothing but what buffers and estimates would size.
    knobs = dict(smc_knobs, smc_gamma=min(smc_knobs["smc_gamma"], max_new_tokens))
    settings = SMCSettings(**_settings_kwargs(
        knobs, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=eos, pad_token_id=pad,
        num_return_sequences=num_return, greedy=greedy,
    ))
    _check_positions_fit(model, smc_draft, input_ids, attention_mask, max_new_tokens)
    if greedy or settings.mode != "smc":  # exact rounds roll caches back: sliding windows must hold it all
        longest = prompt_length + max_new_tokens + settings.max_gamma + 1
        for name, m in (("model", model), ("assistant_model", smc_draft)):
            if isinstance(m, torch.nn.Module):
                compat.check_rollback_fits(m, longest, name)
    _check_memory(model, smc_draft, input_ids, settings, smc_knobs, smc_vocab)
    draft_temperature = settings.proposal_temperature
    draft_log_probs = (
        processed_log_probs(_draft_processors(logits_processor, draft_temperature), prompt_stride=num_return)
        if smc_knobs["smc_draft_processors"]
        else None  # temperature only: the draft's support then covers the target's
    )
    if streamer is not None:
        if input_ids.shape[0] != 1:
            raise ValueError(f"streamer works with one prompt at a time (as in transformers); got {input_ids.shape[0]}.")
        streamer.streamer.put(input_ids.cpu())  # the prompt first, as transformers does
    distributed.prepare(model, smc_draft)  # tensor parallel: same generator state on every rank
    runner_options = dict(static=smc_knobs["static"], compile=smc_knobs["smc_compile"],
                          max_length=prompt_length + max_new_tokens + 2 * (settings.max_gamma + 1))
    # The loop points per-row processor state at its particle rows; the scores pass below (one
    # row per returned sequence) and a processor the caller reuses need the rows generate() set.
    row_state = _processor_row_state(logits_processor)
    try:
        result = smc_sample(
            make_runner(model, smc_vocab, **runner_options),
            make_runner(smc_draft, smc_vocab, **runner_options),
            input_ids,
            attention_mask,
            settings,
            target_log_probs=processed_log_probs(logits_processor, prompt_stride=num_return),
            draft_log_probs=draft_log_probs,
            stop_fn=stopping_fn(stopping_criteria),
            stream=streamer.put if streamer is not None else None,
        )
    finally:
        for processor, value in row_state:
            processor.prompt_ignore_length = value
    if result.gamma_reached is not None and settings.gamma_schedule == "heuristic":
        # As transformers does at the end of assisted generation: the next call starts there.
        config = getattr(smc_draft, "generation_config", None)
        if config is not None:
            config.num_assistant_tokens = result.gamma_reached
    if streamer is not None:  # the rest of the returned particle (the caller ends the stream)
        chosen = int(result.chosen[0, 0])
        streamer.put(result.tokens[0, chosen, streamer.count : result.lengths[0, chosen]])
    output = _to_output(input_ids, result, pad, generation_config.return_dict_in_generate)
    if generation_config.return_dict_in_generate and (generation_config.output_scores or generation_config.output_logits):
        _add_returned_scores(output, model, input_ids, attention_mask, logits_processor, generation_config, smc_vocab)
    return output


def _add_returned_scores(output, model, prompts, prompt_mask, logits_processor, generation_config, vocab_size):
    """`scores` / `logits` of the returned sequences, as transformers' sampling returns them:
    per new position, the target's raw logits and the processed scores (the distribution the
    target defines there). SMC-SD's own forwards ran on particles, blocks at a time, so they
    are recomputed here by one forward of the target over the returned sequences (about the
    cost of a prefill). With padded vocabularies they cover the shared ids only."""
    if not isinstance(model, torch.nn.Module):
        warnings.warn(
            "output_scores / output_logits: this target is not a transformers model, so SMC-SD cannot "
            "recompute them; the output's fields are None.",
            UserWarning,
            stacklevel=2,
        )
        return
    sequences = output.sequences
    rows, prompt_length = sequences.shape[0], prompts.shape[1]
    new = sequences.shape[1] - prompt_length
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompts)
    per_row = rows // prompt_mask.shape[0]  # num_return_sequences, prompt-major
    # The last token is not fed (as in sampling): a learned position table need not hold it.
    mask = torch.cat([prompt_mask.repeat_interleave(per_row, dim=0), prompt_mask.new_ones(rows, new - 1)], dim=1)
    kwargs = {"attention_mask": mask, "use_cache": False}
    parameters = inspect.signature(model.forward).parameters
    if "position_ids" in parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding, as generate() does
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = new  # not the prompt's: [rows, prompt, V] can be large
    with torch.no_grad():
        logits = model(input_ids=sequences[:, :-1], **kwargs).logits[:, -new:].float()
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if generation_config.output_logits:
        output.logits = tuple(logits[:, j] for j in range(new))
    if generation_config.output_scores:
        output.scores = tuple(
            logits_processor(sequences[:, : prompt_length + j], logits[:, j].clone()) for j in range(new)
        )


def _check_positions_fit(target, draft, input_ids, attention_mask, max_new_tokens: int) -> None:
    """A model with a learned position table (GPT-2, OPT) embeds a fixed number of positions:
    a prompt of L real tokens and its first max_new_tokens - 1 new ones (the last one is never
    fed) must fit. Stock generate() would fail there too, but deep inside the model."""
    limits = [(name, m, compat.learned_position_limit(m)) for name, m in (("model", target), ("assistant_model", draft))]
    limits = [(name, m, limit) for name, m, limit in limits if limit is not None]
    if not limits:
        return
    longest = int(attention_mask.sum(-1).max()) if attention_mask is not None else input_ids.shape[1]
    need = longest + max_new_tokens - 1
    for name, m, limit in limits:
        if need > limit:
            raise ValueError(
                f"{name} ({type(m).__name__}) has learned absolute positions and holds {limit} of them, but this "
                f"request feeds {need}: the longest prompt has {longest} tokens, plus max_new_tokens={max_new_tokens} "
                f"minus 1. Lower max_new_tokens to at most {limit - longest + 1} (or shorten the prompt)."
            )


def _check_memory(target, draft, input_ids, settings: SMCSettings, knobs: dict, vocab_size) -> None:
    """Refuse a request that would not fit before the runners allocate (`hf_smcsd.memory`);
    the exact modes also hold one round of draft distributions."""
    memory.check_fits(
        target, draft, prompts=input_ids.shape[0], prompt_length=input_ids.shape[1], particles=settings.particles,
        max_new_tokens=settings.max_new_tokens, gamma=settings.max_gamma,
        exact_mode=settings.greedy or settings.mode != "smc", vocab_size=vocab_size,
    )


def make_runner(model, vocab_size: int | None = None, static: bool = False, compile: bool | None = None,
                max_length: int | None = None):
    """The backend for a model: an object that brings its own runner (e.g. a compiled
    engine) says so with a `smc_runner()` method; a transformers model gets the eager one,
    or with `static` the static one (compiled when `compile`, or on CUDA when it is None).
    With `vocab_size`, its logits are cut to the ids both models share (padded widths)."""
    factory = getattr(model, "smc_runner", None)
    if callable(factory):
        runner = factory()
    elif static:
        from .runners.static import StaticRunner

        compile = compat.input_device(model).type == "cuda" if compile is None else bool(compile)
        runner = StaticRunner(model, max_length=max_length, compile=compile)
    else:
        runner = EagerRunner(model)
    if vocab_size is not None and vocab_size < runner.vocab_size:
        runner = SharedVocabulary(runner, vocab_size)
    return distributed.lockstep(model, runner)  # tensor parallel: every call checked across ranks


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
        num_dead_redos=result.num_dead_redos,
        num_rounds=result.num_rounds,
        round_modes=result.round_modes,
        num_smc_rounds=result.num_smc_rounds,
        num_exact_rounds=result.num_exact_rounds,
        smc_tokens=result.smc_tokens,
        exact_tokens=result.exact_tokens,
        accepted_draft_tokens=result.accepted,
        num_plain_rounds=result.num_plain_rounds,
        plain_tokens=result.plain_tokens,
        round_plans=result.round_plans,
        num_assistant_tokens=result.gamma_reached,
    )
