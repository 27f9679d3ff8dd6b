"""TensorRT-LLM 1.2 engines behind the runner interface, and `TRTModel` for generate().

NOT VERIFIED ON A GPU. Everything that touches TensorRT-LLM below was written against its
1.2 source, imported lazily, and has never run: the CPU tests exercise the packing of
engine inputs, the block tables and this runner's control flow against a torch reference
engine that reads the same inputs (`tests/test_tensorrt_runner.py`), not TensorRT itself.

How the engines are driven (see shared/docs/host-libraries.md, "Driving TensorRT-LLM 1.2
engines step by step"): TensorRT-LLM's Python `GenerationSession` cannot take our own block
tables (its `handle_per_step` rebuilds them from its own `BlocksManager`) nor share blocks
between sequences, so the runner owns everything and calls the engine through
`tensorrt_llm.runtime.Session` one step at a time:

- one KV pool per engine, `[num_blocks, num_layers, 2, kv_heads / tp, tokens_per_block,
  head_size]`, passed as `host_kv_cache_pool_pointers = [[pool.data_ptr(), 0]]` with
  `host_kv_cache_pool_mapping[layer] = (0, layer)`;
- `kv_cache_block_offsets[0, row, kv, i] = table[row, i] * num_layers * 2 + kv` from the
  ref-counted tables of `runners/paged.py`: particles share full blocks, a resample copies
  only partial last blocks (`pool.index_copy_`, one copy moves every layer);
- prefill is a context step (`host_request_types = 0`), prompts packed without padding,
  `host_past_key_value_lengths` = the context lengths;
- an extend is one or more generation steps (`host_request_types = 1`) of exactly the
  engine's built width W = D+1 tokens per row (`--speculative_decoding_mode
  lookahead_decoding --max_draft_len D`): `spec_decoding_generation_lengths = W`,
  `spec_decoding_position_offsets = arange(W)`, a causal `spec_decoding_packed_mask`,
  `spec_decoding_use = [1]` (context steps send `[0]`: the attention plugin prepares its
  spec-decoding XQA kernels on a generation step where the flag changes, so the flag must not
  first turn on in a prefill), `sequence_length = past + W`,
  `host_past_key_value_lengths = past` (per row: rows may differ in length after a
  rollback), one `position_ids` entry per token, and `last_token_ids = 1 .. rows*W` so the
  engine returns logits for every new position. A shorter request is filled up to W and
  the filler forgotten (see `TensorRTRunner.extend`);
- host inputs (`host_*`, `spec_decoding_use`) are bound as CPU tensors by name, as
  TensorRT-LLM's runtimes do (`StepBuffers`); every engine input is declared on the device, so
  the engine's tensor locations cannot tell. `all_reduce_workspace` is bound where
  `allocate_workspace` put it (a CPU tensor in 1.2's plugin.py, a CUDA one in older versions),
  as `GenerationSession` does. Device inputs live in buffers kept across steps and are copied
  only when their value changed; the logits go to a buffer kept too, and a step does not
  synchronise (the runner consumes the logits on the same stream before the next step);
- an engine that verifies several tokens per row needs compute capability >= 8.0 (XQA), and
  a model with a sliding window shorter than the engine's rows is refused (the engine attends
  to whole rows): both when the runner is made, before any step.

Tensor parallelism: engines built with tp > 1 run under `mpirun -n tp`; every rank runs the
whole SMC loop on its own GPU with its shard of the target (a tp=1 draft is replicated).
Every rank must take the same sampling and resampling decisions. `tp_sync="seed"` (default)
broadcasts one seed from rank 0 at the start of each generate() and relies on every rank
seeing bitwise-identical logits (the engines all-gather the vocabulary-parallel logits);
a cheap fingerprint of the tokens and copy plans is all-gathered at every step and a
mismatch raises instead of producing silently different particles. `tp_sync="broadcast"`
instead broadcasts rank 0's logits to all ranks at every step (exact, slower).

TensorRT-LLM APIs called, with the source they were read from (NVIDIA/TensorRT-LLM;
"1.2.0rc2" = commit b35ac1b6, whose tensorrt_llm/version.py says 1.2.0rc2):
- `tensorrt_llm.builder.Engine.from_dir(engine_dir, rank)`, `.engine` (serialized buffer),
  `.config.pretrained_config` / `.config.build_config`: tensorrt_llm/builder.py (stored 1.x
  version read; same calls in runtime/model_runner.py `ModelRunner.from_dir`).
- `tensorrt_llm.runtime.session.Session.from_serialized_engine(buffer)`, `Session.infer_shapes
  (list[TensorInfo])`, `Session.run(inputs, outputs, stream)`, `Session.engine`,
  `tensorrt_llm.runtime.session.TensorInfo(name, dtype, shape)`: tensorrt_llm/runtime/session.py
  (commit 02721299; imported by runtime/generation.py at 1.2.0rc2).
- `tensorrt_llm._utils.torch_dtype_to_trt`, `trt_dtype_to_torch`, `str_dtype_to_torch`,
  `mpi_broadcast`, `mpi_allgather`: tensorrt_llm/_utils.py at 1.2.0rc2.
- `tensorrt_llm.plugin.plugin.CustomAllReduceHelper.allocate_workspace(mapping, size)` and
  `.max_workspace_size_auto(tp_size)` for the `all_reduce_workspace` input when tp > 1:
  tensorrt_llm/plugin/plugin.py, used the same way by runtime/generation.py
  (`GenerationSession.__init__`) at 1.2.0rc2.
- Engine inputs, their shapes and host/device placement: runtime/generation.py at 1.2.0rc2
  (`_get_context_shape_buffer`, `_get_next_step_shape_buffer`, `_prepare_context_inputs`,
  `_prepare_generation_inputs`, `handle_per_step`, `_init_medusa`), models/generation_mixin.py
  (commit 03ec464e, `prepare_basic_inputs` / `prepare_attention_inputs`),
  runtime/memory_pools/memory_pools_allocator.py (commit 7ed07f06, pool pointers and mapping),
  runtime/kv_cache_manager.py (`BlocksManager.get_k_or_v_block_offset`), runtime/medusa_utils.py
  (`get_packed_mask`: bit j of word w = token 32 w + j).
- Through `Session.engine` (TensorRT's ICudaEngine, as runtime/generation.py uses it):
  `num_io_tensors`, `get_tensor_name`, `get_tensor_mode`,
  `get_tensor_dtype` (not `get_tensor_location`: every input is declared on the device).
- Engine rank and shard: `engine.config.pretrained_config.mapping` (`tp_size`, `pp_size`,
  `rank`), checked against the MPI world (`engine_rank`, `check_engine_mapping`).

docs/trt-pytorch-backend.md lists each input with the 1.2 source it was checked against.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..engines.manifest import (
    EngineMismatchError,
    check_manifest,
    limits_of,
    read_manifest,
    rebuild_hint,
    require_fits,
    sliding_window_problem,
    xqa_device_problem,
    xqa_problems,
)
from ..resampling import CopyPlan
from .paged import BlockAllocator, BlockCopies, BlockTables, check_rollback

PERF_KNOBS = 16  # host_runtime_perf_knobs is int64 [16]; -1 = default, [0] = 1 multi_block_mode


# =========================================================== packing (pure, CPU)


def causal_packed_mask(k: int) -> torch.Tensor:
    """`spec_decoding_packed_mask` rows for a chain of `k` tokens: token i sees tokens 0..i.

    `[k, ceil(k / 32)]` int32; bit j of word w stands for token `32 w + j` (as
    `medusa_utils.get_packed_mask` packs it), words above 2^31 wrap to negative int32.
    """
    words = (k + 31) // 32
    token = torch.arange(words * 32).view(words, 32)
    sees = token.unsqueeze(0) <= torch.arange(k).view(k, 1, 1)  # [k, words, 32]
    values = (sees.long() << torch.arange(32)).sum(dim=-1)  # < 2^32, exact in int64
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def kv_block_offsets(table: torch.Tensor, num_layers: int) -> torch.Tensor:
    """`kv_cache_block_offsets` `[1, rows, 2, width]` int32 from a block table `[rows, width]`
    (`-1` = no block, sent as 0 and never read): `block * num_layers * 2 + (0 K, 1 V)`."""
    base = table.clamp(min=0) * (2 * num_layers)
    offsets = torch.stack([base, base + 1], dim=1)
    offsets = torch.where((table >= 0).unsqueeze(1), offsets, torch.zeros_like(offsets))
    return offsets.unsqueeze(0).to(torch.int32)


# Inputs bound as CPU tensors. Every engine input is *declared* on the device
# (`get_tensor_location` says DEVICE for all of them); TensorRT-LLM's runtimes choose by name:
# `host_*` inputs and `spec_decoding_use` (runtime/generation.py `_get_context_shape_buffer`,
# `_get_next_step_shape_buffer`, `_init_medusa`; cpp/tensorrt_llm/runtime/lookaheadBuffers.cpp,
# eagleBuffers.cpp: `useSpecDecoding = ...cpu(...)`). The attention plugin dereferences the
# request types and `spec_decoding_use` on the host. `all_reduce_workspace` is not chosen by
# name: `CustomAllReduceHelper.allocate_workspace` returns it on the CPU in 1.2 and on the
# device in older releases, and GenerationSession binds it wherever it was returned
# (`StepBuffers(fixed=...)`).
HOST_INPUTS = ("spec_decoding_use",)


def bound_on_host(name: str) -> bool:
    return name.startswith("host_") or name in HOST_INPUTS


def bind_inputs(inputs: dict[str, torch.Tensor], input_names: list[str], dtypes: dict[str, torch.dtype],
                device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors an engine step is given: every engine input, in the engine's dtype, on the
    CPU when TensorRT-LLM binds it there (`bound_on_host`), otherwise on `device` (freshly
    copied each time; `StepBuffers` keeps device buffers across steps)."""
    return StepBuffers(input_names, dtypes, device).bind(inputs)


class StepBuffers:
    """The tensors bound to one engine's inputs and outputs, kept from step to step.

    Host inputs (`bound_on_host`) are bound as the CPU tensors they are. Each device input
    has a buffer on `device`, grown to the largest step seen, and is copied from the host only
    when its value differs from what the buffer already holds (the spec-decoding tensors, the
    last-token ids and the context lengths rarely change between steps). `fixed` inputs
    (`all_reduce_workspace`) are bound as given, on whatever device they were made. Output
    buffers are kept too: what `output()` returns is overwritten by the next step, so a caller
    copies what it keeps before it runs another step (on the same stream: no synchronisation
    needed). `copies` counts the host-to-device copies per input name."""

    def __init__(self, input_names: list[str], dtypes: dict[str, torch.dtype], device: torch.device | str,
                 fixed: dict[str, torch.Tensor] | None = None):
        self.input_names, self.dtypes, self.device = list(input_names), dict(dtypes), torch.device(device)
        self.fixed = dict(fixed or {})
        self._buffers: dict[str, torch.Tensor] = {}
        self._held: dict[str, torch.Tensor] = {}  # host copy of what each device buffer holds
        self._outputs: dict[str, torch.Tensor] = {}
        self.copies: dict[str, int] = {}

    def bind(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self.input_names if name not in inputs and name not in self.fixed]
        if missing:
            raise EngineMismatchError(
                f"The engine expects inputs the runner does not make: {missing}. It was not built by "
                "`hf-smcsd build-engines` for TensorRT-LLM 1.2; rebuild it."
            )
        bound = {}
        for name in self.input_names:
            dtype = self.dtypes[name]
            if name in self.fixed:
                bound[name] = self.fixed[name]
            elif bound_on_host(name):
                bound[name] = inputs[name].to(device="cpu", dtype=dtype).contiguous()
            elif inputs[name].device.type != "cpu" and inputs[name].device == self.device:  # the cache indirection
                bound[name] = inputs[name].to(dtype=dtype).contiguous()
            else:
                bound[name] = self._on_device(name, inputs[name].detach().to(device="cpu", dtype=dtype).contiguous())
        return bound

    def _on_device(self, name: str, host: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < host.numel():
            buffer = self._buffers[name] = torch.empty(max(1, host.numel()), dtype=host.dtype, device=self.device)
            self._held.pop(name, None)
        view = buffer[: host.numel()].view(host.shape)
        held = self._held.get(name)
        if held is None or held.shape != host.shape or not torch.equal(held, host):
            view.copy_(host)
            self._held[name] = host.clone()  # the caller may reuse its tensor
            self.copies[name] = self.copies.get(name, 0) + 1
        return view

    def output(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self._outputs.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self._outputs[name] = torch.empty(max(1, size), dtype=dtype, device=self.device)
        return buffer[:size].view(shape)


def _common_inputs(rows: int, table: torch.Tensor, num_layers: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    offsets = kv_block_offsets(table, num_layers)
    knobs = torch.full((PERF_KNOBS,), -1, dtype=torch.int64)
    knobs[0] = 1  # multi_block_mode, as GenerationSession sets it by default
    return {
        "kv_cache_block_offsets": offsets,
        "host_kv_cache_block_offsets": offsets.clone(),
        "cache_indirection": torch.zeros((rows, 1, max_seq_len), dtype=torch.int32),  # beam width 1: unused
        "host_max_attention_window_sizes": torch.full((num_layers,), max_seq_len, dtype=torch.int32),
        "host_sink_token_length": torch.zeros(1, dtype=torch.int32),
        "host_runtime_perf_knobs": knobs,
        "host_context_progress": torch.zeros(1, dtype=torch.int64),
    }


def _spec_inputs(rows: int, width: int, use: bool) -> dict[str, torch.Tensor]:
    """The `spec_decoding_*` inputs for steps of `width` tokens per row (the engine's built
    width unless TensorRTRunner.narrow_steps). `spec_decoding_use` is 1 on generation steps and
    0 on context steps: TensorRT-LLM 1.2's attention plugin starts with the flag off and
    prepares its spec-decoding XQA kernels only on a generation step where the flag changes
    (the C++ lookahead runtime's `disableLookaheadDecoding` sends 0 the same way); a flag first
    set in a prefill can leave the first verify step without a kernel when TensorRT does not
    re-run `configurePlugin` between the two steps."""
    return {
        "spec_decoding_generation_lengths": torch.full((rows,), width, dtype=torch.int32),
        "spec_decoding_position_offsets": torch.arange(width, dtype=torch.int32).expand(rows, width).contiguous(),
        "spec_decoding_packed_mask": causal_packed_mask(width).repeat(rows, 1),
        "spec_decoding_use": torch.full((1,), int(use), dtype=torch.int32),
    }


def pack_context_step(input_ids: torch.Tensor, attention_mask: torch.Tensor, table: torch.Tensor, *,
                      num_layers: int, max_seq_len: int, tokens_per_step: int = 1) -> dict[str, torch.Tensor]:
    """Inputs of a prefill (context) step for left-padded prompts `[rows, width]`: the real
    tokens packed without padding, positions from 0, logits at each prompt's last token.
    `host_past_key_value_lengths` holds the context lengths (the KV length after the step), as
    both TensorRT-LLM runtimes pass it: the plugin takes their maximum as the context
    attention's KV length."""
    mask = attention_mask.to(torch.bool).cpu()
    lengths = mask.sum(dim=1).to(torch.int32)
    rows = lengths.numel()
    positions = (mask.long().cumsum(dim=1) - 1)[mask]
    inputs = {
        "input_ids": input_ids.cpu()[mask].to(torch.int32),
        "position_ids": positions.to(torch.int32),
        "last_token_ids": lengths.cumsum(0).to(torch.int32),
        "context_lengths": lengths.clone(),
        "host_context_lengths": lengths.clone(),
        "sequence_length": lengths.clone(),
        "host_past_key_value_lengths": lengths.clone(),
        "host_request_types": torch.zeros(rows, dtype=torch.int32),
    }
    inputs.update(_common_inputs(rows, table, num_layers, max_seq_len))
    inputs.update(_spec_inputs(rows, tokens_per_step, use=False))
    return inputs


def pack_generation_step(tokens: torch.Tensor, past_lengths: torch.Tensor, prompt_lengths: torch.Tensor,
                         table: torch.Tensor, *, num_layers: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """Inputs of a generation step adding `k` tokens to every row (`tokens` `[rows, k]`, k the
    engine's built width, or less with TensorRTRunner.narrow_steps).

    Row r holds `past_lengths[r]` tokens (rows may differ); its new ones take positions
    `past[r] .. past[r]+k-1`; `last_token_ids = 1 .. rows*k` returns logits for every one of
    them, row-major. `position_ids` holds one position per token, as the C++ lookahead
    runtime passes it (Llama engines apply rotary embeddings inside the attention plugin from
    `host_past_key_value_lengths` and `spec_decoding_position_offsets`).
    """
    rows, k = tokens.shape
    past = past_lengths.to(torch.int32).cpu()
    inputs = {
        "input_ids": tokens.cpu().reshape(-1).to(torch.int32),
        "position_ids": (past.unsqueeze(1) + torch.arange(k, dtype=torch.int32)).reshape(-1),
        "last_token_ids": torch.arange(1, rows * k + 1, dtype=torch.int32),
        "context_lengths": prompt_lengths.to(torch.int32).cpu(),
        "host_context_lengths": prompt_lengths.to(torch.int32).cpu(),
        "sequence_length": past + k,
        "host_past_key_value_lengths": past.clone(),
        "host_request_types": torch.ones(rows, dtype=torch.int32),
    }
    inputs.update(_common_inputs(rows, table, num_layers, max_seq_len))
    inputs.update(_spec_inputs(rows, k, use=True))
    return inputs


def prefill_groups(lengths: torch.Tensor, max_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive prompt ranges `[start, end)` whose tokens fit one engine step."""
    groups, start, used = [], 0, 0
    for index, length in enumerate(lengths.tolist()):
        if length > max_tokens:
            raise EngineMismatchError(
                f"A {length}-token prompt exceeds the engine's max_num_tokens={max_tokens}: rebuild with "
                f"--max-num-tokens {length} (or a larger --max-input-len)."
            )
        if index > start and (used + length > max_tokens or index - start >= max_rows):
            groups.append((start, index))
            start, used = index, 0
        used += length
    if lengths.numel():
        groups.append((start, lengths.numel()))
    return groups


# =========================================================== tensor parallelism


def world() -> tuple[int, int]:
    """(rank, size) of this process under mpirun (from the MPI environment; (0, 1) alone)."""
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                               ("PMIX_RANK", "PMIX_SIZE")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


def local_rank() -> int:
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if name in os.environ:
            return int(os.environ[name])
    return world()[0]


def engine_rank(tp_size: int, world: tuple[int, int]) -> int:
    """Which `rank<r>.engine` this process loads: its MPI rank for a tensor-parallel engine
    (which then needs exactly `tp_size` ranks), 0 for a tp=1 engine (replicated on every rank)."""
    rank, size = world
    if tp_size == 1:
        return 0
    if size != tp_size:
        raise EngineMismatchError(
            f"The engine was built with tensor parallelism {tp_size} but this process group has {size} rank(s): "
            f"launch with `mpirun -n {tp_size} python <your script>`.")
    return rank


def check_engine_mapping(mapping, tp_size: int, rank: int) -> None:
    """The loaded engine's own mapping must be the shard this rank asked for."""
    if int(mapping.tp_size) != tp_size or int(getattr(mapping, "pp_size", 1)) != 1:
        raise EngineMismatchError(
            f"The engine's config says tp_size={mapping.tp_size}, pp_size={getattr(mapping, 'pp_size', 1)} but its "
            f"manifest says tp_size={tp_size} (pipeline parallelism is not supported): rebuild it with "
            "`hf-smcsd build-engines`.")
    if tp_size > 1 and int(mapping.rank) != rank:
        raise EngineMismatchError(
            f"MPI rank {rank} loaded the shard of rank {mapping.rank}: the engine directory's rank files do not match "
            "their configs; rebuild it.")


def sync_seed() -> int | None:
    """Under mpirun: rank 0 draws a seed from its generator (so `torch.manual_seed` before
    generate() still makes runs reproducible), broadcasts it, and every rank reseeds torch
    with it. Alone: does nothing. Returns the seed used (None alone)."""
    if world()[1] == 1:
        return None
    from tensorrt_llm._utils import mpi_broadcast  # 1.2.0rc2 tensorrt_llm/_utils.py

    seed = int(torch.randint(0, 2**62, (1,))) if world()[0] == 0 else None
    seed = mpi_broadcast(seed, 0)
    torch.manual_seed(seed)
    return seed


def fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    flat = tensor.detach().reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device) % 1_000_003
    return int(flat.sum()), int((flat * weights).sum())


def check_lockstep(what: str, tensor: torch.Tensor, allgather: Callable | None = None) -> None:
    """Raise if the ranks disagree on `tensor` (tokens fed, or a copy plan)."""
    if allgather is None:
        if world()[1] == 1:
            return
        from tensorrt_llm._utils import mpi_allgather as allgather  # 1.2.0rc2 tensorrt_llm/_utils.py
    prints = allgather(fingerprint(tensor))
    if any(p != prints[0] for p in prints):
        raise RuntimeError(
            f"Tensor-parallel ranks diverged at {what} (fingerprints {prints}): the ranks no longer take the same "
            "sampling decisions. Retry with TRTModel.from_engine(..., tp_sync='broadcast'), which broadcasts rank 0's "
            "logits every step."
        )


# =========================================================== the engine session


class EngineSession:
    """One engine, run one step at a time with tensors we own (needs a GPU and tensorrt_llm)."""

    def __init__(self, engine_dir: str | Path, manifest: dict):
        try:
            import tensorrt as trt
            from tensorrt_llm._utils import str_dtype_to_torch, torch_dtype_to_trt, trt_dtype_to_torch
            from tensorrt_llm.builder import Engine
            from tensorrt_llm.runtime.session import Session, TensorInfo
        except ImportError as error:
            raise ImportError(
                f"TRTModel needs TensorRT-LLM 1.2 and an NVIDIA GPU ({error}). Use the TensorRT-LLM 1.2 container or "
                "`pip install hf-smcsd[trt]` with NVIDIA's package index."
            ) from error
        if not torch.cuda.is_available():
            raise RuntimeError("TRTModel needs an NVIDIA GPU; torch.cuda.is_available() is False.")
        self._trt, self._TensorInfo = trt, TensorInfo
        self._to_trt, self._to_torch = torch_dtype_to_trt, trt_dtype_to_torch
        tp = int(manifest["tp_size"])
        self.engine_rank = engine_rank(tp, world())  # a tp=1 engine is replicated on every rank
        self.device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(self.device)
        self.compute_capability = torch.cuda.get_device_capability(self.device)  # checked by TensorRTRunner
        self.device_name = torch.cuda.get_device_name(self.device)
        engine = Engine.from_dir(str(engine_dir), self.engine_rank)
        self.session = Session.from_serialized_engine(engine.engine)
        pretrained, build = engine.config.pretrained_config, engine.config.build_config
        check_engine_mapping(pretrained.mapping, tp, self.engine_rank)
        self.tp_size = tp
        self.num_layers = int(pretrained.num_hidden_layers)
        self.num_kv_heads = math.ceil(int(pretrained.num_key_value_heads) / tp)
        self.head_size = int(pretrained.head_size)
        self.vocab_size = int(pretrained.vocab_size)
        kv_dtype = str(pretrained.kv_dtype)
        if kv_dtype in ("int8", "fp8"):
            raise EngineMismatchError(f"{engine_dir}: {kv_dtype} KV caches are not supported; rebuild without KV quantization.")
        self.kv_dtype = str_dtype_to_torch(kv_dtype)
        self.max_batch_size = int(build.max_batch_size)
        self.max_seq_len = int(build.max_seq_len)  # includes the max_draft_len trtllm-build adds
        self.max_num_tokens = int(build.max_num_tokens)
        self.tokens_per_step = int(build.max_draft_len) + 1
        self.tokens_per_block = int(build.plugin_config.tokens_per_block)
        if not build.plugin_config.remove_input_padding:
            raise EngineMismatchError(f"{engine_dir} was built without remove_input_padding; rebuild with build-engines.")
        engine_trt = self.session.engine
        names = [engine_trt.get_tensor_name(i) for i in range(engine_trt.num_io_tensors)]
        is_input = {n: engine_trt.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.dtypes = {n: trt_dtype_to_torch(engine_trt.get_tensor_dtype(n)) for n in self.input_names}
        for needed in ("kv_cache_block_offsets", "host_kv_cache_pool_pointers", "last_token_ids"):
            if needed not in self.input_names:
                raise EngineMismatchError(
                    f"{engine_dir} has no `{needed}` input: it was not built with a paged KV cache and without "
                    f"gather_context_logits. Rebuild it with `hf-smcsd build-engines` ({rebuild_hint(manifest)})."
                )
        self.has_spec_inputs = "spec_decoding_packed_mask" in self.input_names
        if not self.has_spec_inputs:
            self.tokens_per_step = 1
        problems = xqa_problems(
            dtype=str(pretrained.dtype), num_heads=int(pretrained.num_attention_heads),
            num_kv_heads=int(pretrained.num_key_value_heads), head_size=self.head_size,
            tokens_per_block=self.tokens_per_block, tokens_per_step=self.tokens_per_step, tp_size=tp)
        if problems:
            raise EngineMismatchError(
                f"{engine_dir} cannot run its {self.tokens_per_step}-token steps:\n  - " + "\n  - ".join(problems)
                + f"\nRebuild it, for example:\n  {rebuild_hint(manifest)}")
        self.extra_inputs: dict[str, torch.Tensor] = {}
        if "all_reduce_workspace" in self.input_names:
            from tensorrt_llm.plugin.plugin import CustomAllReduceHelper

            mapping = pretrained.mapping
            self._ipc_buffers, workspace = CustomAllReduceHelper.allocate_workspace(
                mapping, CustomAllReduceHelper.max_workspace_size_auto(mapping.tp_size))
            self.extra_inputs["all_reduce_workspace"] = workspace  # bound where it was made
        self.buffers = StepBuffers(self.input_names, self.dtypes, self.device, fixed=self.extra_inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One engine step. The returned logits live in a buffer the next step overwrites; no
        synchronisation here: the runner copies them out on the same stream first."""
        bound = self.buffers.bind(inputs)
        infos = self.session.infer_shapes(
            [self._TensorInfo(name, self._to_trt(t.dtype), tuple(t.shape)) for name, t in bound.items()])
        outputs = {info.name: self.buffers.output(info.name, tuple(info.shape), self._to_torch(info.dtype))
                   for info in infos}
        stream = torch.cuda.current_stream(self.device)
        if not self.session.run(bound, outputs, stream.cuda_stream):
            raise RuntimeError("TensorRT engine execution failed (Session.run returned False).")
        return outputs


# =========================================================== the runner


class TensorRTRunner:
    """`Runner` over one engine session (an `EngineSession`, or anything with the same
    attributes and `run(inputs) -> {"logits": [tokens, vocab_padded]}`).

    `num_blocks`: KV pool size in blocks; default: enough for every row at full length
    (sharing only lowers the need), capped at `kv_cache_fraction` of the free GPU memory
    (the target's pool is made first: leave room for the draft's).
    """

    def __init__(self, session, manifest: dict, *, num_blocks: int | None = None, kv_cache_fraction: float = 0.45,
                 tp_sync: str = "seed", lockstep: bool = True, allgather: Callable | None = None,
                 narrow_steps: bool = False):
        if tp_sync not in ("seed", "broadcast"):
            raise ValueError(f"tp_sync={tp_sync!r}: use 'seed' (shared seed, default) or 'broadcast' (rank 0's logits).")
        gpu = getattr(session, "device_name", None) or "this GPU"
        problem = xqa_device_problem(getattr(session, "compute_capability", None),
                                     tokens_per_step=session.tokens_per_step, gpu=gpu)
        if problem is None:
            problem = sliding_window_problem(manifest.get("model"), session.max_seq_len)
        if problem:
            raise EngineMismatchError(f"The {manifest['role']} engine built from {manifest['source_model']}: {problem}")
        self.session, self.manifest = session, manifest
        # Steps narrower than the built width (spec_decoding_generation_lengths < W): supported
        # upstream, unverified here (gpu-check compares them); off until a GPU run confirms.
        self.narrow_steps = narrow_steps
        self.vocab_size = session.vocab_size
        self.device = session.device
        self.tp_sync, self.lockstep, self._allgather = tp_sync, lockstep, allgather
        tpb = session.tokens_per_block
        max_blocks_per_row = math.ceil(session.max_seq_len / tpb)
        bound = session.max_batch_size * max_blocks_per_row
        if num_blocks is None:
            num_blocks = bound
            if self.device.type == "cuda":
                block_bytes = (session.num_layers * 2 * session.num_kv_heads * tpb * session.head_size
                               * torch.empty(0, dtype=session.kv_dtype).element_size())
                free = torch.cuda.mem_get_info(self.device)[0]
                num_blocks = max(1, min(bound, int(kv_cache_fraction * free) // block_bytes))
        self.tables = BlockTables(BlockAllocator(num_blocks), tpb, max_blocks_per_row=max_blocks_per_row)
        self.pool = torch.zeros(
            (num_blocks, session.num_layers, 2, session.num_kv_heads, tpb, session.head_size),
            dtype=session.kv_dtype, device=self.device)
        self.pool_inputs = {
            "host_kv_cache_pool_pointers": torch.tensor([[self.pool.data_ptr(), 0]], dtype=torch.int64),
            "host_kv_cache_pool_mapping": torch.stack(
                [torch.zeros(session.num_layers, dtype=torch.int32),
                 torch.arange(session.num_layers, dtype=torch.int32)], dim=1),
        }
        # Beam width 1 never reads the cache indirection; keep one zero tensor on the device.
        self._indirection = torch.zeros((session.max_batch_size, 1, session.max_seq_len), dtype=torch.int32,
                                        device=self.device)
        self.prompt_lengths = torch.zeros(0, dtype=torch.long)

    # ------------------------------------------------------------- interface
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, particles: int) -> torch.Tensor:
        out_device = input_ids.device
        mask = attention_mask.to(torch.long).cpu()
        lengths = mask.sum(dim=1)
        require_fits_runtime(self.manifest, self.session, prompts=int(lengths.numel()), particles=particles,
                             max_prompt_len=int(lengths.max()))
        width = mask.shape[1]
        if not torch.equal(mask.bool(), torch.arange(width) >= (width - lengths).unsqueeze(1)):
            raise ValueError("TensorRTRunner needs left-padded prompts: tokenize with padding_side='left'.")
        session, tables = self.session, self.tables
        tables.clear()
        tables.add_rows(lengths)  # prompt blocks, written by the context steps below
        logits = torch.empty(lengths.numel(), self.vocab_size, dtype=torch.float32, device=self.device)
        for start, end in prefill_groups(lengths, session.max_num_tokens, session.max_batch_size):
            inputs = pack_context_step(input_ids[start:end], mask[start:end], tables.table[start:end],
                                       num_layers=session.num_layers, max_seq_len=session.max_seq_len,
                                       tokens_per_step=session.tokens_per_step)
            logits[start:end] = self._run(inputs)
        self.prompt_lengths = lengths.repeat_interleave(particles)
        self._copy(tables.fork(particles))
        return logits.to(out_device)

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every engine step has the engine's built width W (K+1 for the target, 2 or 1 for the
        draft): a request for k tokens runs ceil(k / W) steps, the last one filled up with
        copies of its last token. The filler's logits are dropped and its KV is forgotten at
        once (a rollback of the table; the filler only ever lands in blocks the row owns).
        TensorRT-LLM's lookahead runtime sends narrower steps (spec_decoding_generation_lengths
        < W), but that has not run here; `narrow_steps=True` sends a k < W request as one
        k-wide step, and gpu-check compares the two ways. Off until that comparison passes."""
        rows, k = tokens.shape
        if self.lockstep:
            check_lockstep("extend", tokens, self._allgather)
        session, tables = self.session, self.tables
        pieces, built = [], max(1, session.tokens_per_step)
        for start in range(0, k, built):
            chunk = tokens[:, start:start + built].cpu()
            real = width = chunk.shape[1]
            if real < built and not self.narrow_steps:
                width = built
                chunk = torch.cat([chunk, chunk[:, -1:].expand(rows, width - real)], dim=1)
            per_call = max(1, session.max_num_tokens // width)  # build-engines makes one call fit all rows
            tables.reserve(width)
            logits = torch.empty(rows, width, self.vocab_size, dtype=torch.float32, device=self.device)
            for first in range(0, rows, per_call):
                part = slice(first, min(rows, first + per_call))
                inputs = pack_generation_step(chunk[part], tables.lengths[part], self.prompt_lengths[part],
                                              tables.table[part], num_layers=session.num_layers,
                                              max_seq_len=session.max_seq_len)
                logits[part] = self._run(inputs).view(-1, width, self.vocab_size)
            tables.advance(width)
            if real < width:
                self._copy(tables.rollback(width - real))
            pieces.append(logits[:, :real])
        return torch.cat(pieces, dim=1).to(tokens.device)

    def rollback(self, drop: torch.Tensor) -> None:
        drop = check_rollback(drop, self.tables.lengths, self.prompt_lengths)
        if self.lockstep:
            check_lockstep("rollback", drop, self._allgather)
        self._copy(self.tables.rollback(drop))

    def reorder(self, plan: CopyPlan) -> None:
        if len(plan) == 0:
            return
        if self.lockstep:
            check_lockstep("reorder", torch.stack([plan.dest, plan.src]), self._allgather)
        self._copy(self.tables.reorder(plan.dest, plan.src))
        dest, src = plan.dest.cpu(), plan.src.cpu()
        self.prompt_lengths[dest] = self.prompt_lengths[src]

    def keep(self, rows: torch.Tensor) -> None:
        self.tables.keep(rows)
        self.prompt_lengths = self.prompt_lengths[rows.cpu()]

    # ------------------------------------------------------------- internals
    def _copy(self, copies: BlockCopies) -> None:
        copies.apply(self.pool)

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs["cache_indirection"] = self._indirection[: inputs["host_request_types"].numel()]
        outputs = self.session.run({**inputs, **self.pool_inputs})
        # A view of the session's output buffer, overwritten by the next step: every caller
        # copies it into its own tensor at once.
        logits = outputs["logits"][:, : self.vocab_size].float()
        if self.tp_sync == "broadcast" and world()[1] > 1:
            from tensorrt_llm._utils import mpi_broadcast  # 1.2.0rc2 tensorrt_llm/_utils.py

            logits = torch.from_numpy(mpi_broadcast(logits.cpu().numpy(), 0)).to(self.device)
        return logits


def require_fits_runtime(manifest: dict, session, *, prompts: int, particles: int, max_prompt_len: int) -> None:
    """The checks a runner can make at prefill (it learns N and the prompts there)."""
    if prompts * particles > session.max_batch_size:
        raise EngineMismatchError(
            f"The {manifest['role']} engine runs {session.max_batch_size} rows per step but {prompts} prompts x "
            f"{particles} particles = {prompts * particles}. Rebuild with:\n  "
            + rebuild_hint(manifest, prompts=prompts, particles=particles)
        )
    problems = check_manifest({**manifest, "status": "built"}, max_prompt_len=max_prompt_len)
    if problems:
        raise EngineMismatchError(problems[0] + "\n  " + rebuild_hint(manifest, max_prompt_len=max_prompt_len))


# =========================================================== generate() front end


class TRTModel:
    """An engine-backed model usable as the target and/or the `assistant_model` of SMC-SD.

        target = TRTModel.from_engine("trt_engines/Llama-3.1-8B-Instruct")
        draft = TRTModel.from_engine("trt_engines/Llama-3.2-1B-Instruct")
        out = target.generate(**tokenizer(prompts, return_tensors="pt", padding=True),
                              assistant_model=draft, smc_particles=8, smc_gamma=8, do_sample=True)

    It carries the config, generation config and tokenizer of the source checkpoint and
    brings its own runner (`smc_runner()`), which is how `hf_smcsd.generate.make_runner`
    picks it up when a patched transformers model uses it as `assistant_model`.
    """

    def __init__(self, runner_factory: Callable[[], object], config, generation_config, source: str | Path,
                 manifest: dict | None = None, device: torch.device | str = "cpu"):
        self._runner_factory = runner_factory
        self._runner = None
        self.config = config
        self.generation_config = generation_config
        self.source = Path(source)
        self.manifest = manifest
        self.device = torch.device(device)
        self._tokenizer = None

    @classmethod
    def from_engine(cls, engine_dir: str | Path, *, particles: int | None = None, gamma: int | None = None,
                    max_prompts: int | None = None, max_input_len: int | None = None,
                    max_new_tokens: int | None = None, num_blocks: int | None = None,
                    kv_cache_fraction: float = 0.45, tp_sync: str = "seed", lockstep: bool = True) -> "TRTModel":
        """Load an engine built by `hf-smcsd build-engines`. The optional settings are checked
        against the engine's manifest now (otherwise at generate()), and every mismatch is
        reported with the build command that fixes it."""
        from transformers import AutoConfig

        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        require_fits(manifest, particles=particles, gamma=gamma, prompts=max_prompts, max_prompt_len=max_input_len,
                     max_new_tokens=max_new_tokens, world_size=world()[1])
        source = engine_dir / "hf" if (engine_dir / "hf" / "config.json").is_file() else Path(manifest["source_model"])
        config = AutoConfig.from_pretrained(source)
        window = sliding_window_problem(
            {"sliding_window": getattr(config, "sliding_window", None),
             "use_sliding_window": getattr(config, "use_sliding_window", None)}, limits_of(manifest).max_seq_len)
        if window:  # manifests written before build-engines recorded the window
            raise EngineMismatchError(f"{engine_dir}: {window}")
        session = EngineSession(engine_dir, manifest)
        factory = lambda: TensorRTRunner(session, manifest, num_blocks=num_blocks,  # noqa: E731
                                         kv_cache_fraction=kv_cache_fraction, tp_sync=tp_sync, lockstep=lockstep)
        return cls(factory, config, _generation_config(source, config), source, manifest, session.device)

    # ---------------------------------------------------- what transformers asks
    def smc_runner(self):
        if self._runner is None:
            self._runner = self._runner_factory()  # one KV pool per model, reused across calls
        return self._runner

    def get_output_embeddings(self):
        return None  # compat.output_vocab_size then reads config.vocab_size

    def get_input_embeddings(self):
        return None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def load_tokenizer(self, **kwargs):
        """The source checkpoint's tokenizer (left padding, as SMC-SD needs)."""
        from transformers import AutoTokenizer

        kwargs.setdefault("padding_side", "left")
        return AutoTokenizer.from_pretrained(self.source, **kwargs)

    def __call__(self, *args, **kwargs):
        raise TypeError("A TRTModel has no forward(); use generate() (SMC-SD) or pass it as assistant_model.")

    # ---------------------------------------------------- generate
    def generate(self, *args, **kwargs):
        """SMC-SD with this engine as the target: the same call as a patched transformers
        model's generate() (`assistant_model=`, `smc_*` knobs, sampling warpers, lengths,
        special tokens, `return_dict_in_generate`). The knobs are resolved and checked by
        `hf_smcsd.generate` exactly as for a transformers target; this object then does the
        preparation transformers' generate() would do and enters the same `custom_generate`."""
        from ..generate import SMC_KNOBS, _dispatch

        if "custom_generate" in kwargs:  # the prepared call (from _dispatch, patch() or smc_generate())
            return self._prepared_generate(*args, **kwargs)
        unknown = sorted(name for name in kwargs if name.startswith("smc_") and name not in SMC_KNOBS)
        if unknown:  # a transformers target rejects unused model kwargs; do not ignore them silently either
            raise ValueError(f"generate() got SMC-SD knobs this hf_smcsd does not know: {unknown}; "
                             f"the knobs are {sorted(SMC_KNOBS)}.")
        particles = kwargs.get("smc_particles")
        config = kwargs.get("generation_config") or self.generation_config
        if particles is None and getattr(config, "smc_particles", None) is None:
            raise ValueError(
                "A TRTModel generates with SMC-SD only: pass smc_particles=<N> and assistant_model=<draft>.")
        return _dispatch(self, self._prepared_generate, args, kwargs)

    @torch.no_grad()
    def _prepared_generate(self, input_ids=None, generation_config=None, *, custom_generate=None, **kwargs):
        """What transformers' generate() does before it calls `custom_generate`: merge the
        generation config, fix max_length, build the sampling warpers and stopping criteria."""
        import copy

        from transformers import StoppingCriteriaList

        if custom_generate is None:  # _dispatch hands do_sample=False over to greedy decoding
            raise ValueError(
                "SMC-SD samples: pass do_sample=True. Greedy (assisted) decoding is not available with an "
                "engine-backed target.")
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (a left-padded batch of prompts).")
        model_kwargs = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("smc_")}
        attention_mask = kwargs.pop("attention_mask", None)
        stopping_criteria = kwargs.pop("stopping_criteria", None) or StoppingCriteriaList()
        kwargs.pop("use_cache", None)
        config = copy.deepcopy(generation_config or self.generation_config)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"generate() got arguments a TRTModel does not use: {sorted(unused)}.")
        _fill_defaults(config)
        _check_engine_config(config)
        prompt_length = input_ids.shape[1]
        if config.max_new_tokens is not None:
            config.max_length = prompt_length + config.max_new_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        knobs = model_kwargs["smc_knobs"]
        draft = model_kwargs["smc_draft"]
        request = dict(particles=knobs["smc_particles"], gamma=knobs["smc_gamma"], prompts=input_ids.shape[0],
                       max_prompt_len=int(attention_mask.sum(dim=1).max()),
                       max_new_tokens=config.max_length - prompt_length, world_size=world()[1])
        for model in (self, draft):
            if isinstance(model, TRTModel) and model.manifest is not None:
                require_fits(model.manifest, **request)
        if self.manifest is not None:  # an adaptive K schedule grows K only up to what the engine verifies
            model_kwargs["smc_knobs"] = dict(knobs, gamma_limit=limits_of(self.manifest).tokens_per_step - 1)
        num_return = config.num_return_sequences or 1
        if num_return > 1:  # transformers expands the prompts before custom_generate
            input_ids = input_ids.repeat_interleave(num_return, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return, dim=0)
        sync_seed()
        return custom_generate(self, input_ids, logits_processor=_sampling_warpers(config),
                               stopping_criteria=stopping_criteria, generation_config=config,
                               attention_mask=attention_mask, **model_kwargs)


def _generation_config(source: Path, config):
    from transformers import GenerationConfig

    if (source / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return GenerationConfig.from_model_config(config)


def _fill_defaults(config) -> None:
    """transformers 5.x leaves unset sampling fields None and fills them at generate() time."""
    for name, default in (("temperature", 1.0), ("top_k", 50), ("top_p", 1.0), ("max_length", 20),
                          ("num_return_sequences", 1)):
        if getattr(config, name, None) is None:
            setattr(config, name, default)


# Generation-config fields that make transformers add logits processors beyond the sampling
# warpers; a TRTModel target does not build those (yet).
_UNBUILT = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "max_time": None, "watermarking_config": None, "top_h": None,
}


def _check_engine_config(config) -> None:
    for name, neutral in _UNBUILT.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral and not (name == "guidance_scale" and value == 1.0):
            raise ValueError(
                f"{name}={value!r} is not supported with a TRTModel target yet (only the sampling warpers are "
                "built); drop it, or use the engine as assistant_model of the transformers target."
            )


def _sampling_warpers(config):
    """transformers' sampling warpers for `config`, in generate()'s order, with its defaults
    (top_k=50 unless set)."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    warpers = LogitsProcessorList()
    temperature = config.temperature if config.temperature is not None else 1.0
    top_k = config.top_k if config.top_k is not None else 50
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff))
    return warpers
