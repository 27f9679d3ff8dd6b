"""Issue 19: breaks and weak spots found by an adversarial round, each with its guard."""

import re

import pytest
import torch

import hf_smcsd
from hf_smcsd.testing import zoo

# --- Item 2: models with learned absolute positions (GPT-2 n_positions=16). ---


@pytest.fixture(scope="module")
def gpt2_pairs():
    return {n: _gpt2_pair(n) for n in (16, 32)}


def _gpt2_pair(n_positions: int):
    """A GPT-2 target and draft whose position tables hold `n_positions` rows: the first rows
    of one wide seeded pair, so that every narrower table agrees with it where both exist."""
    models = []
    for seed, layers in ((0, 2), (1, 1)):
        wide = zoo.tiny_model("gpt2", seed=seed, num_layers=layers, n_positions=32)
        narrow = zoo.tiny_model("gpt2", seed=seed, num_layers=layers, n_positions=n_positions)
        state = {k: v[tuple(slice(0, n) for n in narrow.state_dict()[k].shape)] for k, v in wide.state_dict().items()}
        narrow.load_state_dict(state)
        models.append(narrow.eval())
    return models


PROMPTS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
FILLS = dict(smc_particles=3, smc_gamma=7, max_new_tokens=11, eos_token_id=None, pad_token_id=0)  # 5 + 11 = 16


@pytest.mark.parametrize("mode,runner", [("smc", "eager"), ("exact", "eager"), ("auto", "eager"), ("smc", "static")])
def test_a_request_that_fills_the_position_table_runs_as_with_a_larger_table(mode, runner, gpt2_pairs):
    """Rows of groups with less budget left are fed past their budget in a round; they must
    not be fed positions the table lacks, and the tokens kept must be those a larger table
    gives (before the fix: IndexError in the position embedding in most seeds)."""
    narrow, wide = gpt2_pairs[16], gpt2_pairs[32]
    extra = dict(cache_implementation="static") if runner == "static" else {}
    if mode == "auto":  # auto plans from measured times unless given costs: fixed ones, under which every round drafts
        from hf_smcsd.planner import CostModel

        costs = CostModel()
        costs.verify.points, costs.draft_step.points, costs.overhead = {1: 1.0}, {1: 0.0}, {"plain": 0.0, "spec": 0.0}
        extra["smc_auto_costs"] = costs
    for seed in range(3):
        outs = []
        for target, draft in (narrow, wide):
            torch.manual_seed(seed)
            outs.append(hf_smcsd.smc_generate(target, draft, PROMPTS, smc_mode=mode, return_dict_in_generate=True,
                                              **FILLS, **extra))
        assert torch.equal(outs[0].particle_sequences, outs[1].particle_sequences)
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        assert outs[0].sequences.shape[1] == 16


def test_a_request_that_cannot_fit_the_position_table_is_refused_with_the_figures(gpt2_pairs):
    target, draft = gpt2_pairs[16]
    stock = target.generate(PROMPTS, max_new_tokens=12, do_sample=False, pad_token_id=0)  # 5 + 11 fed: fits
    assert stock.shape[1] == 17
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, PROMPTS, **dict(FILLS, max_new_tokens=12))
    assert out.shape[1] == 17
    with pytest.raises(ValueError, match=r"holds 16 of them, but this request feeds 17.*at most 12"):
        hf_smcsd.smc_generate(target, draft, PROMPTS, **dict(FILLS, max_new_tokens=13))


# --- Item 5: inputs_embeds. ---


def test_inputs_embeds_is_refused_by_name(pair):
    target, draft = pair
    embeds = target.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="inputs_embeds is not supported with smc_particles.*input_ids"):
        hf_smcsd.smc_generate(target, draft, inputs_embeds=embeds, max_new_tokens=3)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), inputs_embeds=embeds, max_new_tokens=3)


# --- Weak spots: prompts, temperature, knobs of other modes, other drafters, caches. ---


def test_greedy_takes_temperature_zero_as_stock_greedy_does(pair):
    target, draft = pair
    ids = torch.tensor([[5, 6, 7]])
    stock = target.generate(ids, do_sample=False, temperature=0.0, max_new_tokens=5)
    torch.manual_seed(0)
    ours = hf_smcsd.smc_generate(target, draft, ids, do_sample=False, temperature=0.0, max_new_tokens=5)
    assert torch.equal(ours, stock)
    with pytest.raises(ValueError, match="Invalid temperature=0.0"):  # sampling at 0 means nothing
        hf_smcsd.smc_generate(target, draft, ids, do_sample=True, temperature=0.0, max_new_tokens=5)


@pytest.mark.parametrize(
    "ids,mask,says",
    [
        (torch.zeros(1, 0, dtype=torch.long), None, r"input_ids has no token \(shape \(1, 0\)\)"),
        (torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]), "prompt 1 is empty: its attention_mask row"),
        (torch.tensor([[5, 40]]), None, r"token id 40, outside model's vocabulary of 40 ids \(0..39\)"),
        (torch.tensor([[5, -1]]), None, "token id -1, outside model's vocabulary"),
    ],
    ids=["empty", "all-padding-row", "id-too-large", "negative-id"],
)
def test_bad_prompts_are_refused_up_front_naming_the_argument(pair, ids, mask, says):
    target, draft = pair
    with pytest.raises(ValueError, match=says):
        hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, max_new_tokens=3)


def test_an_id_only_the_wider_model_embeds_is_refused_naming_the_draft(pair):
    from hf_smcsd.testing.tiny_models import tiny_llama

    target, _ = pair
    narrow_draft = tiny_llama(vocab_size=32, hidden_size=32, num_layers=1, seed=1)
    with pytest.raises(ValueError, match="token id 35, outside assistant_model's vocabulary of 32 ids"):
        hf_smcsd.smc_generate(target, narrow_draft, torch.tensor([[5, 35]]), max_new_tokens=3, tokenizer=_Sized(32))


class _Sized:
    """A tokenizer stand-in of `n` tokens (the evidence that wider logits are padding)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize(
    "knobs,mode,named",
    [
        (dict(smc_schedule=(2, 1), smc_auto_threshold=0.5), "smc", ["smc_schedule", "smc_auto_threshold"]),
        (dict(smc_auto_threshold=0.5, smc_resample_threshold=0.3), "exact", ["smc_auto_threshold", "smc_resample_threshold"]),
        (dict(smc_schedule=(2, 1)), "auto", ["smc_schedule"]),
    ],
)
def test_knobs_of_another_mode_warn_once(pair, knobs, mode, named):
    target, draft = pair
    with pytest.warns(UserWarning) as caught:
        torch.manual_seed(0)
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6]]), smc_mode=mode, max_new_tokens=3, **knobs)
    idle = [str(w.message) for w in caught if "no effect" in str(w.message)]
    assert len(idle) == 1 and all(name in idle[0] for name in named) and f"smc_mode={mode!r}" in idle[0]


def test_knobs_of_the_mode_in_use_do_not_warn(pair, recwarn):
    target, draft = pair
    for knobs in (dict(smc_mode="mixed", smc_schedule=(2, 1)), dict(smc_mode="auto", smc_auto_threshold=0.5),
                  dict(smc_mode="smc", smc_resample_threshold=0.3)):
        torch.manual_seed(0)
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6]]), max_new_tokens=3, **knobs)
    assert not [w for w in recwarn if "no effect" in str(w.message)]


def test_greedy_names_the_knobs_it_ignores(pair):
    target, draft = pair
    with pytest.warns(UserWarning, match=r"smc_resample_method has no effect with do_sample=False"):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6]]), do_sample=False, max_new_tokens=3,
                              smc_resample_method="multinomial")


def _seeded_particles(target, draft, **kwargs):
    torch.manual_seed(0)
    return hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), max_new_tokens=9, top_k=0,
                                 return_dict_in_generate=True, **kwargs).particle_sequences


def test_num_assistant_tokens_sets_k(pair):
    """Users of assisted generation set K with num_assistant_tokens, on the assistant's
    generation config (where transformers reads it) or as a keyword."""
    import copy

    target, draft = pair
    k3 = _seeded_particles(target, draft, smc_gamma=3)
    assert not torch.equal(k3, _seeded_particles(target, draft))  # K=4 by default: another run
    assert torch.equal(_seeded_particles(target, draft, num_assistant_tokens=3), k3)
    configured = copy.deepcopy(draft)
    configured.generation_config.num_assistant_tokens = 3
    assert torch.equal(_seeded_particles(target, configured), k3)
    assert torch.equal(_seeded_particles(target, configured, smc_gamma=4), _seeded_particles(target, draft))
    with pytest.raises(ValueError, match="smc_gamma=2 and num_assistant_tokens=3 both set K"):
        _seeded_particles(target, draft, smc_gamma=2, num_assistant_tokens=3)
    with pytest.raises(ValueError, match="Invalid num_assistant_tokens=0"):
        _seeded_particles(target, draft, num_assistant_tokens=0)


@pytest.mark.parametrize(
    "kwargs,says",
    [
        (dict(cache_implementation="offloaded"), "cache_implementation='offloaded' is not supported"),
        (dict(cache_implementation="quantized"), "cache_implementation='quantized' is not supported"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3 is not supported with smc_particles"),
        (dict(assistant_early_exit=1), "assistant_early_exit=1 is not supported with smc_particles"),
    ],
)
def test_what_does_not_map_onto_smc_sd_is_refused_by_name(pair, kwargs, says):
    target, draft = pair
    with pytest.raises(ValueError, match=says):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6]]), max_new_tokens=3, **kwargs)


def test_a_huge_gamma_is_sized_by_what_can_be_drafted(pair, monkeypatch):
    from hf_smcsd import generate, memory

    target, draft = pair
    sized = dict(prompts=1, prompt_length=2, particles=3, max_new_tokens=8)
    assert memory.estimate(target, draft, gamma=10**7, **sized) == memory.estimate(target, draft, gamma=8, **sized)
    lengths = []
    make_runner = generate.make_runner
    monkeypatch.setattr(generate, "make_runner", lambda *a, **kw: lengths.append(kw["max_length"]) or make_runner(*a, **kw))
    outs = []
    for gamma in (8, 10**7):
        torch.manual_seed(0)
        outs.append(hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6]]), smc_particles=3, smc_gamma=gamma,
                                          max_new_tokens=8, cache_implementation="static"))
    assert torch.equal(outs[0], outs[1])
    assert lengths == [2 + 8 + 2 * 9] * 4  # the static runners' buffers: the same as at K=8


# --- Item 3: NaN logits. ---


@pytest.mark.parametrize("poisoned", ["target", "draft"])
@pytest.mark.parametrize("kwargs", [dict(smc_mode="smc"), dict(smc_mode="exact"), dict(smc_mode="mixed"),
                                    dict(smc_mode="auto"), dict(do_sample=False), dict(max_new_tokens=1)],
                         ids=["smc", "exact", "mixed", "auto", "greedy", "one-token"])
def test_nan_logits_raise_an_error_naming_the_model(poisoned, kwargs):
    """Before: exact, mixed and auto returned the last vocabulary id repeated."""
    from hf_smcsd.smc import InvalidDistributionError
    from hf_smcsd.testing.tiny_models import tiny_llama

    target = tiny_llama(vocab_size=40, hidden_size=48, num_layers=2, seed=0)
    draft = tiny_llama(vocab_size=40, hidden_size=32, num_layers=1, seed=1)
    model = target if poisoned == "target" else draft
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    if poisoned == "draft" and "max_new_tokens" in kwargs:
        pytest.skip("one new token is the target's alone: the draft never runs")
    named = "target model (generate()'s model)" if poisoned == "target" else "draft model (assistant_model)"
    torch.manual_seed(0)
    with pytest.raises(InvalidDistributionError, match=re.escape(f"The {named} gave NaN probabilities")):
        hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6], [7, 8]]), **{"max_new_tokens": 6, **kwargs})


# --- Item 1: low target temperatures. ---


def test_near_temperature_zero_smc_sd_returns_the_targets_greedy_output(pair):
    """At temperature 1e-8 the processed target is a point mass: every token but its argmax
    has probability 0 in float32, so a drafted token that is not the argmax is outside the
    target's support (weight 0), and a round where every particle drafted one is redone
    exact. Every row must then equal the target's greedy output (ties within 1e-8 aside, none
    here). Before: the weights were tiny but finite (log w about -1e8), no round died, and
    0 of 20 rows did."""
    target, draft = pair
    ids = torch.randint(4, 40, (20, 3), generator=torch.Generator().manual_seed(0))
    common = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    greedy = target.generate(ids, do_sample=False, **common)
    for draft_temperature in (None, 1e-8):  # the default, and the draft as sharp as the target
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, draft, ids, smc_particles=4, smc_gamma=2, temperature=1e-8, top_k=0,
                                    smc_draft_temperature=draft_temperature, return_dict_in_generate=True, **common)
        assert torch.equal(out.sequences, greedy)
        assert int(out.num_dead_redos.sum()) > 0  # the draft's random argmax is rarely the target's


def test_the_draft_proposes_at_no_less_than_0_7_by_default(pair):
    from hf_smcsd.smc import MIN_DRAFT_TEMPERATURE, SMCSettings

    assert MIN_DRAFT_TEMPERATURE == 0.7
    assert SMCSettings(temperature=0.1).proposal_temperature == 0.7
    assert SMCSettings(temperature=1.3).proposal_temperature == 1.3
    assert SMCSettings(temperature=0.1, draft_temperature=0.2).proposal_temperature == 0.2
    target, draft = pair
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])

    def particles(**kwargs):
        torch.manual_seed(0)
        return hf_smcsd.smc_generate(target, draft, ids, smc_particles=4, max_new_tokens=9, temperature=0.2,
                                     top_k=0, return_dict_in_generate=True, **kwargs).particle_sequences

    assert torch.equal(particles(), particles(smc_draft_temperature=0.7))
    assert not torch.equal(particles(), particles(smc_draft_temperature=0.2))
