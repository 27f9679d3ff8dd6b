"""Padded vocabularies (issue 10): a target and a draft whose logits differ in width only by
padding rows run on the ids they share; the target is then its own distribution restricted
to those ids. Truly different vocabularies stay refused."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LogitsProcessorList, PreTrainedTokenizerFast

import hf_smcsd
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, sampling_noise_tv, total_variation
from hf_smcsd.testing.tiny_models import tiny_llama

EOS, NEW, SAMPLES, SHARED = 0, 3, 6_000, 6
PROMPT = [1, 2, 3]


def word_tokenizer(size):
    vocab = {f"t{i}": i for i in range(size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
                                   unk_token="t0", eos_token="t0", pad_token="t0")


def tiny(vocab_size, seed):
    return tiny_llama(vocab_size=vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, seed=seed,
                      initializer_range=0.5, eos_token_id=EOS)


@pytest.fixture(scope="module")
def padded_pair():
    """A target padded to 8 rows and a draft of 6, sharing a 6-token tokenizer."""
    return tiny(8, seed=0), tiny(SHARED, seed=1)


def restricted_copy(model):
    """`model` without its padding rows: its distribution is exactly the restricted one."""
    copy = tiny(SHARED, seed=2)
    state = {name: (value[:SHARED] if value.shape[0] == model.config.vocab_size and "embed" in name or "lm_head" in name
                    else value) for name, value in model.state_dict().items()}
    copy.load_state_dict(state)
    return copy


class OnlySharedIds:
    """The definition of the restricted target: padding rows get no mass, the rest renormalise."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, SHARED:] = float("-inf")
        return scores


def sample(target, draft, prompts, **kwargs):
    torch.manual_seed(0)
    return hf_smcsd.smc_generate(target, draft, prompts, attention_mask=torch.ones_like(prompts), smc_particles=4,
                                 smc_gamma=2, top_k=0, max_new_tokens=NEW, tokenizer=word_tokenizer(SHARED), **kwargs)


def test_padding_rows_carry_real_mass_here(padded_pair):
    """Else the exactness test below could not tell restricted from unrestricted."""
    target, _ = padded_pair
    p = torch.softmax(target(torch.tensor([PROMPT])).logits[0, -1], -1)
    assert p[SHARED:].sum() > 0.05


def test_restricted_target_is_sampled_exactly(padded_pair):
    """With the restricted target as the draft every weight is equal, so SMC-SD samples the
    restricted target exactly at any N: checked against enumeration of its definition."""
    target, _ = padded_pair
    draft = restricted_copy(target)
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,),
                               logits_processor=LogitsProcessorList([OnlySharedIds()]))
    out = sample(target, draft, torch.tensor([PROMPT] * SAMPLES))
    assert int(out.max()) < SHARED
    got = []
    for row in out[:, len(PROMPT):].tolist():
        got.append(tuple(row[: row.index(EOS) + 1]) if EOS in row else tuple(row))
    floor = sampling_noise_tv(exact, SAMPLES)
    bound = float(floor.mean() + 5 * floor.std())
    tv = total_variation(exact, empirical_distribution(got))
    assert tv <= bound, f"TV {tv:.4f} above the noise bound {bound:.4f}"


def test_either_model_may_be_the_wider(padded_pair):
    target, draft = padded_pair
    out = sample(draft, target, torch.tensor([PROMPT]), return_dict_in_generate=True)
    assert int(out.particle_sequences.max()) < SHARED


def test_config_vocab_size_is_evidence_too(padded_pair):
    """A checkpoint whose LM head is padded beyond config.vocab_size needs no tokenizer."""
    target, draft = padded_pair
    target.config.vocab_size = SHARED
    try:
        torch.manual_seed(0)
        hf_smcsd.smc_generate(target, draft, torch.tensor([PROMPT]), max_new_tokens=NEW)
    finally:
        target.config.vocab_size = 8


def test_widths_without_evidence_ask_for_the_tokenizer(padded_pair):
    target, draft = padded_pair
    with pytest.raises(ValueError, match=r"vocabulary.*pass tokenizer=.*universal assisted generation"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([PROMPT]), max_new_tokens=NEW)


def test_a_tokenizer_beyond_the_draft_is_refused(padded_pair):
    target, draft = padded_pair
    with pytest.raises(ValueError, match=r"8 tokens.*ids 6\.\.7 are real tokens.*universal assisted generation"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([PROMPT]), max_new_tokens=NEW,
                              tokenizer=word_tokenizer(8))


def test_different_tokenizers_are_refused(padded_pair):
    target, draft = padded_pair
    with pytest.raises(ValueError, match="universal assisted generation"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([PROMPT]), max_new_tokens=NEW,
                              tokenizer=word_tokenizer(SHARED), assistant_tokenizer=word_tokenizer(5))
