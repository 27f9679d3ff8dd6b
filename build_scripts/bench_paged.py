#!/usr/bin/env python
"""Paged runner vs eager runner for long prompts with resampling (CPU by default).

    python build_scripts/bench_paged.py                       # prompt lengths 256 1024 2048
    python build_scripts/bench_paged.py --lengths 512 --particles 8 --device cuda

Two measurements per prompt length, on seeded random Llama models (nothing downloaded):

1. runner level, the cost SMC-SD adds: prefill one prompt, expand to N particles, then rounds
   of a (K+1)-token extend followed by a resample that kills half the particles (the copy
   plan of a real resampling step). Reported: time per extend, time per resample, KV memory.
2. end to end: `smc_sample` with a target and a draft, both on the same runner kind, with
   resampling forced every round (`resample_threshold=1.0`) and at the default 0.5.

Not a test: numbers depend on the machine (and on the other processes sharing it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_smcsd.resampling import CopyPlan
from hf_smcsd.runners.eager import EagerRunner
from hf_smcsd.runners.paged import PagedRunner
from hf_smcsd.smc import SMCSettings, smc_sample
from hf_smcsd.testing.tiny_models import tiny_llama, truncated_copy


def half_die_plan(n: int) -> CopyPlan:
    """Particles n/2.. die and take copies of particles 0..n/2-1 (one group)."""
    half = n // 2
    return CopyPlan(dest=torch.arange(half, n), src=torch.arange(half))


def kv_bytes(runner) -> int:
    if isinstance(runner, PagedRunner):
        per_block = runner.pool.numel() // runner.allocator.num_blocks
        return runner.allocator.num_used * per_block * runner.pool.element_size()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in runner.cache.layers)


def runner_level(model, make, length, n, k, rounds, device):
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    runner = make(model)
    start = time.perf_counter()
    runner.prefill(ids, torch.ones_like(ids), n)
    prefill = time.perf_counter() - start
    extends, reorders = [], []
    plan = half_die_plan(n)
    for _ in range(rounds):
        tokens = torch.randint(0, model.config.vocab_size, (n, k + 1), device=device)
        start = time.perf_counter()
        runner.extend(tokens)
        extends.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner.reorder(plan)
        reorders.append(time.perf_counter() - start)
    return prefill, statistics.median(extends), statistics.median(reorders), kv_bytes(runner)


def end_to_end(target, draft, make, length, n, k, new_tokens, threshold, device, repeats=2):
    ids = torch.randint(0, target.config.vocab_size, (1, length), device=device)
    settings = SMCSettings(particles=n, gamma=k, max_new_tokens=new_tokens, resample_threshold=threshold)
    times, resamples = [], 0
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        start = time.perf_counter()
        result = smc_sample(make(target), make(draft), ids, torch.ones_like(ids), settings)
        times.append(time.perf_counter() - start)
        resamples = int(result.num_resamples.sum())
    return min(times), resamples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    target = tiny_llama(vocab_size=512, hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                        max_position_embeddings=8192, initializer_range=0.05).to(device)
    draft = truncated_copy(target, 1)
    makers = {
        "eager": EagerRunner,
        "paged": lambda m: PagedRunner(m, tokens_per_block=args.tokens_per_block, num_blocks=1024),
    }
    n, k = args.particles, args.gamma
    print(f"Llama hidden {args.hidden}, {args.layers} layers (draft: 1), N={n}, K={k}, {args.threads} threads, "
          f"{args.device}, block {args.tokens_per_block} tokens")
    print("\n1) runner level: prefill, then rounds of a (K+1)-token extend + a resample killing half the particles")
    print(f"{'prompt':>7} {'runner':>6} {'prefill ms':>11} {'extend ms':>10} {'resample ms':>12} {'KV MiB':>8}")
    with torch.no_grad():
        for length in args.lengths:
            for name, make in makers.items():
                prefill, extend, reorder, memory = runner_level(target, make, length, n, k, args.rounds, device)
                print(f"{length:>7} {name:>6} {prefill * 1e3:>11.1f} {extend * 1e3:>10.2f} {reorder * 1e3:>12.3f} "
                      f"{memory / 2**20:>8.1f}", flush=True)
        if args.skip_end_to_end:
            return 0
        print(f"\n2) smc_sample end to end, {args.new_tokens} new tokens (best of 2 runs)")
        print(f"{'prompt':>7} {'tau':>4} {'eager s':>8} {'paged s':>8} {'speedup':>8} {'resamples':>10}")
        for length in args.lengths:
            for threshold in (1.0, 0.5):
                eager, resamples = end_to_end(target, draft, makers["eager"], length, n, k, args.new_tokens, threshold,
                                              device)
                paged, _ = end_to_end(target, draft, makers["paged"], length, n, k, args.new_tokens, threshold, device)
                print(f"{length:>7} {threshold:>4} {eager:>8.2f} {paged:>8.2f} {eager / paged:>7.2f}x {resamples:>10}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
