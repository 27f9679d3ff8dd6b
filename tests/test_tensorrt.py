"""The TensorRT path without a GPU: packing particles into engine inputs, the lockstep guard
for tensor parallelism, and `TRTModel` as target and as `assistant_model` of generate()."""

import importlib.util

import pytest
import torch

import hf_smcsd
from hf_smcsd.engines.manifest import EngineLimits, EngineMismatchError, make_manifest, write_manifest
from hf_smcsd.runners import EagerRunner
from hf_smcsd.runners.tensorrt import (
    TRTModel,
    causal_packed_mask,
    check_lockstep,
    kv_block_offsets,
    pack_context_step,
    pack_generation_step,
    prefill_groups,
    sync_seed,
    world,
)

from conftest import left_pad

# ------------------------------------------------------------------ packing


def test_causal_packed_mask_bits():
    assert causal_packed_mask(1).tolist() == [[1]]
    assert causal_packed_mask(3).tolist() == [[1], [3], [7]]
    mask = causal_packed_mask(33)
    assert mask.shape == (33, 2) and mask.dtype == torch.int32
    assert mask[30].tolist() == [2**31 - 1, 0]
    assert mask[31].tolist() == [-1, 0]  # all 32 bits: wraps to -1 in int32
    assert mask[32].tolist() == [-1, 1]  # token 32 is bit 0 of the second word
    bits = [[(int(mask[i, j // 32]) >> (j % 32)) & 1 for j in range(33)] for i in range(33)]
    assert bits == [[int(j <= i) for j in range(33)] for i in range(33)]


def test_block_offsets_layout():
    table = torch.tensor([[4, 7, -1], [2, -1, -1]])
    offsets = kv_block_offsets(table, num_layers=3)
    assert offsets.shape == (1, 2, 2, 3) and offsets.dtype == torch.int32
    assert offsets[0, 0].tolist() == [[24, 42, 0], [25, 43, 0]]  # block * layers * 2 + (0 K, 1 V)
    assert offsets[0, 1].tolist() == [[12, 0, 0], [13, 0, 0]]


def test_context_step_packs_prompts_without_padding():
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12], [20]])
    table = torch.tensor([[0, -1], [1, 2], [3, -1]])
    inputs = pack_context_step(ids, mask, table, num_layers=2, max_seq_len=16)
    assert inputs["input_ids"].tolist() == [5, 6, 7, 9, 10, 11, 12, 20]
    assert inputs["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert inputs["last_token_ids"].tolist() == [3, 7, 8]  # 1-based index of each prompt's last token
    assert inputs["context_lengths"].tolist() == inputs["sequence_length"].tolist() == [3, 4, 1]
    assert inputs["host_request_types"].tolist() == [0, 0, 0]
    # The KV length after the step (GenerationSession and the C++ runtime pass it; the plugin
    # takes its maximum as the context attention's KV length), not 0.
    assert inputs["host_past_key_value_lengths"].tolist() == [3, 4, 1]
    assert inputs["cache_indirection"].shape == (3, 1, 16)
    assert inputs["host_max_attention_window_sizes"].tolist() == [16, 16]
    # Off in context steps: the plugin prepares its spec-decoding kernels on a generation step
    # where the flag changes (tests/test_tensorrt_runner.py models it).
    assert inputs["spec_decoding_use"].tolist() == [0]
    wide = pack_context_step(ids, mask, table, num_layers=2, max_seq_len=16, tokens_per_step=4)
    assert wide["spec_decoding_generation_lengths"].tolist() == [4, 4, 4]
    assert wide["spec_decoding_packed_mask"].shape == (12, 1) and wide["spec_decoding_use"].tolist() == [0]
    assert all(t.dtype == torch.int32 for name, t in inputs.items() if name not in ("host_runtime_perf_knobs", "host_context_progress"))


def test_generation_step_packs_k_tokens_per_row():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    table = torch.tensor([[0, 1], [0, 2]])
    inputs = pack_generation_step(tokens, torch.tensor([6, 5]), torch.tensor([4, 4]), table, num_layers=2, max_seq_len=32)
    assert inputs["input_ids"].tolist() == [1, 2, 3, 4, 5, 6]
    assert inputs["last_token_ids"].tolist() == [1, 2, 3, 4, 5, 6]  # logits for every new position
    # rows of different lengths (after a rollback): each continues from its own length
    assert inputs["sequence_length"].tolist() == [9, 8] and inputs["host_past_key_value_lengths"].tolist() == [6, 5]
    assert inputs["position_ids"].tolist() == [6, 7, 8, 5, 6, 7]  # one per token, as the C++ lookahead runtime
    assert inputs["host_request_types"].tolist() == [1, 1] and inputs["context_lengths"].tolist() == [4, 4]
    assert inputs["spec_decoding_generation_lengths"].tolist() == [3, 3]
    assert inputs["spec_decoding_position_offsets"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert inputs["spec_decoding_packed_mask"].tolist() == [[1], [3], [7], [1], [3], [7]]
    assert inputs["spec_decoding_use"].tolist() == [1]
    assert inputs["kv_cache_block_offsets"][0, 1, 0].tolist() == [0, 8]  # row 1 shares block 0, owns block 2
    assert inputs["host_runtime_perf_knobs"].tolist()[:2] == [1, -1]
    single = pack_generation_step(tokens[:, :1], torch.tensor([6, 6]), torch.tensor([4, 4]), table, num_layers=2,
                                  max_seq_len=32)
    assert single["spec_decoding_use"].tolist() == [1] and single["last_token_ids"].tolist() == [1, 2]


def test_prefill_groups_fit_the_engine():
    assert prefill_groups(torch.tensor([3, 4, 2, 5]), max_tokens=8, max_rows=8) == [(0, 2), (2, 4)]
    assert prefill_groups(torch.tensor([1, 1, 1]), max_tokens=8, max_rows=2) == [(0, 2), (2, 3)]
    with pytest.raises(EngineMismatchError, match="--max-num-tokens 9"):
        prefill_groups(torch.tensor([9]), max_tokens=8, max_rows=8)


# ------------------------------------------------------------------ tensor parallelism


def test_alone_there_is_no_seed_to_share(monkeypatch):
    for name in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world() == (0, 1) and sync_seed() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert world() == (1, 2)


def test_engine_rank_matches_the_mpi_world():
    from hf_smcsd.runners.tensorrt import engine_rank

    assert engine_rank(1, (3, 4)) == 0  # a tp=1 engine is replicated on every rank
    assert engine_rank(2, (1, 2)) == 1
    for world_ in ((0, 1), (2, 4)):
        with pytest.raises(EngineMismatchError, match="tensor parallelism 2 but this process group has .*`mpirun -n 2"):
            engine_rank(2, world_)


def test_loaded_engine_mapping_must_be_this_ranks_shard():
    from types import SimpleNamespace

    from hf_smcsd.runners.tensorrt import check_engine_mapping

    check_engine_mapping(SimpleNamespace(tp_size=2, pp_size=1, rank=1), tp_size=2, rank=1)
    with pytest.raises(EngineMismatchError, match="rank 1 loaded the shard of rank 0"):
        check_engine_mapping(SimpleNamespace(tp_size=2, pp_size=1, rank=0), tp_size=2, rank=1)
    with pytest.raises(EngineMismatchError, match="tp_size=4.*manifest says tp_size=2"):
        check_engine_mapping(SimpleNamespace(tp_size=4, pp_size=1, rank=1), tp_size=2, rank=1)


def test_lockstep_guard_detects_diverged_ranks():
    tokens = torch.tensor([[1, 2], [3, 4]])
    same = lambda fp: [fp, fp]  # noqa: E731  (two ranks that agree)
    check_lockstep("extend", tokens, same)
    other = lambda fp: [fp, (fp[0], fp[1] + 1)]  # noqa: E731
    with pytest.raises(RuntimeError, match="ranks diverged at extend.*tp_sync='broadcast'"):
        check_lockstep("extend", tokens, other)
    swapped = torch.tensor([[2, 1], [3, 4]])  # same sum, different order: still caught
    from hf_smcsd.runners.tensorrt import fingerprint

    assert fingerprint(tokens) != fingerprint(swapped)


# ------------------------------------------------------------------ TRTModel and generate()


def engine_like(model):
    """A TRTModel over an eager runner: the generate() front end without an engine."""
    return TRTModel(lambda: EagerRunner(model), model.config, model.generation_config, source="/nowhere")


KW = dict(smc_particles=4, smc_gamma=3, do_sample=True, max_new_tokens=10, temperature=0.8, top_k=6,
          return_dict_in_generate=True)


@pytest.mark.parametrize("extra", [{}, {"num_return_sequences": 2, "top_k": None, "top_p": 0.9}])
def test_trt_model_generate_matches_smc_generate(pair, extra):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12]])
    kwargs = {**KW, **extra}
    torch.manual_seed(0)
    ours = engine_like(target).generate(ids, attention_mask=mask, assistant_model=draft, **kwargs)
    torch.manual_seed(0)
    reference = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.sequences, reference.sequences)
    assert torch.equal(ours.particle_sequences, reference.particle_sequences)
    assert torch.equal(ours.log_weights, reference.log_weights)


def test_trt_model_as_assistant_of_a_patched_transformers_target(pair):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7]])
    patched = hf_smcsd.patch(target)
    torch.manual_seed(1)
    with_engine_draft = patched.generate(ids, attention_mask=mask, assistant_model=engine_like(draft), **KW)
    torch.manual_seed(1)
    with_hf_draft = patched.generate(ids, attention_mask=mask, assistant_model=draft, **KW)
    assert torch.equal(with_engine_draft.particle_sequences, with_hf_draft.particle_sequences)


@pytest.mark.parametrize("entry", ["smc_generate", "patch"])
def test_smc_generate_and_patch_accept_a_trt_model_target(pair, entry):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7]])
    torch.manual_seed(2)
    if entry == "smc_generate":
        ours = hf_smcsd.smc_generate(engine_like(target), draft, ids, attention_mask=mask, **KW)
    else:
        ours = hf_smcsd.patch(engine_like(target)).generate(ids, attention_mask=mask, assistant_model=draft, **KW)
    torch.manual_seed(2)
    reference = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, **KW)
    assert torch.equal(ours.particle_sequences, reference.particle_sequences)


@pytest.mark.parametrize("kwargs, message", [
    (dict(smc_particles=None), "smc_particles"),
    (dict(assistant_model=None), "assistant_model"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3 is not supported with a TRTModel target"),
    (dict(not_an_argument=1), "does not use: \\['not_an_argument'\\]"),
    (dict(smc_not_a_knob=1), "knobs this hf_smcsd does not know: \\['smc_not_a_knob'\\]"),
])
def test_trt_model_generate_errors(pair, kwargs, message):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7]])
    call = dict(KW, assistant_model=draft)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        engine_like(target).generate(ids, attention_mask=mask, **call)


def test_trt_model_is_not_a_forward_model(pair):
    model = engine_like(pair[0])
    assert model.get_output_embeddings() is None and model.config.vocab_size == 40
    with pytest.raises(TypeError, match="generate"):
        model(torch.tensor([[1]]))


def manifest(**overrides):
    limits = EngineLimits(max_prompts=1, particles=4, max_batch_size=4, gamma=3, tokens_per_step=4, max_input_len=16,
                          max_output_len=16, max_seq_len=32, max_num_tokens=16, tokens_per_block=16)
    values = dict(role="target", source_model="/m", dtype="bfloat16", tp_size=1, limits=limits, build_flags={}, steps=[],
                  model={"vocab_size": 40}, trtllm_version="1.2.1", status="built")
    values.update(overrides)
    return make_manifest(**values)


def test_from_engine_checks_the_manifest_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="smcsd_manifest.json"):
        TRTModel.from_engine(tmp_path)
    write_manifest(tmp_path, manifest())
    with pytest.raises(EngineMismatchError, match="(?s)rebuild with --particles 8.*hf-smcsd build-engines"):
        TRTModel.from_engine(tmp_path, particles=8)
    write_manifest(tmp_path, manifest(tp_size=2))
    with pytest.raises(EngineMismatchError, match="mpirun -n 2"):
        TRTModel.from_engine(tmp_path)
    write_manifest(tmp_path, manifest(dtype="float32"))  # written by an earlier build-engines, which allowed it
    with pytest.raises(EngineMismatchError, match="dtype float32: .*XQA.*--dtype bfloat16"):
        TRTModel.from_engine(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_from_engine_without_tensorrt_llm_says_what_is_missing(tmp_path, pair):
    pair[0].config.save_pretrained(tmp_path / "hf")
    write_manifest(tmp_path, manifest())
    with pytest.raises(ImportError, match="TensorRT-LLM 1.2 and an NVIDIA GPU"):
        TRTModel.from_engine(tmp_path)
