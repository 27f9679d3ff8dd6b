"""Resampling schemes, ancestor counts and the row-copy plan of hf_smcsd.resampling."""

import pytest
import torch

from hf_smcsd.resampling import (
    RESAMPLING_METHODS,
    CopyPlan,
    ancestor_counts,
    copy_plan,
    counts_to_ancestors,
    resample,
)

# Low-variance schemes: with equal weights every particle is kept exactly once.
LOW_VARIANCE = ("systematic", "stratified", "residual")


def test_methods_listed():
    assert set(RESAMPLING_METHODS) == {"systematic", "stratified", "multinomial", "residual"}


@pytest.mark.parametrize("method", RESAMPLING_METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equal_weights(method, dtype):
    torch.manual_seed(0)
    groups, n = 300, 7
    w = torch.full((groups, n), 1.0 / n, dtype=dtype)
    anc = resample(w, method)
    assert anc.shape == (groups, n)
    assert anc.dtype == torch.long
    assert ((anc >= 0) & (anc < n)).all()
    if method in LOW_VARIANCE:
        assert (ancestor_counts(anc) == 1).all()
        plan = copy_plan(anc)
        assert len(plan) == 0
        assert plan.dest.numel() == 0 and plan.src.numel() == 0
    else:
        assert ancestor_counts(anc).sum(-1).eq(n).all()


def test_residual_equal_weights_rounding_n49():
    """float64 49 * (1/49) == 0.99999...: the guaranteed copy must survive the rounding."""
    torch.manual_seed(8)
    w = torch.full((50, 49), 1.0 / 49, dtype=torch.float64)
    assert (ancestor_counts(resample(w, "residual")) == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_never_picks_trailing_zero_weight(monkeypatch, dtype):
    """A position that rounds up to the total must not fall through to a zero-weight last particle."""
    w = torch.softmax(torch.tensor([[0.3, -1.1, 2.0, 0.7, float("-inf")]], dtype=dtype), dim=-1)
    almost_one = 1 - torch.finfo(dtype).eps / 2
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, almost_one, dtype=kw.get("dtype", dtype)))
    for method in ("systematic", "stratified"):
        assert 4 not in resample(w, method).flatten().tolist()


@pytest.mark.parametrize("method", RESAMPLING_METHODS)
@pytest.mark.parametrize("dominant", [0, 2, 4])
def test_one_dominant_weight(method, dominant):
    torch.manual_seed(1)
    groups, n = 200, 5
    w = torch.zeros(groups, n, dtype=torch.float64)
    w[:, dominant] = 1.0
    anc = resample(w, method)
    assert (anc == dominant).all(), anc[(anc != dominant).any(-1)][:5]
    plan = copy_plan(anc)
    assert len(plan) == groups * (n - 1)
    others = torch.tensor([j for j in range(n) if j != dominant])
    base = torch.arange(groups).unsqueeze(-1) * n
    assert torch.equal(plan.dest, (base + others).flatten())
    assert torch.equal(plan.src, (base + dominant).expand(groups, n - 1).flatten())


@pytest.mark.parametrize("method", RESAMPLING_METHODS)
def test_dominant_weight_among_dead_particles(method):
    """Weights from softmax of log weights where most are -inf (exact zeros)."""
    torch.manual_seed(2)
    lw = torch.full((500, 6), float("-inf"), dtype=torch.float64)
    lw[:, 1] = 0.3
    lw[:, 3] = -0.2
    w = torch.softmax(lw, dim=-1)
    anc = resample(w, method)
    assert torch.isin(anc, torch.tensor([1, 3])).all()


@pytest.mark.parametrize("method", RESAMPLING_METHODS)
def test_unbiased_counts(method):
    torch.manual_seed(3)
    groups = 20_000
    w_row = torch.tensor([0.06, 0.11, 0.17, 0.27, 0.39], dtype=torch.float64)
    n = w_row.numel()
    w = w_row.expand(groups, n).contiguous()
    counts = ancestor_counts(resample(w, method)).double()
    assert counts.sum(-1).eq(n).all()
    mean = counts.mean(0)
    se = counts.std(0) / groups**0.5
    expected = n * w_row
    bound = 5 * se + 1e-9
    assert ((mean - expected).abs() < bound).all(), (method, mean, expected, bound)
    if method == "systematic":
        # Every count is floor(N w) or ceil(N w).
        assert ((counts >= expected.floor()) & (counts <= expected.ceil())).all()
    elif method == "residual":
        # At least floor(N w) deterministic copies.
        assert (counts >= expected.floor()).all()


@pytest.mark.parametrize("method", RESAMPLING_METHODS)
def test_copy_plan_invariants(method):
    torch.manual_seed(4)
    for groups, n in [(1, 4), (6, 8), (13, 3), (4, 1)]:
        lw = torch.randn(groups, n, dtype=torch.float64) * 2
        w = torch.softmax(lw, dim=-1)
        anc = resample(w, method)
        plan = copy_plan(anc)
        counts = ancestor_counts(anc).flatten()
        total = groups * n

        assert len(plan) == plan.dest.numel() == plan.src.numel()
        assert plan.dest.unique().numel() == plan.dest.numel()
        assert not torch.isin(plan.dest, plan.src).any()
        assert (counts[plan.dest] == 0).all()
        assert (counts[plan.src] >= 2).all()
        # Every dead row is overwritten; every surplus draw is copied exactly once.
        assert int((counts == 0).sum()) == len(plan)
        assert torch.equal(torch.bincount(plan.src, minlength=total), (counts - 1).clamp(min=0))
        # Copies stay within their group.
        assert torch.equal(plan.dest // n, plan.src // n)

        # Applying the plan realises the resampled population (as a multiset per group).
        x = torch.arange(total)
        x[plan.dest] = x[plan.src]
        want = anc + torch.arange(groups).unsqueeze(-1) * n
        assert torch.equal(x.view(groups, n).sort(-1).values, want.sort(-1).values)
        # Survivors stay in their own rows.
        alive = counts > 0
        assert torch.equal(x[alive], torch.arange(total)[alive])

        # The equivalent full ancestor vector.
        assert torch.equal(plan.ancestors(total), x)


def test_copy_plan_concrete():
    anc = torch.tensor([[0, 0, 0, 3], [1, 1, 2, 2]])
    plan = copy_plan(anc)
    assert torch.equal(plan.dest, torch.tensor([1, 2, 4, 7]))
    assert torch.equal(plan.src, torch.tensor([0, 0, 5, 6]))
    assert torch.equal(plan.ancestors(8), torch.tensor([0, 0, 0, 3, 5, 5, 6, 6]))


def test_copy_plan_offset():
    torch.manual_seed(5)
    n = 4
    anc = torch.tensor([[0, 0, 1, 1], [3, 3, 3, 2], [0, 1, 2, 3]])
    plan = copy_plan(anc)
    # Local group g maps to global group [2, 5, 7][g] of a batch of 8 groups.
    global_groups = torch.tensor([2, 5, 7])
    rows = (global_groups.unsqueeze(-1) * n + torch.arange(n)).flatten()
    moved = plan.offset(rows)
    assert isinstance(moved, CopyPlan)
    assert torch.equal(moved.dest, rows[plan.dest])
    assert torch.equal(moved.src, rows[plan.src])
    assert torch.equal(moved.dest, torch.tensor([10, 11, 20, 21]))
    assert torch.equal(moved.src, torch.tensor([8, 9, 23, 23]))
    # Applied to the whole batch: untouched groups stay, resampled ones match.
    x = torch.arange(8 * n)
    x[moved.dest] = x[moved.src]
    assert torch.equal(moved.ancestors(8 * n), x)
    assert torch.equal(x[:8], torch.arange(8))
    assert torch.equal(x[8:12], torch.tensor([8, 9, 8, 9]))
    assert torch.equal(x[20:24].sort().values, torch.tensor([22, 23, 23, 23]))
    assert torch.equal(x[28:], torch.arange(28, 32))


def test_unknown_method_raises():
    w = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="smc_resample_method") as info:
        resample(w, method="bogus")
    assert "bogus" in str(info.value)


def test_default_method_is_systematic():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).expand(50, 4).contiguous()
    torch.manual_seed(6)
    a = resample(w)
    torch.manual_seed(6)
    b = resample(w, "systematic")
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", RESAMPLING_METHODS)
def test_counts_round_trip(method):
    torch.manual_seed(7)
    groups, n = 40, 6
    w = torch.softmax(torch.randn(groups, n, dtype=torch.float64) * 1.5, dim=-1)
    anc = resample(w, method)
    counts = ancestor_counts(anc)
    assert counts.shape == (groups, n)
    assert counts.sum(-1).eq(n).all()
    back = counts_to_ancestors(counts)
    # Same multiset, in sorted order.
    assert torch.equal(back, anc.sort(-1).values)
    assert torch.equal(ancestor_counts(back), counts)


def test_counts_to_ancestors_concrete():
    counts = torch.tensor([[0, 3, 0, 1], [1, 1, 1, 1], [0, 0, 0, 4]])
    assert torch.equal(
        counts_to_ancestors(counts),
        torch.tensor([[1, 1, 1, 3], [0, 1, 2, 3], [3, 3, 3, 3]]),
    )
    assert torch.equal(ancestor_counts(counts_to_ancestors(counts)), counts)
