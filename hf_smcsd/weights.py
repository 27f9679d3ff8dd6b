"""Pure tensor math of SMC-SD: log-probabilities, sampling, weights, ESS, log Z.

Nothing here knows about models or transformers. Log weights are float64 throughout: they
are sums of many per-token log ratios and half precision would lose them.
"""

from __future__ import annotations

import math

import torch

WEIGHT_DTYPE = torch.float64


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Normalised log-probabilities of `softmax(logits / temperature)`, in float32 or wider.

    This is the cheap identity `log q(d) = s[d] - logsumexp(s)` with `s = logits / T`,
    computed for the whole vocabulary at once.
    """
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        scores = scores / temperature
    return torch.log_softmax(scores, dim=-1)


def sample(log_p: torch.Tensor) -> torch.Tensor:
    """One token per row from `exp(log_p)`, by inverting the cumulative distribution.

    Equal in distribution to `torch.multinomial(exp(log_p), 1)`, but needs no
    normalisation, never picks a `-inf` entry and draws one uniform per row from torch's
    global generator, so `torch.manual_seed` makes it reproducible. One uniform per row
    (not one Gumbel variable per vocabulary entry) is what makes it cheap: 6-9x faster than
    Gumbel-max on a CPU for 8 to 64 rows of 4096 tokens.
    """
    # Float64 for the running sum: in float32, tokens whose probability is below one ulp
    # of the partial sum (~6e-8 of the total) would get no interval at all.
    peak = log_p.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a row of -inf: all zero
    # exp in float32 (exact enough per token), the sum in float64. In place where possible:
    # fresh MB-sized buffers cost page faults on every call and doubled the time on a CPU.
    cdf = (log_p - peak).float().exp_().double().cumsum_(dim=-1)
    total = cdf[..., -1:]
    # u < total strictly, also after rounding the product, so the last positive entry is the
    # furthest `searchsorted` can go and zero-probability entries are never chosen.
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return tokens.clamp_max(log_p.shape[-1] - 1)  # only an all-zero row can reach the end


def gather(log_p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`log_p[..., tokens]` elementwise: the log-probability of each token at its position."""
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def power_log_probs(log_p: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The power-tempered distribution `p^alpha / Z` and `log Z` per row.

    Sampling the bonus token from `p^alpha / Z` instead of `p^alpha` is corrected by the
    weight factor `Z = sum_v p(v)^alpha` (`logZ_bonus` in the spec; exactly 1 at alpha=1).
    """
    if alpha == 1.0:
        return log_p, torch.zeros(log_p.shape[:-1], dtype=log_p.dtype, device=log_p.device)
    scaled = alpha * log_p
    log_z = torch.logsumexp(scaled, dim=-1)
    return scaled - log_z.unsqueeze(-1), log_z


def normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """`softmax(log_weights)` over the last axis (particles of a group).

    A group whose weights are all `-inf` (every particle left the target's support) gets
    uniform weights instead of NaN: there is no information left to prefer any particle.
    """
    dead = torch.isneginf(log_weights).all(dim=-1, keepdim=True)
    safe = torch.where(dead, torch.zeros_like(log_weights), log_weights)
    return torch.softmax(safe, dim=-1)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """`ESS = 1 / sum(w_bar^2)` per group; N for equal weights, 1 for a single survivor,
    and 0 for a group whose weights are all zero (no particle carries information)."""
    w = normalized_weights(log_weights)
    ess = 1.0 / (w * w).sum(dim=-1)
    return torch.where(torch.isneginf(log_weights).all(dim=-1), torch.zeros_like(ess), ess)


def log_mean_weight(log_weights: torch.Tensor) -> torch.Tensor:
    """`logsumexp(log w) - log N` per group: this round's factor of the running log Z."""
    n = log_weights.shape[-1]
    return torch.logsumexp(log_weights, dim=-1) - math.log(n)
