"""`hf-smcsd build-engines`: TensorRT-LLM 1.2 engines for a target and a draft in one call.

    hf-smcsd build-engines --target /models/Llama-3.1-8B-Instruct --draft /models/Llama-3.2-1B-Instruct \\
        --tp-size 2 --max-prompts 8 --particles 8 --gamma 8 --max-input-len 2048 --max-output-len 512 --dry-run

Per model it runs three steps and writes a manifest:

1. `python -m hf_smcsd.engines.convert`: HF checkpoint -> TensorRT-LLM checkpoint, one shard
   per tensor-parallel rank (tensor parallelism is fixed here, not at build time).
2. `trtllm-build` with what SMC-SD needs:
   - paged KV cache with our own block tables: `--kv_cache_type paged --tokens_per_block B`,
     the gpt attention plugin and `--remove_input_padding enable` (the plugin reads
     `kv_cache_block_offsets`), `--use_paged_context_fmha enable`;
   - multi-token generation steps: `--speculative_decoding_mode lookahead_decoding
     --max_draft_len D` gives a plain Llama engine the `spec_decoding_*` inputs with which the
     attention plugin accepts D+1 tokens per row in one generation step (D = K for the target's
     K+1-token verification, 1 for the draft's 2-token catch-up step). `draft_tokens_external`
     would not do: such engines get no `spec_decoding_*` inputs (generation_mixin.py
     `prepare_basic_inputs`), so they cannot take more than one generation token per row;
   - logits for every new position: no `--gather_context_logits` (it is refused with
     max_draft_len > 0); the runner selects every position with `last_token_ids`, and
     `--logits_dtype float32` keeps the weights' precision;
   - one optimisation profile (`--multiple_profiles disable`) so one execution context
     serves prefill and generation steps.
3. Copy the tokenizer and generation config of the source checkpoint into `<engine>/hf/`,
   and write `<engine>/smcsd_manifest.json` (see `engines/manifest.py`).

`--dry-run` prints every step (and the manifests) without TensorRT-LLM installed.

TensorRT-LLM sources read for the flags (NVIDIA/TensorRT-LLM, 1.x engine-flow versions; the
1.2 line is the pin, see trt_engines/README.md for which files were confirmed at 1.2.0rc2):
`tensorrt_llm/commands/build.py` (commit 008b2b8d: argument names; `--gather_context_logits`
refused with `max_draft_len > 0`), `tensorrt_llm/builder.py` (`build()`: adds max_draft_len to
max_seq_len, raises max_num_tokens to batch x (max_draft_len+1), lookahead sets
`spec_decoding_is_generation_length_variable`), `tensorrt_llm/plugin/plugin.py`
(`cli_plugin_args`: the plugin flags above), `tensorrt_llm/models/generation_mixin.py` (commit
03ec464e: `prepare_basic_inputs`, which inputs an engine gets), `tensorrt_llm/models/modeling_utils.py`
(`SpeculativeDecodingMode.from_arguments`, `DecoderModelForCausalLM.forward` passing
`spec_decoding_params` to the layers).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import TRTLLM_PIN, EngineLimits, make_manifest, sliding_window_problem, write_manifest, xqa_problems

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPES = ("bfloat16", "float16", "float32")
SPEC_MODE = "lookahead_decoding"
# Files copied from the source checkpoint so an engine directory is self-contained.
SOURCE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class EnginePlan:
    role: str
    source: Path
    engine_dir: Path
    checkpoint_dir: Path
    tp_size: int
    limits: EngineLimits
    commands: list[list[str]]
    build_flags: dict
    model: dict | None
    notes: list[str] = field(default_factory=list)

    def manifest(self, status: str, trtllm_version: str, dtype: str) -> dict:
        return make_manifest(
            role=self.role,
            source_model=str(self.source),
            dtype=dtype,
            tp_size=self.tp_size,
            limits=self.limits,
            build_flags=self.build_flags,
            steps=self.commands,
            model=self.model,
            trtllm_version=trtllm_version,
            status=status,
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-smcsd build-engines",
        description="Build TensorRT-LLM 1.2 engines for an SMC-SD target and draft (Llama architecture).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="HF checkpoint directory of the target model")
    parser.add_argument("--draft", required=True, help="HF checkpoint directory of the draft model (same tokenizer)")
    parser.add_argument("--output-dir", default="trt_engines", help="engines go to <output-dir>/<name>")
    parser.add_argument("--target-name", help="engine directory name (default: the checkpoint's directory name)")
    parser.add_argument("--draft-name", help="engine directory name (default: the checkpoint's directory name)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="float32 is refused: verify steps run on XQA kernels (fp16/bf16); logits stay float32")
    parser.add_argument("--tp-size", type=int, default=1, help="tensor parallelism of the target (GPUs)")
    parser.add_argument(
        "--draft-tp-size", type=int, default=1,
        help="tensor parallelism of the draft; 1 replicates the draft on every rank when the target has tp > 1",
    )
    parser.add_argument("--max-prompts", type=int, default=1, help="prompts per generate() call")
    parser.add_argument("--particles", type=int, default=8, help="N, particles per prompt (engine batch = prompts x N)")
    parser.add_argument("--gamma", type=int, default=8, help="K, draft tokens per round (target steps take K+1)")
    parser.add_argument("--max-input-len", type=int, default=1024, help="longest prompt, in tokens")
    parser.add_argument("--max-output-len", type=int, default=512, help="largest max_new_tokens")
    parser.add_argument("--tokens-per-block", type=int, default=32, help="KV block size in tokens")
    parser.add_argument("--max-num-tokens", type=int, help="tokens per engine step (default: enough for a step of all rows)")
    parser.add_argument(
        "--draft-step-tokens", type=int, default=2, choices=(1, 2),
        help="tokens per draft step: 2 builds the draft with 2-token steps (one call for SMC-SD's [d_K, b] "
        "catch-up), 1 builds a plain engine (the catch-up then takes two calls)",
    )
    parser.add_argument("--workdir", help="where TensorRT-LLM checkpoints go (default: <output-dir>/.checkpoints)")
    parser.add_argument("--python", default=sys.executable, help="python of the TensorRT-LLM environment")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the converted checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and manifests; run nothing")
    args = parser.parse_args(argv)
    for name in ("tp_size", "draft_tp_size", "max_prompts", "particles", "gamma", "max_input_len", "max_output_len",
                 "tokens_per_block"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: use an integer >= 1.")
    if args.tokens_per_block & (args.tokens_per_block - 1):
        parser.error(f"--tokens-per-block={args.tokens_per_block}: use a power of two (16, 32, 64).")
    if args.draft_tp_size not in (1, args.tp_size):
        parser.error(
            f"--draft-tp-size={args.draft_tp_size}: use 1 (draft replicated on every rank) or the target's "
            f"--tp-size={args.tp_size} (both run under the same mpirun)."
        )
    return args


def read_source_config(path: Path) -> dict | None:
    """Architecture and sizes from the checkpoint's config.json (None if it is not here)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    return {
        "architecture": architectures[0] if architectures else None,
        "model_type": config.get("model_type"),
        "vocab_size": config.get("vocab_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": config.get("num_attention_heads"),
        "num_key_value_heads": config.get("num_key_value_heads", config.get("num_attention_heads")),
        "hidden_size": config.get("hidden_size"),
        "head_dim": config.get("head_dim"),
        "sliding_window": config.get("sliding_window"),
        "use_sliding_window": config.get("use_sliding_window"),
    }


def plan_builds(args: argparse.Namespace) -> list[EnginePlan]:
    output = Path(args.output_dir)
    workdir = Path(args.workdir) if args.workdir else output / ".checkpoints"
    batch = args.max_prompts * args.particles
    max_seq_len = args.max_input_len + args.max_output_len
    plans = []
    for role, source, name, tp, step_tokens in (
        ("target", Path(args.target), args.target_name, args.tp_size, args.gamma + 1),
        ("draft", Path(args.draft), args.draft_name, args.draft_tp_size, args.draft_step_tokens),
    ):
        name = name or source.name.rstrip("/") or role
        engine_dir = output / name
        checkpoint_dir = workdir / f"{name}-tp{tp}"
        max_num_tokens = args.max_num_tokens or max(batch * step_tokens, args.max_input_len)
        if max_num_tokens < max(batch * step_tokens, args.max_input_len):
            raise SystemExit(
                f"--max-num-tokens={max_num_tokens} is below what one step needs: {batch} rows x {step_tokens} tokens "
                f"= {batch * step_tokens}, and a prompt of --max-input-len={args.max_input_len}."
            )
        limits = EngineLimits(
            max_prompts=args.max_prompts, particles=args.particles, max_batch_size=batch, gamma=args.gamma,
            tokens_per_step=step_tokens, max_input_len=args.max_input_len, max_output_len=args.max_output_len,
            max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, tokens_per_block=args.tokens_per_block,
        )
        model = read_source_config(source)
        notes = []
        if model is None:
            notes.append(f"{source}/config.json is not readable here; the architecture is checked when the step runs.")
        elif model["architecture"] not in SUPPORTED_ARCHITECTURES:
            raise SystemExit(
                f"{source} is a {model['architecture']}; build-engines converts Llama-architecture checkpoints "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})."
            )
        elif model["num_key_value_heads"] and model["num_key_value_heads"] % tp and tp % model["num_key_value_heads"]:
            raise SystemExit(f"{source} has {model['num_key_value_heads']} KV heads, which tp={tp} cannot split.")
        window = sliding_window_problem(model, max_seq_len)
        if window:
            raise SystemExit(f"The {role} engine ({source}): {window}")
        heads, hidden = (model or {}).get("num_attention_heads"), (model or {}).get("hidden_size")
        problems = xqa_problems(
            dtype=args.dtype, num_heads=heads, num_kv_heads=(model or {}).get("num_key_value_heads"),
            head_size=(model or {}).get("head_dim") or (hidden // heads if hidden and heads else None),
            tokens_per_block=args.tokens_per_block, tokens_per_step=step_tokens, tp_size=tp)
        if problems:
            raise SystemExit(f"The {role} engine ({source}) would fail at its first {step_tokens}-token step:\n  - "
                             + "\n  - ".join(problems))
        convert = [args.python, "-m", "hf_smcsd.engines.convert", "--model_dir", str(source),
                   "--output_dir", str(checkpoint_dir), "--dtype", args.dtype, "--tp_size", str(tp)]
        build = [
            "trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
            "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto",
            "--remove_input_padding", "enable", "--context_fmha", "enable",
            "--kv_cache_type", "paged", "--tokens_per_block", str(args.tokens_per_block),
            "--use_paged_context_fmha", "enable",
            "--max_batch_size", str(batch), "--max_beam_width", "1",
            "--max_input_len", str(args.max_input_len), "--max_seq_len", str(max_seq_len),
            "--max_num_tokens", str(max_num_tokens),
        ]
        if step_tokens > 1:
            build += ["--speculative_decoding_mode", SPEC_MODE, "--max_draft_len", str(step_tokens - 1)]
        build += ["--logits_dtype", "float32", "--multiple_profiles", "disable", "--workers", str(tp)]
        flags = {
            "kv_cache_type": "paged",
            "tokens_per_block": args.tokens_per_block,
            "gpt_attention_plugin": "auto",
            "remove_input_padding": True,
            "use_paged_context_fmha": True,
            "speculative_decoding_mode": SPEC_MODE if step_tokens > 1 else None,
            "max_draft_len": step_tokens - 1,
            "logits": "last_token_ids selects every new position (no gather_context_logits)",
            "logits_dtype": "float32",
            "multiple_profiles": False,
        }
        plans.append(EnginePlan(role, source, engine_dir, checkpoint_dir, tp, limits, [convert, build], flags, model, notes))
    return plans


def format_plan(plans: list[EnginePlan], args: argparse.Namespace, with_manifests: bool = True) -> str:
    lines = [
        f"# hf-smcsd build-engines: {len(plans)} engines with TensorRT-LLM {TRTLLM_PIN} (the last line with the "
        "engine flow; run in its container or an environment with `pip install hf-smcsd[trt]`).",
        f"# SMC-SD limits: {args.max_prompts} prompts x {args.particles} particles = engine batch "
        f"{args.max_prompts * args.particles}; K = {args.gamma} (target steps of K+1 = {args.gamma + 1} tokens); "
        f"prompts <= {args.max_input_len} tokens; max_new_tokens <= {args.max_output_len}; "
        f"KV blocks of {args.tokens_per_block} tokens.",
    ]
    for plan in plans:
        lines.append("")
        lines.append(
            f"## {plan.role}: {plan.source} -> {plan.engine_dir} (dtype {args.dtype}, tp {plan.tp_size}, "
            f"{plan.limits.tokens_per_step} tokens per step)"
        )
        lines += [f"# note: {note}" for note in plan.notes]
        for command in plan.commands:
            lines.append(shlex.join(command))
        copy = " ".join(name for name in SOURCE_FILES)
        lines.append(f"# copy from {plan.source} into {plan.engine_dir / 'hf'} the files that exist among: {copy}")
        lines.append(f"# write {plan.engine_dir / 'smcsd_manifest.json'}")
        if with_manifests:
            manifest = plan.manifest("planned", TRTLLM_PIN, args.dtype)
            lines += ["#   " + line for line in json.dumps(manifest, indent=2).splitlines()]
    if not args.keep_checkpoints:
        lines.append("")
        lines.append(f"# remove the converted checkpoints under {plans[0].checkpoint_dir.parent}")
    lines.append("")
    tp = max(plan.tp_size for plan in plans)
    run = f"mpirun -n {tp} python your_script.py" if tp > 1 else "python your_script.py"
    lines.append(f"# then: {run}   (see trt_engines/README.md)")
    return "\n".join(lines)


def _require_trtllm() -> str:
    if importlib.util.find_spec("tensorrt_llm") is None or shutil.which("trtllm-build") is None:
        raise SystemExit(
            f"TensorRT-LLM is not installed here (need `import tensorrt_llm` and `trtllm-build`). Build on an "
            f"NVIDIA GPU machine in the TensorRT-LLM {TRTLLM_PIN} container, or `pip install hf-smcsd[trt]` with "
            "NVIDIA's package index. `--dry-run` prints the steps without it."
        )
    try:
        return importlib.metadata.version("tensorrt-llm")
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("tensorrt_llm")


def run_plan(plans: list[EnginePlan], args: argparse.Namespace) -> None:
    version = _require_trtllm()
    if not version.startswith("1.2"):
        print(f"warning: TensorRT-LLM {version} is installed; these steps were written for {TRTLLM_PIN}.", file=sys.stderr)
    for plan in plans:
        print(f"== {plan.role}: {plan.source} -> {plan.engine_dir}", flush=True)
        for command in plan.commands:
            print("$ " + shlex.join(command), flush=True)
            subprocess.run(command, check=True)
        hf_dir = plan.engine_dir / "hf"
        hf_dir.mkdir(parents=True, exist_ok=True)
        for name in SOURCE_FILES:
            if (plan.source / name).is_file():
                shutil.copy2(plan.source / name, hf_dir / name)
        if plan.model is None:
            plan.model = read_source_config(plan.source)
        path = write_manifest(plan.engine_dir, plan.manifest("built", version, args.dtype))
        print(f"wrote {path}", flush=True)
    if not args.keep_checkpoints:
        for plan in plans:
            shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    plans = plan_builds(args)
    if args.dry_run:
        print(format_plan(plans, args))
        return 0
    run_plan(plans, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
