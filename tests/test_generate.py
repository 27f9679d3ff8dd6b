"""The generate() drop-in: patching, knobs, outputs, hand-over, and clear errors."""

import copy

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

import hf_smcsd
from hf_smcsd.testing.tiny_models import tiny_llama

from conftest import full_log_probs, left_pad

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


@pytest.fixture()
def models(pair):
    target, draft = pair
    return hf_smcsd.patch(copy.deepcopy(target)), draft


def batch():
    return left_pad(PROMPTS)


def sampled(model, **kwargs):
    ids, mask = batch()
    torch.manual_seed(0)
    return model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8, **kwargs)


def test_patch_without_smc_particles_is_unchanged(pair):
    target, _ = pair
    plain = copy.deepcopy(target)
    patched = hf_smcsd.patch(copy.deepcopy(target))
    assert torch.equal(sampled(plain), sampled(patched))
    assert torch.equal(sampled(plain, temperature=0.7, top_k=5), sampled(patched, temperature=0.7, top_k=5))
    ids, mask = batch()
    assert torch.equal(plain.generate(ids, attention_mask=mask, max_new_tokens=6),
                       patched.generate(ids, attention_mask=mask, max_new_tokens=6))


def test_patch_touches_only_that_object(pair):
    target, draft = pair
    other = copy.deepcopy(target)
    patched = hf_smcsd.patch(copy.deepcopy(target))
    assert hf_smcsd.patch(patched) is patched  # idempotent
    assert "generate" in vars(patched) and "generate" not in vars(other)
    with pytest.raises(ValueError, match="smc_particles"):  # the stock generate() rejects the knob
        sampled(other, assistant_model=draft, smc_particles=2)


def test_smc_generate_returns_sequences_and_is_seeded(models):
    target, draft = models
    a = sampled(target, assistant_model=draft, smc_particles=3, smc_gamma=2)
    b = sampled(target, assistant_model=draft, smc_particles=3, smc_gamma=2)
    ids, _ = batch()
    assert torch.equal(a, b)
    assert a.shape[0] == 2 and a.shape[1] <= ids.shape[1] + 8 and torch.equal(a[:, : ids.shape[1]], ids)


def test_return_dict_in_generate_carries_diagnostics(models):
    target, draft = models
    out = sampled(target, assistant_model=draft, smc_particles=3, smc_gamma=2, return_dict_in_generate=True)
    assert isinstance(out, hf_smcsd.SMCGenerateOutput) and isinstance(out, GenerateDecoderOnlyOutput)
    assert out.particle_sequences.shape == (2, 3, 8)
    assert out.log_weights.shape == (2, 3) and out.log_weights.dtype == torch.float64
    assert out.log_z.shape == (2,) and torch.isfinite(out.log_z).all()
    assert len(out.ess) == 2 and max(len(e) for e in out.ess) == out.num_rounds  # a group may end early
    assert out.num_rounds == 3  # x0, then 7 tokens in blocks of 3: 3 + 3 + 1
    assert out.num_resamples.shape == (2,)
    prompt_width = batch()[0].shape[1]
    for b in range(2):
        i = out.chosen_particles[b, 0]
        chosen = out.particle_sequences[b, i, : out.particle_lengths[b, i]]
        assert torch.equal(out.sequences[b, prompt_width: prompt_width + len(chosen)], chosen)


def test_knobs_from_generation_config(models):
    target, draft = models
    config = GenerationConfig(do_sample=True, max_new_tokens=5, smc_particles=2, smc_gamma=1, return_dict_in_generate=True)
    ids, mask = batch()
    out = target.generate(ids, attention_mask=mask, generation_config=config, assistant_model=draft)
    assert out.particle_sequences.shape == (2, 2, 5) and out.num_rounds == 2
    target.generation_config.smc_particles = 4
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, do_sample=True, max_new_tokens=5,
                          return_dict_in_generate=True)
    assert out.particle_sequences.shape[1] == 4


def test_max_length_and_eos_list(models):
    target, draft = models
    ids, mask = batch()
    torch.manual_seed(0)
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, smc_particles=4, do_sample=True,
                          max_length=ids.shape[1] + 9, eos_token_id=[3, 4], pad_token_id=39,
                          return_dict_in_generate=True)
    assert out.particle_sequences.shape[-1] == 9
    for b in range(2):
        for i in range(4):
            tokens = out.particle_sequences[b, i].tolist()
            length = int(out.particle_lengths[b, i])
            stops = [j for j, t in enumerate(tokens[:length]) if t in (3, 4)]
            assert stops in ([], [length - 1])  # stops exactly at the first EOS of either id
            assert all(t == 39 for t in tokens[length:])  # padded with pad_token_id


def test_top_k_applies_to_the_target(models):
    """With top_k=2, every token (drafted, bonus or first) is in the target's top 2 there."""
    target, draft = models
    ids, mask = batch()
    torch.manual_seed(0)
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, smc_particles=6, smc_gamma=3,
                          do_sample=True, top_k=2, max_new_tokens=9, return_dict_in_generate=True)
    for b, prompt in enumerate(PROMPTS):
        for i in range(6):
            weight = float(out.log_weights[b, i])
            if weight == float("-inf"):
                continue  # a particle that drafted outside the top-2 has weight zero and is never picked
            tokens = out.particle_sequences[b, i, : out.particle_lengths[b, i]].tolist()
            lp = full_log_probs(target, prompt + tokens)[len(prompt) - 1:]
            for j, token in enumerate(tokens):
                assert token in lp[j].topk(2).indices.tolist()


def test_greedy_runs_greedy_verification_without_warning(models):
    """do_sample=False with smc_particles: the N draft chains are verified against the
    target's argmax (no hand-over to assisted decoding, no warning): the target's greedy text."""
    import warnings

    target, draft = models
    ids = torch.tensor([PROMPTS[0]])
    expected = target.generate(ids, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = target.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=draft, smc_particles=4,
                              return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected)
    assert set("".join(got.round_modes)) == {"e"}  # it really ran the exact walk


def test_plain_function_leaves_model_unpatched(pair):
    target, draft = pair
    ids, mask = batch()
    torch.manual_seed(0)
    a = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, do_sample=True, max_new_tokens=6)
    patched = hf_smcsd.patch(copy.deepcopy(target))
    torch.manual_seed(0)
    b = patched.generate(ids, attention_mask=mask, assistant_model=draft, smc_particles=3, do_sample=True, max_new_tokens=6)
    assert torch.equal(a, b) and "generate" not in vars(target)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(smc_particles=0), "smc_particles"),
        (dict(smc_particles=2.5), "smc_particles"),
        (dict(smc_gamma=0), "smc_gamma"),
        (dict(smc_resample_threshold=1.5), "smc_resample_threshold"),
        (dict(smc_resample_threshold=-0.1), "smc_resample_threshold"),
        (dict(smc_alpha=0.0), "smc_alpha"),
        (dict(smc_resample_method="bogus"), "smc_resample_method"),
        (dict(smc_draft_temperature=0.0), "smc_draft_temperature"),
        (dict(cache_implementation="sliding_window"), "cache_implementation"),
        (dict(num_beams=2), "num_beams"),
        (dict(prefix_allowed_tokens_fn=lambda b, s: [1, 2]), "prefix_allowed_tokens_fn"),
    ],
)
def test_bad_input_names_the_argument(models, kwargs, name):
    target, draft = models
    kwargs = {"smc_particles": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        sampled(target, assistant_model=draft, **kwargs)


def test_missing_draft_is_a_clear_error(models):
    with pytest.raises(ValueError, match="assistant_model"):
        sampled(models[0], smc_particles=2)


def test_vocabulary_mismatch_is_a_clear_error(models):
    other = tiny_llama(vocab_size=41, hidden_size=32, num_layers=1, seed=3)
    with pytest.raises(ValueError, match="vocabulary"):
        sampled(models[0], assistant_model=other, smc_particles=2)


def test_encoder_decoder_is_a_clear_error(models):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    t5 = hf_smcsd.patch(t5)
    with pytest.raises(ValueError, match="encoder-decoder"):
        t5.generate(torch.tensor([[5, 6]]), assistant_model=models[1], smc_particles=2, do_sample=True)
