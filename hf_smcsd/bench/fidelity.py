"""`hf-smcsd fidelity`: how closely SMC-SD follows the target, against the draft alone and
transformers' assisted generation (exact speculative sampling).

    hf-smcsd fidelity                                  # all three sections, a few minutes on a CPU
    hf-smcsd fidelity --sections task --problems 1000 --particles 1,2,4,8,16 --gammas 2,4
    hf-smcsd fidelity --sections task --problems 500 --modes smc:4/8,exact:1/4/8,mixed:4/8,auto:4/8 --gammas 4,8

Three sections (`--sections`, default all):

- exact: tiny enumerable models (vocabulary 8, 4 new tokens, EOS included): the exact target
  distribution over all outputs, and the total variation (TV) to it of the empirical
  distribution of each sampler: SMC-SD over the N x K grid, the draft alone, assisted
  generation, and the target's own sampler (a control). Each TV comes with a 95% interval
  derived from the sample count (see `tv_interval`) and the noise floor: the 95% quantile
  of the TV that a perfect sampler shows at the same sample count.
- task: accuracy on held-out arithmetic problems (`a+b=`) of the trained pair (or
  `--target/--draft`) for target sampling, the draft alone, assisted generation and
  SMC-SD, with the number of problems and a Wilson 95% interval.
- loglik: the mean target log-likelihood per generated token (at the sampling temperature)
  of each method's outputs on code prompts, with its standard error. The target's own
  samples set the reference; a sampler biased toward the draft scores lower.

`--modes` adds the engine's other modes (`smc_mode`: exact, mixed, auto) to every section,
each over `--particles` (`--exact-particles` in the exact section) unless given its own N
grid (`exact:1/4/8`).

Writes fidelity.json, fidelity_exact.csv, fidelity_task.csv, fidelity_loglik.csv and PNG plots
into `--out-dir`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ..testing import enumeration
from ..testing.tiny_models import perturbed_copy, tiny_llama
from . import common, data, real_pair
from .common import sample_outputs

SECTIONS = ("exact", "task", "loglik")
EXACT_COLUMNS = ["method", "particles", "gamma", "samples", "tv", "tv_low", "tv_high", "noise_floor_q95", "consistent",
                 "mean_log_p", "name", "schedule"]
TASK_COLUMNS = ["method", "particles", "gamma", "problems", "correct", "accuracy", "accuracy_low", "accuracy_high",
                "name", "schedule"]
LOGLIK_COLUMNS = ["method", "particles", "gamma", "samples", "tokens_per_sample", "target_loglik_per_token",
                  "stderr", "name", "schedule"]


# ----------------------------------------------------------------------------- samplers

def engine_settings(modes, gammas, particles, schedule=common.DEFAULT_SCHEDULE) -> list[dict]:
    """The engine methods to run, as `method`, `particles`, `gamma`, `schedule` settings:
    `modes` [(method, its N grid)] (`common.parse_modes`; default SMC-SD over `particles`),
    every one at every K in `gammas`."""
    modes = modes if modes is not None else [("smc-sd", particles)]
    return [{"method": method, "particles": n, "gamma": k, "schedule": tuple(schedule) if method == "mixed" else None}
            for method, grid in modes for k in gammas for n in grid]


def _with_assisted(assisted_gamma) -> list[dict]:
    """The baselines' settings: the target alone, the draft alone, assisted generation."""
    return [{"method": m, "particles": None, "gamma": assisted_gamma if m == "assisted" else None, "schedule": None}
            for m in ("target", "draft", "assisted")]


# ----------------------------------------------------------------------------- exact TV

def encode_outputs(tokens: torch.Tensor, lengths: torch.Tensor, vocab: int) -> torch.Tensor:
    """One integer per output (its tokens up to `lengths`): sum of (token+1) * (vocab+1)^i."""
    width = tokens.shape[1]
    base = (vocab + 1) ** torch.arange(width, dtype=torch.long)
    kept = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.where(kept, (tokens.cpu() + 1) * base, 0).sum(dim=1)


def encode_distribution(distribution: dict[tuple[int, ...], float], vocab: int) -> dict[int, float]:
    encoded = {}
    for sequence, p in distribution.items():
        key = sum((t + 1) * (vocab + 1) ** i for i, t in enumerate(sequence))
        encoded[key] = encoded.get(key, 0.0) + p
    return encoded


def tv_interval(keys: torch.Tensor, exact: dict[int, float], level: float = 0.95, boots: int = 400,
                seed: int = 0) -> dict:
    """TV between the empirical distribution of `keys` and `exact`, with an interval.

    With q the sampler's true distribution and q_hat the empirical one, the triangle
    inequality gives |TV(q_hat, p) - TV(q, p)| <= TV(q_hat, q). The `level` quantile d of
    TV(q_hat, q) is estimated by the bootstrap (draws of the same sample count from q_hat),
    so TV(q, p) lies in [TV - d, TV + d] (clipped to [0, 1]) at about that level. The
    interval always contains the point estimate and shrinks like 1/sqrt(samples).
    """
    if keys.numel() < 1:
        raise ValueError("keys: need at least one sample")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: use a probability in (0, 1)")
    values, counts = torch.unique(keys, return_counts=True)
    n = int(keys.numel())
    q_hat = counts.double() / n
    support = sorted(set(values.tolist()) | set(exact))
    index = {k: i for i, k in enumerate(support)}
    p = torch.zeros(len(support), dtype=torch.float64)
    for k, v in exact.items():
        p[index[k]] = v
    q = torch.zeros(len(support), dtype=torch.float64)
    q[torch.tensor([index[k] for k in values.tolist()])] = q_hat
    tv = 0.5 * float((q - p).abs().sum())
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(q_hat, n * boots, replacement=True, generator=generator).view(boots, n)
    boot_counts = torch.zeros(boots, len(q_hat), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(boots, n, dtype=torch.float64))
    spread = 0.5 * (boot_counts / n - q_hat).abs().sum(dim=1)
    d = float(torch.quantile(spread, level))
    return {"tv": tv, "tv_low": max(0.0, tv - d), "tv_high": min(1.0, tv + d), "half_width": d, "samples": n}


def exact_pair(vocab: int = 8, seed: int = 0, draft_noise: float = 0.3, eos: int = 3):
    """A tiny confident target (2 layers) and a draft that approximates it (its weights with
    noise), eval mode, float32. Their outputs' TV is about 0.3 at the defaults."""
    target = tiny_llama(vocab_size=vocab, hidden_size=32, num_layers=2, seed=seed, initializer_range=0.5,
                        eos_token_id=eos)
    draft = perturbed_copy(target, draft_noise, seed=seed + 1)
    import hf_smcsd

    return hf_smcsd.patch(target), draft


def run_exact(particles, gammas, samples: int = 2000, assisted_samples: int = 500, new_tokens: int = 4,
              vocab: int = 8, temperature: float = 1.0, seed: int = 0, prompt=(1, 2), assisted_gamma: int = 3,
              log=print, modes=None, schedule=common.DEFAULT_SCHEDULE, auto_threshold=None) -> dict:
    if not 1 <= new_tokens <= 4 or not 2 <= vocab <= 8:
        raise ValueError(f"new_tokens={new_tokens!r}, vocab={vocab!r}: the exact section enumerates outputs; "
                         "use new_tokens in 1..4 and vocab in 2..8")
    eos = 3 if vocab > 3 else vocab - 1
    target, draft = exact_pair(vocab=vocab, seed=seed, eos=eos)
    exact = encode_distribution(
        enumeration.exact_distribution(target, list(prompt), new_tokens, temperature, (eos,)), vocab)
    prompt_ids = torch.tensor([list(prompt)])

    def measure(method, samples, **kw):
        ids = prompt_ids.expand(samples, -1).contiguous()
        tokens = sample_outputs(method, target, draft, ids, torch.ones_like(ids), max_new_tokens=new_tokens,
                                temperature=temperature, stop_ids=[eos], pad_id=eos, seed=seed, **kw)
        keys = encode_outputs(tokens, common.new_token_counts(tokens, [eos]), vocab)
        result = tv_interval(keys, exact, seed=seed)
        # Exact target log-probability of the samples: a sampler that sharpens the target
        # (favours its likely outputs) scores above the target's own expectation.
        values, counts = torch.unique(keys, return_counts=True)
        log_p = torch.tensor([math.log(exact[k]) if exact.get(k, 0.0) > 0 else -math.inf for k in values.tolist()],
                             dtype=torch.float64)
        result["mean_log_p"] = float((log_p * counts).sum() / counts.sum())
        return result

    floors = {}

    def floor(n):
        if n not in floors:
            exact_tuples = {k: v for k, v in exact.items()}
            noise = enumeration.sampling_noise_tv(exact_tuples, n, repeats=200, seed=seed)
            floors[n] = float(torch.quantile(noise, 0.95))
        return floors[n]

    rows = []

    def add(method, result, particles=None, gamma=None, schedule=None):
        q95 = floor(result["samples"])
        rows.append({"method": method, "particles": particles, "gamma": gamma, "schedule": schedule, **result,
                     "noise_floor_q95": q95, "consistent": result["tv_low"] <= q95})
        rows[-1]["name"] = common.row_name(rows[-1])

    with torch.inference_mode():
        add("target", measure("target", samples))
        add("draft", measure("draft", samples))
        add("assisted", measure("assisted", assisted_samples, gamma=assisted_gamma), gamma=assisted_gamma)
        for setting in engine_settings(modes, gammas, particles, schedule):
            add(**setting, result=measure(samples=samples, auto_threshold=auto_threshold, **setting))
            log(f"fidelity exact: {rows[-1]['name']} TV {rows[-1]['tv']:.3f}")
    expected_log_p = sum(p * math.log(p) for p in exact.values() if p > 0)
    return {"rows": rows, "vocab": vocab, "new_tokens": new_tokens, "temperature": temperature,
            "prompt": list(prompt), "eos": eos, "support": len(exact), "target_mean_log_p": expected_log_p}


# ----------------------------------------------------------------------------- task and loglik

def run_task(target, draft, tokenizer, particles, gammas, problems: int = 300, temperature: float = 0.7,
             seed: int = 0, assisted_gamma: int | str = 4, batch_size: int = 100, log=print, modes=None,
             schedule=common.DEFAULT_SCHEDULE, auto_threshold=None) -> dict:
    chosen = data.heldout_problems(problems, seed=seed + 1234)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stops = [tokenizer.eos_token_id] + ([newline[0]] if len(newline) == 1 else [])
    encoded = [tokenizer(data.problem_prompt(a, b), add_special_tokens=False)["input_ids"] for a, b in chosen]
    device = target.get_input_embeddings().weight.device
    settings = _with_assisted(assisted_gamma) + engine_settings(modes, gammas, particles, schedule)
    rows = []
    for setting in settings:
        correct, started = 0, time.perf_counter()
        for start in range(0, len(chosen), batch_size):
            ids, mask = common.left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
            tokens = sample_outputs(**setting, target=target, draft=draft, input_ids=ids.to(device),
                                    attention_mask=mask.to(device), max_new_tokens=data.MAX_DIGITS + 2,
                                    temperature=temperature, stop_ids=stops, pad_id=tokenizer.pad_token_id,
                                    seed=seed + start, auto_threshold=auto_threshold)
            texts = tokenizer.batch_decode(tokens, skip_special_tokens=False)
            correct += sum(data.is_correct(a, b, t) for (a, b), t in zip(chosen[start : start + batch_size], texts))
        low, high = common.wilson_interval(correct, len(chosen))
        rows.append({**setting, "name": common.row_name(setting), "problems": len(chosen), "correct": correct,
                     "accuracy": correct / len(chosen), "accuracy_low": low, "accuracy_high": high,
                     "seconds": time.perf_counter() - started})
        log(f"fidelity task: {rows[-1]['name']}: {correct}/{len(chosen)} = {correct / len(chosen):.1%} "
            f"({rows[-1]['seconds']:.0f} s)")
    return {"rows": rows, "temperature": temperature, "max_new_tokens": data.MAX_DIGITS + 2}


def run_loglik(target, draft, tokenizer, particles, gammas, prompts: list[str], max_new_tokens: int = 48,
               temperature: float = 0.7, seeds: int = 2, seed: int = 0, assisted_gamma: int | str = 4,
               log=print, modes=None, schedule=common.DEFAULT_SCHEDULE, auto_threshold=None) -> dict:
    device = target.get_input_embeddings().weight.device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = common.left_pad(encoded, tokenizer.pad_token_id)
    settings = _with_assisted(assisted_gamma) + engine_settings(modes, gammas, particles, schedule)
    rows = []
    for setting in settings:
        values = []
        for s in range(seeds):
            tokens = sample_outputs(**setting, target=target, draft=draft, input_ids=ids.to(device),
                                    attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                    temperature=temperature, stop_ids=[], pad_id=tokenizer.pad_token_id,
                                    seed=seed + s, auto_threshold=auto_threshold).cpu()
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
            values += common.target_log_likelihood(target, ids, mask, tokens, lengths, temperature).tolist()
        mean, stderr = common.mean_and_stderr(values)
        rows.append({**setting, "name": common.row_name(setting), "samples": len(values),
                     "tokens_per_sample": max_new_tokens, "target_loglik_per_token": mean, "stderr": stderr})
        log(f"fidelity loglik: {rows[-1]['name']}: {mean:.3f} +- {stderr:.3f} nats/token")
    return {"rows": rows, "temperature": temperature, "prompts": prompts}


# ----------------------------------------------------------------------------- plots

def plot_exact(result: dict, path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    smc = [r for r in rows if r["method"] in common.ENGINE_MODES]
    _engine_lines(ax, smc, "tv", lambda line: _yerr(line, "tv", "tv_low", "tv_high"))
    styles = {"draft": ("tab:red", "-"), "assisted": ("gray", "--"), "target": ("black", ":")}
    for method, (color, style) in styles.items():
        for r in rows:
            if r["method"] == method:
                ax.axhline(r["tv"], color=color, linestyle=style, label=f"{method} alone" if method != "assisted"
                           else f"assisted (K={r['gamma']})")
                ax.axhspan(r["tv_low"], r["tv_high"], color=color, alpha=0.08)
    floor = max(r["noise_floor_q95"] for r in smc) if smc else None
    if floor is not None:
        ax.axhline(floor, color="tab:olive", linestyle="-.", label="perfect sampler, 95% quantile")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("particles N")
    ax.set_ylabel("total variation to the exact target")
    ax.set_title(f"exact fidelity (vocab {result['vocab']}, {result['new_tokens']} new tokens)")
    ax.legend(fontsize=7)
    common.save_figure(fig, path)
    return True


def plot_rows(rows: list[dict], key: str, low: str | None, high: str | None, ylabel: str, title: str,
              path: Path, stderr: str | None = None) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    _engine_lines(ax, [r for r in rows if r["method"] in common.ENGINE_MODES], key,
                  lambda line: _yerr(line, key, low, high) if low else [1.96 * r[stderr] for r in line])
    colors = {"target": "black", "draft": "tab:red", "assisted": "gray"}
    for r in rows:
        if r["method"] in colors:
            color = colors[r["method"]]
            ax.axhline(r[key], color=color, linestyle="--" if r["method"] == "assisted" else "-",
                       label=f"{r['method']} alone" if r["method"] != "assisted" else f"assisted (K={r['gamma']})")
            lo, hi = (r[low], r[high]) if low else (r[key] - 1.96 * r[stderr], r[key] + 1.96 * r[stderr])
            ax.axhspan(lo, hi, color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("particles N")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    common.save_figure(fig, path)
    return True


def _engine_lines(ax, rows, key, yerr):
    """One line against N per engine method and K (the method's marker and colour, a line
    style per K), with error bars `yerr(line)`."""
    for line, label, style in common.engine_lines(rows):
        ax.errorbar([r["particles"] for r in line], [r[key] for r in line], yerr=yerr(line), capsize=3, label=label,
                    **style)


def _yerr(rows, key, low, high):
    # Clipped at 0: an interval computed in floating point may miss its estimate by an ulp.
    return [[max(0.0, r[key] - r[low]) for r in rows], [max(0.0, r[high] - r[key]) for r in rows]]


# ----------------------------------------------------------------------------- CLI

def real_settings(args) -> list[dict]:
    """The real pair's settings: the baselines, then every engine method (as in run_task)."""
    return _with_assisted(args.assisted_gamma) + engine_settings(args.modes, args.gammas, args.particles,
                                                                 args.mixed_schedule)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hf-smcsd fidelity", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    common.add_model_arguments(parser)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--particles", default="1,2,4,8,16", help="SMC-SD N grid (default 1,2,4,8,16)")
    parser.add_argument("--gammas", default="2,4", help="K grid of every engine method, task and loglik (default 2,4)")
    common.add_mode_arguments(parser, "--particles (--exact-particles in the exact section)")
    parser.add_argument("--exact-particles", default="1,4,16,64", help="SMC-SD N grid for the exact section")
    parser.add_argument("--exact-gammas", default="1,3", help="K grid for the exact section (default 1,3)")
    parser.add_argument("--exact-samples", type=int, default=2000, help="samples per sampler (exact section)")
    parser.add_argument("--exact-assisted-samples", type=int, default=500,
                        help="samples of assisted generation (batch size 1, so one call each)")
    parser.add_argument("--exact-new-tokens", type=int, default=4, help="1..4")
    parser.add_argument("--problems", type=int, default=300, help="held-out arithmetic problems (task section)")
    parser.add_argument("--task-seeds", type=int, default=2,
                        help="with --target smollm2: samples per factual question (task section)")
    parser.add_argument("--loglik-prompts", type=int, default=8, help="code prompts (loglik section)")
    parser.add_argument("--loglik-seeds", type=int, default=2, help="samples per prompt (loglik section)")
    parser.add_argument("--loglik-new-tokens", type=int, default=48)
    parser.add_argument("--assisted-gamma", default="4",
                        help="assisted generation's draft tokens per step for task/loglik: an int or 'default'")
    parser.add_argument("--temperature", type=float, default=0.7, help="task and loglik (the exact section uses 1.0)")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.particles = common.parse_int_list(args.particles, "--particles")
        args.gammas = common.parse_int_list(args.gammas, "--gammas")
        args.exact_gammas = common.parse_int_list(args.exact_gammas, "--exact-gammas")
        args.exact_particles = common.parse_int_list(args.exact_particles, "--exact-particles")
        args.exact_modes = common.parse_modes(args.modes, args.exact_particles)
        args.modes = common.parse_modes(args.modes, args.particles)
        args.mixed_schedule = common.parse_schedule(args.mixed_schedule)
    except ValueError as error:
        parser.error(str(error))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"--sections={','.join(args.sections)!r}: use a comma-separated subset of {', '.join(SECTIONS)}")
    for name in ("exact_samples", "exact_assisted_samples", "problems", "loglik_prompts", "loglik_seeds",
                 "loglik_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 1 <= args.exact_new_tokens <= 4:
        parser.error(f"--exact-new-tokens must be in 1..4 (got {args.exact_new_tokens}): outputs are enumerated")
    if args.assisted_gamma != "default":
        try:
            args.assisted_gamma = common.parse_int_list(args.assisted_gamma, "--assisted-gamma")[0]
        except ValueError as error:
            parser.error(str(error))
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0 (got {args.temperature})")
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.quiet_transformers()
    out_dir = Path(args.out_dir)
    report = {"command": "hf-smcsd fidelity " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": dict(vars(args)), "hardware": common.hardware()}
    written = []
    start = time.perf_counter()
    if "exact" in args.sections:
        exact = run_exact(args.exact_particles, args.exact_gammas, samples=args.exact_samples,
                          assisted_samples=args.exact_assisted_samples, new_tokens=args.exact_new_tokens,
                          seed=args.seed, modes=args.exact_modes, schedule=args.mixed_schedule,
                          auto_threshold=args.auto_threshold)
        report["exact"] = exact
        common.write_csv(out_dir / "fidelity_exact.csv", exact["rows"], EXACT_COLUMNS)
        written.append(out_dir / "fidelity_exact.csv")
        print(format_rows(exact["rows"], "exact: TV to the exact target distribution (95% interval; noise floor = "
                          "what a perfect sampler shows at this sample count)", "tv", "tv_low", "tv_high",
                          extra="noise_floor_q95"))
        if not args.no_plots and plot_exact(exact, out_dir / "fidelity_tv.png"):
            written.append(out_dir / "fidelity_tv.png")
    if "task" in args.sections or "loglik" in args.sections:
        try:
            device = common.resolve_device(args.device)
            dtype = common.resolve_dtype(args.dtype, device)
            target, draft, tokenizer, names = common.load_pair(args.target, args.draft, device, dtype)
        except ValueError as error:
            parser.error(str(error))
        report["models"] = names
        report["device"], report["dtype"] = str(device), str(dtype).replace("torch.", "")
    if "task" in args.sections:
        if real_pair.is_real_pair(args.target):  # factual questions instead of arithmetic
            task = real_pair.run_task(target, draft, tokenizer, real_settings(args), temperature=args.temperature,
                                      seed=args.seed, seeds=args.task_seeds, auto_threshold=args.auto_threshold)
            args.problems = task["rows"][0]["problems"]  # questions x seeds, for the titles below
        else:
            task = run_task(target, draft, tokenizer, args.particles, args.gammas, problems=args.problems,
                            temperature=args.temperature, seed=args.seed, assisted_gamma=args.assisted_gamma,
                            modes=args.modes, schedule=args.mixed_schedule, auto_threshold=args.auto_threshold)
        report["task"] = task
        common.write_csv(out_dir / "fidelity_task.csv", task["rows"], TASK_COLUMNS)
        written.append(out_dir / "fidelity_task.csv")
        print(format_rows(task["rows"], f"task: accuracy on {args.problems} held-out problems (Wilson 95% interval), "
                          f"temperature {args.temperature}", "accuracy", "accuracy_low", "accuracy_high"))
        if not args.no_plots and plot_rows(task["rows"], "accuracy", "accuracy_low", "accuracy_high",
                                           "accuracy (factual questions)" if real_pair.is_real_pair(args.target)
                                           else "accuracy (held-out a+b=)", f"task accuracy, {args.problems} problems",
                                           out_dir / "fidelity_task.png"):
            written.append(out_dir / "fidelity_task.png")
    if "loglik" in args.sections:
        if real_pair.is_real_pair(args.target):  # chat prompts; replies end at <|im_end|>
            loglik = real_pair.run_loglik(target, draft, tokenizer, real_settings(args),
                                          real_pair.chat_prompts(tokenizer, args.loglik_prompts),
                                          max_new_tokens=args.loglik_new_tokens, temperature=args.temperature,
                                          seeds=args.loglik_seeds, seed=args.seed, auto_threshold=args.auto_threshold)
        else:
            loglik = run_loglik(target, draft, tokenizer, args.particles, args.gammas,
                                data.code_prompts(args.loglik_prompts), max_new_tokens=args.loglik_new_tokens,
                                temperature=args.temperature, seeds=args.loglik_seeds, seed=args.seed,
                                assisted_gamma=args.assisted_gamma, modes=args.modes, schedule=args.mixed_schedule,
                                auto_threshold=args.auto_threshold)
        report["loglik"] = loglik
        common.write_csv(out_dir / "fidelity_loglik.csv", loglik["rows"], LOGLIK_COLUMNS)
        written.append(out_dir / "fidelity_loglik.csv")
        for r in loglik["rows"]:
            r["low"], r["high"] = (r["target_loglik_per_token"] - 1.96 * r["stderr"],
                                   r["target_loglik_per_token"] + 1.96 * r["stderr"])
        print(format_rows(loglik["rows"], "loglik: mean target log-likelihood per token of each method's outputs "
                          "(+- 1.96 standard errors)", "target_loglik_per_token", "low", "high"))
        if not args.no_plots and plot_rows(loglik["rows"], "target_loglik_per_token", None, None,
                                           "target log-lik / token (nats)", "log-likelihood of outputs (code)",
                                           out_dir / "fidelity_loglik.png", stderr="stderr"):
            written.append(out_dir / "fidelity_loglik.png")
    report["seconds"] = time.perf_counter() - start
    common.write_json(out_dir / "fidelity.json", report)
    written.insert(0, out_dir / "fidelity.json")
    print(f"\nwrote {', '.join(map(str, written))} ({report['seconds']:.0f} s)")
    return 0


def format_rows(rows, title, key, low, high, extra=None) -> str:
    lines = ["", title]
    for r in rows:
        name = common.row_name(r)
        more = f"  (n={r.get('samples') or r.get('problems')})"
        if extra:
            more += f"  floor {r[extra]:.3f}"
        lines.append(f"  {name:<22} {r[key]:8.3f}  [{r[low]:.3f}, {r[high]:.3f}]{more}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
