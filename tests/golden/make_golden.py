"""Golden runs of the round loop: a grid of seeded generate()-level runs whose every output
and diagnostic is recorded, so that a refactor of `hf_smcsd/smc.py` can be checked to change
nothing (same random draws in the same order, bit for bit).

    PYTHONPATH=$PWD python tests/golden/make_golden.py     # rewrite tests/golden/smc_golden.json

Only rewrite the file when a change of behaviour is intended, and say so in the commit.
`tests/test_golden.py` replays the grid and compares. Floats are stored as `float.hex`
(exact). The file is keyed by transformers' major version, in case the two supported
versions ever compute different floats for the same run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "smc_golden.json"
EOS = 3
PROMPTS_1 = [[5, 6, 7]]
PROMPTS_3 = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]  # left-padded to one width


def version_key() -> str:
    return "transformers-" + transformers.__version__.split(".")[0]


def models():
    """The conftest pair: a target and a draft that disagree noticeably (vocabulary 40, EOS 3)."""
    from hf_smcsd.testing.tiny_models import tiny_llama

    target = tiny_llama(vocab_size=40, hidden_size=48, num_layers=2, seed=0, initializer_range=0.25, eos_token_id=EOS)
    draft = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=1, initializer_range=0.25, eos_token_id=EOS)
    return target, draft


def char_tokenizer():
    """A character tokenizer over the tiny models' 40 ids (for stop strings)."""
    from tokenizers import Tokenizer, decoders, models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + ["ab"]
    tok = Tokenizer(tok_models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[("a", "b")], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<pad>")


def fixed_costs(draft_step: float):
    """auto's costs fixed (reproducible plans): a width-free 1 s verify pass, draft steps of
    `draft_step` s (0: every round drafts; 0.6: plain rounds, with a probe after 9)."""
    from hf_smcsd.planner import CostModel

    costs = CostModel()
    costs.verify.points = {1: 1.0}
    costs.draft_step.points = {1: draft_step}
    costs.overhead = {"plain": 0.0, "spec": 0.0}
    return costs


# name -> (prompts, runner, generate() keyword arguments). Every case runs with seed 0 unless
# it says `seed`. `runner`: "eager", "static" (cache_implementation="static") or "paged"
# (a PagedRunner with 4-token blocks). Budgets are chosen so most end mid-round
# (max_new_tokens - 1 not a multiple of K + 1).
CASES = {
    "smc_b1": (PROMPTS_1, "eager", dict(smc_particles=4, smc_gamma=3, max_new_tokens=12)),
    "smc_b3_eos": (PROMPTS_3, "eager", dict(smc_particles=4, smc_gamma=3, max_new_tokens=15, seed=2)),
    "smc_b3_nrs2": (PROMPTS_3, "eager", dict(smc_particles=3, smc_gamma=2, max_new_tokens=9, num_return_sequences=2)),
    "smc_topk_topp": (PROMPTS_3, "eager", dict(smc_particles=4, smc_gamma=3, max_new_tokens=10, top_k=20, top_p=0.9)),
    "smc_dead_redo": (PROMPTS_3, "eager", dict(smc_particles=3, smc_gamma=3, max_new_tokens=14, top_k=1)),
    "smc_alpha_temps": (PROMPTS_1, "eager", dict(smc_particles=4, smc_gamma=2, max_new_tokens=9, smc_alpha=2.0,
                                                 temperature=0.8, smc_draft_temperature=1.3,
                                                 smc_resample_method="multinomial")),
    "exact_b3": (PROMPTS_3, "eager", dict(smc_particles=3, smc_gamma=3, max_new_tokens=13, smc_mode="exact")),
    "exact_rep_penalty": (PROMPTS_3, "eager", dict(smc_particles=3, smc_gamma=2, max_new_tokens=11, smc_mode="exact",
                                                   repetition_penalty=1.8, top_k=0)),
    "mixed_b3": (PROMPTS_3, "eager", dict(smc_particles=4, smc_gamma=3, max_new_tokens=17, smc_mode="mixed",
                                          smc_schedule=(1, 2), repetition_penalty=1.5, top_k=0)),
    "auto_b3": (PROMPTS_3, "eager", dict(smc_particles=4, smc_gamma=2, max_new_tokens=40, smc_mode="auto",
                                         smc_auto_threshold=0.9, smc_auto_costs=fixed_costs(0.0))),
    "paged_auto_plain_b3": (PROMPTS_3, "paged", dict(smc_particles=3, smc_gamma=2, max_new_tokens=15,
                                                     smc_mode="auto", smc_auto_costs=fixed_costs(0.6))),
    "greedy_b3": (PROMPTS_3, "eager", dict(smc_particles=3, smc_gamma=3, max_new_tokens=11, do_sample=False,
                                           smc_draft_temperature=1.0)),
    "bad_words_min_new": (PROMPTS_3, "eager", dict(smc_particles=4, smc_gamma=3, max_new_tokens=12, min_new_tokens=6,
                                                   bad_words_ids=[[t] for t in range(10, 30)], top_k=0)),
    "stream": (PROMPTS_1, "eager", dict(smc_particles=4, smc_gamma=3, max_new_tokens=14, streamer=True)),
    "stop_strings": (PROMPTS_1, "eager", dict(smc_particles=6, smc_gamma=3, max_new_tokens=14, top_k=0,
                                              temperature=2.0, stop_strings=["c"], eos_token_id=None)),
    "paged_smc_b3": (PROMPTS_3, "paged", dict(smc_particles=4, smc_gamma=3, max_new_tokens=14, seed=2)),
    "paged_dead_redo": (PROMPTS_1, "paged", dict(smc_particles=3, smc_gamma=2, max_new_tokens=8, top_k=1)),
    "paged_mixed_b3": (PROMPTS_3, "paged", dict(smc_particles=3, smc_gamma=2, max_new_tokens=13, smc_mode="mixed",
                                                smc_schedule=(1, 1))),
    "static_smc_b3": (PROMPTS_3, "static", dict(smc_particles=3, smc_gamma=3, max_new_tokens=11, seed=2)),
    "static_dead_redo": (PROMPTS_3, "static", dict(smc_particles=3, smc_gamma=3, max_new_tokens=8, top_k=1)),
    "static_exact_b3": (PROMPTS_3, "static", dict(smc_particles=3, smc_gamma=2, max_new_tokens=11, smc_mode="exact")),
}


def left_pad(prompts, pad=0):
    from hf_smcsd.bench.common import left_pad as pad_left

    return pad_left(prompts, pad)


def run_case(name, target, draft):
    """Run one case; returns the SMCResult of the loop and the settings generate() gave it."""
    import hf_smcsd
    from hf_smcsd import generate as generate_module
    from hf_smcsd.runners.paged import PagedRunner

    prompts, runner, kwargs = CASES[name]
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", 0)
    if runner == "static":
        kwargs["cache_implementation"] = "static"
    if "stop_strings" in kwargs:
        kwargs["tokenizer"] = char_tokenizer()
    ids, mask = left_pad(prompts)
    captured = {"streamed": []}
    if kwargs.get("streamer"):
        kwargs["streamer"] = _Recorder(captured["streamed"])
    original = generate_module.smc_sample

    def recording(*args, **kw):
        captured["settings"] = args[4]
        captured["result"] = original(*args, **kw)
        return captured["result"]

    generate_module.smc_sample = recording
    if runner == "paged":
        for model in (target, draft):
            model.smc_runner = (lambda m: lambda: PagedRunner(m, tokens_per_block=4))(model)
    try:
        torch.manual_seed(seed)
        hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, **kwargs)
    finally:
        generate_module.smc_sample = original
        for model in (target, draft):
            vars(model).pop("smc_runner", None)
    return captured["result"], captured["settings"], captured["streamed"]


class _Recorder:
    """A streamer that records every chunk it is given (the prompt first)."""

    def __init__(self, chunks):
        self.chunks = chunks

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


def _floats(t: torch.Tensor) -> list:
    return [float(v).hex() for v in t.reshape(-1).tolist()]


def record(result, streamed) -> dict:
    """Every field of an SMCResult, in JSON form (floats exact, with their dtype and shape)."""

    def tensor(t):
        if t is None:
            return None
        t = t.cpu()
        values = _floats(t) if t.is_floating_point() else t.reshape(-1).tolist()
        return {"dtype": str(t.dtype), "shape": list(t.shape), "values": values}

    return {
        "tokens": tensor(result.tokens),
        "lengths": tensor(result.lengths),
        "log_weights": tensor(result.log_weights),
        "log_z": tensor(result.log_z),
        "chosen": tensor(result.chosen),
        "ess": [tensor(e) for e in result.ess],
        "num_resamples": tensor(result.num_resamples),
        "num_dead_redos": tensor(result.num_dead_redos),
        "num_rounds": result.num_rounds,
        "round_modes": list(result.round_modes),
        "num_smc_rounds": tensor(result.num_smc_rounds),
        "num_exact_rounds": tensor(result.num_exact_rounds),
        "smc_tokens": tensor(result.smc_tokens),
        "exact_tokens": tensor(result.exact_tokens),
        "accepted": [tensor(a) for a in result.accepted],
        "streamed": streamed,
    }


def float_fingerprint(target, draft) -> str:
    """A digest of the floats this machine computes for what the loop is made of (both models'
    forwards over a padded batch, log-softmax, exp, cumulative sums) and of the seeded draws.
    It does not depend on the loop: where it differs from the recorded one, the machine (its
    CPU's vector instructions, torch's build) computes other floats, and the golden runs cannot
    be compared bit for bit there; the test then skips instead of failing."""
    torch.manual_seed(0)
    ids = torch.tensor([[0, 9, 10], [5, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    values = []
    with torch.no_grad():
        for model in (target, draft):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            log_p = torch.log_softmax(logits / 0.7, dim=-1)
            values += [log_p, log_p.exp().cumsum(-1), torch.logsumexp(logits.double(), dim=-1)]
    values.append(torch.rand(64, dtype=torch.float64))
    digest = hashlib.sha256()
    for v in values:
        digest.update(" ".join(_floats(v)).encode())
    return digest.hexdigest()[:16]


def run_all() -> dict:
    torch.set_num_threads(1)
    target, draft = models()
    return {name: record(*run_case(name, target, draft)[::2]) for name in CASES}


def main() -> None:
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    stored[version_key()] = run_all()
    stored.setdefault("fingerprints", {})[version_key()] = float_fingerprint(*models())
    GOLDEN.write_text(json.dumps(stored, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} [{version_key()}]: {len(CASES)} cases, {GOLDEN.stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
