"""Markdown tables from the JSON that `hf-smcsd bench` and `hf-smcsd fidelity` write.

    python -m hf_smcsd.bench.report results/bench.json results/fidelity.json

Used to write docs/benchmarks.md; prints to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, spec=".1f", none="n/a"):
    return none if value is None else format(value, spec)


def bench_tables(report: dict) -> str:
    rows = report["rows"]
    out = [
        "| method | batch | N | K | tokens/s | x target | x assisted | target log-lik/token | ESS/N | resamples/round "
        "| ms/round draft / verify / resample / prefill / other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if not r["available"]:
            out.append(f"| {r['method']} | {r['batch_size']} | | {r['gamma']} | unavailable | | | | | "
                       f"| {r['note']} |")
            continue
        split = ""
        if r["method"] == "smc-sd":
            split = " / ".join(f"{r[f'ms_per_round_{p}']:.1f}" for p in ("draft", "verify", "resample", "prefill",
                                                                          "other"))
        loglik = f"{r['target_loglik_per_token']:.3f} ± {1.96 * (r['target_loglik_stderr'] or 0):.3f}"
        out.append(
            f"| {r['method']} | {r['batch_size']} | {r['particles'] or ''} | {r['gamma'] or ''} "
            f"| {r['tokens_per_s']:.1f} | {_f(r['speedup_vs_target'], '.2f')} | {_f(r['speedup_vs_assisted'], '.2f')} "
            f"| {loglik} | {_f(r.get('mean_ess_fraction'), '.2f', '')} | {_f(r.get('resample_rate'), '.2f', '')} "
            f"| {split} |"
        )
    n = next(iter(report["summary"].values())).get("min_particles", 4)
    summary = ["", "| batch | target alone | assisted (best) | SMC-SD (fastest) | x target | x assisted "
               "| x assisted at batch 1, one prompt after another | SMC-SD, fastest with N >= {n} | x target "
               "| x assisted |".format(n=n),
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b, s in report["summary"].items():
        assisted = (f"{s['assisted_tokens_per_s']:.1f} (K={s['assisted_best_gamma']})"
                    if s["assisted_tokens_per_s"] else "unavailable (batch 1 only)")
        best = s["smc_best"]
        summary.append(f"| {b} | {s['target_tokens_per_s']:.1f} | {assisted} | {s['smc_tokens_per_s']:.1f} "
                       f"(N={best['particles']}, K={best['gamma']}) | {s['smc_speedup_vs_target']:.2f} "
                       f"| {_f(s['smc_speedup_vs_assisted'], '.2f')} "
                       f"| {_f(s.get('smc_throughput_vs_assisted_batch1'), '.2f')} "
                       f"| {_corrected(s)} |")
    return "\n".join(summary + ["", *out])


def _corrected(s) -> str:
    best = s.get("smc_corrected_best")
    if not best:
        return "n/a | | "
    return (f"{s['smc_corrected_tokens_per_s']:.1f} (N={best['particles']}, K={best['gamma']}) "
            f"| {s['smc_corrected_speedup_vs_target']:.2f} | {_f(s['smc_corrected_speedup_vs_assisted'], '.2f')}")


def _name(r):
    if r["method"] == "smc-sd":
        return f"SMC-SD N={r['particles']} K={r['gamma']}"
    if r["method"] == "assisted":
        return f"assisted (K={r['gamma']})"
    return f"{r['method']} alone"


def fidelity_tables(report: dict) -> str:
    parts = []
    if "exact" in report:
        e = report["exact"]
        parts += [f"Exact (vocabulary {e['vocab']}, {e['new_tokens']} new tokens, {e['support']} possible outputs, "
                  f"temperature {e['temperature']}):", "",
                  "| sampler | samples | TV to the exact target | 95% interval | perfect sampler's 95% quantile "
                  f"| mean exact log p of the samples (target's own expectation: {e['target_mean_log_p']:.3f}) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in e["rows"]:
            parts.append(f"| {_name(r)} | {r['samples']} | {r['tv']:.3f} | [{r['tv_low']:.3f}, {r['tv_high']:.3f}] "
                         f"| {r['noise_floor_q95']:.3f} | {r['mean_log_p']:.3f} |")
        parts.append("")
    if "task" in report:
        t = report["task"]
        n = t["rows"][0]["problems"]
        parts += [f"Task ({n} held-out `a+b=` problems, temperature {t['temperature']}):", "",
                  "| method | correct | accuracy | Wilson 95% interval |", "| --- | --- | --- | --- |"]
        for r in t["rows"]:
            parts.append(f"| {_name(r)} | {r['correct']}/{r['problems']} | {r['accuracy']:.1%} "
                         f"| [{r['accuracy_low']:.1%}, {r['accuracy_high']:.1%}] |")
        parts.append("")
    if "loglik" in report:
        ll = report["loglik"]
        parts += [f"Target log-likelihood of the outputs ({len(ll['prompts'])} code prompts, temperature "
                  f"{ll['temperature']}):", "",
                  "| method | samples | tokens each | mean target log-lik / token | ± 1.96 s.e. |",
                  "| --- | --- | --- | --- | --- |"]
        for r in ll["rows"]:
            parts.append(f"| {_name(r)} | {r['samples']} | {r['tokens_per_sample']} "
                         f"| {r['target_loglik_per_token']:.3f} | {1.96 * r['stderr']:.3f} |")
    return "\n".join(parts)


def main(argv=None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(__doc__.strip())
        return 2
    for path in paths:
        report = json.loads(Path(path).read_text())
        print(f"<!-- from {path}: {report.get('command', '')} -->")
        print(bench_tables(report) if "summary" in report else fidelity_tables(report))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
