"""The rest of generate()'s surface with SMC-SD: logits processors (against enumeration),
stopping criteria and stop strings, streamers, num_return_sequences."""

import threading

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TopKLogitsWarper,
)

import hf_smcsd
from hf_smcsd.testing.enumeration import exact_distribution, total_variation
from hf_smcsd.smc import SMCSettings, smc_sample

from conftest import (ENUM_EOS, ENUM_NEW, ENUM_PROMPT, ENUM_SAMPLES, enumerable_pair, full_log_probs, left_pad,
                      noise_bound, processed_target, processor_cases, sampled_distribution)

EOS, NEW, SAMPLES, PROMPT = ENUM_EOS, ENUM_NEW, ENUM_SAMPLES, ENUM_PROMPT


@pytest.fixture(scope="module")
def enumerable():
    return enumerable_pair(draft_noise=0.5)


def smc_outputs(target, draft, particles, **kwargs):
    return sampled_distribution(target, draft, smc_particles=particles, **kwargs)


@processor_cases()
def test_processed_target_is_approached_as_particles_grow(enumerable, generate_kwargs, processors):
    """The processed target (as transformers' sampling defines it) is what SMC-SD converges to."""
    target, draft = enumerable
    exact, noise = processed_target(target, processors)
    # N=2, not N=1: at N=1 every draft the truncation rules out kills the population, and its
    # round is redone exactly, which hides much of the SMC-SD bias the comparison is about.
    tvs = {n: total_variation(exact, smc_outputs(target, draft, n, smc_gamma=1, **generate_kwargs)) for n in (2, 16)}
    print(generate_kwargs, "TV by N:", {n: round(tv, 4) for n, tv in tvs.items()}, "noise bound", round(noise, 4))
    assert tvs[16] < tvs[2] - noise


def test_draft_processors_make_draft_equal_target_exact(enumerable):
    """With smc_draft_processors=True and draft = target, proposals are the processed target:
    every weight is 1 and the output is exact at any N."""
    target, _ = enumerable
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,),
                               logits_processor=LogitsProcessorList([TopKLogitsWarper(3)]))
    got = smc_outputs(target, target, 2, smc_gamma=2, top_k=3, smc_draft_processors=True)
    assert total_variation(exact, got) < noise_bound(exact, SAMPLES)


def test_draft_processors_off_keeps_draft_support(pair):
    """By default the draft proposes with temperature only: tokens outside the target's top-k
    are proposed and get weight zero (so the support of q covers that of p)."""
    target, _ = pair
    ids, mask = left_pad([[5, 6, 7]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, target, ids, attention_mask=mask, smc_particles=16, smc_gamma=4,
                                do_sample=True, top_k=2, max_new_tokens=6, return_dict_in_generate=True,
                                smc_resample_threshold=0.0)
    assert torch.isneginf(out.log_weights).any()
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, target, ids, attention_mask=mask, smc_particles=16, smc_gamma=4,
                                do_sample=True, top_k=2, max_new_tokens=6, return_dict_in_generate=True,
                                smc_resample_threshold=0.0, smc_draft_processors=True)
    assert out.log_weights.abs().max() < 1e-4


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_cut_at_exact_token_and_weight_counts_kept_tokens(pair):
    target, draft = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    ids, mask = left_pad(prompts)
    stop_token, gamma = 8, 3
    criteria = StoppingCriteriaList([StopAfterToken(stop_token)])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=8, smc_gamma=gamma,
                                do_sample=True, top_k=0, max_new_tokens=15, stopping_criteria=criteria,
                                smc_resample_threshold=0.0, return_dict_in_generate=True, eos_token_id=None)
    stopped_inside, stopped = 0, 0
    for b, prompt in enumerate(prompts):
        for i in range(8):
            tokens = out.particle_sequences[b, i, : out.particle_lengths[b, i]].tolist()
            if stop_token in tokens:
                assert tokens.index(stop_token) == len(tokens) - 1  # ends at the first stop
                stopped += 1
                stopped_inside += (len(tokens) - 1) % (gamma + 1) != 0  # not at a bonus position
            else:
                assert len(tokens) == 15
            lp = full_log_probs(target, prompt + tokens)[len(prompt) - 1:]
            lq = full_log_probs(draft, prompt + tokens)[len(prompt) - 1:]
            expected = sum(float(lp[j, t] - lq[j, t]) for j, t in enumerate(tokens) if j and (j - 1) % (gamma + 1) < gamma)
            assert abs(expected - float(out.log_weights[b, i])) < 1e-3
    assert stopped_inside > 0 and stopped > 0


def char_tokenizer():
    """A character tokenizer over the tiny models' 40 ids: specials, a..z, digits, "ab"."""
    words = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + ["ab"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<pad>")


def test_stop_strings_end_each_particle_where_the_string_first_appears(pair):
    target, draft = pair
    tokenizer = char_tokenizer()
    ids, mask = left_pad([[5, 6, 7]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=16, smc_gamma=3,
                                do_sample=True, top_k=0, temperature=2.0, max_new_tokens=20, stop_strings=["c"],
                                tokenizer=tokenizer, return_dict_in_generate=True, eos_token_id=None)
    c = tokenizer.convert_tokens_to_ids("c")
    ended = 0
    for i in range(16):
        tokens = out.particle_sequences[0, i, : out.particle_lengths[0, i]].tolist()
        if c in tokens:
            assert tokens.index(c) == len(tokens) - 1
            ended += 1
        else:
            assert len(tokens) == 20
    assert ended > 0


def test_stop_strings_need_the_tokenizer(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="tokenizer"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6]]), do_sample=True, stop_strings=["c"])


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        assert not self.ended, "put after end"
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_streamer_gets_prompt_then_exactly_the_returned_tokens(pair, threshold):
    target, draft = pair
    ids = torch.tensor([[5, 6, 7]])
    streamer = RecordingStreamer()
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, smc_particles=3, smc_gamma=2, do_sample=True, max_new_tokens=24,
                                streamer=streamer, smc_resample_threshold=threshold, eos_token_id=None)
    assert streamer.puts[0] == [[5, 6, 7]] and streamer.ended == 1
    streamed = [t for chunk in streamer.puts[1:] for t in chunk]
    assert streamed == out[0, 3:].tolist()
    if threshold == 1.0:  # resampling every round: lineages coalesce, tokens settle early
        assert len(streamer.puts) > 2


def test_text_iterator_streamer_does_not_hang_when_generation_fails(pair):
    target, draft = pair
    tokenizer = char_tokenizer()
    streamer = TextIteratorStreamer(tokenizer, timeout=30)

    class Boom(StoppingCriteria):
        calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            Boom.calls += 1
            if Boom.calls > 3:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    received = []
    consumer = threading.Thread(target=lambda: received.extend(streamer))
    consumer.start()
    with pytest.raises(RuntimeError, match="boom"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), smc_particles=2, do_sample=True,
                              max_new_tokens=30, streamer=streamer, stopping_criteria=StoppingCriteriaList([Boom()]))
    consumer.join(timeout=30)
    assert not consumer.is_alive()


def test_text_iterator_streamer_in_a_thread(pair):
    target, draft = pair
    tokenizer = char_tokenizer()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=30)
    result = {}

    def produce():
        torch.manual_seed(0)
        result["out"] = hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), smc_particles=4,
                                              do_sample=True, max_new_tokens=12, streamer=streamer, eos_token_id=None)

    producer = threading.Thread(target=produce)
    producer.start()
    text = "".join(streamer)
    producer.join(timeout=30)
    assert text == tokenizer.decode(result["out"][0, 3:])


def test_num_return_sequences_returns_particles_of_each_prompt(pair):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=4, do_sample=True,
                                max_new_tokens=7, num_return_sequences=3, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 6 and out.chosen_particles.shape == (2, 3)
    width = ids.shape[1]
    for row in range(6):
        b, r = divmod(row, 3)
        assert torch.equal(out.sequences[row, :width], ids[b])
        i = int(out.chosen_particles[b, r])
        length = int(out.particle_lengths[b, i])
        assert out.sequences[row, width:width + length].tolist() == out.particle_sequences[b, i, :length].tolist()


def test_returned_particles_follow_the_final_weights():
    """The final pick draws particle i with probability w_i: over many prompts, how often
    each slot is picked matches the sum of its normalised weights."""
    from test_smc_loop import ScriptedRunner

    target = torch.zeros(1, 4, 4)
    target[:, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()  # the drafted token's target probability
    draft = torch.zeros(1, 4, 4)  # uniform proposals: weights 4 * p(d)
    prompts = 20000
    torch.manual_seed(0)
    result = smc_sample(ScriptedRunner(target), ScriptedRunner(draft), torch.zeros(prompts, 1, dtype=torch.long),
                        None, SMCSettings(particles=4, gamma=1, max_new_tokens=2))
    weights = torch.softmax(result.log_weights, dim=1)
    assert weights.std() > 0.05  # the weights really differ
    picked = torch.nn.functional.one_hot(result.chosen[:, 0], 4).double().sum(0)
    expected = weights.sum(0)
    sd = (weights * (1 - weights)).sum(0).sqrt()
    assert ((picked - expected).abs() < 5 * sd).all(), (picked, expected, sd)


def test_sequence_processors_hold_for_every_particle_with_weight(pair):
    """bad_words_ids, no_repeat_ngram_size and min_new_tokens: every particle that can be
    returned (finite weight) obeys them at every position, bonus and first tokens included."""
    target, draft = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    ids, mask = left_pad(prompts)
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=8, smc_gamma=3,
                                do_sample=True, top_k=0, temperature=1.5, max_new_tokens=12, eos_token_id=3,
                                bad_words_ids=[[4], [20]], no_repeat_ngram_size=2, min_new_tokens=5,
                                return_dict_in_generate=True)
    returnable = 0
    for b, prompt in enumerate(prompts):
        for i in range(8):
            if torch.isneginf(out.log_weights[b, i]):
                continue
            returnable += 1
            tokens = out.particle_sequences[b, i, : out.particle_lengths[b, i]].tolist()
            assert 4 not in tokens and 20 not in tokens
            assert 3 not in tokens[:4]  # no EOS before 5 new tokens
            full = ids[b].tolist() + tokens
            bigrams = list(zip(full, full[1:]))
            assert len(bigrams) == len(set(bigrams))
    assert returnable >= 4
