"""The few places where transformers 4.57 and 5.x differ, for what this package touches.

- Both versions keep a `DynamicCache` as a list of `layers` with `keys` / `values`
  `[batch, kv_heads, length, head_dim]`; older caches only offer `reorder_cache`.
- `cache_position` is an input in 4.57 and gone in 5.x; neither needs it from us: 4.57
  derives it from the cache length, which is the same for every row here because caches
  only grow, in lockstep, and are never cropped (so the 5.x change of `crop` semantics
  never matters either).
- Both apply `top_k=50` when sampling unless the user sets `top_k` (4.57 as a config
  default, 5.x at generate() time); it reaches SMC-SD as a target warper like any other.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
IS_TRANSFORMERS_5 = TRANSFORMERS_VERSION.major >= 5


def output_vocab_size(model) -> int:
    """Width of the model's logits (the LM head), which is what must match between models."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def copy_cache_rows(cache, dest: torch.Tensor, src: torch.Tensor, total_rows: int) -> None:
    """`cache[dest] <- cache[src]` on the batch axis, writing only the `dest` rows."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        # A cache without per-layer tensors: fall back to its full reorder (copies every row).
        ancestors = torch.arange(total_rows, device=dest.device)
        ancestors[dest] = src
        cache.reorder_cache(ancestors)
        return
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            # Layers may sit on different devices under an accelerate device map.
            d, s = dest.to(tensor.device), src.to(tensor.device)
            tensor.index_copy_(0, d, tensor.index_select(0, s))


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
