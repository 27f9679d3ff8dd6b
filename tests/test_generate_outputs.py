"""output_scores / output_logits with SMC-SD (issue 10): the returned sequence's per-step
target logits and processed scores, as transformers' sampling returns them."""

import pytest
import torch

import hf_smcsd

from conftest import left_pad

KW = dict(max_new_tokens=5, top_k=5, temperature=0.7, do_sample=True, return_dict_in_generate=True,
          output_scores=True, output_logits=True)


def test_scores_and_logits_of_the_returned_sequences(pair):
    target, _ = pair
    draft = target  # proposals inside the target's top-k: no particle dies, so the pick is by weight
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=4, smc_draft_processors=True, **KW)
    assert int(out.num_dead_redos.sum()) == 0
    new = out.sequences.shape[1] - ids.shape[1]
    assert len(out.scores) == len(out.logits) == new
    # The first step depends on the prompt alone: the same as stock sampling's.
    stock = target.generate(ids, attention_mask=mask, **KW)
    torch.testing.assert_close(out.logits[0], stock.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.scores[0], stock.scores[0], atol=1e-4, rtol=1e-4)
    # Later steps: the target's logits on the returned prefix (row 1 has no padding).
    row = out.sequences[1]
    for j in range(new):
        with torch.no_grad():
            expected = target(row[: ids.shape[1] + j].unsqueeze(0)).logits[0, -1]
        torch.testing.assert_close(out.logits[j][1], expected, atol=1e-4, rtol=1e-4)
        kept = torch.isfinite(out.scores[j][1])
        assert int(kept.sum()) == 5  # top_k=5
        token = int(row[ids.shape[1] + j])
        assert bool(kept[token])  # a sampled token lies in the processed target's support
        if token == 3:
            break  # EOS: the rest is padding


def test_scores_follow_num_return_sequences(pair):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=4, num_return_sequences=2, **KW)
    assert out.sequences.shape[0] == 4 and out.scores[0].shape == (4, 40)
    torch.testing.assert_close(out.logits[0][0], out.logits[0][1])  # one prompt, the same first-step logits


def test_scores_with_a_per_row_processor_on_a_left_padded_batch(pair):
    """Issue 19, item 4: repetition_penalty keeps one padding length per row of generate()'s
    batch (transformers 5.24); the loop points it at particle rows, the scores pass needs the
    returned rows. Greedy returns the target's greedy output, so its scores are stock's."""
    target, draft = pair
    ids, mask = torch.tensor([[0, 2, 3], [4, 5, 6]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    common = dict(attention_mask=mask, do_sample=False, max_new_tokens=6, return_dict_in_generate=True,
                  output_scores=True, repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
    stock = target.generate(ids, **common)
    for mode in ("smc", "exact"):
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, draft, ids, smc_particles=3, smc_mode=mode, **common)
        assert torch.equal(out.sequences, stock.sequences)
        for ours, theirs in zip(out.scores, stock.scores, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    sampled = hf_smcsd.smc_generate(target, draft, ids, smc_particles=3, num_return_sequences=2,
                                    **dict(common, do_sample=True))
    assert sampled.scores[0].shape == (4, 40)


def test_a_callers_per_row_processor_keeps_its_rows(pair):
    """A processor passed in with per-row state leaves generate() as it came in."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11]])
    lengths = torch.tensor([1, 0])
    try:
        processor = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=lengths.clone())
    except ValueError:
        pytest.skip("this transformers keeps no per-row state in the repetition penalty (4.57: an int only)")
    torch.manual_seed(0)
    hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, max_new_tokens=4,
                          logits_processor=LogitsProcessorList([processor]))
    assert torch.equal(processor.prompt_ignore_length, lengths)
