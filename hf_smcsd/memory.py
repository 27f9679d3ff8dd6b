"""What a request needs in memory, estimated before anything is allocated.

SMC-SD multiplies every prompt by N particles, in both models' KV caches. A request that
does not fit used to run for minutes and then die in the allocator (on a GPU, the
out-of-memory error users report most with speculative decoding). `check_fits` estimates
the request from the configs alone (instant) and refuses it with the figures and the knobs
that shrink it when it exceeds what the device has free.

What is counted (bytes):
- each model's KV cache: rows x positions x layers x 2 x kv_heads x head_dim x dtype size,
  rows = prompts x N, positions = prompt + max_new_tokens + K + 1 (a round may run past the
  budget); sliding-window layers hold at most their window;
- the logits of one round in float32: the target's [rows, K+1, V] and the draft's [rows, V]
  per step, each counted four times (logits as returned, a float32 copy, log-probabilities,
  a processed copy). On CPU, 2 prompts x N=128, 64 new tokens, V=32000: estimated 831 MiB;
  peak resident memory grew by 725 to 861 MiB over four runs (the SAFETY margin covers it);
- in the exact modes (`smc_mode` other than "smc"), the draft's distributions of one round,
  [rows, K, V] float32;
- the particles' token buffers, [rows, max_new_tokens] int64.

Free memory: CUDA's free memory on the device (`torch.cuda.mem_get_info`); on the CPU the
system's available memory (`MemAvailable`), lowered to a cgroup's or an address-space
limit's headroom when one is set. Models spread over several devices (an accelerate device
map) are not checked. `HF_SMCSD_MEMORY_CHECK=0` turns the check off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import compat

SAFETY = 0.9  # refuse above this fraction of the free memory: allocators fragment, kernels need workspace
GIB = 1024**3


class InsufficientMemoryError(MemoryError):
    """A request that would not fit in the device's free memory (raised before any work)."""


@dataclass
class Estimate:
    target_kv: int
    draft_kv: int
    working: int  # logits, distributions, token buffers
    rows: int
    positions: int

    @property
    def total(self) -> int:
        return self.target_kv + self.draft_kv + self.working


def _text_config(model):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config(decoder=True)
        except TypeError:
            return get_text_config()
    return config


def _kv_heads(config) -> int:
    for name in ("num_key_value_heads", "num_kv_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1  # Falcon's multi-query attention
    return int(config.num_attention_heads)


def _dtype_bytes(model) -> int:
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_row(model, positions: int) -> int:
    """Bytes of one row's KV cache holding `positions` tokens, from the model's config."""
    config = _text_config(model)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    layers = int(config.num_hidden_layers)
    layer_types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    held = [
        min(positions, int(window)) if window and kind == "sliding_attention" else positions
        for kind in (layer_types if len(layer_types) == layers else ["full_attention"] * layers)
    ]
    from .distributed import tp_size

    # A tensor-parallel model's cache holds this rank's heads only.
    return 2 * _kv_heads(config) * int(head_dim) * _dtype_bytes(model) * sum(held) // tp_size(model)


def estimate(target, draft, prompts: int, prompt_length: int, particles: int, max_new_tokens: int, gamma: int,
             exact_mode: bool = False, vocab_size: int | None = None) -> Estimate:
    rows = prompts * particles
    gamma = min(gamma, max_new_tokens)  # a round drafts at most what some budget can keep
    positions = prompt_length + max_new_tokens + gamma + 1
    vocab = vocab_size or compat.output_vocab_size(target)
    copies = 4  # logits as returned, in float32, as log-probabilities, processed (measured: see module doc)
    working = copies * 4 * rows * (gamma + 1) * vocab + copies * 4 * rows * vocab + 8 * rows * max_new_tokens
    if exact_mode:
        working += 4 * rows * gamma * vocab
    return Estimate(
        target_kv=rows * kv_bytes_per_row(target, positions),
        draft_kv=rows * kv_bytes_per_row(draft, positions),
        working=working,
        rows=rows,
        positions=positions,
    )


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_available_bytes() -> int | None:
    """Available system memory, lowered to a cgroup v2 limit's or RLIMIT_AS's headroom."""
    candidates = []
    try:
        import psutil  # optional

        candidates.append(int(psutil.virtual_memory().available))
    except ImportError:
        available = _meminfo("MemAvailable")
        if available is not None:
            candidates.append(available)
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        candidates.append(max(limit - used, 0))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            candidates.append(max(soft - virtual, 0))
    except (ImportError, OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def free_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (None when unknown: then nothing is checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return cpu_available_bytes()
    return None


def _single_device(model) -> torch.device | None:
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len({str(d) for d in device_map.values()}) > 1:
        return None  # spread over devices (or offloaded): not checked
    return compat.input_device(model)


def check_fits(target, draft, prompts: int, prompt_length: int, particles: int, max_new_tokens: int, gamma: int,
               exact_mode: bool = False, vocab_size: int | None = None) -> Estimate | None:
    """Raise InsufficientMemoryError if the request's estimate exceeds the free memory of the
    device the models run on. Returns the estimate (None when it is not checked)."""
    if os.environ.get("HF_SMCSD_MEMORY_CHECK", "1") == "0":
        return None
    if not all(isinstance(m, torch.nn.Module) and hasattr(m, "config") for m in (target, draft)):
        return None  # engines bring their own limits (checked against their build)
    devices = _single_device(target), _single_device(draft)
    if None in devices or devices[0] != devices[1]:
        return None
    need = estimate(target, draft, prompts, prompt_length, particles, max_new_tokens, gamma, exact_mode, vocab_size)
    free = free_bytes(devices[0])
    if free is None or need.total <= SAFETY * free:
        return need
    raise InsufficientMemoryError(
        f"This SMC-SD request needs about {need.total / GIB:.2f} GiB but {devices[0]} has {free / GIB:.2f} GiB free: "
        f"KV caches {need.target_kv / GIB:.2f} GiB (target) + {need.draft_kv / GIB:.2f} GiB (draft) for "
        f"{prompts} prompt(s) x {particles} particles = {need.rows} rows of up to {need.positions} positions, "
        f"plus {need.working / GIB:.2f} GiB of logits and buffers. Shrink it: fewer particles (smc_particles), "
        "fewer new tokens (max_new_tokens), fewer prompts per call, or a smaller smc_gamma "
        "(HF_SMCSD_MEMORY_CHECK=0 skips this check)."
    )
