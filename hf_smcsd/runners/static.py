"""The static runner: preallocated KV tensors written in place, and optionally compiled steps.

Same contract as the eager runner (`base.Runner`), but the cache never reallocates on the hot
path. Every layer owns two tensors `[rows, kv_heads, capacity, head_dim]`, taken once at
prefill from a process-wide pool (the next generate() of the same shape gets them back). Each row has its own write cursor: a row's real tokens live in the contiguous slots
`[start[r], cursor[r])` (`start` skips the row's left padding), so

- `extend` writes the k new keys and values of every row at `cursor[r] .. cursor[r]+k-1`
  (a scatter), with position ids `cursor[r] - start[r] + j`, and attends through a per-row
  4D mask (`start[r] <= slot <= query slot`, and inside the window on sliding layers);
- `rollback` moves cursors back (the stale slots are masked, then overwritten);
- `reorder` copies the slots of the dying rows only, in place;
- `keep` compacts the kept rows to the front; the physical row count shrinks by halves (a
  smaller bucket) once half of it is unused, and the rows beyond the live ones are inert
  (never advanced, never returned).

Nothing in `extend`, `reorder`, `rollback` or `keep` reads a device value back: the host
tracks an upper bound of the longest row (prompt width plus every token fed) and attends to
the first `L` slots only, `L` rounded up to a power of two. When the bound would cross into
the next `L` (exact-mode rollbacks make it loose), one `cursor.max()` tightens it.

Compiled steps (`compile=True`): the forward, mask construction included, goes through
`torch.compile` (mode "reduce-overhead" on CUDA, i.e. CUDA graphs). Shapes only change with
the number of new tokens (1 or 2 for the draft, K or K+1 for the verify), the row bucket and
the `L` bucket; shapes turn dynamic after their first change, so a model compiles about three
graphs for the whole process, whatever the grid of N, K and batch sizes; the prefill runs
uncompiled.

The model runs its own transformers forward on a `Cache` of this module's kind, with the
mask passed ready-made (4D, additive), so any family whose attention reads keys and values
through the cache and whose positions come from `position_ids` works: the zoo families
except Falcon with ALiBi, which rebuilds its bias from a 2D mask.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Callable, NamedTuple

import torch
from transformers.cache_utils import Cache

from .. import compat
from ..resampling import CopyPlan

MIN_LENGTH_BUCKET = 64  # the smallest attended length; buckets then double
# Buffers hold one slot more than the capacity, never attended: the attended length is then
# always a strict slice of the buffer, and compiled code need not specialise on `L == size`.
_SPARE_SLOTS = 1
# Model types whose attention cannot take a ready-made 4D mask (ALiBi is rebuilt from 2D).
_NEEDS_2D_MASK = {"bloom", "mpt"}


def length_bucket(length: int, capacity: int) -> int:
    """The attended length for rows of up to `length` slots: a power of two (at least
    `MIN_LENGTH_BUCKET`), capped at the capacity."""
    bucket = MIN_LENGTH_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, capacity)


class _SlotLayer:
    """One layer's preallocated keys and values (allocated on the first write, where and in
    the dtype the model computes them)."""

    is_compileable = True
    is_sliding = False

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False

    def get_seq_length(self) -> int:
        return 0


class SlotCache(Cache):
    """A transformers `Cache` whose rows each write at their own slots.

    The runner sets `slots` `[rows, k]` (where this forward's tokens go) and `kv_index`
    (`arange(length)`, the slots to attend) before each forward; `update` scatters the new
    keys and values there and returns the first `length` slots.
    """

    def __init__(self, num_layers: int, rows: int, capacity: int):
        super().__init__(layers=[_SlotLayer() for _ in range(num_layers)])
        self.physical_rows = rows
        self.capacity = capacity
        self.length = capacity  # host copy of len(kv_index)
        self.slots: torch.Tensor | None = None
        self.kv_index: torch.Tensor | None = None
        self._held: list[torch.Tensor] = []  # taken from the pool; given back when this cache goes
        weakref.finalize(self, _POOL.give, self._held)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            self._allocate(layer, key_states, value_states)
        rows, length = key_states.shape[0], self.kv_index.shape[0]  # shapes, not attributes: no recompiles
        keys, values = layer.keys[:rows], layer.values[:rows]
        index = self.slots[:, None, :, None]
        keys.scatter_(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]), key_states.to(keys.dtype))
        values.scatter_(2, index.expand(-1, values.shape[1], -1, values.shape[3]), value_states.to(values.dtype))
        return keys[:, :, :length], values[:, :, :length]

    def _allocate(self, layer, key_states, value_states) -> None:
        def buffer(states):
            shape = (self.physical_rows, states.shape[1], self.capacity + _SPARE_SLOTS, states.shape[3])
            return self._take(shape, states)

        layer.keys, layer.values = buffer(key_states), buffer(value_states)
        layer.is_initialized = True

    def _take(self, shape, like: torch.Tensor) -> torch.Tensor:
        tensor = _POOL.take(tuple(shape), like.dtype, like.device)
        self._held.append(tensor)
        return tensor

    def buffers(self):
        for layer in self.layers:
            if layer.is_initialized:
                yield layer.keys
                yield layer.values

    def resize(self, rows: int, capacity: int) -> None:
        """Move every layer to buffers of `rows` x `capacity` (a smaller row bucket, a longer
        capacity), keeping the first rows and slots; the old buffers go back to the pool."""
        keep_rows, keep_slots = min(rows, self.physical_rows), min(capacity, self.capacity)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = self._take((rows, old.shape[1], capacity + _SPARE_SLOTS, old.shape[3]), old)
                new[:keep_rows, :, :keep_slots] = old[:keep_rows, :, :keep_slots]
                setattr(layer, name, new)
                self._held[:] = [t for t in self._held if t is not old]
                _POOL.give([old])
        self.physical_rows, self.capacity = rows, capacity

    # What transformers may ask a cache; positions and masks never come from here.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs):
        return self.length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def max_batch_size(self) -> int:
        return self.physical_rows

    @property
    def max_cache_len(self) -> int:
        return self.capacity


class _BufferPool:
    """Free KV buffers by (shape, dtype, device), for every static runner of the process.

    A cache takes its buffers at prefill and gives them back when it is dropped (or trades
    them for another size), so the next generate() of the same shape writes into the same
    tensors: CUDA graphs recorded on them replay instead of being captured again. Like
    transformers' own static cache, the memory stays reserved: `release_buffers()` frees it.
    """

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        stack = self.free.get((shape, dtype, device))
        if stack:
            return stack.pop()  # stale contents are harmless: every slot is written before it is unmasked
        with torch.inference_mode(False):  # reusable outside inference mode too (in-place writes)
            tensor = torch.zeros(shape, dtype=dtype, device=device)
        _mark_static(tensor)
        return tensor

    def give(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)


_POOL = _BufferPool()


def release_buffers() -> None:
    """Free the KV buffers that finished static runners left for reuse."""
    _POOL.free.clear()


def _mark_static(*tensors) -> None:
    # A fixed address lets CUDA graphs write into the buffers instead of copying them.
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


def _is_left_padded(mask: torch.Tensor) -> bool:
    """True when every row is zeros then ones (its real tokens are contiguous at the end)."""
    return bool((mask[:, 1:] >= mask[:, :-1]).all()) and bool(mask[:, -1].all())


class StaticRunner:
    """A transformers causal LM on preallocated per-row KV slots; see the module docstring.

    `max_length` (slots per row: prompt width plus every token the row will be fed) sizes
    the buffers once; without it they start at the prompt plus 64. Either way they double
    (a copy, and new graphs when compiled) if a row ever needs more.
    `compile=True` compiles the fixed-shape steps (`compile_mode` defaults to
    "reduce-overhead" on CUDA, inductor's default elsewhere).
    """

    def __init__(self, model, max_length: int | None = None, compile: bool = False, compile_mode: str | None = None):
        compat.check_supported_model(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_type = getattr(config, "model_type", "")
        if getattr(config, "alibi", False) or model_type in _NEEDS_2D_MASK:
            raise ValueError(
                f"The static runner does not support {type(model).__name__} with ALiBi (model_type={model_type!r}): "
                "it builds its position bias from a 2D mask. Drop cache_implementation='static' to use the eager runner."
            )
        attn = getattr(config, "_attn_implementation", None) or "sdpa"
        if attn not in ("eager", "sdpa"):
            raise ValueError(
                f"The static runner passes a ready-made 4D mask, which attn_implementation={attn!r} cannot take: "
                "load the model with attn_implementation='sdpa' (or 'eager'), or drop cache_implementation='static'."
            )
        self.model = model
        self.vocab_size = compat.output_vocab_size(model)
        self.input_device = compat.input_device(model)
        self.max_length = max_length
        self._spec = _ForwardSpec.of(model, config)
        self._num_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer"))
        self.compiled = bool(compile)
        if compile_mode is None:
            compile_mode = "reduce-overhead" if self.input_device.type == "cuda" else "default"
        self._compile_mode = compile_mode
        self._slot_index: torch.Tensor | None = None  # arange(capacity), sliced: no arange per step
        self.cache: SlotCache | None = None
        self.start: torch.Tensor | None = None  # [physical rows] first slot of each row's real tokens
        self.cursor: torch.Tensor | None = None  # [physical rows] next free slot
        self.live = 0  # rows the loop sees; physical rows beyond them are inert
        self.bound = 0  # host-side upper bound of max(cursor)

    @torch.no_grad()
    def _forward(self, input_ids, compiled: bool, last_only: bool = False) -> torch.Tensor:
        k = input_ids.shape[1]
        self.cache.slots = self.cursor.unsqueeze(1) + self._slot_index[:k]  # where each row's new tokens go
        self.cache.kv_index = self._slot_index[: self.cache.length]
        if compiled:
            if self.input_device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            logits = _compiled_step(self._compile_mode)(self._spec, self.model, self.cache, input_ids, self.start)
            return logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        return _step(self._spec, self.model, self.cache, input_ids, self.start, last_only).float()

    # --- the Runner interface ---

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, particles: int) -> torch.Tensor:
        out_device = input_ids.device
        prompts, width = input_ids.shape
        mask = attention_mask.to(self.input_device, torch.long)
        if not _is_left_padded(mask):
            raise ValueError(
                "The static runner needs left-padded prompts (each row: padding, then its tokens): "
                "use a tokenizer with padding_side='left', or drop cache_implementation='static'."
            )
        rows = prompts * particles
        capacity = max(self.max_length or width + MIN_LENGTH_BUCKET, width + 1)
        self.cache = SlotCache(self._num_layers, rows, capacity)
        self.start = (width - mask.sum(-1)).to(torch.long)
        self.cursor = torch.zeros(prompts, dtype=torch.long, device=self.input_device)
        self.cache.length = length_bucket(width, capacity)
        self._slot_index = torch.arange(capacity, device=self.input_device)
        # The prompt runs once per prompt (uncompiled: its shape is the prompt's), then its
        # slots are copied to the prompt's N rows.
        logits = self._forward(input_ids.to(self.input_device), compiled=False, last_only=True)[:, -1]
        for buffer in self.cache.buffers():
            buffer[:rows, :, :width] = buffer[:prompts, :, :width].repeat_interleave(particles, dim=0)
        self.start = self.start.repeat_interleave(particles)
        self.cursor = torch.full((rows,), width, dtype=torch.long, device=self.input_device)
        self.live, self.bound = rows, width
        return logits.to(out_device)

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        live, k = tokens.shape
        rows = self.cache.physical_rows
        self._make_room(k)
        ids = tokens.to(self.input_device).contiguous()  # a slice's strides would be guarded on: recompiles
        if rows > live:  # inert rows: any token, never advanced, never returned
            ids = torch.cat([ids, ids.new_zeros(rows - live, k)])
        logits = self._forward(ids, compiled=self.compiled)[:live]
        if rows > live:
            self.cursor[:live] += k
        else:
            self.cursor += k
        self.bound += k
        return logits.to(tokens.device)

    def reorder(self, plan: CopyPlan) -> None:
        if len(plan) == 0:
            return
        dest, src = plan.dest.to(self.input_device), plan.src.to(self.input_device)
        for buffer in self.cache.buffers():
            used = buffer[:, :, : self.cache.length]  # slots past L hold nothing a row can see
            used.index_copy_(0, dest, used.index_select(0, src))
        for state in (self.start, self.cursor):
            state.index_copy_(0, dest, state.index_select(0, src))

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.input_device)
        live = rows.shape[0]
        for buffer in self.cache.buffers():
            used = buffer[:, :, : self.cache.length]
            used[:live] = used.index_select(0, rows)
        for state in (self.start, self.cursor):
            state[:live] = state.index_select(0, rows)
            state[live:] = 0  # inert rows write at slot 0 and see only themselves
        physical = self.cache.physical_rows
        while physical > 1 and live <= physical // 2:
            physical //= 2
        if physical < self.cache.physical_rows:
            self.cache.resize(physical, self.cache.capacity)
            self.start, self.cursor = self.start[:physical].clone(), self.cursor[:physical].clone()
        self.live = live

    def rollback(self, drop: torch.Tensor) -> None:
        self.cursor[: self.live] -= drop.to(self.input_device, torch.long)

    # --- lengths, on the host ---

    def _make_room(self, k: int) -> None:
        """Make sure the first `cache.length` slots hold every row after k more tokens."""
        needed = self.bound + k
        if needed <= self.cache.length:
            return
        # The bound is loose after rollbacks: read the real longest row once before growing.
        self.bound = int(self.cursor.max())
        needed = self.bound + k
        if needed > self.cache.capacity:
            self._grow(max(needed, 2 * self.cache.capacity))
        if needed > self.cache.length:
            self.cache.length = length_bucket(needed, self.cache.capacity)

    def _grow(self, capacity: int) -> None:
        self.cache.resize(self.cache.physical_rows, capacity)
        self._slot_index = torch.arange(capacity, device=self.input_device)


class _ForwardSpec(NamedTuple):
    """What `_step` needs to know about a model, as constants (compiled code guards on them)."""

    mask_kinds: tuple[tuple[str, bool], ...]
    window: int | None
    mask_dtype: torch.dtype
    cache_argument: str
    takes_position_ids: bool
    takes_cache_position: bool
    takes_logits_to_keep: bool
    position_limit: int | None  # learned position tables: see EagerRunner

    @classmethod
    def of(cls, model, config) -> _ForwardSpec:
        parameters = inspect.signature(model.forward).parameters
        window = getattr(config, "sliding_window", None)
        return cls(
            mask_kinds=_mask_kinds(config),
            window=int(window) if window else None,
            mask_dtype=next(model.parameters()).dtype,
            # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
            cache_argument="cache" if "cache" in parameters else "past_key_values",
            takes_position_ids="position_ids" in parameters,
            takes_cache_position="cache_position" in parameters,  # 4.57: spares a get_seq_length()
            takes_logits_to_keep="logits_to_keep" in parameters,
            position_limit=compat.learned_position_limit(model),
        )


def _step(spec: _ForwardSpec, model, cache: SlotCache, input_ids, start, last_only: bool = False):
    """One forward of `input_ids` `[rows, k]` written at `cache.slots`: positions and the
    per-row 4D masks come from the slots and each row's `start`. Module level, with the
    runner's state as arguments, so that every runner of a model shares its compiled code."""
    slots, kv = cache.slots, cache.kv_index
    positions = (slots - start.unsqueeze(1)).clamp(min=0)
    if spec.position_limit is not None:  # rows fed past their budget (see EagerRunner)
        positions = positions.clamp(max=spec.position_limit - 1)
    query = slots.unsqueeze(2)  # [rows, k, 1]
    allowed = (kv >= start[:, None, None]) & (kv <= query)
    blocked = torch.finfo(spec.mask_dtype).min
    masks = {}
    for kind, sliding in spec.mask_kinds:
        ok = allowed & (query - kv < spec.window) if sliding else allowed
        additive = torch.zeros(ok.shape, dtype=spec.mask_dtype, device=ok.device).masked_fill(~ok, blocked)
        masks[kind] = additive[:, None]  # [rows, 1, k, length]
    kwargs = {"attention_mask": masks[""] if "" in masks else masks, spec.cache_argument: cache, "use_cache": True}
    if spec.takes_position_ids:
        kwargs["position_ids"] = positions
    if spec.takes_cache_position:
        kwargs["cache_position"] = slots[0]
    if last_only and spec.takes_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **kwargs).logits


_COMPILED: dict[str, Callable] = {}


def _compiled_step(mode: str) -> Callable:
    """`_step` through torch.compile, one per mode for the whole process. Shapes become
    dynamic after their first change (rows, new tokens, attended length), so a model compiles
    about three graphs: its first shape, single-token steps (torch specialises sizes of 1) and
    a general one. CUDA graphs are still recorded per shape: a capture, not a compile."""
    if mode not in _COMPILED:
        config = torch._dynamo.config
        # Target and draft (and each family) add their own graphs to the same function.
        if getattr(config, "recompile_limit", 64) < 64:
            config.recompile_limit = 64
        _COMPILED[mode] = torch.compile(_step, mode=mode, dynamic=True)
    return _COMPILED[mode]


def _mask_kinds(config) -> tuple[tuple[str, bool], ...]:
    """The 4D masks the model takes, as (layer type, sliding) pairs. Models with sliding
    layers among full ones (Gemma 2/3, Qwen 2/3 with windows) take a {layer type: mask}
    dict; the others take one mask for every layer: sliding when the config has a window
    and no layer types (Mistral, Phi-3 with a window), else full."""
    layer_types = list(getattr(config, "layer_types", None) or ())
    if "sliding_attention" in layer_types:
        return tuple((kind, kind == "sliding_attention") for kind in sorted(set(layer_types)))
    sliding = bool(getattr(config, "sliding_window", None)) and not layer_types
    return (("", sliding),)
