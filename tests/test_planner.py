"""The round planner (hf_smcsd.planner): the SIR bias bound, the evidence, the cost model
and the choice of each round's modes and K."""

import itertools
import math

import pytest
import torch

from hf_smcsd import planner


def sir_output(p: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """The exact output distribution of SIR with n draws from q, weights p / q, by
    enumerating every n-tuple of draws (small vocabularies only)."""
    vocab = p.shape[0]
    out = torch.zeros(vocab, dtype=torch.float64)
    w = torch.where(q > 0, p / q.clamp(min=1e-300), 0.0)
    for draws in itertools.product(range(vocab), repeat=n):
        prob = math.prod(float(q[d]) for d in draws)
        if prob == 0.0:
            continue
        weights = torch.stack([w[d] for d in draws])
        if weights.sum() == 0:  # every draw outside the target's support: SIR picks uniformly
            for d in draws:
                out[d] += prob / n
            continue
        for d, wd in zip(draws, weights):
            out[d] += prob * float(wd / weights.sum())
    return out


def random_pair(generator, vocab=4, sharp=False):
    p = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * 2, dim=0)
    if sharp:  # the draft at a temperature near 0: a point mass on its argmax
        q = torch.zeros(vocab, dtype=torch.float64)
        q[torch.randint(vocab, (1,), generator=generator)] = 1.0
    else:
        q = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * 2, dim=0)
    return p, q


@pytest.mark.parametrize("sharp", [False, True])
def test_sir_bias_bounds_the_exact_sir_total_variation(sharp):
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        p, q = random_pair(generator, sharp=sharp)
        for n in (1, 2, 3, 5):
            tv = 0.5 * float((sir_output(p, q, n) - p).abs().sum())
            bound = float(planner.sir_bias(p, q, n))
            assert tv <= bound + 1e-6, (n, tv, bound)
            if n == 1:  # SIR of one draw is the draft: the bound is exact there
                assert math.isclose(tv, bound, abs_tol=1e-6)


def test_sir_bias_falls_with_n_and_never_exceeds_tv():
    generator = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(5, 50, generator=generator), dim=-1)
    q = torch.softmax(torch.randn(5, 50, generator=generator), dim=-1)
    tv = 0.5 * (p - q).abs().sum(dim=-1)
    previous = planner.sir_bias(p, q, 1)
    assert torch.allclose(previous, tv, atol=1e-6)
    for n in (2, 4, 8, 64):
        bias = planner.sir_bias(p, q, n)
        assert (bias <= previous + 1e-7).all()
        previous = bias
    assert (planner.sir_bias(p, p, 4) == 0).all()  # draft = target: no bias at any N


def test_a_too_sharp_draft_is_caught():
    """At a draft temperature of 1e-6 every particle proposes the draft's argmax: however
    many particles, SIR can only return that token, and the bound is the target mass off it
    even where the draft's argmax is the target's (the chi-square would be infinite, the
    acceptance estimate 1 - TV looks fine: 0.6 here)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    p = torch.softmax(logits / 0.7, dim=-1)
    q = torch.softmax(logits / 1e-6, dim=-1)
    for n in (1, 4, 64):
        assert math.isclose(float(planner.sir_bias(p, q, n)), 1.0 - float(p.max()), rel_tol=1e-5)
    assert float(planner.sir_bias(p, q, 64)) > 0.4
    # ... so the planner never runs SMC-SD on that evidence, at any K and N.
    rate = planner.sir_bias(p, q, 8).double().reshape(1)
    plan = planner.plan_round(rate, torch.tensor([0.6], dtype=torch.float64), planner.CostModel(), rows=8,
                              gamma=4, bound=0.1)
    assert plan.k > 0 and plan.exact.all()


def test_position_measures_and_group_means():
    generator = torch.Generator().manual_seed(2)
    target_lp = torch.log_softmax(torch.randn(4, 3, 10, generator=generator), dim=-1)
    draft_lp = torch.log_softmax(torch.randn(4, 3, 10, generator=generator), dim=-1)
    bias, tv = planner.position_measures(target_lp, draft_lp, particles=2)
    assert bias.shape == tv.shape == (4, 3)
    assert torch.allclose(tv, 0.5 * (target_lp.exp() - draft_lp.exp()).abs().sum(-1), atol=1e-6)
    counted = torch.ones(4, 3, dtype=torch.bool)
    counted[2:] = False  # the second group counted nothing
    counted[1, 2] = False
    means = planner.group_means(bias, counted, particles=2)
    assert math.isclose(float(means[0]), float(bias[:2].flatten()[:5].mean()), rel_tol=1e-6)
    assert torch.isnan(means[1])


def test_update_rate_rises_at_once_and_falls_by_half_the_gap():
    nan = float("nan")
    old = torch.tensor([nan, 0.4, 0.4, 0.4], dtype=torch.float64)
    new = torch.tensor([0.1, 0.8, 0.2, nan], dtype=torch.float64)
    assert torch.allclose(planner.update_rate(old, new, decay=0.5), torch.tensor([0.1, 0.8, 0.3, 0.4], dtype=torch.float64))
    assert math.isclose(float(planner.update_rate(old, new)[2]), 0.4 - planner.RATE_DECAY * 0.2)


def test_a_rate_needs_enough_evidence():
    rate = torch.tensor([0.01, 0.01], dtype=torch.float64)
    got = planner.usable_rate(rate, torch.tensor([planner.MIN_EVIDENCE - 1.0, planner.MIN_EVIDENCE]))
    assert torch.isnan(got[0]) and got[1] == 0.01


def test_block_bias_composes_positions():
    rate = torch.tensor([0.0, 0.1, float("nan")], dtype=torch.float64)
    got = planner.block_bias(rate, 3)
    assert got[0] == 0 and math.isclose(float(got[1]), 1 - 0.9**3) and torch.isnan(got[2])


def test_acceptance_estimate_and_expected_tokens():
    nan = float("nan")
    # No exact rounds: the single-chain estimate (or the prior) alone.
    a = planner.acceptance(torch.zeros(2), torch.zeros(2), torch.tensor([0.7, nan], dtype=torch.float64))
    assert torch.allclose(a, torch.tensor([0.7, planner.PRIOR_ACCEPTANCE], dtype=torch.float64))
    # Many exact rounds outweigh the prior: 300 accepted over 100 rejections -> 0.75.
    a = planner.acceptance(torch.tensor([300.0]), torch.tensor([100.0]), torch.tensor([0.1], dtype=torch.float64))
    assert abs(float(a[0]) - 0.75) < 0.01
    tokens = planner.expected_exact_tokens(torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64), 3)
    assert torch.allclose(tokens, torch.tensor([1.0, 1.875, 1 + 0.999 + 0.999**2 + 0.999**3], dtype=torch.float64))


def test_linear_cost_fits_the_latest_times():
    cost = planner.LinearCost()
    assert not cost.known and cost(10) == 0.0
    cost.observe(4, 2.0)
    assert cost(100) == 2.0  # one point: no slope
    cost.observe(20, 6.0)
    assert math.isclose(cost(12), 4.0) and math.isclose(cost(0), 1.0)
    cost.observe(20, 10.0)  # smoothed towards the new time at a count already seen
    assert math.isclose(cost.points[20], 8.0)
    flat = planner.LinearCost({4: 3.0, 8: 2.0})  # a negative slope is noise: no slope
    assert flat.fit()[1] == 0.0


def costs(verify_fixed, verify_per_token, draft_step, overhead=0.0):
    model = planner.CostModel()
    model.verify.points = {8: verify_fixed + 8 * verify_per_token, 40: verify_fixed + 40 * verify_per_token}
    model.draft_step.points = {8: draft_step}
    model.overhead = {"plain": overhead, "spec": overhead}
    return model


def test_plan_runs_smc_where_the_bound_allows_and_exact_elsewhere():
    rate = torch.tensor([0.001, 0.3, float("nan")], dtype=torch.float64)
    accept = torch.full((3,), 0.8, dtype=torch.float64)
    plan = planner.plan_round(rate, accept, costs(1.0, 0.0, 0.05), rows=12, gamma=4, bound=0.02)
    assert plan.k == 4  # cheap draft, free width: the longest block
    assert plan.exact.tolist() == [False, True, True]  # no evidence: exact
    assert math.isclose(float(plan.bias[0]), 1 - 0.999**4)
    # A tighter bound makes the first group exact too; a bound of 0 never allows SMC-SD.
    assert planner.plan_round(rate, accept, costs(1.0, 0.0, 0.05), 12, 4, bound=0.001).exact.all()
    zero = planner.plan_round(torch.zeros(3, dtype=torch.float64), accept, costs(1.0, 0.0, 0.05), 12, 4, bound=0.0)
    assert not zero.exact.any()  # rate 0 (draft = target) has bound 0 <= 0
    nonzero = planner.plan_round(torch.full((3,), 1e-9, dtype=torch.float64), accept, costs(1.0, 0.0, 0.05), 12, 4,
                                 bound=0.0)
    assert nonzero.exact.all()


def test_plan_decodes_plainly_when_the_draft_does_not_pay():
    rate = torch.full((2,), 0.5, dtype=torch.float64)
    poor = torch.full((2,), 0.05, dtype=torch.float64)
    plan = planner.plan_round(rate, poor, costs(1.0, 0.0, 0.4), rows=8, gamma=4, bound=0.02)
    assert plan.k == 0 and not plan.exact.any()
    assert plan.tokens_per_s == pytest.approx(2.0)  # two groups, one token each, one second
    # A probe forbids K = 0.
    assert planner.plan_round(rate, poor, costs(1.0, 0.0, 0.4), 8, 4, 0.02, allow_plain=False).k >= 1
    # The same draft with good acceptance pays.
    good = torch.full((2,), 0.9, dtype=torch.float64)
    assert planner.plan_round(rate, good, costs(1.0, 0.0, 0.4), 8, 4, 0.02).k > 0


def test_plan_prefers_short_blocks_when_width_costs():
    """A verify whose time grows with the tokens it processes: long blocks at modest
    acceptance lose to short ones, and a short block still beats plain decoding."""
    rate = torch.full((1,), 0.5, dtype=torch.float64)
    accept = torch.full((1,), 0.6, dtype=torch.float64)
    plan = planner.plan_round(rate, accept, costs(1.0, 0.25, 0.1), rows=1, gamma=8, bound=0.02)
    assert 0 < plan.k < 8


def test_plan_without_measured_costs_drafts_at_the_users_k():
    rate = torch.full((2,), float("nan"), dtype=torch.float64)
    plan = planner.plan_round(rate, torch.full((2,), 0.5, dtype=torch.float64), planner.CostModel(), 8, 5, 0.02)
    assert plan.k == 5 and plan.exact.all()


def test_greedy_plans_never_run_smc():
    rate = torch.zeros(2, dtype=torch.float64)
    plan = planner.plan_round(rate, torch.full((2,), 0.9, dtype=torch.float64), costs(1.0, 0.0, 0.05), 8, 4, 0.02,
                              allow_smc=False)
    assert plan.k > 0 and plan.exact.all()


def test_probe_schedule_backs_off_and_resets():
    probes = planner.ProbeSchedule(wait=2, factor=4.0)
    assert probes.must_draft(probe_seconds=100.0)  # the first round drafts
    probes.after(2, probe=True)
    probes.after(0, probe=False, seconds=1.0)
    assert probes.wait == 4 and probes.factor == 8.0  # that first probe went back to plain
    probes = planner.ProbeSchedule(wait=2, factor=4.0, first=False)
    probes.after(0, probe=False, seconds=1.0)
    assert not probes.must_draft()
    probes.after(0, probe=False, seconds=1.0)
    assert probes.must_draft(probe_seconds=0.5)
    assert not probes.must_draft(probe_seconds=1.0)  # 2 s of plain rounds < 4 x a 1 s probe
    probes.after(3, probe=True)  # the probe ...
    probes.after(0, probe=False, seconds=1.0)  # ... went back to plain: wait twice as long
    assert probes.wait == 4 and probes.factor == 8.0 and probes.streak == 1
    probes.after(2, probe=False)  # drafting by choice resets the wait
    assert probes.wait == planner.FIRST_PROBE and probes.factor == planner.PROBE_FACTOR and probes.streak == 0


def test_plain_rounds_before_probe_says_when_must_draft_holds_again():
    """The loop runs that many plain rounds in one burst: afterwards `must_draft` holds,
    one round earlier it does not."""
    for wait, factor, probe_seconds, seconds, probed in [(8, 8.0, 2.0, 0.5, False), (8, 8.0, 0.1, 0.5, False),
                                                         (4, 2.0, 3.0, 1.0, True), (2, 4.0, 0.0, 0.0, False)]:
        probes = planner.ProbeSchedule(wait=wait, factor=factor, first=False, probed=probed)
        rounds = probes.plain_rounds_before_probe(probe_seconds, seconds)
        before = planner.ProbeSchedule(wait=wait, factor=factor, first=False, probed=probed)
        before.after(0, probe=False, seconds=seconds, rounds=rounds - 1)
        probes.after(0, probe=False, seconds=seconds, rounds=rounds)
        assert probes.must_draft(probe_seconds) and (rounds == 1 or not before.must_draft(probe_seconds))
    # 16 rounds of wait after a failed probe (the doubling), and the time: 2 * 8 * 2 s / 0.5 s = 64.
    assert planner.ProbeSchedule(wait=8, factor=8.0, first=False, probed=True).plain_rounds_before_probe(2.0, 0.5) == 64
    # Free plain rounds never pay for a probe that costs time.
    assert planner.ProbeSchedule(first=False).plain_rounds_before_probe(1.0, 0.0) is None


def test_a_plain_rounds_overhead_is_not_a_drafted_rounds():
    """Until a plain round was measured its own time counts as 0, not as a drafted round's
    (which holds far more work and would hide plain decoding from the planner)."""
    model = planner.CostModel()
    model.verify.points, model.draft_step.points = {8: 1.0}, {8: 0.1}
    model.overhead = {"spec": 5.0}
    assert model.round_seconds(8, 0) == 1.0 and model.round_seconds(8, 2) == pytest.approx(6.2)
    model.observe_overhead("plain", 0.5)
    assert model.round_seconds(8, 0) == 1.5


def test_no_probe_where_no_acceptance_could_pay():
    """A verify pass that costs what its tokens cost (a compute-bound target) never beats
    plain decoding, whatever the draft: no probe. An overhead-bound one can."""
    compute_bound = costs(0.0, 1.0, 0.0)  # verify: 1 s per token
    compute_bound.draft_step.points = {8: 0.1}
    assert not planner.drafting_can_pay(compute_bound, rows=8, plain_rows=2, gamma=4)  # 4 rows per group
    overhead_bound = costs(1.0, 0.0, 0.0)
    overhead_bound.draft_step.points = {8: 0.1}
    assert planner.drafting_can_pay(overhead_bound, rows=8, plain_rows=2, gamma=4)
    assert planner.drafting_can_pay(planner.CostModel(), rows=8, plain_rows=2, gamma=4)  # nothing measured


def test_plan_runs_exact_rounds_on_one_chain_where_rows_cost():
    """Where the loop can narrow, one exact chain per group is a choice beside N chains: a
    verify whose time grows with its tokens makes it the faster exact round (N chains
    accept a little more but cost N times the rows); a free width keeps N chains, whose
    SMC-SD rounds commit K + 1 tokens where the bound allows them."""
    groups, n = 2, 4
    no_evidence = torch.full((groups,), float("nan"), dtype=torch.float64)
    accept_n, accept_1 = torch.full((groups,), 0.8, dtype=torch.float64), torch.full((groups,), 0.7, dtype=torch.float64)
    knobs = dict(rows=groups * n, gamma=4, bound=0.02, plain_rows=groups, particles=n)
    width_costs = costs(1.0, 0.25, 0.0)
    plan = planner.plan_round(no_evidence, accept_n, width_costs, single_accept=accept_1, **knobs)
    assert int(plan.k) > 0 and int(plan.chains) == 1 and plan.exact.all()
    assert plan.chains_by_choice == (1,) + (n,) * 4 + (1,) * 4
    # A runner that cannot narrow (plain rounds on N rows too, no one-chain choice): N chains, more slowly.
    wide = planner.plan_round(no_evidence, accept_n, width_costs, **dict(knobs, plain_rows=groups * n))
    assert int(wide.k) > 0 and int(wide.chains) == n and float(wide.tokens_per_s) < float(plan.tokens_per_s)
    assert wide.chains_by_choice == (n,) * 5
    # A free width with SMC-SD allowed: N chains.
    good = torch.full((groups,), 0.001, dtype=torch.float64)
    smc = planner.plan_round(good, accept_n, costs(1.0, 0.0, 0.05), single_accept=accept_1, **knobs)
    assert int(smc.chains) == n and int(smc.k) == 4 and not smc.exact.any()


def test_probe_schedule_skips_probes_too_late_to_pay():
    """A scheduled probe with fewer than LATE_PROBE tokens left is not due, and a burst that
    would reach it runs on; the first probe is not affected."""
    probes = planner.ProbeSchedule(wait=2, factor=0.0)
    assert probes.must_draft(left=1)  # the first round
    probes.after(2, probe=True)
    probes.after(0, probe=False, rounds=4)
    assert probes.must_draft(left=planner.LATE_PROBE) and not probes.must_draft(left=planner.LATE_PROBE - 1)
    fresh = planner.ProbeSchedule(wait=4, factor=0.0, first=False)
    assert fresh.plain_rounds_before_probe(0.0, 1.0, left=planner.LATE_PROBE + 4) == 4
    assert fresh.plain_rounds_before_probe(0.0, 1.0, left=planner.LATE_PROBE + 3) is None
