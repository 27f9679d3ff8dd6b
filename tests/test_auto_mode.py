"""smc_mode="auto" end to end: the planner's plain rounds (K = 0), probes and exact rounds
stay the target's distribution by enumeration, greedy stays the target's greedy output on
every runner, SMC-SD rounds run only within the quality bound, and the diagnostics say
what each round did and why."""

import itertools
import weakref

import pytest
import torch

import hf_smcsd
from hf_smcsd import planner
from hf_smcsd.testing.enumeration import empirical_distribution, exact_distribution, total_variation

from conftest import enumerable_pair, left_pad, noise_bound, processor_cases

EOS, NEW, SAMPLES = 0, 5, 10_000
PROMPT = [1, 2, 3]


def costs(draft_step: float) -> planner.CostModel:
    """Fixed costs (reproducible plans): a width-free verify of 1 s, draft steps of
    `draft_step` s. Draft steps of 0.9 s make plain rounds the planner's choice after a
    probe (drafting could pay only at an acceptance near 1: the planner probes, see
    `planner.drafting_can_pay`); free ones make every round draft."""
    model = planner.CostModel()
    model.verify.points = {1: 1.0}
    model.draft_step.points = {1: draft_step}
    model.overhead = {"plain": 0.0, "spec": 0.0}
    return model


PLAIN_COSTS, SPEC_COSTS = costs(0.9), costs(0.0)


@pytest.fixture
def probe_every_round(monkeypatch):
    """The first probe after one plain round (then 2, 4, ...), even near the end, so short
    outputs mix plain rounds, probes and the draft's catch-up."""
    monkeypatch.setattr(planner, "FIRST_PROBE", 1)
    monkeypatch.setattr(planner, "PROBE_FACTOR", 0.0)
    monkeypatch.setattr(planner, "LATE_PROBE", 0)


@pytest.fixture
def evidence_from_one_round(monkeypatch):
    """Outputs of 5 tokens never gather MIN_EVIDENCE drafted positions: let one round's do,
    so that the bound alone decides between SMC-SD and exact."""
    monkeypatch.setattr(planner, "MIN_EVIDENCE", 1)


def sample(target, draft, seed=0, samples=SAMPLES, **kwargs):
    ids = torch.tensor([PROMPT] * samples)
    torch.manual_seed(seed)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=1.0, max_new_tokens=NEW, return_dict_in_generate=True, **kwargs)
    rows = [tuple(r[: r.index(EOS) + 1]) if EOS in r else tuple(r) for r in out.sequences[:, len(PROMPT):].tolist()]
    return empirical_distribution(rows), out


@pytest.mark.parametrize("particles, gamma", [(1, 2), (4, 1), (3, 3)])
def test_plain_rounds_probes_and_exact_rounds_are_the_target(probe_every_round, particles, gamma):
    target, draft = enumerable_pair(draft_noise=1.0)
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    got, out = sample(target, draft, smc_particles=particles, smc_gamma=gamma, smc_mode="auto",
                      smc_auto_costs=PLAIN_COSTS)
    modes = "".join(out.round_modes)
    assert "p" in modes and "e" in modes and "s" not in modes  # plain rounds and probes both ran
    assert total_variation(exact, got) <= noise_bound(exact, SAMPLES)


@pytest.mark.parametrize("cost_model", ["plain", "spec"])
def test_one_chain_and_n_chain_rounds_in_any_order_are_the_target(monkeypatch, probe_every_round, cost_model):
    """Exact rounds on one chain per group (narrow caches) and on N chains, with plain
    rounds between them, in whatever order the planner picks (here it is refused the
    one-chain choice every other round), stay the target's distribution: every switch
    lets the draft catch up, copies each group's one row into its N rows and back, and
    fills the full arrays' stale rows before the final pick."""
    plan_round, calls = planner.plan_round, itertools.count()

    def alternating(*args, **kwargs):
        if next(calls) % 2:
            kwargs["single_accept"] = None
        return plan_round(*args, **kwargs)

    monkeypatch.setattr(planner, "plan_round", alternating)
    target, draft = enumerable_pair(draft_noise=0.5)
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    got, out = sample(target, draft, smc_particles=3, smc_gamma=2, smc_mode="auto",
                      smc_auto_costs=PLAIN_COSTS if cost_model == "plain" else SPEC_COSTS)
    ran = {(p["mode"], p["chains"]) for prompt in out.round_plans for p in prompt}
    assert {("e", 1), ("e", 3)} <= ran and ("s", 1) not in ran
    assert (("p", 1) in ran) == (cost_model == "plain")
    assert total_variation(exact, got) <= noise_bound(exact, SAMPLES)


@pytest.mark.parametrize("runner", ["eager", "paged"])
def test_the_draft_catches_up_on_every_token_it_missed(pair, probe_every_round, runner):
    """A draft that is a copy of the target proposes the target's own distribution, so
    every draft of an exact round is accepted, but only if the draft's cache holds every
    token before it: the prompt (prefilled when it first drafts) and the tokens of the
    plain rounds it skipped, on one chain or on N."""
    import copy

    from hf_smcsd.runners.paged import PagedRunner

    target, _ = pair
    draft = copy.deepcopy(target)
    if runner == "paged":
        for model in (target, draft):
            model.smc_runner = (lambda m: lambda: PagedRunner(m, tokens_per_block=4))(model)
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]])
    try:
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, smc_gamma=3,
                                    smc_mode="auto", smc_auto_costs=costs(1.5), smc_auto_threshold=0.0,
                                    do_sample=True, temperature=1.0, max_new_tokens=40, pad_token_id=0,
                                    eos_token_id=None, return_dict_in_generate=True)
    finally:
        for model in (target, draft):
            vars(model).pop("smc_runner", None)
    for plans, accepted in zip(out.round_plans, out.accepted_draft_tokens):
        drafted = [p["k"] for p in plans if p["mode"] == "e"]
        assert "p" in "".join(p["mode"] for p in plans) and len(drafted) >= 3
        assert accepted.tolist()[:-1] == drafted[:-1]  # (the last may be cut by the budget)


def test_a_run_that_never_drafts_never_runs_the_draft(pair, monkeypatch):
    """Auto prefills the draft when it first drafts: where no acceptance could make drafting
    pay (no first probe) and the output ends before a later probe, the draft never runs."""
    import functools

    target, draft = pair
    calls = []
    forward = draft.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(draft, "forward", counting)
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7], [9, 10, 11]]), smc_particles=4, smc_gamma=3,
                                smc_mode="auto", smc_auto_costs=costs(1.5), do_sample=True, max_new_tokens=6,
                                eos_token_id=None, return_dict_in_generate=True)
    assert out.round_modes == ["p" * 5] * 2 and not calls  # (x0 is the start's)
    hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), smc_particles=4, smc_gamma=3, smc_mode="exact",
                          do_sample=True, max_new_tokens=6, eos_token_id=None)
    assert calls  # (the counter counts)


def test_later_calls_skip_the_first_probe_where_earlier_calls_measured_no_pay(pair, monkeypatch):
    """A call with measured costs leaves its exact walks' per-depth acceptance (the mean over
    its prompts) for the next call with the same pair: a copy of the target is remembered
    at (nearly) 1. A remembered acceptance of 0, at which no K can pay, lets the next call
    decode plainly from the first round (no first probe); fixed costs (reproducible plans)
    ignore the memory."""
    import copy

    from hf_smcsd import smc

    target, draft = pair
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    knobs = dict(smc_particles=4, smc_gamma=3, smc_mode="auto", do_sample=True, temperature=1.0, max_new_tokens=6,
                 eos_token_id=None, return_dict_in_generate=True)
    twin = copy.deepcopy(target)
    with monkeypatch.context() as m:
        m.setattr(planner, "drafting_can_pay", lambda *args: True)  # (a twin costs what the target costs)
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, twin, ids, smc_auto_costs=None, **knobs)
    assert out.round_modes[0].startswith("e")  # nothing remembered: the first round probes
    settings = smc.SMCSettings(particles=4, gamma=3, max_new_tokens=6, temperature=1.0, mode="auto")
    assert smc.remembered_acceptance(target, twin, settings) > 0.99  # (the estimate's cap is 0.999)
    assert smc.remembered_acceptance(target, draft, settings) is None
    smc.remember_acceptance(target, draft, settings, 0.0)
    for costs_model, first in ((None, "p"), (PLAIN_COSTS, "e")):
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, draft, ids, smc_auto_costs=costs_model, **knobs)
        assert all(m.startswith(first) for m in out.round_modes), (costs_model, out.round_modes)
    assert smc.remembered_acceptance(target, draft, settings) == 0.0  # (the fixed-cost run drafted, and left it)
    # Another model at a freed model's address does not inherit its entry.
    key = smc._memory_key(target, draft, settings)
    smc._ACCEPTANCE_MEMORY[key] = (smc._ACCEPTANCE_MEMORY[key][0], weakref.ref(twin), 0.0)  # as if `draft` replaced it
    assert smc.remembered_acceptance(target, draft, settings) is None


def test_no_probe_too_late_to_pay(pair, probe_every_round):
    """A scheduled probe with fewer than `planner.LATE_PROBE` tokens left to every prompt is
    skipped (a draft it found paying could not earn its cost back); the bursts run on."""
    target, draft = pair
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    tails = {}
    for late in (0, 16):
        planner.LATE_PROBE = late  # (restored by the fixture)
        torch.manual_seed(0)
        out = hf_smcsd.smc_generate(target, draft, ids, smc_particles=4, smc_gamma=3, smc_mode="auto",
                                    smc_auto_costs=PLAIN_COSTS, do_sample=True, max_new_tokens=40, eos_token_id=None,
                                    return_dict_in_generate=True)
        tails[late] = [modes[-15:] for modes in out.round_modes]
        assert all(modes.startswith("e") and "e" in modes[1:-15] for modes in out.round_modes)
    assert all("e" in tail for tail in tails[0]) and not any("e" in tail for tail in tails[16])


@processor_cases()
def test_narrow_plain_rounds_follow_the_processed_target(probe_every_round, generate_kwargs, processors):
    """Plain rounds on one row per group apply the processors (one that reads each row's
    sequence among them) as the target's own sampling does."""
    from transformers import LogitsProcessorList

    target, draft = enumerable_pair(draft_noise=1.0)
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,), logits_processor=LogitsProcessorList(processors))
    got, out = sample(target, draft, smc_particles=3, smc_gamma=2, smc_mode="auto", smc_auto_costs=PLAIN_COSTS,
                      **generate_kwargs)
    assert "p" in "".join(out.round_modes)
    assert total_variation(exact, got) <= noise_bound(exact, SAMPLES)


def test_smc_rounds_within_the_default_bound_keep_the_target_for_a_middling_draft(evidence_from_one_round):
    """The dangerous case (a draft at TV 0.5 from the target, where agreement looks good
    enough for SMC-SD): with every round drafting, auto at the default bound stays at the
    noise floor while SMC-SD alone does not."""
    target, draft = enumerable_pair(draft_noise=0.15)
    exact = exact_distribution(target, PROMPT, NEW, eos_token_ids=(EOS,))
    noise = noise_bound(exact, SAMPLES)
    smc, _ = sample(target, draft, smc_particles=4, smc_gamma=1, smc_mode="smc")
    assert total_variation(exact, smc) > noise
    auto, _ = sample(target, draft, smc_particles=4, smc_gamma=1, smc_mode="auto", smc_auto_costs=SPEC_COSTS)
    assert total_variation(exact, auto) <= noise


def test_a_looser_bound_runs_smc_rounds_but_not_with_a_too_sharp_draft(evidence_from_one_round):
    """The bound decides: a good draft at a loose bound gets SMC-SD rounds; the same draft at
    a temperature of 1e-6 (every particle proposes its argmax) gets none."""
    target, draft = enumerable_pair(draft_noise=0.02)
    knobs = dict(smc_particles=4, smc_gamma=1, smc_mode="auto", smc_auto_costs=SPEC_COSTS, smc_auto_threshold=0.1)
    _, out = sample(target, draft, samples=500, **knobs)
    assert int(out.num_smc_rounds.sum()) > 0
    planner.MIN_EVIDENCE = 100  # (restored by the fixture) ... but not on too little evidence
    _, few = sample(target, draft, samples=500, **knobs)
    assert int(few.num_smc_rounds.sum()) == 0
    planner.MIN_EVIDENCE = 1
    _, sharp = sample(target, draft, samples=500, smc_draft_temperature=1e-6, **knobs)
    assert int(sharp.num_smc_rounds.sum()) == 0 and int(sharp.num_exact_rounds.sum()) > 0


@pytest.mark.parametrize("runner", ["eager", "static", "paged"])
def test_greedy_auto_with_plain_rounds_is_the_targets_greedy_output(pair, probe_every_round, runner):
    """Plain rounds, probes and the draft catching up after them, through every runner's
    cache bookkeeping (rollbacks of exact rounds, rows of different lengths)."""
    from hf_smcsd.runners.paged import PagedRunner

    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]])
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=19, pad_token_id=0,
                               eos_token_id=None)
    extra = dict(cache_implementation="static") if runner == "static" else {}
    if runner == "paged":
        for model in (target, draft):
            model.smc_runner = (lambda m: lambda: PagedRunner(m, tokens_per_block=4))(model)
    try:
        for cost_model in (PLAIN_COSTS, SPEC_COSTS, None):  # None: measured (the calibration feeds and rolls back)
            torch.manual_seed(0)
            out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, smc_gamma=3,
                                        smc_mode="auto", smc_auto_costs=cost_model, smc_draft_temperature=1.0,
                                        do_sample=False, max_new_tokens=19, pad_token_id=0, eos_token_id=None,
                                        return_dict_in_generate=True, **extra)
            assert torch.equal(out.sequences, expected), (runner, out.round_modes)
            modes = set("".join(out.round_modes))
            if cost_model is not None:
                assert modes == ({"p", "e"} if cost_model is PLAIN_COSTS else {"e"})
    finally:
        for model in (target, draft):
            vars(model).pop("smc_runner", None)


def test_round_plans_say_what_each_round_did_and_why(pair, probe_every_round):
    target, draft = pair
    ids, mask = left_pad([[5, 6, 7], [9, 10, 11, 12]])
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=4, smc_gamma=3,
                                smc_mode="auto", smc_auto_costs=PLAIN_COSTS, do_sample=True, max_new_tokens=20,
                                eos_token_id=None, return_dict_in_generate=True)
    for b in range(2):
        modes, plans = out.round_modes[b], out.round_plans[b]
        assert [p["mode"] for p in plans] == list(modes)
        assert all((p["k"] == 0) == (p["mode"] == "p") for p in plans)
        assert all(p["bias_bound"] is None for p in plans if p["mode"] == "p")
        assert all(p["predicted_tokens_per_s"] > 0 for p in plans)
        assert int(out.num_plain_rounds[b]) == modes.count("p") == int(out.plain_tokens[b])
        assert int(out.plain_tokens[b] + out.exact_tokens[b] + out.smc_tokens[b]) == 20


def test_fixed_costs_make_auto_reproducible_and_measured_costs_are_cached(pair):
    from hf_smcsd import smc

    target, draft = pair
    ids = torch.tensor([[5, 6, 7]])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(hf_smcsd.smc_generate(target, draft, ids, smc_particles=4, smc_gamma=3, smc_mode="auto",
                                          smc_auto_costs=SPEC_COSTS, do_sample=True, max_new_tokens=16,
                                          eos_token_id=None))
    assert torch.equal(runs[0], runs[1])
    assert not SPEC_COSTS.overhead["spec"]  # fixed costs are not updated by the run
    smc._COST_CACHE.clear()
    hf_smcsd.smc_generate(target, draft, ids, smc_particles=4, smc_gamma=3, smc_mode="auto", do_sample=True,
                          max_new_tokens=8, eos_token_id=None)
    (measured,) = smc._COST_CACHE.values()
    assert measured.verify.known and measured.draft_step.known and set(measured.overhead) <= {"plain", "spec"}


@pytest.mark.parametrize("stop", ["eos", "criteria"])
def test_plain_bursts_stop_where_the_target_stops(pair, stop):
    """A burst of plain rounds ends at the step where some group stops (an EOS id, or a
    stopping criterion reading the sequence), and the other groups go on: greedy auto
    returns the target's own greedy output, prompt by prompt."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    target, draft = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21]]
    ids, mask = left_pad(prompts)
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0,
                           eos_token_id=None)[:, ids.shape[1]:]
    token = int(free[0, 6])  # prompt 0 stops at its 7th new token (or earlier); the others when they meet it
    kwargs = dict(eos_token_id=token) if stop == "eos" else dict(
        eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopAfterToken(token)]))
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, ids, attention_mask=mask, smc_particles=3, smc_gamma=3,
                                smc_mode="auto", smc_auto_costs=PLAIN_COSTS, do_sample=False, max_new_tokens=24,
                                pad_token_id=0, return_dict_in_generate=True, **kwargs)
    new = out.sequences[:, ids.shape[1]:]
    for b, row in enumerate(free.tolist()):
        end = row.index(token) + 1 if token in row else len(row)  # the target's greedy text up to its first stop
        assert new[b, :end].tolist() == row[:end] and (new[b, end:] == 0).all()
    modes = out.round_modes
    assert all(m.startswith("e") and set(m[1:]) == {"p"} for m in modes)  # one probe, then plain bursts
    assert len(modes[0]) < len(max(modes, key=len))  # prompt 0 stopped first; the others went on


def test_planning_reads_nothing_back_from_the_device(monkeypatch):
    """The plan stays on the device (its K is read with the round's first synchronisation,
    `smc.choose_round_shape`): no host read of a tensor inside `plan_round`."""
    def refuse(*args, **kwargs):
        raise AssertionError("plan_round read a tensor on the host")

    rate = torch.tensor([0.001, 0.3, float("nan")], dtype=torch.float64)
    accept = torch.full((3,), 0.8, dtype=torch.float64)
    for costs_model in (SPEC_COSTS, PLAIN_COSTS, planner.CostModel()):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            plan = planner.plan_round(rate, accept, costs_model, rows=12, gamma=4, bound=0.02,
                                      live=torch.tensor([True, True, False]), plain_rows=3,
                                      single_accept=accept, particles=4)
        assert 0 <= int(plan.k) <= 4 and plan.exact.shape == (3,)
        assert int(plan.k) == 4 or costs_model is PLAIN_COSTS  # free drafts, or nothing measured: the longest


def test_plain_bursts_stream_each_token_as_it_is_drawn(pair, probe_every_round):
    """A streamer gets every token of a plain burst at once (one put per step), and exactly
    the returned tokens."""
    class Recording:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    target, draft = pair
    streamer = Recording()
    torch.manual_seed(0)
    out = hf_smcsd.smc_generate(target, draft, torch.tensor([[5, 6, 7]]), smc_particles=3, smc_gamma=2,
                                smc_mode="auto", smc_auto_costs=PLAIN_COSTS, do_sample=True, max_new_tokens=24,
                                streamer=streamer, eos_token_id=None, return_dict_in_generate=True)
    assert streamer.puts[0] == [[5, 6, 7]] and streamer.ended == 1
    assert [t for chunk in streamer.puts[1:] for t in chunk] == out.sequences[0, 3:].tolist()
    plain = out.round_modes[0].count("p")
    assert plain > 10 and sum(len(chunk) == 1 for chunk in streamer.puts[1:]) >= plain
