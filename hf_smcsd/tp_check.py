"""The tensor-parallel check: SMC-SD with a tp_plan-sharded target against a single process.

    python -m hf_smcsd.tp_check --make DIR                       # a small random Llama pair, saved
    torchrun --nproc-per-node N -m hf_smcsd.tp_check --models DIR [--device cuda] [--out r.json]

Every rank loads the target sharded over all ranks (`distributed.load_tp_model`) and the
draft whole (replicated), and, as the single-process reference, the target unsharded. For
SMC-SD sampling, exact mode and greedy verification, on the eager and the static runner, each
rank runs generate() with the sharded target and with the reference, from the same seed; rank
1 and up seed their generators differently on purpose (hf_smcsd gives every rank rank 0's
generator state). Rank 0 prints one line per case: whether every rank returned the same tokens,
and whether they equal the single-process run. Exit code 0 only if every case agrees.

Last, with two ranks or more, rank 1 is given a different draft: the lockstep check must stop
that generate() with an error on every rank, instead of a hang or different text. `--time`
also times the replicated draft against a sharded one. `scripts/tp_check.sh N` runs it on N GPUs;
`tests/test_tensor_parallel.py` runs it with two CPU processes (gloo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]
CASES = (  # name, generate() arguments
    ("smc sample, eager", dict(do_sample=True, smc_resample_threshold=0.9)),
    ("smc sample, static", dict(do_sample=True, smc_resample_threshold=0.9, cache_implementation="static")),
    ("exact, eager", dict(do_sample=True, smc_mode="exact")),
    ("exact, static", dict(do_sample=True, smc_mode="exact", cache_implementation="static")),
    ("greedy, eager", dict(do_sample=False)),
    ("greedy, static", dict(do_sample=False, cache_implementation="static")),
)


def make_models(root: Path, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> None:
    from .testing.tiny_models import tiny_llama, truncated_copy

    target = tiny_llama(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        num_kv_heads=kv_heads, initializer_range=0.3, seed=0)
    target.save_pretrained(root / "target")
    truncated_copy(target, max(1, layers // 2)).save_pretrained(root / "draft")


def _left_pad(device):
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _generate(target, draft, knobs: dict, seed: int, device, max_new_tokens: int):
    ids, mask = _left_pad(device)
    torch.manual_seed(seed)
    sampling = {"top_k": 0} if knobs.get("do_sample") else {}  # the whole distribution
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, smc_particles=4, smc_gamma=3,
                          max_new_tokens=max_new_tokens, pad_token_id=0, return_dict_in_generate=True,
                          **sampling, **knobs)
    accepted = [sum(map(int, per_prompt)) for per_prompt in (out.accepted_draft_tokens or [])]
    return {"sequences": out.sequences.cpu().tolist(), "log_weights": out.log_weights.cpu().double().tolist(),
            # what the caches went through: resamples (reorders) and exact rounds (rollbacks)
            "resamples": int(out.num_resamples.sum()), "exact_rounds": int(out.num_exact_rounds.sum()),
            "accepted_draft_tokens": accepted}


def run(args) -> int:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from . import patch
    from .distributed import load_tp_model, torchrun_world

    rank, world, local_rank = torchrun_world()
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference must compute the same way
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    models = Path(args.models)
    target = patch(load_tp_model(models / "target", dtype=torch.float32))
    draft = AutoModelForCausalLM.from_pretrained(models / "draft", dtype=torch.float32).to(device).eval()
    reference = patch(AutoModelForCausalLM.from_pretrained(models / "target", dtype=torch.float32).to(device).eval())
    results, started = [], time.perf_counter()
    for name, knobs in CASES:
        # Rank 0 seeds as the reference does; the others differently, on purpose:
        # generate() gives every rank rank 0's generator state.
        sharded = _generate(target, draft, knobs, args.seed + 7919 * rank, device, args.max_new_tokens)
        single = _generate(reference, draft, knobs, args.seed, device, args.max_new_tokens)
        results.append({"case": name, "sharded": sharded, "single": single})
    caught = _divergence_caught(target, draft, rank, device) if world > 1 else None
    seconds = time.perf_counter() - started
    timing = _time_drafts(args, target, draft, device, models) if args.time else None
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    ok = True
    if rank == 0:
        report = {"world_size": world, "device": str(device), "transformers": _version("transformers"),
                  "torch": torch.__version__, "cases": [], "seconds": seconds, "timing": timing}
        print(f"tp_check: {world} ranks on {device.type}, transformers {report['transformers']}, torch {torch.__version__}")
        for index, (name, _) in enumerate(CASES[: len(results)]):
            tokens = [per_rank[index]["sharded"]["sequences"] for per_rank in gathered]
            single = gathered[0][index]["single"]["sequences"]
            same_ranks = all(t == tokens[0] for t in tokens)
            same_single = tokens[0] == single
            weights = torch.tensor(gathered[0][index]["sharded"]["log_weights"])
            single_weights = torch.tensor(gathered[0][index]["single"]["log_weights"])
            finite = torch.isfinite(weights) & torch.isfinite(single_weights)
            diff = float((weights - single_weights)[finite].abs().max()) if bool(finite.any()) else 0.0
            ok = ok and same_ranks and same_single
            first = gathered[0][index]["sharded"]
            print(f"{'PASS' if same_ranks and same_single else 'FAIL'}  {name}: ranks identical: {same_ranks}; "
                  f"= single process: {same_single}; max |log weight diff| {diff:.1e}; {first['resamples']} resamples, "
                  f"{first['exact_rounds']} exact rounds, accepted draft tokens {first['accepted_draft_tokens']}")
            for r, t in enumerate(tokens):
                print(f"      rank {r}: {t}")
            print(f"      single: {single}")
            report["cases"].append({"case": name, "ranks_identical": same_ranks, "equals_single_process": same_single,
                                    "max_log_weight_diff": diff, "tokens_per_rank": tokens, "single_process": single,
                                    "resamples": first["resamples"], "exact_rounds": first["exact_rounds"],
                                    "accepted_draft_tokens": first["accepted_draft_tokens"]})
        if caught is not None:
            ok = ok and caught
            print(f"{'PASS' if caught else 'FAIL'}  lockstep guard: rank 1 given a different draft; the run stopped with "
                  f"an error on every rank: {caught}")
            report["divergence_caught"] = caught
        if timing:
            print(f"timing (s per generate, {timing['repeats']} repeats): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in timing.items() if k != "repeats"))
        print(f"{'ALL AGREE' if ok else 'MISMATCH'} in {seconds:.1f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    verdict = [ok]
    dist.broadcast_object_list(verdict, src=0)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if verdict[0] else 1


def _divergence_caught(target, draft, rank, device) -> bool:
    """True if a generate() whose rank 1 has a different draft fails on every rank with the
    lockstep error (rather than hanging, or returning different text per rank)."""
    import copy

    import torch.distributed as dist

    different = copy.deepcopy(draft)
    if rank == 1:
        with torch.no_grad():
            different.lm_head.weight.add_(torch.randn_like(different.lm_head.weight))
    try:
        _generate(target, different, {"do_sample": True}, 0, device, 4)
        mine = False
    except RuntimeError as error:
        if "diverged" not in str(error):
            raise
        mine = True
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return all(every)


def _time_drafts(args, target, draft, device, models):
    """Seconds per SMC-SD generate() with the draft replicated and with it sharded too."""
    from .distributed import load_tp_model

    sharded_draft = load_tp_model(models / "draft", dtype=torch.float32)
    ids, mask = _left_pad(device)
    timing = {"repeats": 3}
    for name, d in (("replicated draft", draft), ("sharded draft", sharded_draft)):
        target.generate(ids, attention_mask=mask, assistant_model=d, smc_particles=4, max_new_tokens=8, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(timing["repeats"]):
            target.generate(ids, attention_mask=mask, assistant_model=d, smc_particles=4,
                            max_new_tokens=args.max_new_tokens, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing[name] = (time.perf_counter() - began) / timing["repeats"]
    return timing


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_smcsd.tp_check", description=__doc__.splitlines()[0])
    parser.add_argument("--make", metavar="DIR", help="save a random Llama target and its truncated draft to DIR")
    parser.add_argument("--models", metavar="DIR", help="run the check (under torchrun) with DIR/target, DIR/draft")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="write the report as JSON (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--time", action="store_true", help="also time a replicated against a sharded draft")
    for name, default in (("vocab", 128), ("hidden", 64), ("layers", 2), ("heads", 4), ("kv-heads", 2)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"--make: model {name} (default {default})")
    args = parser.parse_args(argv)
    if args.make:
        make_models(Path(args.make), vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads)
        return 0
    if not args.models:
        parser.error("pass --make DIR or --models DIR")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
