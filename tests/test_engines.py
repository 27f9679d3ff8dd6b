"""Engine building without TensorRT-LLM: the dry-run steps, argument checks, the manifest
and the checks that say what to rebuild."""

import json
import os
import subprocess
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from hf_smcsd import cli
from hf_smcsd.engines import build
from hf_smcsd.engines.manifest import (
    MANIFEST_NAME,
    EngineLimits,
    EngineMismatchError,
    check_manifest,
    check_pair,
    make_manifest,
    read_manifest,
    require_fits,
    write_manifest,
)
from hf_smcsd.testing.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EIGHT_B = ["--target", "/models/Llama-3.1-8B-Instruct", "--draft", "/models/Llama-3.2-1B-Instruct", "--tp-size", "2",
           "--max-prompts", "8", "--particles", "8", "--gamma", "8", "--max-input-len", "2048", "--max-output-len", "512"]


def dry_run(capsys, argv):
    assert cli.main(["build-engines", *argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def commands(out, program):
    return [shlex.split(line) for line in out.splitlines() if program in line and not line.startswith("#")]


def flags(argv):
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def test_dry_run_prints_complete_steps_for_an_8b_target_with_tp2_and_a_1b_draft(capsys):
    out = dry_run(capsys, EIGHT_B)
    converts = commands(out, "hf_smcsd.engines.convert")
    builds = commands(out, "trtllm-build")
    assert len(converts) == 2 and len(builds) == 2
    target_convert, draft_convert = map(flags, converts)
    assert target_convert["--model_dir"] == "/models/Llama-3.1-8B-Instruct" and target_convert["--tp_size"] == "2"
    assert draft_convert["--model_dir"] == "/models/Llama-3.2-1B-Instruct" and draft_convert["--tp_size"] == "1"
    assert target_convert["--dtype"] == draft_convert["--dtype"] == "bfloat16"
    target, draft = map(flags, builds)
    assert target["--checkpoint_dir"] == target_convert["--output_dir"]
    assert target["--output_dir"] == "trt_engines/Llama-3.1-8B-Instruct"
    for built, draft_len, workers in ((target, "8", "2"), (draft, "1", "1")):
        assert built["--kv_cache_type"] == "paged" and built["--tokens_per_block"] == "32"
        assert built["--remove_input_padding"] == "enable" and built["--gpt_attention_plugin"] == "auto"
        assert built["--use_paged_context_fmha"] == "enable"
        assert built["--speculative_decoding_mode"] == "lookahead_decoding"
        assert built["--max_draft_len"] == draft_len and built["--workers"] == workers
        assert built["--max_batch_size"] == "64" and built["--max_beam_width"] == "1"
        assert built["--max_input_len"] == "2048" and built["--max_seq_len"] == "2560"
        assert built["--logits_dtype"] == "float32" and built["--multiple_profiles"] == "disable"
    assert int(target["--max_num_tokens"]) >= 64 * 9
    assert "--gather_context_logits" not in out  # refused by trtllm-build with max_draft_len > 0
    assert "smcsd_manifest.json" in out and "mpirun -n 2" in out
    assert '"status": "planned"' in out


def test_dry_run_manifests_record_limits_flags_and_version(capsys):
    args = build.parse_args(EIGHT_B)
    plans = build.plan_builds(args)
    target = plans[0].manifest("planned", "1.2.1", "bfloat16")
    assert target["role"] == "target" and target["tp_size"] == 2 and target["tensorrt_llm_version"] == "1.2.1"
    assert target["limits"]["max_batch_size"] == 64 and target["limits"]["tokens_per_step"] == 9
    assert target["build_flags"]["kv_cache_type"] == "paged" and target["build_flags"]["max_draft_len"] == 8
    assert any("trtllm-build" in step for step in target["steps"])
    draft = plans[1].manifest("planned", "1.2.1", "bfloat16")
    assert draft["limits"]["tokens_per_step"] == 2 and draft["tp_size"] == 1


def test_plain_draft_engine_has_no_speculative_flags(capsys):
    out = dry_run(capsys, [*EIGHT_B, "--draft-step-tokens", "1"])
    draft = flags(commands(out, "trtllm-build")[1])
    assert "--speculative_decoding_mode" not in draft and "--max_draft_len" not in draft


def test_source_config_is_read_and_checked(tmp_path, capsys):
    llama = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=40, hidden_size=64, num_layers=2).save_pretrained(llama)  # 4 heads of 16
    out = dry_run(capsys, ["--target", str(llama), "--draft", str(llama), "--draft-name", "tiny-draft",
                           "--output-dir", str(tmp_path / "engines")])
    assert '"architecture": "LlamaForCausalLM"' in out and '"vocab_size": 40' in out
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="GPT2LMHeadModel.*Llama-architecture"):
        build.main(["--target", str(gpt2), "--draft", str(llama), "--dry-run"])


def llama_dir(tmp_path, name, **sizes):
    path = tmp_path / name
    tiny_llama(vocab_size=40, num_layers=1, **sizes).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("sizes, extra, message", [
    ({}, ["--dtype", "float32"], "dtype float32: .*XQA kernels, which take float16 or bfloat16 only: rebuild with --dtype bfloat16"),
    (dict(hidden_size=96, num_heads=6, num_kv_heads=1), [], "groups of 6 query heads .* divides 64"),
    (dict(hidden_size=32, num_heads=4, num_kv_heads=2), [], "head size 8: .*multiple of 16"),
    ({}, ["--tokens-per-block", "8"], "tokens per block 8: .*--tokens-per-block 32"),
    ({}, ["--gamma", "32"], "33 tokens per step .* --gamma 31"),
])
def test_build_plans_that_xqa_cannot_verify_are_refused(tmp_path, sizes, extra, message):
    """Multi-token generation steps run on XQA kernels only (TensorRT-LLM 1.2): refuse plans
    they cannot run, with what to rebuild, before anything is built."""
    source = llama_dir(tmp_path, "m", **{"hidden_size": 64, **sizes})
    with pytest.raises(SystemExit, match="(?s)The target engine .* would fail at its first .*-token step.*" + message):
        build.main(["--target", source, "--draft", source, "--draft-name", "d", "--dry-run", *extra])


def test_a_one_token_draft_needs_no_xqa(tmp_path, capsys):
    target = llama_dir(tmp_path, "t", hidden_size=64)
    draft = llama_dir(tmp_path, "d", hidden_size=96, num_heads=6, num_kv_heads=1)  # groups of 6: no XQA verify
    with pytest.raises(SystemExit, match="draft engine"):
        build.main(["--target", target, "--draft", draft, "--dry-run"])
    out = dry_run(capsys, ["--target", target, "--draft", draft, "--draft-step-tokens", "1"])
    assert out.count("trtllm-build") >= 2


def test_convert_creates_the_checkpoint_directory(tmp_path, monkeypatch):
    """TensorRT-LLM's save_checkpoint writes into its directory without creating it; the
    stand-in modules below do the same, so the conversion must make it first."""
    import types

    from hf_smcsd.engines import convert

    saved = []

    class FakeModel:
        @classmethod
        def from_hugging_face(cls, model_dir, dtype, mapping, quant_config):
            return cls()

        def save_checkpoint(self, output_dir, save_config):
            assert Path(output_dir).is_dir(), f"{output_dir} does not exist (save_checkpoint does not create it)"
            saved.append(save_config)

    modules = {"tensorrt_llm": types.ModuleType("tensorrt_llm"),
               "tensorrt_llm.mapping": types.SimpleNamespace(Mapping=lambda **kw: kw),
               "tensorrt_llm.models": types.SimpleNamespace(LLaMAForCausalLM=FakeModel),
               "tensorrt_llm.models.modeling_utils": types.SimpleNamespace(QuantConfig=lambda: None)}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    out = tmp_path / "ckpt" / "nested-tp2"
    assert convert.main(["--model_dir", "m", "--output_dir", str(out), "--tp_size", "2"]) == 0
    assert saved == [True, False]


@pytest.mark.parametrize("extra, message", [
    (["--tokens-per-block", "24"], "power of two"),
    (["--tp-size", "2", "--draft-tp-size", "3"], "draft-tp-size=3"),
    (["--particles", "0"], "--particles=0"),
])
def test_bad_arguments_name_the_argument(extra, message, capsys):
    with pytest.raises(SystemExit):
        build.main(["--target", "a", "--draft", "b", *extra, "--dry-run"])
    assert message in capsys.readouterr().err


def test_too_small_max_num_tokens_is_refused():
    with pytest.raises(SystemExit, match="max-num-tokens=100 is below"):
        build.main([*EIGHT_B, "--max-num-tokens", "100", "--dry-run"])


def test_building_without_tensorrt_llm_says_how(monkeypatch):
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="--dry-run"):
        build.main(EIGHT_B)


def test_wrapper_script_dry_run(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["build_engines.py", *EIGHT_B, "--dry-run"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "build_scripts" / "build_engines.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert len(commands(capsys.readouterr().out, "trtllm-build")) == 2


# ------------------------------------------------------------------ manifest


def limits(**overrides):
    values = dict(max_prompts=2, particles=8, max_batch_size=16, gamma=4, tokens_per_step=5, max_input_len=64,
                  max_output_len=32, max_seq_len=96, max_num_tokens=80, tokens_per_block=16)
    values.update(overrides)
    return EngineLimits(**values)


def manifest(role="target", status="built", tp=1, vocab=40, **limit_overrides):
    return make_manifest(role=role, source_model="/m/src", dtype="bfloat16", tp_size=tp,
                         limits=limits(**limit_overrides), build_flags={"kv_cache_type": "paged"},
                         steps=[["trtllm-build", "--x", "1"]], model={"vocab_size": vocab},
                         trtllm_version="1.2.1", status=status)


def test_manifest_round_trip_and_errors(tmp_path):
    written = manifest()
    path = write_manifest(tmp_path, written)
    assert path.name == MANIFEST_NAME and read_manifest(tmp_path) == written
    assert written["steps"] == ["trtllm-build --x 1"]
    with pytest.raises(FileNotFoundError, match="hf-smcsd build-engines"):
        read_manifest(tmp_path / "nothing")
    path.write_text(json.dumps({**written, "format": "other/0"}))
    with pytest.raises(EngineMismatchError, match="format 'other/0'"):
        read_manifest(tmp_path)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_batch_size=8 is smaller than max_prompts x particles = 16"):
        limits(max_batch_size=8)
    with pytest.raises(ValueError, match="gamma=0"):
        limits(gamma=0)


def test_a_fitting_request_has_no_problems():
    assert check_manifest(manifest(), particles=8, gamma=4, prompts=2, max_prompt_len=64, max_new_tokens=32,
                          world_size=1) == []


@pytest.mark.parametrize("request_, expected", [
    (dict(particles=16, prompts=2), "2 prompts x 16 particles = 32: .* --particles 16"),
    (dict(particles=20), "fewer than smc_particles=20: rebuild with --particles 20"),
    (dict(gamma=6), "smc_gamma=6 needs K\\+1 = 7: use smc_gamma <= 4, or rebuild with --gamma 6"),
    (dict(max_prompt_len=100), "prompts of up to 64 tokens but one has 100: rebuild with --max-input-len 100"),
    (dict(max_prompt_len=64, max_new_tokens=40), "room for 32 new tokens, not max_new_tokens=40"),
    (dict(world_size=1), None),
])
def test_each_mismatch_says_what_to_rebuild(request_, expected):
    problems = check_manifest(manifest(), **request_)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and __import__("re").search(expected, problems[0]), problems


def test_tp_engine_needs_mpirun_with_as_many_ranks():
    problems = check_manifest(manifest(tp=2), world_size=1)
    assert len(problems) == 1 and "mpirun -n 2" in problems[0]
    assert check_manifest(manifest(tp=2), world_size=2) == []


def test_planned_manifest_is_not_loadable():
    problems = check_manifest(manifest(status="planned"))
    assert "never built" in problems[0]


def test_draft_gamma_is_not_checked():
    assert check_manifest(manifest(role="draft", tokens_per_step=2), gamma=8) == []


def test_require_fits_lists_problems_and_a_rebuild_command():
    with pytest.raises(EngineMismatchError) as error:
        require_fits(manifest(), particles=16, prompts=2, gamma=8, max_prompt_len=10, max_new_tokens=10)
    text = str(error.value)
    assert text.count("\n  - ") == 2
    assert "hf-smcsd build-engines" in text and "--particles 16" in text and "--gamma 8" in text
    assert "--max-prompts 2" in text and "--tp-size 1" in text


def test_pair_checks():
    assert check_pair(manifest(), manifest(role="draft", tokens_per_step=2)) == []
    problems = check_pair(manifest(vocab=40), manifest(role="draft", vocab=41, tokens_per_step=2))
    assert any("vocabulary" in p for p in problems)
    assert any("role='target'" in p for p in check_pair(manifest(), manifest()))


def test_gpu_check_says_what_it_could_not_do_and_fails_here(capsys):
    """No GPU and no TensorRT-LLM on this machine: the one-command GPU check must say so,
    check nothing and exit non-zero (2), never report success."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("this machine has a GPU and TensorRT-LLM: the check would run for real")
    assert cli.main(["gpu-check"]) == 2
    out = capsys.readouterr().out
    assert "COULD NOT RUN - nothing was checked" in out and "PASS" not in out
    assert ("no NVIDIA GPU" in out) or ("no TensorRT-LLM" in out)
    script = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert script.returncode == 2 and "COULD NOT RUN" in script.stdout
