"""Speed of `smc_mode="auto"` against the target alone and the best fixed (mode, N, K), side by
side in one process, for several pairs and batch sizes.

Pairs (`--pairs`, comma-separated):
- `committed`: examples/models (a trained 1-layer draft for a 6-layer target);
- `weak`: examples/models_weak/draft with the committed target;
- `useless`: the committed draft's architecture with random weights (drafting never pays);
- `shapes`: random-weight models of the smcsd-134m / smcsd-18m shapes (random prompts; speed
  only: `hf_smcsd.bench.shapes`).

Per pair and batch size, every method runs `--repeats` times, methods interleaved within a
repeat so they see the same load; the median tokens per second is reported, with auto's
ratio to the target alone and to the fastest fixed setting, and auto's rounds (share of
SMC-SD / exact / plain, mean K, share of drafted rounds on one chain). Sampling at temperature 0.7, no EOS (every output has
`--max-new-tokens` tokens).

    PYTHONPATH=$PWD python build_scripts/auto_speed.py                       # all pairs, batch 1 and 8
    PYTHONPATH=$PWD python build_scripts/auto_speed.py --pairs committed --batch-sizes 1 --repeats 3

`--baseline DIR` adds auto as another checkout of the project runs it (DIR holds its
`hf_smcsd` package; e.g. `git worktree add /tmp/main main`), interleaved with the others:
a before/after comparison under the same load.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_smcsd

ROOT = Path(__file__).resolve().parent.parent


def load_pair(name: str):
    """(target, draft, prompt ids [list of lists], pad id)."""
    if name == "shapes":
        from hf_smcsd.bench import shapes

        target, draft = shapes.random_model("smcsd-134m"), shapes.random_model("smcsd-18m", seed=1)
        prompts = shapes.random_prompts(8, target.config.vocab_size, shortest=16, longest=24)
        return target, draft, prompts, 0
    target_path = ROOT / "examples/models/target"
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    if name == "useless":
        config = AutoConfig.from_pretrained(ROOT / "examples/models/draft")
        torch.manual_seed(1)
        draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        draft_path = ROOT / ("examples/models_weak/draft" if name == "weak" else "examples/models/draft")
        draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).eval()
    import sys

    sys.path.insert(0, str(ROOT / "build_scripts"))
    import auto_sweep

    prompts = [tokenizer(p).input_ids for p in auto_sweep.prompts(8, seed=7)]
    return target, draft, prompts, tokenizer.pad_token_id


def load_baseline(directory: str):
    """The `hf_smcsd` package of another checkout, imported as `hf_smcsd_baseline` (its
    modules import each other relatively, so both copies live side by side)."""
    package = Path(directory).resolve() / "hf_smcsd"
    spec = importlib.util.spec_from_file_location("hf_smcsd_baseline", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def left_pad(prompts, pad):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="committed,weak,useless,shapes")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--fixed", default="smc:4:4,smc:4:8,exact:1:2,exact:1:4,exact:4:4,exact:4:8",
                        help="fixed settings mode:N:K, comma-separated")
    parser.add_argument("--auto", default="4:4", help="auto's N:K (K is its largest block)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default=None,
                        help="a checkout whose auto runs beside this one's (before/after, same load)")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    torch.set_num_threads(1)
    fixed = [tuple(f.split(":")) for f in args.fixed.split(",") if f]
    auto_n, auto_k = map(int, args.auto.split(":"))
    for pair in args.pairs.split(","):
        target, draft, prompts, pad = load_pair(pair)
        for batch in map(int, args.batch_sizes.split(",")):
            ids, mask = left_pad((prompts * batch)[:batch], pad)
            sampling = dict(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=args.max_new_tokens,
                            eos_token_id=None, pad_token_id=pad)
            methods = {"target alone": None, f"auto N={auto_n} K<={auto_k}": ("auto", auto_n, auto_k)}
            if baseline is not None:
                methods["auto (baseline)"] = ("auto", auto_n, auto_k)
            methods.update({f"{m} N={n} K={k}": (m, int(n), int(k)) for m, n, k in fixed})
            times = {name: [] for name in methods}
            plans = []
            # One untimed warm-up of each method (and auto's cost calibration, cached per shape).
            for repeat in range(args.repeats + 1):
                for name, spec in methods.items():
                    torch.manual_seed(repeat)
                    start = time.perf_counter()
                    if spec is None:
                        target.generate(ids, attention_mask=mask, **sampling)
                    else:
                        mode, n, k = spec
                        package = baseline if name == "auto (baseline)" else hf_smcsd
                        out = package.smc_generate(target, draft, ids, attention_mask=mask, smc_mode=mode,
                                                    smc_particles=n, smc_gamma=k, return_dict_in_generate=True,
                                                    **sampling)
                        if name.startswith("auto N") and repeat:
                            plans += [p for prompt in out.round_plans for p in prompt]
                    if repeat:
                        times[name].append(time.perf_counter() - start)
            tokens = batch * args.max_new_tokens
            speed = {name: tokens / statistics.median(t) for name, t in times.items()}
            base = speed["target alone"]
            best_fixed = max((n for n in methods if methods[n] is not None and methods[n][0] != "auto"),
                             key=speed.get, default=None)
            auto_name = next(n for n in methods if n.startswith("auto"))
            mix = "".join(p["mode"] for p in plans)
            mean_k = sum(p["k"] for p in plans) / max(len(plans), 1)
            drafted = [p for p in plans if p["k"] > 0]
            one_chain = sum(p.get("chains") == 1 for p in drafted) / max(len(drafted), 1)
            print(f"\n{pair}, batch {batch}, {args.max_new_tokens} new tokens, median of {args.repeats}:")
            for name in methods:
                print(f"  {name:<18}{speed[name]:>9.1f} tok/s  {speed[name] / base:5.2f}x target")
            against_fixed = (f"auto / best fixed ({best_fixed}) {speed[auto_name] / speed[best_fixed]:.2f}x; "
                             if best_fixed else "")
            if baseline is not None:
                against_fixed += f"baseline auto / target alone {speed['auto (baseline)'] / base:.2f}x; "
            print(f"  auto / target alone {speed[auto_name] / base:.2f}x; {against_fixed}auto rounds s/e/p "
                  + "/".join(f"{mix.count(m) / max(len(mix), 1):.2f}" for m in "sep") + f", mean K {mean_k:.1f}"
                  + f", drafted rounds on one chain {one_chain:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
