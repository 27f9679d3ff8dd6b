"""`hf-smcsd generate` (issue 10): one prompt streamed to stdout, a file of prompts, --json."""

import json
from pathlib import Path

import pytest

from hf_smcsd import cli

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
PAIR = ["--target", str(MODELS / "target"), "--draft", str(MODELS / "draft")]

pytestmark = pytest.mark.skipif(not (MODELS / "target").exists(), reason="the trained pair is not in examples/models")


def test_generate_is_a_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_one_prompt_streams_its_completion(capsys):
    assert cli.main(["generate", *PAIR, "--prompt", "def add(a, b):", "--max-new-tokens", "12", "-N", "4"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.strip() and "def add" not in streamed  # the completion only, not the prompt


def test_json_for_a_file_of_prompts(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("12+30=\n\nimport os\n")
    argv = ["generate", *PAIR, "--prompts-file", str(prompts), "--max-new-tokens", "6", "-N", "4", "-K", "2", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == ["12+30=", "import os"]
    assert len(result["completions"]) == len(result["sequences"]) == len(result["log_z"]) == 2
    assert result["settings"]["smc_particles"] == 4 and len(result["ess"]) == 2
    # seeded: the same call gives the same sequences
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == result["sequences"]


def test_k_schedule_reaches_the_json(capsys):
    argv = ["generate", *PAIR, "--prompt", "def add(a, b):", "--max-new-tokens", "12", "-N", "2", "-K", "2",
            "--mode", "exact", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["num_assistant_tokens"] is None  # constant: nothing adapted
    assert cli.main(argv + ["--k-schedule", "heuristic_transient"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["num_assistant_tokens_schedule"] == "heuristic_transient"
    assert isinstance(result["num_assistant_tokens"], int) and result["num_assistant_tokens"] >= 1


def test_bad_knob_is_a_clear_error_without_a_traceback(capsys):
    assert cli.main(["generate", *PAIR, "--prompt", "x", "-N", "0"]) == 2
    assert "error: Invalid smc_particles=0" in capsys.readouterr().err


# --- Issue 19: every bad invocation ends in one line and exit status 2; --help imports nothing heavy. ---


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--target", str(MODELS / "target"), "--draft", "/nonexistent/draft", "--prompt", "x"],
         "error: cannot load --draft /nonexistent/draft: "),
        (["--target", "/nonexistent/target", "--draft", str(MODELS / "draft"), "--prompt", "x"],
         "error: cannot load --target /nonexistent/target: "),
        ([*PAIR, "--prompts-file", "/nonexistent/prompts.txt"],
         "error: cannot read --prompts-file /nonexistent/prompts.txt: No such file or directory"),
    ],
    ids=["draft", "target", "prompts-file"],
)
def test_a_missing_path_is_one_line_and_exit_2(argv, says, capsys):
    assert cli.main(["generate", *argv]) == 2
    err = capsys.readouterr().err  # before it: at most transformers' loading progress bar
    assert says in err.rstrip("\n").split("\n")[-1] and "Traceback" not in err


def test_an_empty_prompts_file_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert cli.main(["generate", *PAIR, "--prompts-file", str(empty)]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_help_does_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys\nfrom hf_smcsd import cli\n"
        "for argv in (['--help'], ['generate', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "--particles" in done.stdout
