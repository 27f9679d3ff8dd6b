"""The TensorRT runner end to end on CPU, against a torch stand-in for the engine.

`ReferenceEngine` plays the compiled engine: it reads exactly the inputs the runner packs
for TensorRT-LLM's attention plugin (packed tokens, `host_request_types`, `kv_cache_block_offsets`
into the pool behind `host_kv_cache_pool_pointers`, `host_past_key_value_lengths`,
`sequence_length`, the `spec_decoding_*` tensors, `last_token_ids`) with the semantics we read in
TensorRT-LLM 1.2's runtime, and computes a Llama forward with them (per-row loops: clarity over
speed). It checks the runner's bookkeeping, not TensorRT: the GPU tests do that.
"""

import pytest
import torch

from hf_smcsd.engines.manifest import EngineLimits, EngineMismatchError, make_manifest
from hf_smcsd.resampling import copy_plan
from hf_smcsd.runners import EagerRunner, Runner
from hf_smcsd.runners.tensorrt import TensorRTRunner, bind_inputs, causal_packed_mask
from hf_smcsd.smc import SMCSettings, smc_sample

from conftest import left_pad, random_resample

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]
PAD_VOCAB = 3  # the engine's logits are vocab-padded (tp); the runner must cut them


# What TensorRT-LLM 1.2's attention plugin reads on the host (it dereferences these; a device
# pointer there crashes) - shared/docs/host-libraries.md; everything else must be on the device.
HOST_READ = {"host_request_types", "host_context_lengths", "host_past_key_value_lengths", "host_kv_cache_block_offsets",
             "host_kv_cache_pool_pointers", "host_kv_cache_pool_mapping", "host_max_attention_window_sizes",
             "host_sink_token_length", "host_runtime_perf_knobs", "host_context_progress", "spec_decoding_use"}
INT64_INPUTS = {"host_runtime_perf_knobs", "host_context_progress", "host_kv_cache_pool_pointers"}
SPEC_INPUTS = ["spec_decoding_generation_lengths", "spec_decoding_position_offsets", "spec_decoding_packed_mask",
               "spec_decoding_use"]
STAND_IN_DEVICE = torch.device("meta")  # where "device" inputs are bound: anything but the CPU


class ReferenceEngine:
    def __init__(self, model, *, max_batch_size=32, max_seq_len=96, max_num_tokens=64, tokens_per_step=4,
                 tokens_per_block=16):
        self.model = model
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_size = model.model.layers[0].self_attn.head_dim
        self.vocab_size = config.vocab_size
        self.kv_dtype = torch.float32
        self.device = torch.device("cpu")
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_num_tokens, self.tokens_per_step, self.tokens_per_block = max_num_tokens, tokens_per_step, tokens_per_block
        # Like a real engine: the inputs it was built with, all declared on the device.
        self.input_names = ["input_ids", "position_ids", "last_token_ids", "context_lengths", "host_context_lengths",
                            "sequence_length", "host_past_key_value_lengths", "host_request_types",
                            "kv_cache_block_offsets", "host_kv_cache_block_offsets", "host_kv_cache_pool_pointers",
                            "host_kv_cache_pool_mapping", "cache_indirection", "host_max_attention_window_sizes",
                            "host_sink_token_length", "host_runtime_perf_knobs", "host_context_progress"]
        if tokens_per_step > 1:  # engines built with --max_draft_len > 0 get the spec_decoding_* inputs
            self.input_names += SPEC_INPUTS
        self.dtypes = {name: torch.int64 if name in INT64_INPUTS else torch.int32 for name in self.input_names}
        self.pools = {}  # data_ptr -> tensor, registered by the test
        self.calls = []

    def attach(self, runner):
        self.pools[runner.pool.data_ptr()] = runner.pool
        return runner

    def check_binding(self, inputs):
        """Bind as EngineSession.run does, then fail where the plugin would."""
        bound = bind_inputs(inputs, self.input_names, self.dtypes, STAND_IN_DEVICE)
        for name, tensor in bound.items():
            if name in HOST_READ:
                assert tensor.device.type == "cpu", f"the plugin reads {name} on the host; it was bound on {tensor.device}"
            else:
                assert tensor.device == STAND_IN_DEVICE, f"{name} must be on the engine's device, not {tensor.device}"
        return {name: inputs[name] for name in self.input_names}

    @torch.no_grad()
    def run(self, inputs):
        inputs = self.check_binding(inputs)
        layers, tpb = self.num_layers, self.tokens_per_block
        pool = self.pools[int(inputs["host_kv_cache_pool_pointers"][0, 0])]
        assert inputs["host_kv_cache_pool_pointers"][0, 1] == 0
        assert torch.equal(inputs["host_kv_cache_pool_mapping"][:, 1], torch.arange(layers, dtype=torch.int32))
        request = inputs["host_request_types"]
        rows = request.numel()
        assert rows <= self.max_batch_size and inputs["input_ids"].numel() <= self.max_num_tokens
        offsets = inputs["kv_cache_block_offsets"][0].long()  # [rows, 2, width]
        assert torch.equal(offsets, inputs["host_kv_cache_block_offsets"][0].long())
        blocks = offsets[:, 0] // (2 * layers)
        used = offsets[:, 1] != 0  # unused entries are (0, 0); a used one is (2 L block, 2 L block + 1)
        assert bool((offsets[:, 1][used] == offsets[:, 0][used] + 1).all()) and bool((offsets[:, 0][~used] == 0).all())
        assert bool((offsets[:, 0] % (2 * layers) == 0).all())
        past = inputs["host_past_key_value_lengths"].long()
        assert inputs["cache_indirection"].shape == (rows, 1, self.max_seq_len)
        width = self.tokens_per_step
        if width > 1:  # the built width in every step, spec decoding always on (never switched)
            assert inputs["spec_decoding_use"].tolist() == [1]
            assert bool((inputs["spec_decoding_generation_lengths"] == width).all())
            assert torch.equal(inputs["spec_decoding_position_offsets"], torch.arange(width, dtype=torch.int32).expand(rows, width))
            assert torch.equal(inputs["spec_decoding_packed_mask"], causal_packed_mask(width).repeat(rows, 1))
        if bool((request == 0).all()):  # context step
            counts = inputs["host_context_lengths"].long()
            # The KV length after the step, as both TensorRT-LLM runtimes pass it.
            assert torch.equal(past, counts) and torch.equal(inputs["sequence_length"].long(), counts)
            positions = torch.cat([torch.arange(int(c)) for c in counts])
            self.calls.append(("context", rows, int(counts.sum())))
        else:
            assert bool((request == 1).all())
            k = inputs["input_ids"].numel() // rows
            assert k == width, f"a {k}-token step on an engine built for {width}"
            counts = torch.full((rows,), k)
            assert torch.equal(inputs["sequence_length"].long(), past + k)
            positions = (past.unsqueeze(1) + torch.arange(k)).flatten()
            self.calls.append(("generation", rows, k))
        assert torch.equal(inputs["position_ids"].long(), positions)
        assert inputs["input_ids"].numel() == int(counts.sum())
        row_of = torch.repeat_interleave(torch.arange(rows), counts)
        model = self.model.model
        hidden = model.embed_tokens(inputs["input_ids"].long()).unsqueeze(0)  # [1, tokens, hidden]
        cos, sin = model.rotary_emb(hidden, positions.unsqueeze(0))
        for index, layer in enumerate(model.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)[0]
            q = attention.q_proj(x).view(-1, self.num_heads, self.head_size)
            k_ = attention.k_proj(x).view(-1, self.num_kv_heads, self.head_size)
            v = attention.v_proj(x).view(-1, self.num_kv_heads, self.head_size)
            c, s = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
            half = self.head_size // 2
            rot = lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1)  # noqa: E731
            q, k_ = q * c + rot(q) * s, k_ * c + rot(k_) * s
            for t in range(q.shape[0]):  # write K/V where the block table says
                r, p = int(row_of[t]), int(positions[t])
                block = int(blocks[r, p // tpb])
                pool[block, index, 0, :, p % tpb] = k_[t]
                pool[block, index, 1, :, p % tpb] = v[t]
            out = torch.empty_like(q)
            for t in range(q.shape[0]):  # causal attention over the row's own blocks
                r, p = int(row_of[t]), int(positions[t])
                keys = torch.stack([pool[int(blocks[r, i // tpb]), index, 0, :, i % tpb] for i in range(p + 1)], 1)
                values = torch.stack([pool[int(blocks[r, i // tpb]), index, 1, :, i % tpb] for i in range(p + 1)], 1)
                group = self.num_heads // self.num_kv_heads
                keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
                weights = torch.softmax((keys @ q[t].unsqueeze(-1)).squeeze(-1) * attention.scaling, dim=-1)
                out[t] = (weights.unsqueeze(-1) * values).sum(1)
            hidden = hidden + attention.o_proj(out.reshape(1, -1, self.num_heads * self.head_size))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(model.norm(hidden))[0]
        selected = logits[inputs["last_token_ids"].long() - 1]
        padded = torch.cat([selected, torch.full((selected.shape[0], PAD_VOCAB), 1e4)], dim=1)
        return {"logits": padded}


def manifest_for(engine, role="target"):
    limits = EngineLimits(max_prompts=1, particles=engine.max_batch_size, max_batch_size=engine.max_batch_size, gamma=max(1, engine.tokens_per_step - 1),
                          tokens_per_step=engine.tokens_per_step, max_input_len=24, max_output_len=engine.max_seq_len - 24,
                          max_seq_len=engine.max_seq_len, max_num_tokens=engine.max_num_tokens,
                          tokens_per_block=engine.tokens_per_block)
    role = role if engine.tokens_per_step > 1 else "draft"
    return make_manifest(role=role, source_model="/m", dtype="float16", tp_size=1, limits=limits, build_flags={},
                         steps=[], model={"vocab_size": engine.vocab_size}, trtllm_version="test", status="built")


def make_runner(model, **engine_kwargs):
    engine = ReferenceEngine(model, **engine_kwargs)
    runner = TensorRTRunner(engine, manifest_for(engine), num_blocks=64)
    return engine.attach(runner), engine


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def test_runner_satisfies_interface(pair):
    assert isinstance(make_runner(pair[0])[0], Runner)


def test_prefill_extend_resample_keep_equal_recompute(pair):
    model = pair[0]
    n = 3
    runner, engine = make_runner(model, max_num_tokens=8)  # forces two prefill steps
    ids, mask = left_pad(PROMPTS)
    first = runner.prefill(ids, mask, n)
    assert [call[0] for call in engine.calls] == ["context", "context"]
    assert first.shape == (3, 40)
    gen = torch.Generator().manual_seed(0)
    history = [list(PROMPTS[row // n]) for row in range(3 * n)]
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(first[row], fresh_logits(model, prompt)[-1], atol=1e-4, rtol=1e-4)
    for width in (4, 1, 6):  # every step is 4 wide (the built width): 1 -> one filled-up step, 6 -> 4 + 2 filled up
        step = torch.randint(0, 40, (3 * n, width), generator=gen)
        before = len(engine.calls)
        logits = runner.extend(step)
        calls = engine.calls[before:]  # max_num_tokens=8: rows are split too, 8 // 4 rows per call
        assert all(call[0] == "generation" and call[2] == 4 and call[1] <= 2 for call in calls)
        assert sum(call[1] for call in calls) == 9 * -(-width // 4)
        assert runner.tables.lengths.tolist() == [len(h) + width for h in history]  # the filler is forgotten
        assert logits.shape == (3 * n, width, 40)
        for row in range(3 * n):
            history[row] += step[row].tolist()
            torch.testing.assert_close(logits[row], fresh_logits(model, history[row])[-width:], atol=1e-4, rtol=1e-4)
        random_resample(runner, history, 3, n, gen, seed=width)
    runner.keep(torch.tensor([3, 4, 5]))
    last = torch.tensor([[1], [2], [3]])
    logits = runner.extend(last)
    for i, row in enumerate((3, 4, 5)):
        torch.testing.assert_close(logits[i, 0], fresh_logits(model, history[row] + [i + 1])[-1], atol=1e-4, rtol=1e-4)
    runner.tables.check()


def test_batch_larger_than_the_engine_says_what_to_rebuild(pair):
    runner, _ = make_runner(pair[0], max_batch_size=8)
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(EngineMismatchError, match="(?s)3 prompts x 4 particles = 12.*--max-prompts 3 --particles"):
        runner.prefill(ids, mask, 4)


def test_smc_sample_with_engine_runners_matches_eager(pair):
    """SMC-SD end to end through the TensorRT runner (target and draft), same seed as the
    eager runners: identical particles and resampling decisions."""
    target, draft = pair
    ids, mask = left_pad(PROMPTS[:2])
    settings = SMCSettings(particles=4, gamma=3, max_new_tokens=9, temperature=0.9, resample_threshold=0.9,
                           eos_token_ids=[3], pad_token_id=0)
    torch.manual_seed(3)
    engine_result = smc_sample(make_runner(target)[0], make_runner(draft, tokens_per_step=2)[0], ids, mask, settings)
    torch.manual_seed(3)
    eager_result = smc_sample(EagerRunner(target), EagerRunner(draft), ids, mask, settings)
    assert int(engine_result.num_resamples.sum()) > 0
    assert torch.equal(engine_result.tokens, eager_result.tokens)
    torch.testing.assert_close(engine_result.log_weights, eager_result.log_weights, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ rollback, fixed-width steps, binding

LONG_PROMPTS = [list(range(5, 19)), list(range(9, 27)), [20, 21]]  # 14, 18 and 2 tokens: 16-token blocks cross


def test_random_prefill_extend_reorder_keep_rollback_equal_recompute(pair):
    """The random walk of tests/test_paged.py through the TensorRT runner and the stand-in
    engine: rows of different lengths after rollbacks, 1..5-token extends on a 4-wide engine."""
    from test_paged import random_runner_walk

    runner, engine = make_runner(pair[0], max_seq_len=128)
    counts = random_runner_walk(runner, pair[0], steps=40, seed=6, prompts=LONG_PROMPTS, widths=(1, 4, 5))
    assert min(counts.values()) >= 2
    assert {call[2] for call in engine.calls if call[0] == "generation"} == {4}


def test_rollback_into_shared_prompt_block_then_extend(pair):
    model = pair[0]
    runner, _ = make_runner(model)
    prompt = list(range(5, 23))  # 18 tokens: block 0 full and shared by the particles
    ids, mask = left_pad([prompt])
    runner.prefill(ids, mask, 2)
    runner.extend(torch.tensor([[30, 31, 32], [33, 34, 35]]))
    runner.reorder(copy_plan(torch.tensor([[0, 0]])))  # row 1 := row 0, sharing its full blocks
    runner.rollback(torch.tensor([3, 1]))
    runner.tables.check()
    assert runner.tables.lengths.tolist() == [18, 20]
    logits = runner.extend(torch.tensor([[36], [37]]))
    for row, history in enumerate([prompt + [36], prompt + [30, 31, 37]]):
        torch.testing.assert_close(logits[row, 0], fresh_logits(model, history)[-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="rollback\\(drop\\): rows \\[0\\] ask to drop \\[2\\]"):
        runner.rollback(torch.tensor([2, 0]))


def test_one_token_engine_runs_without_spec_inputs(pair):
    """A draft built with --draft-step-tokens 1 has no spec_decoding_* inputs: a 2-token
    catch-up is two one-token steps."""
    model = pair[1]
    runner, engine = make_runner(model, tokens_per_step=1)
    ids, mask = left_pad(PROMPTS[:2])
    runner.prefill(ids, mask, 2)
    logits = runner.extend(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]))
    assert [call for call in engine.calls if call[0] == "generation"] == [("generation", 4, 1)] * 2
    for row in range(4):
        expected = fresh_logits(model, PROMPTS[row // 2] + [2 * row + 1, 2 * row + 2])[-2:]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


def test_host_inputs_are_bound_on_the_cpu_by_name():
    from hf_smcsd.runners.tensorrt import bound_on_host

    names = ["input_ids", "host_request_types", "spec_decoding_use", "spec_decoding_packed_mask", "all_reduce_workspace",
             "kv_cache_block_offsets", "host_kv_cache_block_offsets", "host_kv_cache_pool_pointers"]
    inputs = {name: torch.zeros(2, dtype=torch.int32) for name in names}
    dtypes = {name: torch.int64 if name in ("all_reduce_workspace", "host_kv_cache_pool_pointers") else torch.int32
              for name in names}
    bound = bind_inputs(inputs, names, dtypes, STAND_IN_DEVICE)
    on_cpu = {name for name, tensor in bound.items() if tensor.device.type == "cpu"}
    assert on_cpu == {"host_request_types", "spec_decoding_use", "all_reduce_workspace", "host_kv_cache_block_offsets",
                      "host_kv_cache_pool_pointers"}
    assert bound["all_reduce_workspace"].dtype == torch.int64 and all(bound_on_host(n) for n in on_cpu)
    with pytest.raises(EngineMismatchError, match="expects inputs the runner does not make: \\['medusa_logits'\\]"):
        bind_inputs(inputs, names + ["medusa_logits"], dtypes, STAND_IN_DEVICE)


def test_stand_in_refuses_host_inputs_bound_on_the_device(pair):
    _, engine = make_runner(pair[0])
    inputs = {name: torch.zeros(1, dtype=torch.int32) for name in engine.input_names}
    engine.dtypes = {name: torch.int32 for name in engine.input_names}
    from hf_smcsd.runners import tensorrt

    original = tensorrt.bound_on_host
    try:
        tensorrt.bound_on_host = lambda name: False  # what placing by get_tensor_location() did
        with pytest.raises(AssertionError, match="reads host_\\w+ on the host"):
            engine.check_binding(inputs)
    finally:
        tensorrt.bound_on_host = original


# ------------------------------------------------------------------ hf-smcsd gpu-check, on CPU


def stand_in_trt_model(model, tokens_per_step):
    from hf_smcsd.runners.tensorrt import TRTModel

    engine = ReferenceEngine(model, max_batch_size=8, tokens_per_step=tokens_per_step)
    manifest = manifest_for(engine, role="target" if tokens_per_step > 2 else "draft")
    factory = lambda: engine.attach(TensorRTRunner(engine, manifest, num_blocks=64))  # noqa: E731
    return TRTModel(factory, model.config, model.generation_config, "/nowhere", manifest)


@pytest.fixture(scope="module")
def gpu_check_context():
    from hf_smcsd.engines import gpu_check

    target, draft = gpu_check.tiny_pair()
    return gpu_check.Context(stand_in_trt_model(target, gpu_check.K + 1), stand_in_trt_model(draft, 2), target, draft,
                             device="cpu")


@pytest.mark.parametrize("index", range(5))
def test_gpu_check_checks_pass_against_the_stand_in(gpu_check_context, index):
    """The GPU check's own logic, run here with stand-in engines in float32: a failure on
    the GPU then points at the engines, not at the check."""
    from hf_smcsd.engines import gpu_check

    name, check = gpu_check.CHECKS[index]
    assert check(gpu_check_context), name


def test_gpu_check_report(gpu_check_context, monkeypatch, capsys):
    """The whole command with the stand-in engines: one line per check, a summary, and an exit
    code that is 0 only if every check passed; a failed build leaves every check NOT CHECKED."""
    from hf_smcsd.engines import gpu_check

    monkeypatch.setattr(gpu_check, "missing_prerequisites", lambda: [])
    monkeypatch.setattr(gpu_check, "build_context", lambda root: gpu_check_context)
    code = gpu_check.main([])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("PASS  ") == len(gpu_check.CHECKS) + 1
    assert "FAIL  " not in out

    def failed_build(root):
        raise SystemExit("trtllm-build: error")

    monkeypatch.setattr(gpu_check, "build_context", failed_build)
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  build fp16 engines: SystemExit: trtllm-build: error" in out and "NOT CHECKED: target: prefill" in out
