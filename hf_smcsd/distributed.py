"""Tensor parallelism on the PyTorch paths: a target sharded by transformers' `tp_plan`.

    torchrun --nproc-per-node 8 my_script.py      # one process per GPU, every rank runs:

    from hf_smcsd import patch
    from hf_smcsd.distributed import load_tp_model

    target = patch(load_tp_model("meta-llama/Llama-3.1-70B-Instruct", dtype=torch.bfloat16))
    draft = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B-Instruct",
                                                 dtype=torch.bfloat16, device_map=target.device)
    torch.manual_seed(0)
    out = target.generate(**inputs, assistant_model=draft, smc_particles=8, do_sample=True)

transformers shards the target with DTensor over a 1-D mesh of all ranks (the attention heads
and the MLP columns split, one all-reduce per attention and per MLP; the LM head's output is
gathered, so every rank gets the full logits). Each rank's KV cache then holds that rank's
heads only, and the eager and static runners need nothing special: they index rows and
positions, never heads, so every reorder, rollback and keep is applied by each rank to its own
shard.

What tensor parallelism needs from SMC-SD is lockstep: every rank runs the whole loop, and the
ranks must feed the same tokens and take the same host decisions (resample or not, which
rows, exact or SMC-SD round, when to stop), or the next forward mixes partial sums of
different tokens (silently wrong) or one rank waits in a collective the others never enter
(a hang). How it is kept:

- **Identical generators, not draws broadcast from rank 0.** At the start of each generate()
  rank 0's generator states (the CPU one, and the current CUDA device's) are broadcast and set
  on every rank (`sync_random_state`); from then on every rank draws the same numbers from the
  same logits. Broadcasting every draw instead would need collectives inside the loop
  (`hf_smcsd.smc`), at several points per round, each a host-device round trip; identical
  generators cost one broadcast per call and leave the loop as it is. Broadcasting the
  *state* (rather than a fresh seed from rank 0) keeps `torch.manual_seed(s)` meaning the
  same as in a single process: rank 0's stream is the single-process stream.
- **The logits are the same on every rank**: the LM head's output is all-gathered (or
  all-reduced), which hands every rank the same bits; the draft is replicated (below) and
  runs the same kernels on the same inputs.
- **Checked, not assumed**: the target's runner is wrapped in `LockstepRunner`, which
  all-gathers a fingerprint (operation, sums of the tokens / copy plan / drops) at every
  call and raises on all ranks at once if they differ, naming the call; a divergence becomes
  an error instead of wrong text or a hang. Cost: one all-gather of 3 integers per runner call
  (a handful per round; small next to a sharded forward).

The draft is **replicated**: every rank holds a whole copy, on its own device (load it with
`device_map=target.device`). Drafting is K sequential one-token forwards of a small model,
latency-bound; sharding it would add two all-reduces per layer to each of them for little
compute saved. A draft sharded too (`load_tp_model` for both) is accepted if it is on the
target's mesh; a draft on another mesh is refused. Which is faster on real GPUs has not been
measured (`scripts/tp_check.sh N --time` measures it where N GPUs exist).

Not verified on a GPU (none was available): everything here ran on CPU with two gloo
processes (`tests/test_tensor_parallel.py`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class TensorParallelError(ValueError):
    """A tensor-parallel setup SMC-SD cannot run; the message says what to change."""


# ------------------------------------------------------------------ loading


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; a clear error without."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise TensorParallelError(
            f"Tensor parallelism (tp_plan) needs one process per device started by torchrun: "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Launch with "
            "`torchrun --nproc-per-node <devices> your_script.py` (for one device, load without tp_plan).")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def check_tp_config(config, world_size: int) -> None:
    """Refuse, before loading, a model transformers cannot shard or `world_size` cannot split."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "base_model_tp_plan", None):
        raise TensorParallelError(
            f"{type(text).__name__} (model_type {getattr(text, 'model_type', '?')!r}) has no tensor-parallel plan "
            "(config.base_model_tp_plan) in this transformers, so tp_plan='auto' cannot shard it. Use "
            "device_map='auto' (layers over several GPUs, no parallel speed-up) or a family that has a plan "
            "(Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...).")
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value and value % world_size:
            divisors = [d for d in range(1, value + 1) if value % d == 0 and d > 1]
            raise TensorParallelError(
                f"{name}={value} is not divisible by the world size {world_size}: every rank must hold whole "
                f"heads. Use --nproc-per-node {' or '.join(map(str, divisors[:6]))}.")


def tp_load_kwargs() -> dict:
    """The from_pretrained argument that asks for tp_plan='auto' in this transformers:
    `distributed_config=DistributedConfig(tp_plan="auto")` where it exists (5.x, where the
    bare `tp_plan=` is deprecated), `tp_plan="auto"` before (4.57's DistributedConfig has no
    tp_plan)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    if "tp_plan" in {field.name for field in dataclasses.fields(DistributedConfig)}:
        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}


def load_tp_model(path, model_class=None, **kwargs):
    """`from_pretrained(path, tp_plan="auto", **kwargs)` for this rank, after the checks
    transformers does not make (or makes deep inside): started by torchrun, a model family
    with a tensor-parallel plan, heads the world size divides. Returns the model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("device_map", "tp_plan", "distributed_config"):
        if name in kwargs:
            raise TensorParallelError(f"load_tp_model sets the placement itself; drop {name}=.")
    _, world_size, _ = torchrun_world()
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    check_tp_config(config, world_size)
    model = (model_class or AutoModelForCausalLM).from_pretrained(path, **tp_load_kwargs(), **kwargs)
    return model.eval()


# ------------------------------------------------------------------ what a loaded model is


def tp_mesh(model):
    """The device mesh `model`'s parameters are sharded over (tensor parallel), or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    # A DTensor lives on a device mesh, which needs the default process group: without one
    # there is nothing to look for (and no scan over every parameter on each call).
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    for parameter in model.parameters():
        if isinstance(parameter, DTensor):
            return parameter.device_mesh
    return None


def tp_size(model) -> int:
    """How many ranks `model` is sharded over (1: not tensor-parallel)."""
    mesh = tp_mesh(model)
    return 1 if mesh is None else int(mesh.mesh.numel())


def _mesh_ranks(mesh) -> list[int]:
    return [int(rank) for rank in mesh.mesh.flatten().tolist()]


def _mesh_group(mesh):
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group(mesh.ndim - 1)


def check_pair(target, draft, *, target_mesh=None, draft_mesh=None, draft_device=None, target_device=None):
    """The mesh SMC-SD runs the pair over (None: no tensor parallelism), after refusing what
    cannot run in lockstep. The keyword arguments replace what is read from the models (tests)."""
    target_mesh = target_mesh if target_mesh is not None else tp_mesh(target)
    draft_mesh = draft_mesh if draft_mesh is not None else tp_mesh(draft)
    if target_mesh is None and draft_mesh is None:
        return None
    if target_mesh is None:
        raise TensorParallelError(
            "The draft (assistant_model) is tensor-parallel but the target is not: shard the target "
            "(hf_smcsd.distributed.load_tp_model) and replicate the draft, or load neither with tp_plan.")
    if draft_mesh is not None:
        if _mesh_ranks(draft_mesh) != _mesh_ranks(target_mesh) or draft_mesh.device_type != target_mesh.device_type:
            raise TensorParallelError(
                f"The draft is sharded over a different mesh ({draft_mesh.device_type} ranks "
                f"{_mesh_ranks(draft_mesh)}) than the target ({target_mesh.device_type} ranks "
                f"{_mesh_ranks(target_mesh)}): every rank runs both models in lockstep. Load the draft on the same "
                "ranks with load_tp_model, or replicate it (load it without tp_plan on every rank).")
        return target_mesh
    from . import compat

    if isinstance(draft, torch.nn.Module):
        draft_device = draft_device if draft_device is not None else compat.input_device(draft)
        target_device = target_device if target_device is not None else compat.input_device(target)
        if torch.device(draft_device) != torch.device(target_device):
            raise TensorParallelError(
                f"The replicated draft runs on {draft_device} but this rank's target shard is on {target_device}: "
                "load the draft on every rank's own device (device_map=target.device).")
    return target_mesh


# ------------------------------------------------------------------ lockstep


def sync_random_state(mesh) -> None:
    """Set rank 0's generator states (CPU, and the current CUDA device's) on every rank of
    `mesh`, so every rank draws what rank 0 draws (see the module docstring)."""
    import torch.distributed as dist

    group = _mesh_group(mesh)
    cuda = mesh.device_type == "cuda"
    states = [torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None]
    dist.broadcast_object_list(states, src=dist.get_global_rank(group, 0), group=group)
    torch.set_rng_state(states[0])
    if cuda:
        torch.cuda.set_rng_state(states[1])


def prepare(target, draft):
    """Called by generate() before the runners are made: checks the pair and synchronises
    the generators when the target is tensor-parallel. Returns the mesh (None without TP)."""
    mesh = check_pair(target, draft)
    if mesh is not None:
        sync_random_state(mesh)
    return mesh


def fingerprint(op: int, tensor: torch.Tensor) -> torch.Tensor:
    """Three int64s that differ when the operation or (almost surely) the values differ."""
    flat = tensor.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64) % 1_000_003
    return torch.tensor([op, int(flat.sum()), int((flat * weights).sum()) ^ flat.numel()], dtype=torch.int64)


OPS = {"prefill": 1, "extend": 2, "reorder": 3, "keep": 4, "rollback": 5}


class LockstepRunner:
    """A runner whose calls are checked to be the same on every rank of the mesh (see the
    module docstring). Everything else is the wrapped runner's."""

    def __init__(self, runner, mesh):
        import torch.distributed as dist

        self.runner, self.mesh = runner, mesh
        self._group = _mesh_group(mesh)
        self._size = dist.get_world_size(self._group)
        backend = dist.get_backend(self._group)
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _check(self, what: str, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        self.calls += 1
        mine = fingerprint(OPS[what], tensor).to(self._device)
        gathered = [torch.empty_like(mine) for _ in range(self._size)]
        dist.all_gather(gathered, mine, group=self._group)
        prints = torch.stack(gathered).cpu()
        if not bool((prints == prints[0]).all()):
            names = {code: name for name, code in OPS.items()}
            calls = [f"rank {r}: {names.get(int(p[0]), '?')} {p[1:].tolist()}" for r, p in enumerate(prints)]
            raise RuntimeError(
                f"Tensor-parallel ranks diverged at runner call {self.calls} ({what}): {'; '.join(calls)}. Every "
                "rank must feed the same tokens and take the same decisions; hf_smcsd gives every rank rank 0's "
                "generator state at each generate(), so the ranks' logits or inputs differ (a draft that differs "
                "between ranks, non-deterministic kernels, or prompts that differ between ranks).")

    def prefill(self, input_ids, attention_mask, particles):
        self._check("prefill", torch.cat([(input_ids * attention_mask).reshape(-1).cpu(),
                                          torch.tensor([particles])]))
        return self.runner.prefill(input_ids, attention_mask, particles)

    def extend(self, tokens):
        self._check("extend", tokens)
        return self.runner.extend(tokens)

    def reorder(self, plan):
        self._check("reorder", torch.cat([plan.dest.reshape(-1).cpu(), plan.src.reshape(-1).cpu()]))
        return self.runner.reorder(plan)

    def keep(self, rows):
        self._check("keep", rows)
        return self.runner.keep(rows)

    def rollback(self, drop):
        self._check("rollback", drop)
        return self.runner.rollback(drop)


def lockstep(model, runner):
    """`runner` wrapped in a LockstepRunner when `model` is tensor-parallel, else `runner`."""
    mesh = tp_mesh(model)
    return runner if mesh is None else LockstepRunner(runner, mesh)


def refuse_tp(model, what: str) -> None:
    """For backends that compute attention themselves from the weights (the paged runner)."""
    if tp_mesh(model) is not None:
        raise TensorParallelError(
            f"{what} computes attention from the model's weights itself and cannot run a tensor-parallel "
            "(tp_plan) model; use the eager runner (the default) or cache_implementation='static'.")
