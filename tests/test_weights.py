"""Pure tensor math of hf_smcsd.weights: log-probs, inverse-CDF sampling, power tempering,
normalised weights, ESS and the log mean weight."""

import math

import pytest
import torch

from hf_smcsd.weights import (
    effective_sample_size,
    gather,
    log_mean_weight,
    log_probs,
    normalized_weights,
    power_log_probs,
    sample,
)


def tv_bound(p: torch.Tensor, m: int, multiple: float) -> float:
    """`multiple` times the expected total variation between `p` and an empirical
    distribution of `m` draws from it: E[TV] ~ sum_i sqrt(p_i (1 - p_i) / (2 pi m))."""
    p = p.double()
    return multiple * float(torch.sqrt(p * (1 - p) / (2 * math.pi * m)).sum())


def empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=vocab).double() / tokens.numel()


# --------------------------------------------------------------------------- log_probs


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_log_probs_identity(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 50) * 3
    lp = log_probs(logits, temperature)
    assert lp.shape == logits.shape
    s = logits / temperature
    expected = s - torch.logsumexp(s, dim=-1, keepdim=True)
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, torch.log(torch.softmax(logits / temperature, dim=-1)), atol=1e-5, rtol=1e-5)
    # Gathered at drawn tokens: s[d] - logsumexp(s).
    tokens = torch.randint(0, 50, (3, 4))
    got = gather(lp, tokens)
    want = s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(s, dim=-1)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Normalised: exp sums to one per row.
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_log_probs_half_precision_input(dtype, temperature):
    torch.manual_seed(1)
    logits = (torch.randn(5, 64) * 4).to(dtype)
    lp = log_probs(logits, temperature)
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all()
    # Same as the float32 computation on the (already rounded) half values.
    s = logits.float() / temperature
    torch.testing.assert_close(lp, s - torch.logsumexp(s, dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_log_probs_keeps_float64():
    logits = torch.randn(2, 10, dtype=torch.float64)
    assert log_probs(logits, 0.9).dtype == torch.float64


# --------------------------------------------------------------------------- sample

P6 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.02, 0.28], dtype=torch.float64)
M = 200_000


def test_sample_matches_distribution():
    torch.manual_seed(2)
    log_p = P6.log().float()
    tokens = sample(log_p.expand(M, -1).contiguous())
    assert tokens.shape == (M,)
    assert tokens.dtype == torch.long
    freq = empirical(tokens, 6)
    tv = 0.5 * float((freq - P6).abs().sum())
    bound = tv_bound(P6, M, 4.0)
    assert tv < bound, (tv, bound, freq)


def test_sample_unnormalised_log_p():
    """No normalisation needed: adding a per-row constant changes nothing."""
    torch.manual_seed(3)
    log_p = (P6.log() + 17.0).float()
    tokens = sample(log_p.expand(M, -1).contiguous())
    freq = empirical(tokens, 6)
    tv = 0.5 * float((freq - P6).abs().sum())
    assert tv < tv_bound(P6, M, 4.0), (tv, freq)


def test_sample_never_draws_neg_inf():
    torch.manual_seed(4)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64)
    log_p = p.log().float()  # -inf at 0, 2, 5
    assert torch.isneginf(log_p).sum() == 3
    tokens = sample(log_p.expand(50_000, -1).contiguous())
    counts = torch.bincount(tokens, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0, counts
    assert (counts[[1, 3, 4]] > 0).all(), counts
    # A single finite entry is always chosen.
    one = torch.full((1000, 7), float("-inf"))
    one[:, 4] = -3.0
    assert (sample(one) == 4).all()


def test_sample_top_uniform_never_reaches_zero_entries_at_the_end(monkeypatch):
    """`uniform * total` can round up to the total itself (simulated here with u = 1.0); the
    draw must still land on the last *positive* entry, not on the -inf tail."""
    log_p = torch.tensor([[-0.1, -2.0, -3.0, float("-inf"), float("-inf")]] * 4)
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 1.0))
    assert (sample(log_p) == 2).all()


def test_sample_all_neg_inf_row_stays_in_range():
    dead = torch.full((3, 5), float("-inf"))
    tokens = sample(dead)
    assert ((tokens >= 0) & (tokens < 5)).all()


def test_sample_keeps_tokens_below_float32_resolution(monkeypatch):
    """A tail of 1000 tokens at 1e-9 each, behind a head token at ~1: each step of the
    running sum is below one float32 ulp (1 + 1e-9 == 1 in float32), so a float32 CDF can
    only give tail tokens intervals of 0 or 1 ulp and picks a neighbour. The float64 CDF
    keeps every interval: a uniform in the middle of token 500's interval picks token 500."""
    p = torch.full((1001,), 1e-9, dtype=torch.float64)
    p[0] = 1.0 - p[1:].sum()
    log_p = p.log().float().unsqueeze(0)
    assert float(torch.tensor(1.0, dtype=torch.float32) + 1e-9) == 1.0
    cdf = torch.cumsum(torch.exp(log_p - log_p.amax()).double(), dim=-1)[0]
    middle = float((cdf[499] + cdf[500]) / 2 / cdf[-1])
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, middle))
    assert int(sample(log_p)) == 500



def test_sample_batched_shape_and_reproducible():
    log_p = torch.log_softmax(torch.randn(3, 4, 11), dim=-1)
    torch.manual_seed(5)
    a = sample(log_p)
    torch.manual_seed(5)
    b = sample(log_p)
    assert a.shape == (3, 4)
    assert ((a >= 0) & (a < 11)).all()
    assert torch.equal(a, b)


def test_sample_against_multinomial():
    torch.manual_seed(6)
    log_p = P6.log().float()
    ours = sample(log_p.expand(M, -1).contiguous())
    multi = torch.multinomial(P6.float(), M, replacement=True)
    tv = 0.5 * float((empirical(ours, 6) - empirical(multi, 6)).abs().sum())
    bound = tv_bound(P6, M, 8.0)  # 4x bound for each of the two empirical distributions
    assert tv < bound, (tv, bound)


# --------------------------------------------------------------------------- power_log_probs


def test_power_alpha_one_is_identity():
    log_p = torch.log_softmax(torch.randn(4, 9), dim=-1)
    out, log_z = power_log_probs(log_p, 1.0)
    assert torch.equal(out, log_p)
    assert log_z.shape == (4,)
    assert torch.equal(log_z, torch.zeros(4))


@pytest.mark.parametrize("alpha", [2.0, 0.5, 3.0])
def test_power_alpha_normalised_and_proportional(alpha):
    torch.manual_seed(7)
    log_p = torch.log_softmax(torch.randn(4, 9, dtype=torch.float64) * 2, dim=-1)
    out, log_z = power_log_probs(log_p, alpha)
    p = log_p.exp()
    assert out.shape == log_p.shape and log_z.shape == (4,)
    # Normalised.
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    # Proportional to p^alpha, with constant Z = sum p^alpha.
    z = (p**alpha).sum(-1)
    torch.testing.assert_close(log_z, z.log())
    torch.testing.assert_close(out.exp(), p**alpha / z.unsqueeze(-1))
    if alpha > 1:
        assert (log_z < 0).all()  # sum p^alpha < 1 for a non-degenerate p
    else:
        assert (log_z > 0).all()


def test_power_log_z_matches_spec_logz_bonus():
    """logZ_bonus = logsumexp(alpha l / T) - alpha logsumexp(l / T)  (spec, step 4)."""
    torch.manual_seed(8)
    logits = torch.randn(3, 20, dtype=torch.float64) * 3
    t, alpha = 0.8, 2.0
    _, log_z = power_log_probs(log_probs(logits, t), alpha)
    s = logits / t
    spec = torch.logsumexp(alpha * s, dim=-1) - alpha * torch.logsumexp(s, dim=-1)
    torch.testing.assert_close(log_z, spec)


def test_power_handles_neg_inf():
    p = torch.tensor([[0.0, 0.6, 0.4, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    log_p = p.log()
    out, log_z = power_log_probs(log_p, 2.0)
    assert not torch.isnan(out).any()
    assert not torch.isnan(log_z).any()
    assert torch.isneginf(out[0, [0, 3]]).all()
    torch.testing.assert_close(out[0, [1, 2]].exp(), torch.tensor([0.36, 0.16], dtype=torch.float64) / 0.52)
    torch.testing.assert_close(log_z, torch.tensor([math.log(0.52), math.log(0.30)], dtype=torch.float64))


# --------------------------------------------------------------------------- weights / ESS


def test_equal_weights_ess_is_n():
    for n in (1, 4, 8):
        lw = torch.full((3, n), -2.5, dtype=torch.float64)
        w = normalized_weights(lw)
        torch.testing.assert_close(w, torch.full((3, n), 1.0 / n, dtype=torch.float64))
        torch.testing.assert_close(effective_sample_size(lw), torch.full((3,), float(n), dtype=torch.float64))


def test_single_survivor_ess_is_one():
    lw = torch.full((2, 5), float("-inf"), dtype=torch.float64)
    lw[0, 2] = -40.0
    lw[1, 4] = 12.0
    w = normalized_weights(lw)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    expected[0, 2] = 1.0
    expected[1, 4] = 1.0
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(effective_sample_size(lw), torch.ones(2, dtype=torch.float64))


def test_all_dead_group_is_uniform_no_nan():
    lw = torch.tensor(
        [[float("-inf")] * 4, [0.0, -1.0, float("-inf"), 2.0]], dtype=torch.float64
    )
    w = normalized_weights(lw)
    ess = effective_sample_size(lw)
    assert not torch.isnan(w).any() and not torch.isnan(ess).any()
    torch.testing.assert_close(w[0], torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(ess[0], torch.tensor(0.0, dtype=torch.float64))  # no information: 0, not N
    # The live group is untouched by the dead one: plain softmax.
    torch.testing.assert_close(w[1], torch.softmax(lw[1], dim=-1))
    assert w[1, 2] == 0.0


def test_ess_general_and_bounds():
    torch.manual_seed(9)
    lw = torch.randn(6, 8, dtype=torch.float64) * 2
    w = torch.softmax(lw, dim=-1)
    torch.testing.assert_close(normalized_weights(lw), w)
    ess = effective_sample_size(lw)
    torch.testing.assert_close(ess, 1.0 / (w**2).sum(-1))
    assert ((ess >= 1.0) & (ess <= 8.0)).all()
    # Invariant to a per-group shift of the log weights (huge shifts must not overflow).
    shifted = lw + torch.tensor([[1e3], [-1e3], [0.0], [500.0], [-700.0], [3.0]], dtype=torch.float64)
    torch.testing.assert_close(effective_sample_size(shifted), ess)


def test_log_mean_weight():
    torch.manual_seed(10)
    lw = torch.randn(4, 6, dtype=torch.float64) * 3
    got = log_mean_weight(lw)
    torch.testing.assert_close(got, torch.log(torch.exp(lw).mean(-1)))
    # Stable far outside exp's range.
    big = lw + 1000.0
    torch.testing.assert_close(log_mean_weight(big), got + 1000.0)
    # Equal weights: the mean is the weight itself.
    torch.testing.assert_close(
        log_mean_weight(torch.full((2, 5), -3.0, dtype=torch.float64)),
        torch.full((2,), -3.0, dtype=torch.float64),
    )
    # Some dead particles lower the mean by the fraction alive.
    part = torch.tensor([[0.0, float("-inf"), float("-inf"), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(log_mean_weight(part), torch.tensor([math.log(0.5)], dtype=torch.float64))
