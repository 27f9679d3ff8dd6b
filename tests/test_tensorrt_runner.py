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
from hf_smcsd.runners.tensorrt import StepBuffers, TensorRTRunner, bind_inputs, causal_packed_mask
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
        self.extra_inputs = {}  # bound as made (EngineSession: all_reduce_workspace)
        self.buffers = None  # StepBuffers, as EngineSession binds with them
        self.logits_buffer = StepBuffers([], {}, "cpu")  # like the session, logits go to one kept buffer
        self.compute_capability = None  # (major, minor) of the GPU; None: not a GPU (no check)
        self.narrow_ok = False  # takes steps narrower than the built width (gpu-check's narrow comparison)
        # The attention plugin's spec-decoding state: the flag starts off; the XQA kernels for
        # multi-token steps are prepared on a generation step where the flag changes.
        self.spec_flag, self.xqa_prepared = False, False

    def attach(self, runner):
        self.pools[runner.pool.data_ptr()] = runner.pool
        return runner

    def check_binding(self, inputs):
        """Bind as EngineSession.run does, then fail where the plugin would."""
        if self.buffers is None:
            self.buffers = StepBuffers(self.input_names, self.dtypes, STAND_IN_DEVICE, fixed=self.extra_inputs)
        bound = self.buffers.bind(inputs)
        for name, tensor in bound.items():
            if name in self.extra_inputs:
                assert tensor is self.extra_inputs[name], f"{name} must be bound as it was allocated"
            elif name in HOST_READ:
                assert tensor.device.type == "cpu", f"the plugin reads {name} on the host; it was bound on {tensor.device}"
            else:
                assert tensor.device == STAND_IN_DEVICE, f"{name} must be on the engine's device, not {tensor.device}"
        return {name: inputs[name] if name in inputs else bound[name] for name in self.input_names}

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
        if width > 1:  # the built width (or a narrower one where narrow_ok), a causal chain
            step = inputs["spec_decoding_position_offsets"].shape[1]
            assert step == width or (self.narrow_ok and step < width), f"a {step}-wide spec step on a {width}-wide engine"
            assert bool((inputs["spec_decoding_generation_lengths"] == step).all())
            assert torch.equal(inputs["spec_decoding_position_offsets"], torch.arange(step, dtype=torch.int32).expand(rows, step))
            assert torch.equal(inputs["spec_decoding_packed_mask"], causal_packed_mask(step).repeat(rows, 1))
            use = bool(inputs["spec_decoding_use"].item())
            generation = bool((request == 1).all())
            if generation and use != self.spec_flag:
                self.xqa_prepared = use
            self.spec_flag = use
            if generation and not (use and self.xqa_prepared):
                raise RuntimeError("No available XQA kernels are found for speculative decoding mode "
                                   f"(spec_decoding_use={int(use)}, flag first set outside a generation step)")
        if bool((request == 0).all()):  # context step
            counts = inputs["host_context_lengths"].long()
            # The KV length after the step, as both TensorRT-LLM runtimes pass it.
            assert torch.equal(past, counts) and torch.equal(inputs["sequence_length"].long(), counts)
            positions = torch.cat([torch.arange(int(c)) for c in counts])
            self.calls.append(("context", rows, int(counts.sum())))
        else:
            assert bool((request == 1).all())
            k = inputs["input_ids"].numel() // rows
            assert k == width or (self.narrow_ok and k < width), f"a {k}-token step on an engine built for {width}"
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
        out = self.logits_buffer.output("logits", tuple(padded.shape), padded.dtype)  # overwritten next step
        out.copy_(padded)
        return {"logits": out}


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

    names = ["input_ids", "host_request_types", "spec_decoding_use", "spec_decoding_packed_mask",
             "kv_cache_block_offsets", "host_kv_cache_block_offsets", "host_kv_cache_pool_pointers"]
    inputs = {name: torch.zeros(2, dtype=torch.int32) for name in names}
    dtypes = {name: torch.int64 if name == "host_kv_cache_pool_pointers" else torch.int32 for name in names}
    bound = bind_inputs(inputs, names, dtypes, STAND_IN_DEVICE)
    on_cpu = {name for name, tensor in bound.items() if tensor.device.type == "cpu"}
    assert on_cpu == {"host_request_types", "spec_decoding_use", "host_kv_cache_block_offsets",
                      "host_kv_cache_pool_pointers"}
    assert bound["host_kv_cache_pool_pointers"].dtype == torch.int64 and all(bound_on_host(n) for n in on_cpu)
    with pytest.raises(EngineMismatchError, match="expects inputs the runner does not make: \\['medusa_logits'\\]"):
        bind_inputs(inputs, names + ["medusa_logits"], dtypes, STAND_IN_DEVICE)


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_all_reduce_workspace_is_bound_where_it_was_allocated(pair, where):
    """`allocate_workspace` returns the all-reduce workspace on the CPU (1.2) or on the device
    (older releases); GenerationSession binds it as returned, and so must the runner: the
    stand-in checks the very tensor arrives, through a whole prefill and extend."""
    runner, engine = make_runner(pair[0])
    workspace = torch.zeros(6, dtype=torch.int64, device=where)
    engine.input_names.append("all_reduce_workspace")
    engine.dtypes["all_reduce_workspace"] = torch.int64
    engine.extra_inputs["all_reduce_workspace"] = workspace
    ids, mask = left_pad(PROMPTS[:2])
    runner.prefill(ids, mask, 2)
    runner.extend(torch.tensor([[1, 2, 3, 4]] * 4))
    assert [call[0] for call in engine.calls] == ["context", "generation"]  # each bound the workspace itself
    from hf_smcsd.runners.tensorrt import bound_on_host

    assert not bound_on_host("all_reduce_workspace")  # not moved to the CPU by its name


def test_context_steps_send_spec_decoding_off(pair):
    """The plugin prepares its spec-decoding XQA kernels on a generation step where
    `spec_decoding_use` changes; a flag first set in the prefill leaves the first verify step
    without a kernel (the stand-in raises as the plugin fails). Context steps send 0, so every
    first generation step after a prefill switches the flag on - including after a second
    prefill in the same runner."""
    runner, engine = make_runner(pair[0])
    ids, mask = left_pad(PROMPTS[:2])
    for _ in range(2):
        runner.prefill(ids, mask, 2)
        assert engine.spec_flag is False
        runner.extend(torch.tensor([[1, 2, 3, 4]] * 4))
        assert engine.spec_flag is True and engine.xqa_prepared


def test_device_inputs_are_copied_only_when_they_change(pair):
    """Device inputs live in buffers kept across steps; a step copies only inputs whose value
    changed. Same-shape generation steps repeat the spec-decoding tensors, the last-token ids
    and the context lengths: each is copied once for the steps, not once per step."""
    runner, engine = make_runner(pair[0])
    ids, mask = left_pad(PROMPTS[:2])
    runner.prefill(ids, mask, 2)
    before = dict(engine.buffers.copies)
    for step in range(3):
        runner.extend(torch.tensor([[step, 2, 3, 4]] * 4))
    copies = {name: engine.buffers.copies.get(name, 0) - before.get(name, 0) for name in engine.buffers.copies}
    assert copies["input_ids"] == 3 and copies["position_ids"] == 3 and copies["sequence_length"] == 3
    for name in ("spec_decoding_generation_lengths", "spec_decoding_position_offsets", "spec_decoding_packed_mask",
                 "last_token_ids", "context_lengths"):
        assert copies[name] <= 1, (name, copies[name])


def test_step_buffers_always_bind_the_current_values():
    """The kept buffers never serve a stale value: random inputs, often repeated, sometimes
    longer or shorter, bound on the CPU as the "device" so the values can be read back."""
    gen = torch.Generator().manual_seed(0)
    buffers = StepBuffers(["a", "host_b"], {"a": torch.int32, "host_b": torch.int32}, "cpu")
    previous = None
    for _ in range(200):
        if previous is not None and torch.rand(1, generator=gen) < 0.5:
            value = previous.clone()
        else:
            length = int(torch.randint(1, 9, (1,), generator=gen))
            value = torch.randint(0, 3, (length,), generator=gen)
        bound = buffers.bind({"a": value, "host_b": value})
        assert torch.equal(bound["a"], value.to(torch.int32)) and bound["a"].data_ptr() != value.data_ptr()
        previous = value
    assert buffers.copies["a"] < 200


def test_runner_copies_logits_out_of_the_reused_output_buffer(pair):
    """The session's logits buffer is overwritten by the next step; the stand-in reuses one
    too, so logits kept across the steps of one extend (and the prefill's groups) would be
    clobbered. They match a recompute."""
    model = pair[0]
    runner, _ = make_runner(model, max_num_tokens=8)  # several calls per prefill and per step
    ids, mask = left_pad(PROMPTS)
    first = runner.prefill(ids, mask, 1)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(first[row], fresh_logits(model, prompt)[-1], atol=1e-4, rtol=1e-4)
    logits = runner.extend(torch.tensor([[1, 2, 3, 4, 5, 6]] * 3))  # two steps, rows split over calls
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], fresh_logits(model, prompt + [1, 2, 3, 4, 5, 6])[-6:], atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("capability,tokens_per_step,refused", [((7, 5), 4, True), ((7, 0), 2, True),
                                                                 ((7, 5), 1, False), ((8, 0), 4, False),
                                                                 ((9, 0), 4, False)])
def test_gpus_older_than_ampere_are_refused_before_a_verify_step(pair, capability, tokens_per_step, refused):
    engine = ReferenceEngine(pair[0], tokens_per_step=tokens_per_step)
    engine.compute_capability, engine.device_name = capability, "Tesla T4"
    if refused:
        with pytest.raises(EngineMismatchError, match=f"(?s)Tesla T4 has compute capability {capability[0]}\\."
                                                      f"{capability[1]}.*XQA.*8\\.0 or newer"):
            TensorRTRunner(engine, manifest_for(engine), num_blocks=64)
        assert engine.calls == []
    else:
        TensorRTRunner(engine, manifest_for(engine), num_blocks=64)


@pytest.mark.parametrize("model_fields,refused", [({"sliding_window": 32}, True),
                                                  ({"sliding_window": 32, "use_sliding_window": False}, False),
                                                  ({"sliding_window": 96}, False), ({"sliding_window": None}, False)])
def test_sliding_windows_shorter_than_the_engine_rows_are_refused(pair, model_fields, refused):
    """The engine attends to whole rows (`host_max_attention_window_sizes = max_seq_len`): a
    model whose window is shorter would get different logits once a row outgrows it."""
    from hf_smcsd.engines.manifest import check_manifest

    engine = ReferenceEngine(pair[0])  # max_seq_len 96
    manifest = manifest_for(engine)
    manifest["model"].update(model_fields)
    if refused:
        with pytest.raises(EngineMismatchError, match="sliding_window=32.*rows of up to 96 tokens"):
            TensorRTRunner(engine, manifest, num_blocks=64)
        assert any("sliding_window=32" in problem for problem in check_manifest(manifest))
    else:
        TensorRTRunner(engine, manifest, num_blocks=64)
        assert check_manifest(manifest) == []


def test_narrow_steps_match_built_width_steps(pair):
    """`narrow_steps=True` (off by default, unverified on a GPU) sends a k < W request as one
    k-wide step; against an engine that takes narrow steps it gives the logits of the
    filled-up built-width steps."""
    model = pair[0]
    ids, mask = left_pad(PROMPTS[:2])
    results = {}
    for narrow in (False, True):
        runner, engine = make_runner(model)
        engine.narrow_ok = narrow
        runner.narrow_steps = narrow
        runner.prefill(ids, mask, 2)
        results[narrow] = [runner.extend(torch.tensor([[7, 8, 9, 10, 11][:width]] * 4)) for width in (1, 2, 5)]
        widths = [call[2] for call in engine.calls if call[0] == "generation"]
        assert widths == ([1, 2, 4, 1] if narrow else [4, 4, 4, 4])
    for built, narrow in zip(results[False], results[True]):
        torch.testing.assert_close(narrow, built, atol=1e-4, rtol=1e-4)


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
    engine.narrow_ok = True  # for gpu-check's narrow-step comparison (the runner's default stays built width)
    manifest = manifest_for(engine, role="target" if tokens_per_step > 2 else "draft")
    factory = lambda: engine.attach(TensorRTRunner(engine, manifest, num_blocks=64))  # noqa: E731
    return TRTModel(factory, model.config, model.generation_config, "/nowhere", manifest)


@pytest.fixture(scope="module")
def gpu_check_context():
    from hf_smcsd.engines import gpu_check

    target, draft = gpu_check.tiny_pair()
    return gpu_check.Context(stand_in_trt_model(target, gpu_check.K + 1), stand_in_trt_model(draft, 2), target, draft,
                             device="cpu")


@pytest.mark.parametrize("index", range(6))
def test_gpu_check_checks_pass_against_the_stand_in(gpu_check_context, index):
    """The GPU check's own logic, run here with stand-in engines in float32: a failure on
    the GPU then points at the engines, not at the check."""
    from hf_smcsd.engines import gpu_check

    name, check = (gpu_check.CHECKS + gpu_check.UNVERIFIED_CHECKS)[index]
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
    assert out.count("PASS  ") == len(gpu_check.CHECKS) + 1 + len(gpu_check.UNVERIFIED_CHECKS)
    assert "FAIL  " not in out and "PASS  UNVERIFIED narrow steps" in out.split("not counted")[1]

    def narrow_fails(ctx):
        raise AssertionError("narrow step differs")

    monkeypatch.setattr(gpu_check, "UNVERIFIED_CHECKS", (("UNVERIFIED narrow", narrow_fails),))
    assert gpu_check.main([]) == 0  # not counted
    assert "FAIL  UNVERIFIED narrow: AssertionError: narrow step differs" in capsys.readouterr().out

    def failed_build(root):
        raise SystemExit("trtllm-build: error")

    monkeypatch.setattr(gpu_check, "build_context", failed_build)
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  build fp16 engines: SystemExit: trtllm-build: error" in out and "NOT CHECKED: target: prefill" in out
