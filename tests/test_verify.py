"""The operators after a verify pass (hf_smcsd.verify): the vectorised accept walk against
the plain loop on the same uniforms, the walk's exactness on a context-free model, greedy,
budgets, and the SMC-SD increments."""

import math

import pytest
import torch

from hf_smcsd import verify


def random_inputs(groups, n, k, vocab, seed, bonus=True, shared_prefix_model=True):
    """Drafts from q, with p and q depending only on the depth (so rows sharing a prefix
    share distributions, as in a real group)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(groups, 1, k, vocab, generator=g) * 1.5, dim=-1).expand(groups, n, k, vocab)
    p = torch.softmax(torch.randn(groups, 1, k + int(bonus), vocab, generator=g) * 1.5, dim=-1)
    p = p.expand(groups, n, k + int(bonus), vocab)
    drafted = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).view(groups, n, k)
    limit = torch.randint(1, k + 2, (groups,), generator=g)
    u_accept = torch.rand(groups, k, n, generator=g, dtype=torch.float64)
    u_final = torch.rand(groups, generator=g, dtype=torch.float64)
    return drafted, q.contiguous(), p.contiguous(), limit, u_accept, u_final


@pytest.mark.parametrize("skip_done", [True, False], ids=["skipping", "masked"])
@pytest.mark.parametrize("n, k, bonus", [(1, 1, True), (1, 4, True), (4, 3, True), (8, 2, False), (3, 5, False)])
def test_vectorised_walk_equals_reference_loop(n, k, bonus, skip_done):
    inputs = random_inputs(64, n, k, 7, seed=n * 10 + k, bonus=bonus)
    fast = verify.accept_walk(*inputs, skip_done=skip_done)
    slow = verify.accept_walk_reference(*inputs)
    assert torch.equal(fast.num_committed, slow.num_committed)
    assert torch.equal(fast.num_accepted, slow.num_accepted)
    assert torch.equal(fast.winner, slow.winner)
    assert torch.equal(fast.tokens, slow.tokens)
    # Sanity of what both claim: at least one token, at most the limit, drafts then one more.
    limit = inputs[3]
    assert (fast.num_committed >= 1).all() and (fast.num_committed <= limit.clamp(max=k + int(bonus))).all()
    assert (fast.num_committed - fast.num_accepted <= 1).all()


def test_winner_holds_every_accepted_token():
    drafted, q, p, limit, u_a, u_f = random_inputs(200, 4, 4, 3, seed=5)  # tiny vocab: many acceptances
    walk = verify.accept_walk(drafted, q, p, limit, u_a, u_f)
    for g in range(200):
        a = int(walk.num_accepted[g])
        assert drafted[g, walk.winner[g], :a].tolist() == walk.tokens[g, :a].tolist()
    assert int(walk.num_accepted.max()) >= 2


@pytest.mark.parametrize("n", [1, 3])
def test_walk_commits_tokens_distributed_as_the_target(n):
    """Context-free p_t and q_t: over many groups, the first committed token follows p_1 and
    the second p_2 (given the walk got that far), for a draft far from the target."""
    groups, k, vocab = 40_000, 2, 5
    torch.manual_seed(0)
    p_rows = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.3, 0.5], [0.2] * 5])
    q_rows = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.5], [0.5, 0.3, 0.1, 0.05, 0.05]])
    p = p_rows.view(1, 1, 3, vocab).expand(groups, n, 3, vocab)
    q = q_rows.view(1, 1, 2, vocab).expand(groups, n, 2, vocab)
    drafted = torch.multinomial(q.reshape(-1, vocab), 1).view(groups, n, k)
    u_a, u_f = verify.draw_uniforms(groups, k, n)
    walk = verify.accept_walk(drafted, q, p, torch.full((groups,), 10), u_a, u_f)
    for depth in range(2):
        reached = walk.num_committed > depth
        counts = torch.bincount(walk.tokens[reached, depth], minlength=vocab).double()
        total = counts.sum()
        expected = p_rows[depth].double() * total
        sd = (total * p_rows[depth].double() * (1 - p_rows[depth].double())).sqrt()
        assert ((counts - expected).abs() < 5 * sd).all(), (depth, counts, expected)
    assert bool((walk.num_committed == 1).any()) and bool((walk.num_committed == 3).any())


def test_more_candidates_accept_more():
    """The point of N drafts: the expected accepted length grows with N for the same p, q."""
    means = []
    for n in (1, 4):
        drafted, q, p, _, u_a, u_f = random_inputs(4000, n, 4, 6, seed=1)
        walk = verify.accept_walk(drafted, q, p, torch.full((4000,), 10), u_a, u_f)
        means.append(float(walk.num_accepted.double().mean()))
    assert means[1] > means[0] + 0.1, means


def test_greedy_walk_accepts_exactly_the_argmax_chain():
    groups, n, k, vocab = 300, 3, 3, 4
    drafted, q, p, _, u_a, u_f = random_inputs(groups, n, k, vocab, seed=2)
    target = verify.one_hot(p.log())
    walk = verify.accept_walk(drafted, q, target, torch.full((groups,), 10), u_a, u_f)
    argmax = p[:, 0].argmax(-1)  # [G, k + 1]: the target's choice at each depth (context-free here)
    for g in range(groups):
        c = int(walk.num_committed[g])
        assert walk.tokens[g, :c].tolist() == argmax[g, :c].tolist()
        a = int(walk.num_accepted[g])
        if a < k:  # stopped because no viable row had the argmax
            assert not (drafted[g, :, a][(drafted[g, :, :a] == argmax[g, :a]).all(-1)] == argmax[g, a]).any()


def test_depth_limit_without_room_for_a_bonus():
    drafted, q, p, _, u_a, u_f = random_inputs(50, 2, 3, 4, seed=3)
    same = q[:, :, :, :].clone()
    walk = verify.accept_walk(drafted, same, same.clone()[:, :, [0, 1, 2, 2]], torch.full((50,), 2), u_a, u_f)
    # p = q: every draft is accepted; with a limit of 2 the walk commits exactly 2, no bonus.
    assert walk.num_accepted.tolist() == [2] * 50 and walk.num_committed.tolist() == [2] * 50


def test_residual_guard_keeps_a_distribution_when_rounding_leaves_nothing():
    # q covers p everywhere: the residual after a rejection is zero mass; never NaN.
    p = torch.tensor([[[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]]])
    q = p[:, :, :1].clone()
    drafted = torch.tensor([[[2]]])  # impossible under p: always rejected (q(2) = 0: NaN ratio)
    walk = verify.accept_walk(drafted, q, p, torch.tensor([5]), torch.zeros(1, 1, 1, dtype=torch.float64),
                              torch.tensor([0.7], dtype=torch.float64))
    assert walk.num_committed.tolist() == [1] and walk.tokens[0, 0].item() in (0, 1)


def test_smc_increments_and_acceptance_estimate():
    log_p = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.9]]))
    log_q = torch.log(torch.tensor([[0.25, 0.4], [0.1, 0.3]]))
    inc = verify.smc_increments(log_p, log_q, alpha=2.0)
    assert inc.dtype == torch.float64
    assert torch.allclose(inc, 2 * log_p.double() - log_q.double())
    counted = torch.tensor([[True, True], [False, False]])
    est = verify.acceptance_estimate(log_p, log_q, counted)
    assert math.isclose(float(est[0]), (1.0 + 0.5) / 2, rel_tol=1e-6) and math.isnan(float(est[1]))


def test_a_token_the_targets_float32_sampling_never_draws_is_outside_the_support():
    """Issue 19: p(d) = 0 in float32 (log p below about -103.3) is weight 0, not a tiny weight
    that keeps a population of impossible tokens alive; -100 is still inside."""
    log_p = torch.tensor([[-200.0, -100.0, -1.0]])
    log_q = torch.tensor([[-1.0, -1.0, -1.0]])
    increments = verify.smc_increments(log_p, log_q)
    assert torch.isneginf(increments[0, 0])
    assert torch.equal(increments[0, 1:], torch.tensor([-99.0, 0.0], dtype=torch.float64))
