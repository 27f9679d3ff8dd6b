"""`hf-smcsd bench` and `hf-smcsd fidelity` on tiny seeded models with very small settings.

Speed is never asserted: only the structure of the results and the properties that hold
whatever the timings (unavailable entries, counts, intervals, shares of a whole).
"""

import csv
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

import hf_smcsd
from hf_smcsd.bench import bench, common, data, fidelity
from hf_smcsd.testing.tiny_models import tiny_llama

from conftest import full_log_probs, left_pad, load_train_pair

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    target = hf_smcsd.patch(tiny_llama(vocab_size=48, hidden_size=32, num_layers=2, seed=0, initializer_range=0.3))
    draft = tiny_llama(vocab_size=48, hidden_size=16, num_layers=1, seed=1, initializer_range=0.3)
    return target, draft


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [4, 4]]


@pytest.fixture(scope="module")
def rows(models):
    target, draft = models
    return bench.run_bench(target, draft, PROMPTS, pad_id=0, batch_sizes=[1, 2], particles=[1, 3], gammas=[2],
                           assisted_gammas=["default", 2], max_new_tokens=5, repeats=2, warmup=0, seed=0,
                           log=lambda *_: None)


def test_bench_rows_cover_the_grid_and_mark_assisted_unavailable(rows):
    keys = {(r["method"], r["batch_size"], r["particles"], r["gamma"]) for r in rows}
    expected = set()
    for b in (1, 2):
        expected |= {("target", b, None, None), ("assisted", b, None, "default"), ("assisted", b, None, 2)}
        expected |= {("smc-sd", b, n, 2) for n in (1, 3)}
    assert keys == expected and len(rows) == len(expected)
    for r in rows:
        unavailable = r["method"] == "assisted" and r["batch_size"] > 1
        assert r["available"] is (not unavailable)
        if unavailable:
            assert r.get("tokens_per_s") is None and r["speedup_vs_target"] is None
            assert "batch size 1" in r["note"]
        else:
            assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_repeats"]) == 2
            assert r["new_tokens"] == 5 * r["batch_size"]  # EOS ignored: every method writes max_new_tokens
            assert math.isfinite(r["target_loglik_per_token"]) and r["target_loglik_per_token"] < 0


def test_bench_counts_new_tokens_per_target_forward(rows):
    """The target alone makes one forward per new token; assisted generation with K=2 gets
    between 1 and K+1 tokens per forward (1 + accepted draft tokens per block); a random
    draft against a random target is rejected often, so it cannot reach K+1 every time."""
    for r in rows:
        if r["method"] == "target":
            assert r["tokens_per_target_call"] == pytest.approx(1.0)
        elif r["method"] == "assisted" and r["available"]:
            upper = 3 if r["gamma"] == 2 else 21  # "default": up to 20 draft tokens per block
            assert 1.0 <= r["tokens_per_target_call"] <= upper, r
        elif r["method"] == "smc-sd":
            # The target's prefill gives the first token, then each round K+1=3: 5 tokens in 1 + 2 forwards.
            assert r["tokens_per_target_call"] == pytest.approx(5 / 3)
        else:
            assert r.get("tokens_per_target_call") is None


def test_bench_speedups_and_smc_diagnostics(rows):
    target = {r["batch_size"]: r for r in rows if r["method"] == "target"}
    best_assisted = max(r["tokens_per_s"] for r in rows if r["method"] == "assisted" and r["available"])
    for r in rows:
        if not r["available"]:
            continue
        assert r["speedup_vs_target"] == pytest.approx(r["tokens_per_s"] / target[r["batch_size"]]["tokens_per_s"])
        if r["batch_size"] == 1:
            assert r["speedup_vs_assisted"] == pytest.approx(r["tokens_per_s"] / best_assisted)
        else:
            assert r["speedup_vs_assisted"] is None  # nothing to compare with at batch > 1
    for r in (r for r in rows if r["method"] == "smc-sd"):
        n = r["particles"]
        assert 1 - 1e-9 <= r["mean_ess"] <= n + 1e-9
        assert r["mean_ess_fraction"] == pytest.approx(r["mean_ess"] / n)
        assert 0 <= r["resample_rate"] <= 1
        if n == 1:
            assert r["resample_rate"] == 0 and r["mean_ess"] == pytest.approx(1.0)
        # 5 new tokens, K=2: x0, then rounds of up to 3 tokens -> 2 rounds.
        assert r["rounds"] == 2
        shares = [r[f"share_{p}"] for p in common.TIME_PARTS]
        assert all(s >= 0 for s in shares) and sum(shares) == pytest.approx(1.0)
        assert r["ms_per_round_draft"] > 0 and r["ms_per_round_verify"] > 0
    summary = bench.summarize(rows, min_particles=3)
    assert summary["2"]["assisted_tokens_per_s"] is None and "batch size 1" in summary["2"]["assisted_note"]
    assert summary["1"]["smc_corrected_best"] == {"particles": 3, "gamma": 2}
    assert bench.summarize(rows, min_particles=4)["1"]["smc_corrected_best"] is None
    assert summary["1"]["assisted_tokens_per_s"] == best_assisted
    assert summary["1"]["smc_tokens_per_s"] == max(r["tokens_per_s"] for r in rows
                                                   if r["method"] == "smc-sd" and r["batch_size"] == 1)
    text = bench.format_table(rows)
    assert text.count("unavailable") == 2


def test_instrumentation_does_not_change_outputs_and_is_removed(models):
    target, draft = models
    ids, mask = left_pad(PROMPTS[:2])
    kwargs = dict(assistant_model=draft, smc_particles=3, smc_gamma=2, do_sample=True, max_new_tokens=7,
                  return_dict_in_generate=True)
    torch.manual_seed(3)
    plain = target.generate(ids, attention_mask=mask, **kwargs)
    timer = common.Timer(torch.device("cpu"))
    with common.instrumented(target, draft, timer):
        torch.manual_seed(3)
        timed = target.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(plain.sequences, timed.sequences)
    assert "smc_runner" not in vars(target) and "smc_runner" not in vars(draft)
    assert timer.calls["prefill"] == 2  # one prefill per model
    assert timer.calls["verify"] == timed.num_rounds
    assert timer.calls["draft"] == 2 * timed.num_rounds  # K=2 draft forwards per round
    split = common.time_split(timer, total_seconds=sum(timer.seconds.values()) + 0.01, rounds=timed.num_rounds)
    assert split["ms_per_round_other"] == pytest.approx(10 / timed.num_rounds)


def test_target_log_likelihood_matches_a_full_forward_with_left_padding(models):
    target, _ = models
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    new = torch.tensor([[1, 2, 3, 4], [7, 8, 9, 0]])
    lengths = torch.tensor([4, 3])
    ids, mask = left_pad(prompts)
    got = common.target_log_likelihood(target, ids, mask, new, lengths, temperature=0.7, chunk_rows=1)
    for i, prompt in enumerate(prompts):
        tokens = prompt + new[i, : lengths[i]].tolist()
        lp = full_log_probs(target, tokens, temperature=0.7)
        expected = sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(new[i, : lengths[i]].tolist()))
        assert got[i].item() == pytest.approx(expected / lengths[i].item(), abs=1e-4)


def test_new_token_counts_stop_at_the_first_stop():
    tokens = torch.tensor([[1, 2, 3, 2], [3, 1, 1, 1], [1, 1, 1, 1]])
    assert common.new_token_counts(tokens, [3]).tolist() == [3, 1, 4]
    assert common.new_token_counts(tokens, []).tolist() == [4, 4, 4]


def test_wilson_interval():
    low, high = common.wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-3)
    assert common.wilson_interval(300, 300)[1] == 1.0 and common.wilson_interval(0, 300)[0] == 0.0
    for k, n in [(3, 10), (50, 100), (99, 100), (500, 1000)]:
        low, high = common.wilson_interval(k, n)
        assert 0 <= low <= k / n <= high <= 1
    assert (lambda a, b: b - a)(*common.wilson_interval(500, 1000)) < (lambda a, b: b - a)(*common.wilson_interval(5, 10))
    with pytest.raises(ValueError, match="trials"):
        common.wilson_interval(0, 0)


def test_draft_parameters_leave_out_what_the_target_shares():
    target = tiny_llama(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    draft = tiny_llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, seed=1)
    alone = common.count_parameters(draft)
    assert common.count_parameters(draft, shared_with=target) == alone
    assert common.describe_parameters(draft, target) == f"{alone / 1e6:.1f}M"
    embedding = target.get_input_embeddings().weight
    draft.model.embed_tokens.weight = embedding  # as the real pair's loader attaches it
    draft.lm_head.weight = embedding
    shared = embedding.numel()
    assert common.count_parameters(draft, shared_with=target) == common.count_parameters(draft) - shared
    assert common.describe_parameters(draft, target).endswith(f"+ {shared / 1e6:.1f}M shared with the target")


def test_pareto_front():
    points = [(10, 0.5), (5, 0.1), (8, 0.6), (10, 0.4), (1, 0.0)]
    assert bench.pareto_front(points) == [1, 3, 4]


def test_tv_interval_contains_the_estimate_and_shrinks_with_samples():
    exact = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    widths = []
    for n in (200, 5000):
        keys = torch.multinomial(probs, n, replacement=True, generator=generator)
        result = fidelity.tv_interval(keys, exact, seed=1)
        assert result["tv_low"] <= result["tv"] <= result["tv_high"]
        assert result["samples"] == n
        assert result["tv_low"] == 0.0  # an exact sampler: the interval reaches zero
        widths.append(result["half_width"])
    assert widths[1] < widths[0] / 2
    # A wrong sampler: its interval excludes zero and holds the true TV (0.3 here).
    wrong = torch.multinomial(torch.tensor([0.2, 0.3, 0.45, 0.05]), 5000, replacement=True, generator=generator)
    result = fidelity.tv_interval(wrong, exact, seed=1)
    assert result["tv_low"] > 0 and result["tv_low"] <= 0.3 <= result["tv_high"]


def test_output_encoding_matches_the_exact_distribution_keys():
    tokens = torch.tensor([[1, 3, 0, 0], [2, 2, 2, 2], [3, 0, 0, 0]])
    lengths = common.new_token_counts(tokens, [3])
    keys = fidelity.encode_outputs(tokens, lengths, vocab=4)
    encoded = fidelity.encode_distribution({(1, 3): 0.2, (2, 2, 2, 2): 0.3, (3,): 0.5}, vocab=4)
    assert keys.tolist() == list(encoded)


def test_exact_section_separates_the_draft_from_the_target():
    result = fidelity.run_exact([1, 8], [1], samples=600, assisted_samples=60, new_tokens=2, vocab=5,
                                log=lambda *_: None)
    rows = {(r["method"], r["particles"]): r for r in result["rows"]}
    assert set(rows) == {("target", None), ("draft", None), ("assisted", None), ("smc-sd", 1), ("smc-sd", 8)}
    for r in result["rows"]:
        assert r["tv_low"] <= r["tv"] <= r["tv_high"]
        assert r["noise_floor_q95"] > 0
    assert rows[("target", None)]["consistent"]  # the target's own sampler is within noise
    assert not rows[("draft", None)]["consistent"]  # the draft is not
    assert rows[("smc-sd", 8)]["tv"] < rows[("draft", None)]["tv"]
    assert rows[("assisted", None)]["samples"] == 60
    # The target's own samples score near the exact expectation of log p; the draft's lower.
    assert result["target_mean_log_p"] < 0
    assert rows[("draft", None)]["mean_log_p"] < rows[("target", None)]["mean_log_p"]


# ----------------------------------------------------------------------------- the CLI on a saved pair

@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny target/draft pair saved like the committed one (tokenizer with digits, float16)."""
    train_pair = load_train_pair()
    texts = ["def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20, data.task_text(random.Random(0), 3000)]
    tokenizer = train_pair.train_tokenizer(texts, 300)
    root = tmp_path_factory.mktemp("pair")
    files = train_pair.save_tokenizer(tokenizer, root / "tok")
    for name, layers, hidden, seed in (("target", 2, 32, 0), ("draft", 1, 16, 1)):
        model = train_pair.build_model(len(tokenizer), layers, hidden, 2 * hidden, 4, 2, eos_id=0, pad_id=1,
                                       seed=seed, max_positions=256)
        train_pair.save_half(model, files, root / name)
    prompts = root / "prompts.txt"
    prompts.write_text("def f(x):\n---\nclass A:\n    def g(self):\n---\nimport os\n")
    return root


def test_bench_cli_writes_csv_json_and_plots(saved_pair, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--target", str(saved_pair / "target"), "--draft", str(saved_pair / "draft"), "--batch-sizes", "1,2",
            "--particles", "2", "--gammas", "2", "--assisted-gammas", "2", "--max-new-tokens", "4",
            "--repeats", "1", "--warmup", "0", "--prompts-file", str(saved_pair / "prompts.txt"),
            "--out-dir", str(out)]
    assert bench.main(argv) == 0
    with open(out / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        table = list(reader)
    assert len(table) == 6
    unavailable = [r for r in table if r["available"] == "False"]
    assert [(r["method"], r["batch_size"]) for r in unavailable] == [("assisted", "2")]
    assert unavailable[0]["tokens_per_s"] == "" and "batch size 1" in unavailable[0]["note"]
    report = json.loads((out / "bench.json").read_text())
    assert {"command", "settings", "models", "hardware", "summary", "rows", "prompts"} <= set(report)
    assert report["summary"]["2"]["assisted_tokens_per_s"] is None
    assert report["dtype"] == "float32"  # the float16 checkpoint runs in float32 on a CPU
    assert len(report["prompts"]) == 2
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench_tokens_per_s.png").stat().st_size > 0 and (out / "bench_pareto.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "unavailable" in printed and "batch 1:" in printed
    from hf_smcsd.bench import report as markdown

    assert markdown.main([str(out / "bench.json")]) == 0
    tables = capsys.readouterr().out
    assert "| 2 | " in tables and "unavailable (batch 1 only)" in tables
    assert tables.count("| smc-sd |") == 2


def test_fidelity_cli_task_and_loglik(saved_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "code_prompts", lambda count, **_: ["def f(x):\n", "import os\n"][:count])
    out = tmp_path / "out"
    argv = ["--target", str(saved_pair / "target"), "--draft", str(saved_pair / "draft"), "--sections",
            "task,loglik", "--particles", "1,2", "--gammas", "2", "--problems", "12", "--loglik-prompts", "2",
            "--loglik-seeds", "1", "--loglik-new-tokens", "4", "--out-dir", str(out)]
    assert fidelity.main(argv) == 0  # with plots: intervals at 0% must still draw
    report = json.loads((out / "fidelity.json").read_text())
    task = report["task"]["rows"]
    assert [r["method"] for r in task] == ["target", "draft", "assisted", "smc-sd", "smc-sd"]
    for r in task:
        assert r["problems"] == 12 and 0 <= r["correct"] <= 12
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
    for r in report["loglik"]["rows"]:
        assert r["samples"] == 2 and r["target_loglik_per_token"] < 0
    with open(out / "fidelity_task.csv") as f:
        assert csv.DictReader(f).fieldnames == fidelity.TASK_COLUMNS
    from hf_smcsd.bench import report as markdown

    tables = markdown.fidelity_tables(report)
    assert tables.count("SMC-SD N=") == 4 and "/12 |" in tables
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "fidelity_task.png").exists() and (out / "fidelity_loglik.png").exists()


@pytest.mark.parametrize("module, argv, named", [
    (bench, ["--particles", "0"], "--particles"),
    (bench, ["--batch-sizes", "x"], "--batch-sizes"),
    (bench, ["--target", "somewhere"], "--draft"),
    (bench, ["--temperature", "0"], "--temperature"),
    (fidelity, ["--sections", "exact,speed"], "--sections"),
    (fidelity, ["--exact-new-tokens", "6"], "--exact-new-tokens"),
])
def test_bad_arguments_name_the_argument(module, argv, named, capsys):
    with pytest.raises(SystemExit) as raised:
        module.main(argv)
    assert raised.value.code == 2
    assert named in capsys.readouterr().err


def test_missing_committed_pair_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "DEFAULT_TARGET", tmp_path / "target")
    monkeypatch.setattr(common, "DEFAULT_DRAFT", tmp_path / "draft")
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "1"])
    err = capsys.readouterr().err
    assert "train_pair.py" in err and "--target" in err


def test_gsm8k_answers_are_extracted_without_the_hub():
    spec = importlib.util.spec_from_file_location("gsm8k", ROOT / "examples" / "gsm8k.py")
    gsm8k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsm8k)  # imports no `datasets` until problems are loaded
    assert gsm8k.gold_answer("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    assert gsm8k.predicted_answer("so 3 + 4 = 7 apples.\n#### 7.00") == "7"
    assert gsm8k.predicted_answer("first 12, then 30, total 42") == "42"
    assert gsm8k.predicted_answer("no idea") is None
    assert gsm8k.predicted_answer("#### -5") == "-5"
    with pytest.raises(ValueError, match="solution"):
        gsm8k.gold_answer("no marker 5")


def test_gsm8k_passes_the_engine_modes_to_the_sampler(monkeypatch):
    spec = importlib.util.spec_from_file_location("gsm8k", ROOT / "examples" / "gsm8k.py")
    gsm8k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsm8k)
    seen = []

    def sampler(method, target, draft, ids, mask, **kw):
        seen.append((method, kw["particles"], kw["gamma"], kw["schedule"], kw["auto_threshold"], len(ids)))
        return torch.tensor([[5, 6]] * len(ids))

    class Tokenizer:
        pad_token_id = 0

        def batch_decode(self, tokens, **_):
            return ["#### 7"] * len(tokens)

    monkeypatch.setattr(gsm8k, "sample_outputs", sampler)
    row = gsm8k.run_method("mixed", None, None, Tokenizer(), [[1, 2], [3], [4]], ["7", "8", "7"], particles=4, gamma=8,
                           batch_size=2, schedule=(2, 1), auto_threshold=0.5, device=torch.device("cpu"))
    assert seen == [("mixed", 4, 8, (2, 1), 0.5, 2), ("mixed", 4, 8, (2, 1), 0.5, 1)]
    assert row["name"] == "mixed(2,1) N=4 K=8" and row["correct"] == 2 and row["new_tokens"] == 6


def _bench_row(method, n, k, speedup, batch_size=1, available=True):
    return {"method": method, "particles": n, "gamma": k, "batch_size": batch_size, "available": available,
            "speedup_vs_target": speedup}


def _task_row(method, n, k, accuracy):
    return {"method": method, "particles": n, "gamma": k, "accuracy": accuracy, "accuracy_low": accuracy - 0.02,
            "accuracy_high": accuracy + 0.02, "problems": 100}


def test_speed_vs_accuracy_join_and_front(tmp_path, capsys, monkeypatch):
    from hf_smcsd.bench import report as markdown

    first = {"summary": {}, "rows": [
        _bench_row("target", None, None, 1.0), _bench_row("assisted", None, "default", 0.7),
        _bench_row("assisted", None, 4, 0.6), _bench_row("smc-sd", 4, 2, 1.5), _bench_row("smc-sd", 8, 2, 1.1),
        _bench_row("smc-sd", 4, 2, 0.5, batch_size=8),  # another batch size: not joined
        _bench_row("assisted", None, 4, None, batch_size=8, available=False),
    ]}
    second = {"summary": {}, "rows": [_bench_row("target", None, None, 1.0), _bench_row("smc-sd", 16, 2, 0.8),
                                      _bench_row("smc-sd", 4, 2, 9.9)]}  # a repeat: the first report wins
    fidelity = {"task": {"rows": [
        _task_row("target", None, None, 0.95), _task_row("draft", None, None, 0.5), _task_row("assisted", None, 4, 0.94),
        _task_row("smc-sd", 4, 2, 0.80), _task_row("smc-sd", 8, 2, 0.90), _task_row("smc-sd", 16, 2, 0.93),
        _task_row("smc-sd", 32, 2, 0.95),  # no bench row: not joined
    ]}}
    joined = markdown.speed_vs_accuracy([first, second], [fidelity])
    by_name = {markdown._name(r): r for r in joined}
    assert list(by_name) == ["SMC-SD N=4 K=2", "SMC-SD N=8 K=2", "target alone", "SMC-SD N=16 K=2", "assisted (K=4)"]
    assert by_name["SMC-SD N=4 K=2"]["speedup_vs_target"] == 1.5
    assert by_name["assisted (K=4)"]["accuracy"] == 0.94
    front = {name for name, r in by_name.items() if r["pareto"]}
    # N=16 (0.8x, 93%) and assisted (0.6x, 94%) are beaten on both by the target (1.0x, 95%).
    assert front == {"SMC-SD N=4 K=2", "SMC-SD N=8 K=2", "target alone"}

    paths = []
    for i, rep in enumerate([first, second, fidelity]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({**rep, "command": "x"} if "task" in rep else rep))
    # Only the join is checked here: these stub reports lack the columns of the full tables.
    monkeypatch.setattr(markdown, "bench_tables", lambda report: "")
    monkeypatch.setattr(markdown, "fidelity_tables", lambda report: "")
    png = tmp_path / "join.png"
    assert markdown.main([str(p) for p in paths] + ["--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| SMC-SD N=8 K=2 | 1.10 | 90.0% | [88.0%, 92.0%] | yes |" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
    assert markdown.main([str(paths[0]), "--plot"]) == 2


# ----------------------------------------------------------------------------- the engine's modes as methods

def test_modes_schedules_knobs_and_names():
    assert common.parse_modes("smc", [1, 2]) == [("smc-sd", [1, 2])]
    assert common.parse_modes("smc:4/8, exact:1/4/8,mixed,auto:2", [3]) == [
        ("smc-sd", [4, 8]), ("exact", [1, 4, 8]), ("mixed", [3]), ("auto", [2])]
    for bad, says in (("fast", "unknown mode"), ("exact:0", "--modes"), ("smc,smc:4", "named twice"), ("", "--modes")):
        with pytest.raises(ValueError, match=says):
            common.parse_modes(bad, [1])
    assert common.parse_schedule("4,1") == (4, 1) and common.parse_schedule("0,2") == (0, 2)
    for bad in ("4", "a,1", "0,0", "-1,2", "1,2,3"):
        with pytest.raises(ValueError, match="--mixed-schedule"):
            common.parse_schedule(bad)
    assert common.engine_knobs("smc-sd") == {}  # the default mode: nothing passed, runs on any version
    assert common.engine_knobs("exact") == {"smc_mode": "exact"}
    assert common.engine_knobs("mixed", (2, 3)) == {"smc_mode": "mixed", "smc_schedule": (2, 3)}
    assert common.engine_knobs("mixed") == {"smc_mode": "mixed", "smc_schedule": (4, 1)}
    assert common.engine_knobs("auto", auto_threshold=0.8) == {"smc_mode": "auto", "smc_auto_threshold": 0.8}
    assert common.engine_knobs("auto") == {"smc_mode": "auto"}
    with pytest.raises(ValueError, match="engine"):
        common.engine_knobs("assisted")
    assert [common.method_name(*a) for a in [("smc-sd", 4, 8), ("exact", 1, 4), ("mixed", 4, 8, (4, 1)),
                                             ("auto", 8, 8), ("assisted", None, "default"), ("target",)]] == [
        "SMC-SD N=4 K=8", "exact N=1 K=4", "mixed(4,1) N=4 K=8", "auto N=8 K=8", "assisted (K=default)",
        "target alone"]


def engine_stand_in(generate, calls):
    """A generate() that records the engine's mode knobs it is given and runs SMC-SD in their
    place: the harnesses' plumbing is tested here, the modes themselves in the library's tests."""

    def stand_in(*args, **kwargs):
        knobs = {k: kwargs.pop(k) for k in ("smc_mode", "smc_schedule", "smc_auto_threshold") if k in kwargs}
        if kwargs.get("smc_particles") is not None:
            calls.append((knobs, kwargs["smc_particles"], kwargs["smc_gamma"], len(kwargs.get("input_ids", args[-1:]))))
        return generate(*args, **kwargs)

    return stand_in


MODES = [("smc-sd", [2]), ("exact", [1, 2]), ("mixed", [2]), ("auto", [2])]


def test_bench_runs_every_engine_mode_with_its_knobs(models, monkeypatch):
    target, draft = models
    calls = []
    monkeypatch.setattr(target, "generate", engine_stand_in(target.generate, calls))
    rows = bench.run_bench(target, draft, PROMPTS, pad_id=0, batch_sizes=[1, 2], particles=[9], gammas=[2, 3],
                           assisted_gammas=[2], max_new_tokens=4, repeats=1, warmup=0, log=lambda *_: None,
                           modes=MODES, schedule=(2, 1), auto_threshold=0.7)
    engine = [r for r in rows if r["method"] in common.ENGINE_MODES]
    names = [r["name"] for r in engine if r["batch_size"] == 1]
    assert names == ["SMC-SD N=2 K=2", "SMC-SD N=2 K=3", "exact N=1 K=2", "exact N=1 K=3", "exact N=2 K=2",
                     "exact N=2 K=3", "mixed(2,1) N=2 K=2", "mixed(2,1) N=2 K=3", "auto N=2 K=2", "auto N=2 K=3"]
    assert len(engine) == 2 * len(names)
    # Each setting reached generate() with its own knobs: timed, instrumented (no loglik call).
    expected = {"smc-sd": {}, "exact": {"smc_mode": "exact"}, "mixed": {"smc_mode": "mixed", "smc_schedule": (2, 1)},
                "auto": {"smc_mode": "auto", "smc_auto_threshold": 0.7}}
    for r in engine:
        made = [c for c in calls if c[1:] == (r["particles"], r["gamma"], r["batch_size"])
                and c[0] == expected[r["method"]]]
        assert len(made) == 2, r["name"]  # one timed repeat, one instrumented run
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 4 * r["batch_size"]
        assert r["speedup_vs_target"] > 0 and 1 <= r["tokens_per_target_call"] <= r["gamma"] + 1
        assert r["ms_per_round_verify"] > 0 and r["ms_per_round_rollback"] == 0  # SMC-SD stands in: no rollback
    assert {r["schedule"] for r in engine if r["method"] == "mixed"} == {(2, 1)}
    assert {r["auto_threshold"] for r in engine if r["method"] == "auto"} == {0.7}
    summary = bench.summarize(rows)
    assert set(summary["1"]["fastest_by_method"]) == {"smc-sd", "exact", "mixed", "auto"}
    fastest_exact = max((r for r in engine if r["method"] == "exact" and r["batch_size"] == 2),
                        key=lambda r: r["tokens_per_s"])
    assert summary["2"]["fastest_by_method"]["exact"]["name"] == fastest_exact["name"]
    text = bench.format_table(rows)
    assert "mixed(2,1)" in text and text.count("\nexact ") == 8


def test_timed_runner_books_rollback_and_forwards_the_rest():
    class Inner:
        vocab_size = 7
        tables = "the inner runner's own attribute"

        def __init__(self):
            self.dropped = None

        def rollback(self, drop):
            self.dropped = drop

    inner, timer = Inner(), common.Timer(torch.device("cpu"))
    runner = common.TimedRunner(inner, timer, "verify")
    runner.rollback(torch.tensor([0, 2]))
    assert inner.dropped.tolist() == [0, 2] and timer.calls == {"rollback": 1}
    assert runner.tables == Inner.tables
    split = common.time_split(timer, total_seconds=1.0, rounds=1)
    assert split["ms_per_round_rollback"] == pytest.approx(1000 * timer.seconds["rollback"])


@pytest.mark.skipif("smc_mode" not in hf_smcsd.generate.SMC_KNOBS, reason="this version has no smc_mode yet")
def test_bench_runs_the_real_modes(models):
    target, draft = models
    rows = bench.run_bench(target, draft, PROMPTS, pad_id=0, batch_sizes=[1, 2], particles=[2], gammas=[2],
                           assisted_gammas=[2], max_new_tokens=5, repeats=1, warmup=0, log=lambda *_: None,
                           modes=[("exact", [1, 2]), ("mixed", [2]), ("auto", [2])])
    for r in rows:
        if r["method"] in common.ENGINE_MODES:
            assert r["new_tokens"] == 5 * r["batch_size"] and r["tokens_per_s"] > 0
            # auto's first call calibrates its costs (a few target forwards, cached per shape)
            lowest = 0.3 if r["method"] == "auto" else 1
            assert lowest <= r["tokens_per_target_call"] <= 3 and r["ms_per_round_verify"] > 0


def test_fidelity_cli_runs_every_engine_mode_with_its_knobs(saved_pair, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(common, "smc_generate",
                        lambda target, draft, ids, **kw: engine_stand_in(
                            lambda *a, **k: hf_smcsd.smc_generate(target, draft, *a, **k), calls)(ids, **kw))
    monkeypatch.setattr(data, "code_prompts", lambda count, **_: ["def f(x):\n", "import os\n"][:count])
    out = tmp_path / "out"
    argv = ["--target", str(saved_pair / "target"), "--draft", str(saved_pair / "draft"), "--sections",
            "exact,task,loglik", "--modes", "smc:2,exact:1/2,mixed,auto", "--particles", "3", "--gammas", "2",
            "--exact-particles", "4", "--exact-gammas", "1", "--exact-samples", "40", "--exact-assisted-samples", "5",
            "--exact-new-tokens", "2", "--mixed-schedule", "2,1", "--auto-threshold", "0.6", "--problems", "6",
            "--loglik-prompts", "2", "--loglik-seeds", "1", "--loglik-new-tokens", "3", "--out-dir", str(out)]
    assert fidelity.main(argv) == 0
    report = json.loads((out / "fidelity.json").read_text())
    engine = ["SMC-SD N=2 K=2", "exact N=1 K=2", "exact N=2 K=2", "mixed(2,1) N=3 K=2", "auto N=3 K=2"]
    for section in ("task", "loglik"):
        assert [r["name"] for r in report[section]["rows"]] == ["target alone", "draft alone", "assisted (K=4)", *engine]
    # The exact section's grid: --exact-particles where a mode names none, K from --exact-gammas.
    assert [r["name"] for r in report["exact"]["rows"]][3:] == [
        "SMC-SD N=2 K=1", "exact N=1 K=1", "exact N=2 K=1", "mixed(2,1) N=4 K=1", "auto N=4 K=1"]
    assert {tuple(sorted(c[0].items())) for c in calls} == {
        (), (("smc_mode", "exact"),), (("smc_mode", "mixed"), ("smc_schedule", (2, 1))),
        (("smc_auto_threshold", 0.6), ("smc_mode", "auto"))}
    task = {r["name"]: r for r in report["task"]["rows"]}
    assert task["mixed(2,1) N=3 K=2"]["schedule"] == [2, 1] and task["exact N=2 K=2"]["problems"] == 6
    with open(out / "fidelity_task.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)][3:] == engine
    from hf_smcsd.bench import report as markdown

    tables = markdown.fidelity_tables(report)
    for name in engine:
        assert f"| {name} |" in tables


def test_speed_vs_accuracy_joins_modes_by_schedule():
    from hf_smcsd.bench import report as markdown

    bench_report = {"summary": {}, "rows": [
        _bench_row("target", None, None, 1.0), _bench_row("exact", 4, 8, 1.3),
        {**_bench_row("mixed", 4, 8, 1.9), "schedule": [1, 1]}, {**_bench_row("mixed", 4, 8, 1.6), "schedule": [4, 1]},
        _bench_row("auto", 4, 8, 1.7), _bench_row("smc-sd", 4, 8, 2.0)]}
    task = {"task": {"rows": [
        _task_row("target", None, None, 0.96), _task_row("exact", 4, 8, 0.96),
        {**_task_row("mixed", 4, 8, 0.93), "schedule": [4, 1]}, _task_row("auto", 4, 8, 0.90),
        _task_row("smc-sd", 4, 8, 0.85)]}}  # no accuracy for mixed(1,1): not joined
    joined = markdown.speed_vs_accuracy([bench_report], [task])
    names = [markdown._name(r) for r in joined]
    assert names == ["SMC-SD N=4 K=8", "auto N=4 K=8", "mixed(4,1) N=4 K=8", "exact N=4 K=8", "target alone"]
    assert joined[2]["speedup_vs_target"] == 1.6 and joined[2]["accuracy"] == 0.93
    assert [r["pareto"] for r in joined] == [True, True, True, True, False]  # exact: as accurate and faster
    table = markdown.speed_vs_accuracy_table(joined)
    assert "| mixed(4,1) N=4 K=8 | 1.60 | 93.0% |" in table


def test_bench_tables_show_modes_and_the_fastest_of_each(models, monkeypatch):
    from hf_smcsd.bench import report as markdown

    target, draft = models
    monkeypatch.setattr(target, "generate", engine_stand_in(target.generate, []))
    rows = bench.run_bench(target, draft, PROMPTS, pad_id=0, batch_sizes=[1], particles=[2], gammas=[2],
                           assisted_gammas=[2], max_new_tokens=3, repeats=1, warmup=0, log=lambda *_: None,
                           modes=[("exact", [2]), ("mixed", [2])], schedule=(3, 1))
    tables = markdown.bench_tables(json.loads(json.dumps(common._jsonable({"summary": bench.summarize(rows),
                                                                           "rows": rows}))))
    assert "| mixed(3,1) | 1 | 2 | 2 |" in tables and "| exact | 1 | 2 | 2 |" in tables
    assert "| 1 | exact | exact N=2 K=2 |" in tables and "| 1 | mixed | mixed(3,1) N=2 K=2 |" in tables
    assert "| 1 | n/a | | |" not in tables  # no SMC-SD row: the summary says n/a in its own columns
