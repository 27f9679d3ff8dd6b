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
from hf_smcsd.runners import EagerRunner, Runner
from hf_smcsd.runners.tensorrt import TensorRTRunner, causal_packed_mask
from hf_smcsd.smc import SMCSettings, smc_sample

from conftest import left_pad, random_resample

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]
PAD_VOCAB = 3  # the engine's logits are vocab-padded (tp); the runner must cut them


class ReferenceEngine:
    def __init__(self, model, *, max_batch_size=32, max_seq_len=64, max_num_tokens=64, tokens_per_step=4,
                 tokens_per_block=4):
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
        self.pools = {}  # data_ptr -> tensor, registered by the test
        self.calls = []

    def attach(self, runner):
        self.pools[runner.pool.data_ptr()] = runner.pool
        return runner

    @torch.no_grad()
    def run(self, inputs):
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
        if bool((request == 0).all()):  # context step
            counts = inputs["host_context_lengths"].long()
            assert bool((past == 0).all()) and torch.equal(inputs["sequence_length"].long(), counts)
            positions = torch.cat([torch.arange(int(c)) for c in counts])
            assert torch.equal(inputs["position_ids"].long(), positions)
            self.calls.append(("context", rows, int(counts.sum())))
        else:
            assert bool((request == 1).all())
            k = int(inputs["spec_decoding_generation_lengths"][0]) if int(inputs["spec_decoding_use"][0]) else 1
            assert bool((inputs["spec_decoding_generation_lengths"] == k).all())
            assert torch.equal(inputs["spec_decoding_position_offsets"], torch.arange(k, dtype=torch.int32).expand(rows, k))
            assert torch.equal(inputs["spec_decoding_packed_mask"], causal_packed_mask(k).repeat(rows, 1))
            counts = torch.full((rows,), k)
            assert torch.equal(inputs["sequence_length"].long(), past + k)
            positions = (past.unsqueeze(1) + torch.arange(k)).flatten()
            self.calls.append(("generation", rows, k))
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
    limits = EngineLimits(max_prompts=1, particles=engine.max_batch_size, max_batch_size=engine.max_batch_size, gamma=engine.tokens_per_step - 1,
                          tokens_per_step=engine.tokens_per_step, max_input_len=16, max_output_len=engine.max_seq_len - 16,
                          max_seq_len=engine.max_seq_len, max_num_tokens=engine.max_num_tokens,
                          tokens_per_block=engine.tokens_per_block)
    return make_manifest(role=role, source_model="/m", dtype="float32", tp_size=1, limits=limits, build_flags={},
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
    for width in (4, 1, 6):  # 6 > tokens_per_step: split into steps of 4 and 2
        step = torch.randint(0, 40, (3 * n, width), generator=gen)
        before = len(engine.calls)
        logits = runner.extend(step)
        calls = engine.calls[before:]  # max_num_tokens=8: rows are split too, 8 // k rows per call
        assert all(call[0] == "generation" and call[1] <= 8 // call[2] for call in calls)
        assert [sum(c[1] for c in calls if c[2] == k) for k in (4, 2)] == ([9, 9] if width == 6 else [9 * (width == 4), 0])
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
