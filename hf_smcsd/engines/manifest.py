"""The manifest written beside every engine, and the checks made when an engine is loaded.

An engine is compiled for fixed limits: the batch (prompts x particles), the tokens one row
may add per step (K+1 for the target, 2 for the draft), the prompt and total lengths, the
KV block size, the tensor-parallel size. `smcsd_manifest.json` records them with where the
weights came from and how the engine was built; `check_manifest` compares them with what a
generate() call asks for and says exactly what to rebuild when something does not fit.

Pure Python: nothing here imports TensorRT-LLM.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MANIFEST_NAME = "smcsd_manifest.json"
FORMAT = "hf-smcsd-engine/1"
TRTLLM_PIN = "1.2.1"  # the last TensorRT-LLM line that builds engines (see trt_engines/README.md)
ROLES = ("target", "draft")


class EngineMismatchError(ValueError):
    """An engine cannot serve the requested generate() call; the message says what to rebuild."""


@dataclass(frozen=True)
class EngineLimits:
    """What one engine was compiled to serve."""

    max_prompts: int  # prompts per generate() call
    particles: int  # N
    max_batch_size: int  # engine batch = max_prompts * particles (rows per step)
    gamma: int  # K the SMC settings were built for
    tokens_per_step: int  # tokens one row may add per engine step: K+1 (target), 2 (draft)
    max_input_len: int  # longest prompt
    max_output_len: int  # max_new_tokens
    max_seq_len: int  # prompt + new tokens (passed to trtllm-build)
    max_num_tokens: int  # tokens per engine step over all rows
    tokens_per_block: int  # KV block size

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Engine limit {item.name}={value!r}: use an integer >= 1.")
        if self.max_batch_size < self.max_prompts * self.particles:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} is smaller than max_prompts x particles = "
                f"{self.max_prompts * self.particles}."
            )
        if self.max_seq_len < self.max_input_len + 1:
            raise ValueError(f"max_seq_len={self.max_seq_len} leaves no room after max_input_len={self.max_input_len}.")

    @property
    def max_draft_len(self) -> int:
        """TensorRT-LLM's name for the extra tokens per step (`--max_draft_len`)."""
        return self.tokens_per_step - 1


# What TensorRT-LLM 1.2's attention plugin needs to run a generation step of more than one
# token per row (a verify step): such steps run on XQA kernels only ("No available XQA kernels
# are found for speculative decoding mode" otherwise). Read in cpp/tensorrt_llm/kernels/
# decoderMaskedMultiheadAttention: decoderXQARunner.cpp (spec-dec steps with an fp16/bf16 KV
# cache take the JIT kernels only when 64 % (q heads / kv heads) == 0) and
# decoderXQAImplJIT/kernelUtils.cpp (`supportConfigHMMA`: fp16/bf16, head size a multiple of
# 16 in 16..256, q heads / kv heads <= 32, tokens per block in {16, 32, 64, 128}).
XQA_DTYPES = ("float16", "bfloat16")
XQA_TOKENS_PER_BLOCK = (16, 32, 64, 128)
MAX_TOKENS_PER_STEP = 32  # one int32 word of spec_decoding_packed_mask per token; more is unverified


def xqa_problems(*, dtype: str, num_heads: int | None, num_kv_heads: int | None, head_size: int | None,
                 tokens_per_block: int, tokens_per_step: int, tp_size: int = 1) -> list[str]:
    """Why an engine with these settings cannot run steps of `tokens_per_step` tokens per row
    (empty: it can). Engines with one token per step need none of this. Sizes left None
    (config not readable) are not checked."""
    if tokens_per_step <= 1:
        return []
    problems = []
    if dtype not in XQA_DTYPES:
        problems.append(
            f"dtype {dtype}: steps of {tokens_per_step} tokens per row run on TensorRT-LLM's XQA kernels, which "
            "take float16 or bfloat16 only: rebuild with --dtype bfloat16 (or float16); the logits stay float32.")
    if num_heads and num_kv_heads:
        heads = num_heads // tp_size
        kv_heads = max(1, num_kv_heads // tp_size)  # fewer KV heads than ranks: each rank keeps a copy of one
        group = heads // kv_heads
        if heads % kv_heads or 64 % group or group > 32:
            problems.append(
                f"{num_heads} query heads over {num_kv_heads} KV heads (tp {tp_size}) gives groups of {group} query "
                "heads per KV head; XQA verify steps need a group size that divides 64 (1, 2, 4, 8, 16 or 32). "
                "Use another model, or --draft-step-tokens 1 for a draft (one token per step needs no XQA).")
    if head_size is not None and (head_size % 16 or not 16 <= head_size <= 256):
        problems.append(f"head size {head_size}: XQA verify steps need a multiple of 16 between 16 and 256.")
    if tokens_per_block not in XQA_TOKENS_PER_BLOCK:
        problems.append(
            f"tokens per block {tokens_per_block}: XQA verify steps need one of {XQA_TOKENS_PER_BLOCK}: rebuild "
            "with --tokens-per-block 32 (or 16, 64, 128).")
    if tokens_per_step > MAX_TOKENS_PER_STEP:
        problems.append(
            f"{tokens_per_step} tokens per step (K+1): at most {MAX_TOKENS_PER_STEP} are supported (one word of the "
            f"packed attention mask per token; longer steps are unverified): rebuild with --gamma "
            f"{MAX_TOKENS_PER_STEP - 1} or less.")
    return problems


XQA_MIN_COMPUTE_CAPABILITY = (8, 0)  # the HMMA kernels a bf16/fp16 KV cache runs on (kernelUtils.cpp)


def xqa_device_problem(capability: tuple[int, int] | None, *, tokens_per_step: int, gpu: str = "this GPU") -> str | None:
    """Why `gpu` (compute capability `capability`) cannot run steps of `tokens_per_step` tokens
    per row (None: it can, or nothing to check). Verify steps run on XQA only, and XQA's kernels
    for a float16/bfloat16 KV cache need compute capability 8.0 (Ampere) or newer; an older GPU
    would fail inside the attention plugin at the first verify step."""
    if tokens_per_step <= 1 or capability is None:
        return None
    capability = (int(capability[0]), int(capability[1]))
    if capability >= XQA_MIN_COMPUTE_CAPABILITY:
        return None
    major, minor = XQA_MIN_COMPUTE_CAPABILITY
    return (f"{gpu} has compute capability {capability[0]}.{capability[1]}; an engine that verifies "
            f"{tokens_per_step} tokens per row per step runs TensorRT-LLM's XQA kernels, which need {major}.{minor} or "
            "newer (A100, L4, H100, ...). Use such a GPU, or the PyTorch runners (a transformers target) here.")


def sliding_window_problem(model: dict | None, max_seq_len: int) -> str | None:
    """Why an engine built for rows of `max_seq_len` tokens would compute wrong logits for a
    model with sliding-window attention (None: it would not). The runner passes
    `host_max_attention_window_sizes = max_seq_len` on every layer, so the engine attends to
    the whole row: a model trained with a shorter window (Mistral's 4096) would see more
    context than it was trained on as soon as a row outgrows its window. `model` holds the
    checkpoint config's `sliding_window` and `use_sliding_window` (Qwen2 has a window it
    does not use)."""
    window = (model or {}).get("sliding_window")
    if not window or (model or {}).get("use_sliding_window") is False:
        return None
    if int(window) >= int(max_seq_len):
        return None  # no row ever outgrows the window: full attention is the same thing
    return (f"the model uses sliding-window attention (sliding_window={window}) but the engine holds rows of up to "
            f"{max_seq_len} tokens and attends to all of them, which gives different logits once a row is longer "
            f"than {window} tokens: rebuild with --max-input-len + --max-output-len <= {window}, or use the "
            "PyTorch runners (EagerRunner / StaticRunner) for this model.")


def manifest_xqa_problems(manifest: dict) -> list[str]:
    model = manifest.get("model") or {}
    heads = model.get("num_attention_heads")
    hidden = model.get("hidden_size")
    head_size = model.get("head_dim") or (hidden // heads if hidden and heads else None)
    limits = limits_of(manifest)
    return xqa_problems(dtype=manifest["dtype"], num_heads=heads, num_kv_heads=model.get("num_key_value_heads"),
                        head_size=head_size, tokens_per_block=limits.tokens_per_block,
                        tokens_per_step=limits.tokens_per_step, tp_size=int(manifest["tp_size"]))


def make_manifest(
    *,
    role: str,
    source_model: str,
    dtype: str,
    tp_size: int,
    limits: EngineLimits,
    build_flags: dict,
    steps: list[list[str]],
    model: dict | None,
    trtllm_version: str,
    status: str,
) -> dict:
    if role not in ROLES:
        raise ValueError(f"role={role!r}: use 'target' or 'draft'.")
    return {
        "format": FORMAT,
        "role": role,
        "status": status,  # "built", or "planned" for a --dry-run
        "source_model": source_model,
        "model": model,  # architecture, vocab_size, layers, heads from the source config (None if unread)
        "dtype": dtype,
        "tp_size": tp_size,
        "pp_size": 1,
        "limits": asdict(limits),
        "build_flags": build_flags,  # what SMC-SD relies on: paged KV, multi-token steps, logits per position
        "steps": [shlex.join(step) for step in steps],
        "tensorrt_llm_version": trtllm_version,
    }


def write_manifest(engine_dir: str | Path, manifest: dict) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {engine_dir}: this is not an engine directory made by "
            "`hf-smcsd build-engines` (run it, or pass the directory it wrote)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise EngineMismatchError(
            f"{path} has format {manifest.get('format')!r}, this hf-smcsd reads {FORMAT!r}: rebuild the engine "
            "with this version's `hf-smcsd build-engines`."
        )
    EngineLimits(**manifest["limits"])  # validates
    return manifest


def limits_of(manifest: dict) -> EngineLimits:
    return EngineLimits(**manifest["limits"])


def rebuild_hint(manifest: dict, **needed) -> str:
    """A `hf-smcsd build-engines` command line with the limits raised to what is needed."""
    limits = limits_of(manifest)
    values = {
        "--max-prompts": max(limits.max_prompts, needed.get("prompts") or 0),
        "--particles": max(limits.particles, needed.get("particles") or 0),
        "--gamma": max(limits.gamma, needed.get("gamma") or 0),
        "--max-input-len": max(limits.max_input_len, needed.get("max_prompt_len") or 0),
        "--max-output-len": max(limits.max_output_len, needed.get("max_new_tokens") or 0),
        "--tokens-per-block": limits.tokens_per_block if limits.tokens_per_block in XQA_TOKENS_PER_BLOCK else 32,
    }
    if values["--gamma"] + 1 > MAX_TOKENS_PER_STEP:
        values["--gamma"] = MAX_TOKENS_PER_STEP - 1
    dtype = manifest["dtype"] if manifest["dtype"] in XQA_DTYPES else "bfloat16"
    parts = ["hf-smcsd build-engines", "--target <target checkpoint>", "--draft <draft checkpoint>",
             f"--dtype {dtype}", f"--tp-size {manifest['tp_size']}"]
    parts += [f"{flag} {value}" for flag, value in values.items()]
    return " ".join(parts)


def check_manifest(
    manifest: dict,
    *,
    particles: int | None = None,
    gamma: int | None = None,
    prompts: int | None = None,
    max_prompt_len: int | None = None,
    max_new_tokens: int | None = None,
    world_size: int | None = None,
) -> list[str]:
    """Every reason this engine cannot serve the request (empty list: it fits).

    Arguments left as None are not checked (a runner learns N and the prompts at prefill).
    """
    problems = []
    limits = limits_of(manifest)
    name = f"{manifest['role']} engine"
    if manifest.get("status") != "built":
        problems.append(
            f"{name} was never built (manifest status {manifest.get('status')!r}, e.g. from --dry-run): "
            "run the build steps."
        )
    if particles is not None and prompts is not None and prompts * particles > limits.max_batch_size:
        problems.append(
            f"{name} batch is {limits.max_batch_size} rows but {prompts} prompts x {particles} particles = "
            f"{prompts * particles}: pass fewer prompts per call, or rebuild with --max-prompts {prompts} "
            f"--particles {particles}."
        )
    elif particles is not None and particles > limits.max_batch_size:
        problems.append(
            f"{name} batch is {limits.max_batch_size} rows, fewer than smc_particles={particles}: rebuild with "
            f"--particles {particles}."
        )
    if gamma is not None and manifest["role"] == "target" and gamma + 1 > limits.tokens_per_step:
        problems.append(
            f"{name} verifies at most {limits.tokens_per_step} tokens per row per step but smc_gamma={gamma} "
            f"needs K+1 = {gamma + 1}: use smc_gamma <= {limits.tokens_per_step - 1}, or rebuild with --gamma {gamma}."
        )
    if max_prompt_len is not None and max_prompt_len > limits.max_input_len:
        problems.append(
            f"{name} takes prompts of up to {limits.max_input_len} tokens but one has {max_prompt_len}: "
            f"rebuild with --max-input-len {max_prompt_len}."
        )
    if max_prompt_len is not None and max_new_tokens is not None and max_prompt_len + max_new_tokens > limits.max_seq_len:
        room = limits.max_seq_len - max_prompt_len
        problems.append(
            f"{name} holds {limits.max_seq_len} tokens per row: a {max_prompt_len}-token prompt leaves room for "
            f"{room} new tokens, not max_new_tokens={max_new_tokens}: ask for fewer, or rebuild with "
            f"--max-output-len {max_new_tokens} (and --max-input-len >= {max_prompt_len})."
        )
    problems += [f"{name}: {problem}" for problem in manifest_xqa_problems(manifest)]
    window = sliding_window_problem(manifest.get("model"), limits.max_seq_len)
    if window:
        problems.append(f"{name}: {window}")
    tp = int(manifest["tp_size"])
    if world_size is not None and tp > 1 and world_size != tp:
        problems.append(
            f"{name} was built with tensor parallelism {tp} but this process group has {world_size} rank(s): "
            f"launch with `mpirun -n {tp} python <your script>`."
        )
    return problems


def require_fits(manifest: dict, **request) -> None:
    """Raise `EngineMismatchError` listing every problem `check_manifest` finds."""
    problems = check_manifest(manifest, **request)
    if problems:
        hint = rebuild_hint(manifest, **request)
        lines = "\n  - ".join(problems)
        raise EngineMismatchError(
            f"The {manifest['role']} engine built from {manifest['source_model']} cannot serve this call:\n  - {lines}\n"
            f"Rebuild both engines with, for example:\n  {hint}"
        )


def check_pair(target: dict, draft: dict) -> list[str]:
    """Problems that make two engines unusable together."""
    problems = []
    if target["role"] != "target":
        problems.append(f"the target engine's manifest says role={target['role']!r}.")
    if draft["role"] != "draft":
        problems.append(f"the draft engine's manifest says role={draft['role']!r}.")
    target_vocab = (target.get("model") or {}).get("vocab_size")
    draft_vocab = (draft.get("model") or {}).get("vocab_size")
    if target_vocab and draft_vocab and target_vocab != draft_vocab:
        problems.append(
            f"target vocabulary {target_vocab} != draft vocabulary {draft_vocab}: SMC-SD needs one shared tokenizer."
        )
    t, d = limits_of(target), limits_of(draft)
    if d.max_batch_size < t.max_batch_size:
        problems.append(
            f"draft batch {d.max_batch_size} < target batch {t.max_batch_size}: build both in one "
            "`hf-smcsd build-engines` call."
        )
    return problems
