"""Markdown tables from the JSON that `hf-smcsd bench` and `hf-smcsd fidelity` write.

    python -m hf_smcsd.bench.report results/bench.json results/fidelity.json
    python -m hf_smcsd.bench.report results/bench*.json results/fidelity*.json --plot speed_vs_accuracy.png

Used to write docs/benchmarks.md; prints to stdout. Given both kinds of report, it also
joins them: each setting's speed (relative to the target alone, measured side by side in
its own bench run, so several runs can be combined) against its task accuracy, and the
settings on the Pareto front of the two. `--plot PATH` draws that join (needs matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import ENGINE_MODES, METHOD_STYLES, method_column, pareto_front, pyplot, row_name, save_figure


def _f(value, spec=".1f", none="n/a"):
    return none if value is None or value != value else format(value, spec)  # None and NaN


def bench_tables(report: dict) -> str:
    rows = report["rows"]
    out = [
        "| method | batch | N | K | tokens/s | x target | x assisted | target log-lik/token | ESS/N | resamples/round "
        "| new tokens / target forward | ms/round draft / verify / resample / rollback / prefill / other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        method = method_column(r)
        if not r["available"]:
            out.append(f"| {method} | {r['batch_size']} | | {r['gamma']} | unavailable | | | | | | "
                       f"| {r['note']} |")
            continue
        split = ""
        if r["method"] in ENGINE_MODES:  # reports from before rollback was timed have no rollback part
            split = " / ".join(_f(r.get(f"ms_per_round_{p}"), ".1f", "-")
                               for p in ("draft", "verify", "resample", "rollback", "prefill", "other"))
        loglik = f"{r['target_loglik_per_token']:.3f} ± {1.96 * (r['target_loglik_stderr'] or 0):.3f}"
        out.append(
            f"| {method} | {r['batch_size']} | {r['particles'] or ''} | {r['gamma'] or ''} "
            f"| {r['tokens_per_s']:.1f} | {_f(r['speedup_vs_target'], '.2f')} | {_f(r['speedup_vs_assisted'], '.2f')} "
            f"| {loglik} | {_f(r.get('mean_ess_fraction'), '.2f', '')} | {_f(r.get('resample_rate'), '.2f', '')} "
            f"| {_f(r.get('tokens_per_target_call'), '.2f', '')} | {split} |"
        )
    n = next(iter(report["summary"].values())).get("min_particles", 4)
    summary = ["", "| batch | target alone | assisted (best) | SMC-SD (fastest) | x target | x assisted "
               "| x assisted at batch 1, one prompt after another | SMC-SD, fastest with N >= {n} | x target "
               "| x assisted |".format(n=n),
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fastest = ["", "| batch | method | fastest setting | tokens/s | x target | x assisted |",
               "| --- | --- | --- | --- | --- | --- |"]
    for b, s in report["summary"].items():
        assisted = (f"{s['assisted_tokens_per_s']:.1f} (K={s['assisted_best_gamma']})"
                    if s["assisted_tokens_per_s"] else "unavailable (batch 1 only)")
        best = s["smc_best"]
        smc = (f"{s['smc_tokens_per_s']:.1f} (N={best['particles']}, K={best['gamma']}) "
               f"| {s['smc_speedup_vs_target']:.2f} | {_f(s['smc_speedup_vs_assisted'], '.2f')} "
               f"| {_f(s.get('smc_throughput_vs_assisted_batch1'), '.2f')}") if best else "n/a | | |"
        summary.append(f"| {b} | {s['target_tokens_per_s']:.1f} | {assisted} | {smc} | {_corrected(s)} |")
        for method, m in s.get("fastest_by_method", {}).items():
            if method == "smc-sd":  # in the summary already
                continue
            fastest.append(f"| {b} | {method} | {m['name']} | {m['tokens_per_s']:.1f} "
                           f"| {_f(m['speedup_vs_target'], '.2f')} | {_f(m['speedup_vs_assisted'], '.2f')} |")
    if len(fastest) == 3:  # SMC-SD alone, or a report from before the engine's other modes
        fastest = []
    return "\n".join(summary + fastest + ["", *out])


def _corrected(s) -> str:
    best = s.get("smc_corrected_best")
    if not best:
        return "n/a | | "
    return (f"{s['smc_corrected_tokens_per_s']:.1f} (N={best['particles']}, K={best['gamma']}) "
            f"| {s['smc_corrected_speedup_vs_target']:.2f} | {_f(s['smc_corrected_speedup_vs_assisted'], '.2f')}")


_name = row_name  # "SMC-SD N=4 K=8", "exact N=4 K=8", "mixed(4,1) N=4 K=8", "assisted (K=4)", "target alone"


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


def _key(r) -> tuple:
    gamma, schedule = r.get("gamma"), r.get("schedule")
    return (r["method"], r.get("particles"), None if gamma is None else str(gamma),
            tuple(schedule) if schedule else None)


def speed_vs_accuracy(benches: list[dict], fidelities: list[dict], batch_size: int = 1) -> list[dict]:
    """Join bench rows at `batch_size` with task-accuracy rows of the same method, N and K.

    Speed is the speedup over the target alone *of the same bench run* (absolute tokens/s
    of runs made under different load do not compare). Where reports repeat a setting,
    the first one given wins. Each joined row is marked `pareto` when no other row is at
    least as fast and as accurate and strictly better in one of the two.
    """
    speed, accuracy = {}, {}
    for report in benches:
        for r in report["rows"]:
            if r["batch_size"] == batch_size and r["available"] and r.get("speedup_vs_target") is not None:
                speed.setdefault(_key(r), r)
    for report in fidelities:
        for r in report.get("task", {}).get("rows", []):
            accuracy.setdefault(_key(r), r)
    joined = [
        {"method": key[0], "particles": key[1], "gamma": speed[key]["gamma"], "schedule": key[3],
         "speedup_vs_target": speed[key]["speedup_vs_target"], "accuracy": accuracy[key]["accuracy"],
         "accuracy_low": accuracy[key]["accuracy_low"], "accuracy_high": accuracy[key]["accuracy_high"],
         "problems": accuracy[key]["problems"]}
        for key in speed if key in accuracy
    ]
    front = set(pareto_front([(r["speedup_vs_target"], -r["accuracy"]) for r in joined]))
    for i, r in enumerate(joined):
        r["pareto"] = i in front
    return sorted(joined, key=lambda r: -r["speedup_vs_target"])


def speed_vs_accuracy_table(joined: list[dict], batch_size: int = 1) -> str:
    out = [f"| method | x target (batch {batch_size}) | task accuracy | Wilson 95% interval | Pareto front |",
           "| --- | --- | --- | --- | --- |"]
    for r in joined:
        out.append(f"| {_name(r)} | {r['speedup_vs_target']:.2f} | {r['accuracy']:.1%} "
                   f"| [{r['accuracy_low']:.1%}, {r['accuracy_high']:.1%}] | {'yes' if r['pareto'] else ''} |")
    return "\n".join(out)


def plot_speed_vs_accuracy(joined: list[dict], path: Path, batch_size: int = 1) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, (marker, color) in METHOD_STYLES.items():
        pts = [r for r in joined if r["method"] == method]
        if pts:
            ax.errorbar([r["accuracy"] for r in pts], [r["speedup_vs_target"] for r in pts],
                        xerr=[[max(0.0, r["accuracy"] - r["accuracy_low"]) for r in pts],
                              [max(0.0, r["accuracy_high"] - r["accuracy"]) for r in pts]],
                        fmt=marker, color=color, capsize=2, label=method if method != "assisted"
                        else f"assisted (K={pts[0]['gamma']})")
    for r in joined:
        if r["method"] in ENGINE_MODES:
            ax.annotate(f"{r['particles']},{r['gamma']}", (r["accuracy"], r["speedup_vs_target"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in joined if r["pareto"]), key=lambda r: r["accuracy"])
    ax.plot([r["accuracy"] for r in front], [r["speedup_vs_target"] for r in front], "-", color="tab:red",
            alpha=0.6, label="Pareto front")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"task accuracy ({joined[0]['problems']} problems, Wilson 95%)")
    ax.set_ylabel(f"speed / target alone's (batch {batch_size})")
    ax.set_title("speed against task accuracy (labels N,K)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    plot_path = None
    if "--plot" in args:
        i = args.index("--plot")
        if i + 1 >= len(args):
            print("--plot needs a PATH for the PNG, e.g. --plot speed_vs_accuracy.png", file=sys.stderr)
            return 2
        plot_path = Path(args[i + 1])
        del args[i : i + 2]
    if not args:
        print(__doc__.strip())
        return 2
    benches, fidelities = [], []
    for path in args:
        report = json.loads(Path(path).read_text())
        print(f"<!-- from {path}: {report.get('command', '')} -->")
        if "summary" in report:
            benches.append(report)
            print(bench_tables(report))
        else:
            fidelities.append(report)
            print(fidelity_tables(report))
        print()
    joined = speed_vs_accuracy(benches, fidelities) if benches and fidelities else []
    if joined:
        print(speed_vs_accuracy_table(joined))
        if plot_path is not None and plot_speed_vs_accuracy(joined, plot_path):
            print(f"\n<!-- wrote {plot_path} -->")
    elif plot_path is not None:
        print("--plot needs a bench report and a fidelity report with a task section", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
