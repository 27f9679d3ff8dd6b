"""The few places where transformers 4.57 and 5.x differ, for what this package touches.

- Both versions keep a `DynamicCache` as a list of `layers` with `keys` / `values`
  `[batch, kv_heads, length, head_dim]`; older caches only offer `reorder_cache`.
- `cache_position` is an input in 4.57 and gone in 5.x; neither needs it from us: 4.57
  derives it from the cache length, which is the same for every row here because caches
  only grow, in lockstep, and are never cropped (so the 5.x change of `crop` semantics
  never matters either).
- Both apply `top_k=50` when sampling unless the user sets `top_k` (4.57 as a config
  default, 5.x at generate() time); it reaches SMC-SD as a target warper like any other.
- Sliding-window layers (Mistral, Gemma 2 / 3) are `DynamicSlidingWindowLayer`s in both:
  they keep the last `window - 1` positions, the same count for every row, so rows copy as
  plainly as full-attention layers.
- 5.24 renamed the forward's `past_key_values` argument (and the outputs' field) to `cache`,
  warning on the old name until 5.40 removes it: `cache_kwarg` names what the installed
  forward takes, `output_cache` reads it back, `passed_cache` finds a cache a caller gave
  generate() under any of the names.
- Also here: where a model's inputs go under an accelerate device map (`input_device`),
  per-device cache row copies (`copy_cache_rows`, `select_cache_rows`), and which models
  and caches the runner accepts (`check_supported_model`, `check_supported_cache`).
"""

from __future__ import annotations

import inspect
import weakref

import torch
import transformers
from packaging.version import Version

from .families import REJECTED

TRANSFORMERS_VERSION = Version(transformers.__version__)
IS_TRANSFORMERS_5 = TRANSFORMERS_VERSION.major >= 5
_RENAMED_CACHE = TRANSFORMERS_VERSION >= Version("5.24.0.dev0")


# Names a caller may give generate() a cache under (newest first); 5.24 renamed the first two.
CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


# forward function -> the cache argument's name. Keyed on the function, not the model: a bound
# method's `__func__` is the class's forward, shared by every instance (and every deepcopy) of a
# class, while a forward replaced on one instance (accelerate's hooks, a user's wrapper) is its
# own key. Weak keys, so a dropped wrapper does not stay alive here.
_CACHE_KWARG_BY_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_kwarg(model) -> str:
    """The name the installed forward takes its KV cache under: `cache` (transformers >= 5.24)
    or `past_key_values`. Read from the signature, so remote-code models that still use the
    old name keep working. The signature is read once per forward function: `inspect.signature`
    on every forward call cost about 3% of an exact-mode run."""
    forward = model.forward
    key = getattr(forward, "__func__", forward)
    try:
        return _CACHE_KWARG_BY_FORWARD[key]
    except KeyError:
        pass
    except TypeError:  # a forward that cannot be weakly referenced: read it every time
        return _cache_kwarg_of(forward)
    name = _CACHE_KWARG_BY_FORWARD[key] = _cache_kwarg_of(forward)
    return name


def _cache_kwarg_of(forward) -> str:
    parameters = inspect.signature(forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    return "cache" if _RENAMED_CACHE else "past_key_values"  # a forward(**kwargs): the current name


def output_cache(output):
    """The cache a forward returned, read under the field name its output class declares
    (reading the old name on 5.24+ goes through a deprecation shim)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def passed_cache(kwargs: dict):
    """A cache the caller passed to generate(), under any name it accepts (or None)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_vocab_size(model) -> int:
    """Width of the model's logits (the LM head), which is what must match between models."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def copy_cache_rows(cache, dest: torch.Tensor, src: torch.Tensor, total_rows: int, tail: int | None = None) -> None:
    """`cache[dest] <- cache[src]` on the batch axis, writing only the `dest` rows (only
    their last `tail` positions when `tail` is given: the rows agree before them).

    Plain attention layers (full or sliding window) are copied tensor by tensor, each on its
    own device (an accelerate device map may spread layers over several). A layer that keeps
    more per-row state than keys and values (e.g. the indexer keys of sparse-attention
    layers) uses its own `reorder_cache`, which gathers every row.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        # A cache without per-layer tensors: fall back to its full reorder (copies every row).
        cache.reorder_cache(_ancestors(dest, src, total_rows))
        return
    for layer in layers:
        kind = type(layer).__name__
        if kind == "DummyLayer":  # a layer that shares another layer's KV: nothing of its own
            continue
        if kind not in _PLAIN_KV_LAYERS:
            device = _layer_device(layer) or dest.device
            layer.reorder_cache(_ancestors(dest, src, total_rows).to(device))
            continue
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            d, s = dest.to(tensor.device), src.to(tensor.device)
            if tail is not None and 0 < tail < tensor.shape[2]:
                window = tensor[:, :, -tail:]  # a view: index_copy_ writes through to the cache
                window.index_copy_(0, d, window.index_select(0, s))
            else:
                tensor.index_copy_(0, d, tensor.index_select(0, s))


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep only `rows` of the cache, in that order, each layer on its own device."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        cache.batch_select_indices(rows)
        return
    for layer in layers:
        device = _layer_device(layer)
        layer.batch_select_indices(rows.to(device) if device is not None else rows)


def _ancestors(dest: torch.Tensor, src: torch.Tensor, total_rows: int) -> torch.Tensor:
    ancestors = torch.arange(total_rows, device=dest.device)
    ancestors[dest] = src
    return ancestors


def _layer_device(layer):
    keys = getattr(layer, "keys", None)
    return keys.device if isinstance(keys, torch.Tensor) else None


def input_device(model) -> torch.device:
    """Where the model's input ids must go: the device its embedding runs on.

    Under an accelerate device map the embedding's weights may be offloaded (to the CPU or
    to disk, then they sit on the `meta` device) and are brought to the hook's execution
    device for each forward, so that device is the one that counts.
    """
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    return torch.device(model.device)


# --- Which models and caches the eager runner can drive. ---

# Cache layers that hold exactly `keys` / `values` `[rows, kv_heads, length, head_dim]` and
# one length for all rows (the sliding window layer keeps the last `window - 1` positions,
# the same for every row since all rows grow in lockstep). Anything else is either
# refused (`check_supported_cache`) or copied by its own `reorder_cache`.
_PLAIN_KV_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")
_OTHER_SUPPORTED_LAYERS = ("DynamicIndexedLayer", "DummyLayer")
# Layer types (config.layer_types) with a recurrent or convolutional state.
_STATEFUL_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "recurrent")

_FIX = (
    "Use an attention-only model (see the supported families in hf_smcsd.families.SUPPORTED and the README), "
    "or generate without smc_particles."
)


def _model_type(model) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _configs(model):
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            text = get_text_config(decoder=True)
        except TypeError:
            text = get_text_config()
        if text is not None and text is not config:
            configs.append(text)
    return configs


def check_supported_model(model) -> None:
    """Raise a ValueError naming the model type if SMC-SD cannot run this model.

    SMC-SD copies each particle's cache rows on resampling. Models with a recurrent state
    (Mamba / state-space layers, linear attention, RG-LRU, short convolutions; hybrids that
    mix them with attention) keep it in caches whose rows the runner cannot copy, so they
    are refused: transformers flags most of them `_is_stateful`, the rest are listed in
    `hf_smcsd.families.REJECTED` or recognised by their `layer_types`.
    """

    config = getattr(model, "config", None)
    model_type = _model_type(model)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} (model_type={model_type!r}) is an encoder-decoder model; SMC-SD supports decoder-only "
            "causal LMs (AutoModelForCausalLM). Use a decoder-only target and draft."
        )
    types = {_model_type(model)} | {str(getattr(c, "model_type", "")) for c in _configs(model)}
    rejected = sorted(t for t in types if t in REJECTED)
    if rejected:
        raise ValueError(
            f"SMC-SD does not support {name} (model_type={rejected[0]!r}): this family {REJECTED[rejected[0]]}. "
            + _FIX
        )
    if getattr(model, "_is_stateful", False):
        raise ValueError(
            f"SMC-SD does not support {name} (model_type={model_type!r}): transformers marks it stateful "
            "(a recurrent or hybrid cache), whose per-particle state the SMC-SD runner cannot copy. " + _FIX
        )
    for c in _configs(model):
        layer_types = getattr(c, "layer_types", None) or ()
        stateful = sorted({str(t) for t in layer_types} & set(_STATEFUL_LAYER_TYPES))
        if stateful:
            raise ValueError(
                f"SMC-SD does not support {name} (model_type={model_type!r}): it has {', '.join(stateful)} "
                "layers, whose recurrent state the SMC-SD runner cannot copy per particle. " + _FIX
            )


def check_supported_cache(cache, model) -> None:
    """Raise a ValueError if the cache a prefill produced is not one the runner can expand,
    extend, copy and shrink row by row (a `DynamicCache` of attention layers)."""
    model_type, name = _model_type(model), type(model).__name__
    cache_class = type(cache).__name__
    if cache_class != "DynamicCache" or getattr(cache, "layers", None) is None:
        raise ValueError(
            f"SMC-SD does not support {name} (model_type={model_type!r}): its forward returned a "
            f"{cache_class}, but the SMC-SD runner needs a DynamicCache of attention layers to copy per "
            "particle. " + _FIX
        )
    odd = sorted(
        {type(layer).__name__ for layer in cache.layers} - set(_PLAIN_KV_LAYERS) - set(_OTHER_SUPPORTED_LAYERS)
    )
    if odd:
        raise ValueError(
            f"SMC-SD does not support {name} (model_type={model_type!r}): its cache has {', '.join(odd)} "
            "layers, which the SMC-SD runner cannot copy per particle. " + _FIX
        )


STATIC_CACHE_IMPLEMENTATIONS = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked", "mamba")


def is_static_cache(cache) -> bool:
    """True for caches of fixed size (which cannot be expanded to N rows per prompt)."""
    if cache is None:
        return False
    names = {cls.__name__ for cls in type(cache).__mro__}
    if names & {"StaticCache", "HybridCache", "SlidingWindowCache", "HybridChunkedCache", "OffloadedStaticCache"}:
        return True
    layers = getattr(cache, "layers", None) or []
    return any("Static" in type(layer).__name__ for layer in layers)


# --- Rows of different lengths (exact mode): gathers along the time axis, sliding windows. ---


def gather_cache_positions(cache, order: torch.Tensor) -> None:
    """Rebuild every layer with `keys[r, :, t] <- keys[r, :, order[r, t]]` (the same for
    values): `order` `[rows, new_length]` picks, per row, which cache positions stay and in
    what order. Used to compact rows with masked holes."""
    for layer in getattr(cache, "layers", None) or ():
        kind = type(layer).__name__
        if kind == "DummyLayer":
            continue
        if kind not in _PLAIN_KV_LAYERS:
            raise ValueError(
                f"smc_mode with exact rounds cannot roll back a {kind} cache layer (it keeps more per-position "
                "state than keys and values). Use smc_mode='smc' with this model."
            )
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            index = order.to(tensor.device)[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            setattr(layer, name, tensor.gather(2, index))
        if hasattr(layer, "cumulative_length") and isinstance(getattr(layer, "keys", None), torch.Tensor):
            layer.cumulative_length = layer.keys.shape[-2]


def sliding_window(model) -> int | None:
    """The attention window of the model's sliding-window layers, or None if it has none."""
    for config in _configs(model):
        window = getattr(config, "sliding_window", None)
        if not window:
            continue
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            if any("sliding" in str(t) for t in layer_types):
                return int(window)
            continue
        if getattr(config, "use_sliding_window", True):
            return int(window)
    return None


def check_rollback_fits(model, length: int, name: str = "model") -> None:
    """Exact rounds roll caches back. A sliding-window layer forgets positions older than its
    window, so a rollback is only possible while every sequence fits in the window."""
    window = sliding_window(model)
    if window is not None and length > window - 1:
        raise ValueError(
            f"{name} has sliding-window attention (window {window}) and this request can reach {length} cached "
            f"positions (padded prompt + max_new_tokens + smc_gamma + 1). Exact rounds (smc_mode='exact', "
            "'mixed', 'auto', or do_sample=False) roll the cache back, which a sliding window cannot do past "
            f"its window. Shorten the prompt or max_new_tokens to fit {window - 1} positions, or use smc_mode='smc'."
        )


# --- Learned absolute positions (GPT-2, OPT, ...): a table with a fixed number of rows. ---

_POSITION_LIMIT_NAMES = ("n_positions", "max_position_embeddings")


def learned_position_limit(model) -> int | None:
    """How many positions a model with a learned position table can embed (position ids
    0 .. limit - 1), or None when its positions are computed (rotary, ALiBi) and any
    position id works. A table is any embedding besides the token embedding (GPT-2's `wpe`,
    OPT's `embed_positions`); its size is the config's `n_positions` /
    `max_position_embeddings` (OPT's table holds 2 rows more, for its offset)."""
    if not isinstance(model, torch.nn.Module):
        return None
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    tokens = get_input_embeddings() if callable(get_input_embeddings) else None
    if not any(isinstance(m, torch.nn.Embedding) and m is not tokens for m in model.modules()):
        return None
    for config in _configs(model):
        for name in _POSITION_LIMIT_NAMES:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None
