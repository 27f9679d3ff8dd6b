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


def test_bad_knob_is_a_clear_error_without_a_traceback(capsys):
    assert cli.main(["generate", *PAIR, "--prompt", "x", "-N", "0"]) == 2
    assert "error: Invalid smc_particles=0" in capsys.readouterr().err
