"""A patched model behaves like a model (issue 10): deepcopy, pickle / torch.save,
save_pretrained / from_pretrained, and a call's smc_particles=None over the config."""

import copy
import io
import pickle

import torch
from transformers import AutoModelForCausalLM

import hf_smcsd
from hf_smcsd.testing.tiny_models import tiny_llama

IDS = torch.tensor([[1, 2, 3]])
SMC = dict(smc_particles=3, do_sample=True, max_new_tokens=8, return_dict_in_generate=True)


def fresh_pair():
    target = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=0, initializer_range=0.25, eos_token_id=3)
    draft = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=1, initializer_range=0.25, eos_token_id=3)
    return hf_smcsd.patch(target), draft


def seeded(fn, *args, **kwargs):
    torch.manual_seed(0)
    return fn(*args, **kwargs)


def test_deepcopy_is_an_independent_patched_model():
    model, draft = fresh_pair()
    clone = copy.deepcopy(model)
    with torch.no_grad():  # the copy now prefers token 7 everywhere; the original does not
        clone.lm_head.weight.zero_()
        clone.lm_head.weight[7] = 1.0
        clone.model.norm.weight.fill_(50.0)
    got = seeded(clone.generate, IDS, assistant_model=draft, **SMC).sequences
    assert torch.equal(got, seeded(hf_smcsd.smc_generate, clone, draft, IDS, **SMC).sequences)
    assert not torch.equal(got, seeded(model.generate, IDS, assistant_model=draft, **SMC).sequences)
    assert clone.generate.model is clone and model.generate.model is model


def test_pickle_and_torch_save_keep_the_patch():
    model, draft = fresh_pair()
    expected = seeded(model.generate, IDS, assistant_model=draft, **SMC).sequences
    restored = [pickle.loads(pickle.dumps(model))]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored.append(torch.load(buffer, weights_only=False))
    for clone in restored:
        assert clone.generate.model is clone
        assert torch.equal(seeded(clone.generate, IDS, assistant_model=draft, **SMC).sequences, expected)


def test_save_pretrained_keeps_smc_settings(tmp_path):
    model, draft = fresh_pair()
    model.generation_config.smc_particles = 5
    model.generation_config.smc_gamma = 2
    model.save_pretrained(tmp_path)
    loaded = hf_smcsd.patch(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert (loaded.generation_config.smc_particles, loaded.generation_config.smc_gamma) == (5, 2)
    out = loaded.generate(IDS, assistant_model=draft, do_sample=True, max_new_tokens=6, return_dict_in_generate=True)
    assert isinstance(out, hf_smcsd.SMCGenerateOutput) and out.particle_sequences.shape[1] == 5


def test_explicit_none_turns_off_a_configured_smc():
    model, draft = fresh_pair()
    stock = seeded(model.generate, IDS, do_sample=True, max_new_tokens=6)
    model.generation_config.smc_particles = 4
    got = seeded(model.generate, IDS, do_sample=True, max_new_tokens=6, smc_particles=None)
    assert torch.equal(got, stock)


def test_patching_twice_and_the_class_untouched():
    model, _ = fresh_pair()
    patched = model.generate
    assert hf_smcsd.patch(model).generate is patched
    other = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=0)
    assert "generate" not in vars(other) and "generate" in vars(model)
