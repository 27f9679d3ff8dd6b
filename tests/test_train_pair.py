"""The training script's data, tokenizer and checkpoints (tiny settings; no real training)."""

import json
import random
import re

import pytest
import torch

from conftest import load_train_pair
from hf_smcsd.bench import data



@pytest.fixture(scope="module")
def train_pair():
    return load_train_pair()


LINE = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


def test_arithmetic_lines_are_correct_and_deterministic():
    a = data.task_text(random.Random(7), 3000)
    b = data.task_text(random.Random(7), 3000)
    assert a == b
    assert a != data.task_text(random.Random(8), 3000)
    assert a.startswith(data.EOS) and len(a) >= 3000
    lines = a[len(data.EOS):].splitlines()
    assert len(lines) > 100
    for line in lines:
        x, y, z = map(int, LINE.match(line).groups())
        assert x + y == z
        assert len(line.split("+")[0]) == data.MAX_DIGITS and len(line.split("=")[1]) == data.MAX_DIGITS + 1
        assert not data.is_heldout_problem(x, y)  # training text never holds a held-out problem
    digits = {len(str(int(LINE.match(line).group(1)))) for line in lines}
    assert digits == {1, 2, 3}


def test_heldout_problems_are_held_out_distinct_and_seeded():
    problems = data.heldout_problems(200, seed=3)
    assert problems == data.heldout_problems(200, seed=3)
    assert problems != data.heldout_problems(200, seed=4)
    assert len(set(problems)) == 200
    assert all(data.is_heldout_problem(a, b) for a, b in problems)
    # About 1 in HELDOUT_MODULUS of all problems is held out.
    share = sum(data.is_heldout_problem(a, b) for a in range(300) for b in range(300)) / 300**2
    assert abs(share - 1 / data.HELDOUT_MODULUS) < 0.01


def test_problem_format_and_answer_parsing():
    assert data.problem_line(7, 45) == "007+045=0052\n"
    assert data.problem_prompt(3, 4) == data.EOS + "003+004="
    assert data.is_correct(12, 30, "0042\n007+001=0008")
    assert data.is_correct(12, 30, "42" + data.EOS)
    assert not data.is_correct(12, 30, "0420\n")
    assert not data.is_correct(12, 30, "4")
    assert not data.is_correct(12, 30, "")
    assert not data.is_correct(12, 30, "-42")


def test_file_split_is_deterministic_and_disjoint(tmp_path):
    for name in ["b.py", "a.py", "pkg/c.py", "test/skip.py", "site-packages/x.py", "d.txt"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    files = data.stdlib_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.py", "b.py", "pkg/c.py"]
    train, heldout = data.split_files(files, every=2)
    assert heldout == [files[0], files[2]] and train == [files[1]]
    with pytest.raises(ValueError, match="every"):
        data.split_files(files, every=1)


@pytest.fixture(scope="module")
def tokenizer(train_pair):
    texts = ["def f(x):\n    return x + 1\n" * 20, data.task_text(random.Random(0), 2000)]
    return train_pair.train_tokenizer(texts, 300)


def test_task_characters_are_single_tokens(train_pair, tokenizer):
    table = train_pair.task_token_map(tokenizer)
    assert set(table) == set(train_pair.TASK_CHARS)
    assert len(set(table.values())) == len(table)
    assert tokenizer.convert_tokens_to_ids(data.EOS) == 0 and tokenizer.convert_tokens_to_ids(data.PAD) == 1


def test_batches_are_deterministic_and_mix_the_task(train_pair, tokenizer):
    table = train_pair.task_token_map(tokenizer)
    stream = torch.arange(1000, dtype=torch.int32) % 200 + 2

    def batches(seed, fraction):
        return train_pair.Batches(stream, table, 0, seq_len=32, batch_size=8, task_fraction=fraction, seed=seed)

    first = batches(5, 0.5).next()
    a, b, c = batches(5, 0.5), batches(5, 0.5), batches(6, 0.5)
    runs = [[x.next() for _ in range(6)] for x in (a, b, c)]
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(runs[0], runs[1]))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(runs[0], runs[2]))
    assert torch.equal(first[0], runs[0][0][0])
    assert first[0].shape == (8, 32)
    tasks = sum(n for _, n in runs[0])
    assert 0 < tasks < 48  # a mix at 50%
    only_code = batches(5, 0.0)
    assert all(only_code.next()[1] == 0 for _ in range(3))
    task_batch, n = batches(5, 1.0).next()
    assert n == 8
    inverse = {v: k for k, v in table.items()}
    for row in task_batch:
        assert row[0].item() == 0  # EOS first, as in the evaluation prompts
        text = "".join(inverse[t] for t in row[1:].tolist())
        for line in text.split("\n")[:-1]:  # the last line may be cut by seq_len
            x, y, z = map(int, LINE.match(line).groups())
            assert x + y == z
    with pytest.raises(ValueError, match="task_fraction"):
        batches(0, 1.5)


def test_checkpoints_are_half_precision_and_load_with_the_tokenizer_class(train_pair, tokenizer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    files = train_pair.save_tokenizer(tokenizer, tmp_path / "tok")
    model = train_pair.build_model(len(tokenizer), 1, 32, 64, 4, 2, eos_id=0, pad_id=1, seed=0, max_positions=128)
    train_pair.save_half(model, files, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert next(model.parameters()).dtype == torch.float32  # the in-memory model is left as it was
    reloaded = train_pair.load_float32(tmp_path / "m")
    assert next(reloaded.parameters()).dtype == torch.float32
    assert reloaded.generation_config.eos_token_id == 0 and reloaded.generation_config.pad_token_id == 1
    loaded = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert loaded("12+3=", add_special_tokens=False)["input_ids"] == tokenizer("12+3=", add_special_tokens=False)[
        "input_ids"]
    assert loaded.padding_side == "left"
    assert "token_type_ids" not in loaded("12+3=")  # Llama takes none; 4.57 adds them unless told


@pytest.mark.parametrize("argv, named", [
    (["--target-task-fraction", "2"], "--target-task-fraction"),
    (["--vocab-size", "100"], "--vocab-size"),
    (["--draft-steps", "0"], "--draft-steps"),
])
def test_arguments_are_checked(train_pair, capsys, argv, named):
    with pytest.raises(SystemExit):
        train_pair.parse_args(argv)
    assert named in capsys.readouterr().err


def test_training_end_to_end_is_deterministic(train_pair, tmp_path):
    corpus = tmp_path / "lib"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"mod{i}.py").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n\n\nclass C{i}:\n    pass\n" * 8)
    tiny = ["--stdlib", str(corpus), "--vocab-size", "320", "--seq-len", "32", "--batch-size", "2",
            "--target-layers", "2", "--target-hidden", "32", "--target-intermediate", "64", "--target-steps", "3",
            "--draft-hidden", "16", "--draft-intermediate", "32", "--draft-steps", "2", "--eval-windows", "2",
            "--eval-problems", "5", "--max-positions", "128"]
    for run in ("a", "b"):
        assert train_pair.main(tiny + ["--out", str(tmp_path / run)]) == 0
    for name in ("target", "draft"):
        for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json",
                  "generation_config.json"):
            assert (tmp_path / "a" / name / f).read_bytes() == (tmp_path / "b" / name / f).read_bytes(), (name, f)
    assert (tmp_path / "a" / "target" / "tokenizer.json").read_bytes() == \
        (tmp_path / "a" / "draft" / "tokenizer.json").read_bytes()
    report = json.loads((tmp_path / "a" / "training.json").read_text())
    for name, layers in (("target", 2), ("draft", 1)):
        m = report["models"][name]
        assert m["layers"] == layers and m["steps"] == (3 if name == "target" else 2)
        assert m["heldout_code_loss"] > 0 and 0 <= m["heldout_task_accuracy"] <= 1
        assert m["heldout_task_problems"] == 5
    assert not (tmp_path / "a" / ".tokenizer").exists()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| target |" in card and "| draft |" in card


def _tiny_corpus(root):
    root.mkdir()
    for i in range(10):
        (root / f"mod{i}.py").write_text(f"def f{i}(x, y):\n    return x * {i} + y\n\n\nclass C{i}:\n    pass\n" * 8)
    return ["--stdlib", str(root), "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2",
            "--eval-problems", "5", "--max-positions", "128"]


def test_a_draft_for_an_existing_target_shares_its_tokenizer_and_leaves_it_alone(train_pair, tmp_path):
    common = _tiny_corpus(tmp_path / "lib")
    pair = tmp_path / "pair"
    assert train_pair.main(common + ["--out", str(pair), "--vocab-size", "320", "--target-layers", "2",
                                     "--target-hidden", "32", "--target-intermediate", "64", "--target-steps", "2",
                                     "--draft-hidden", "16", "--draft-intermediate", "32", "--draft-steps", "2"]) == 0
    target_bytes = {f.name: f.read_bytes() for f in (pair / "target").iterdir()}
    # --vocab-size and the target's options are ignored: the target's tokenizer is reused.
    weak = common + ["--target-from", str(pair / "target"), "--vocab-size", "999", "--target-steps", "7",
                     "--draft-hidden", "8", "--draft-intermediate", "16", "--draft-steps", "3",
                     "--draft-task-fraction", "0.1"]
    for run in ("w1", "w2"):
        assert train_pair.main(weak + ["--out", str(tmp_path / run)]) == 0
    w1 = tmp_path / "w1"
    assert sorted(p.name for p in w1.iterdir()) == ["README.md", "draft", "training.json"]  # no target copy
    for f in (w1 / "draft").iterdir():
        assert f.read_bytes() == (tmp_path / "w2" / "draft" / f.name).read_bytes(), f.name  # deterministic
        if f.name.startswith("tokenizer"):
            assert f.read_bytes() == target_bytes[f.name], f.name  # byte for byte the target's
    assert {f.name: f.read_bytes() for f in (pair / "target").iterdir()} == target_bytes  # target untouched
    config = json.loads((w1 / "draft" / "config.json").read_text())
    assert config["hidden_size"] == 8 and config["vocab_size"] == json.loads(target_bytes["config.json"])["vocab_size"]
    report = json.loads((w1 / "training.json").read_text())
    draft, target = report["models"]["draft"], report["models"]["target"]
    assert draft["steps"] == 3 and draft["task_fraction"] == 0.1
    assert target["path"] == (pair / "target").as_posix() and "checkpoint_mb" not in target
    assert target["steps"] == 2  # read from the target's own training.json
    alone = json.loads((pair / "training.json").read_text())["models"]
    assert target["heldout_task_accuracy"] == alone["target"]["heldout_task_accuracy"]  # same held-out problems
    assert target["heldout_code_loss"] == pytest.approx(alone["target"]["heldout_code_loss"], rel=1e-5)
    for name in ("acceptance_code", "acceptance_task"):
        assert 0 < draft[name] < 1 and 0 < alone["draft"][name] < 1
    card = (w1 / "README.md").read_text()
    assert f"--draft {w1.as_posix()}/draft" in card and "| target |" in card and "| draft |" in card


def test_acceptance_rate_is_one_for_a_model_against_itself_and_lower_for_another(train_pair):
    from hf_smcsd.testing.tiny_models import tiny_llama

    a = tiny_llama(vocab_size=32, hidden_size=16, num_layers=1, seed=0, initializer_range=0.5)
    b = tiny_llama(vocab_size=32, hidden_size=16, num_layers=1, seed=1, initializer_range=0.5)
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(0))
    where = torch.zeros(3, 10, dtype=torch.bool)
    where[:, 4:7] = True
    assert train_pair.acceptance_rate(a, a, ids, where) == pytest.approx(1.0)
    other = train_pair.acceptance_rate(a, b, ids, where, batch_size=2)
    assert 0 < other < 0.99
    with torch.no_grad():  # by hand at the marked positions: 1 - total variation
        p = torch.softmax(a(ids).logits / 0.7, -1)[where]
        q = torch.softmax(b(ids).logits / 0.7, -1)[where]
    assert other == pytest.approx(float(1 - 0.5 * (p - q).abs().sum(-1).mean()), rel=1e-5)


def test_target_from_must_be_a_saved_model(train_pair, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_pair.parse_args(["--target-from", str(tmp_path)])
    assert "--target-from" in capsys.readouterr().err


def test_code_prompts_come_from_held_out_files(tmp_path):
    for i in range(6):
        body = "import os\n\nX = 1\n\n" + "".join(f"def f{i}_{j}(a):\n    return a\n\n" for j in range(4))
        (tmp_path / f"m{i}.py").write_text(body * 2)  # repeated text: the same prompt twice in a file
    prompts = data.code_prompts(4, root=tmp_path)
    assert prompts == data.code_prompts(4, root=tmp_path)
    assert len(prompts) == len(set(prompts)) == 4
    train, heldout = data.split_files(data.stdlib_files(tmp_path))
    heldout_text = "".join(data.read_source(p) for p in heldout)
    train_text = "".join(data.read_source(p) for p in train)
    for prompt in prompts:
        assert prompt.rstrip().endswith(":") and "def " in prompt
        assert prompt in heldout_text and prompt not in train_text
    with pytest.raises(ValueError, match="count"):
        data.code_prompts(50, root=tmp_path)
