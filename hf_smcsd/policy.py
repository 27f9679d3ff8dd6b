"""Which mode each group runs next: SMC-SD or exact. Pure tensor functions.

A group's mode for a round is fixed before the round's drafts are drawn, from what earlier
rounds showed (docs/algorithm.md, "Switching between modes"): a choice that looked at the
round's own draws would make the exact rounds' candidates a selected, no longer i.i.d.,
sample. Every function here therefore takes only counters and statistics of past rounds.

Modes (the `smc_mode` knob):

- `"smc"`: every round SMC-SD (importance weights, resampling). Fastest; biased at small N.
- `"exact"`: every round lossless multi-draft speculative sampling. The target's own
  output distribution, for any draft.
- `"mixed"`: a fixed per-group cycle, `smc_schedule = (exact_rounds, smc_rounds)`: e.g.
  (4, 1) runs 4 exact rounds, then 1 SMC-SD round, and repeats.
- `"auto"`: exact where draft and target disagree, SMC-SD where they agree. The evidence
  is `agreement`, a running average over past rounds of the smaller of two measures of the
  round just run (`round_agreement`), both in [0, 1], both 1 when the draft proposes as
  the target would:
  - the estimated single-token acceptance `1 - TV(p, q)` (the mean of `min(1, p(d)/q(d))`
    over the drafted tokens): how often the draft proposes what the target would keep;
  - the effective sample size of the round's weight increments `sum_t log p(d_t) - log q(d_t)`
    over the group's N rows, divided by N: how evenly SMC-SD would weigh them. It falls
    toward 1/N when one particle would take all the weight, the degeneracy that biases
    SMC-SD at small N. (With N = 1 it says nothing and only the acceptance counts.)
  Exact rounds measure both too (their N drafts are i.i.d. from one prefix), so a group
  can return to SMC-SD. Above `smc_auto_threshold` the next round is SMC-SD; at or below
  it, or with no evidence yet (the first round), exact: a threshold of 1 is exact mode, 0
  nearly SMC-SD mode. Neither measure alone protected the weak-draft pair's answers (mean
  acceptance is high on format tokens; the ESS of 4 particles is noisy); their minimum at
  0.3 did, at 84% of the committed pair's code tokens in SMC-SD rounds (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from .verify import acceptance_estimate
from .weights import effective_sample_size

MODES = ("smc", "exact", "mixed", "auto")
DEFAULT_SCHEDULE = (4, 1)
DEFAULT_AUTO_THRESHOLD = 0.3
AGREEMENT_DECAY = 0.5  # weight of the newest round in the running average


def exact_rounds(
    mode: str,
    rounds_run: torch.Tensor,
    agreement: torch.Tensor,
    schedule: tuple[int, int] = DEFAULT_SCHEDULE,
    threshold: float = DEFAULT_AUTO_THRESHOLD,
) -> torch.Tensor:
    """Per group, True where its next round runs in exact mode.

    `rounds_run` `[G]`: rounds each group has run so far; `agreement` `[G]`: its running
    acceptance estimate (NaN where nothing was measured yet).
    """
    if mode == "smc":
        return torch.zeros_like(rounds_run, dtype=torch.bool)
    if mode == "exact":
        return torch.ones_like(rounds_run, dtype=torch.bool)
    if mode == "mixed":
        exact, smc = schedule
        return (rounds_run % (exact + smc)) < exact
    if mode == "auto":
        return ~(agreement > threshold)  # NaN (no evidence yet) compares False: exact; 1.0: always exact
    raise ValueError(f"Unknown smc_mode={mode!r}; use one of {', '.join(MODES)}.")


def round_agreement(log_p: torch.Tensor, log_q: torch.Tensor, counted: torch.Tensor, particles: int) -> torch.Tensor:
    """Per group `[G]`, how well this round's drafts agreed with the target (see the module
    docstring): the smaller of the mean single-token acceptance over the `counted` drafted
    tokens `[G * N, k]` and the ESS fraction of the rows' summed log ratios (N > 1 only).
    NaN for a group with nothing counted."""
    acceptance = acceptance_estimate(log_p, log_q, counted).view(-1, particles).nanmean(dim=1)
    if particles == 1:
        return acceptance
    ratios = torch.where(counted, log_p.double() - log_q.double(), 0.0).sum(dim=1).view(-1, particles)
    ess_fraction = effective_sample_size(ratios) / particles
    return torch.minimum(acceptance, ess_fraction)  # NaN acceptance (nothing counted) stays NaN


def update_agreement(agreement: torch.Tensor, observed: torch.Tensor, decay: float = AGREEMENT_DECAY) -> torch.Tensor:
    """Running average of the per-round acceptance estimates; NaN observations change nothing."""
    blended = decay * observed + (1.0 - decay) * agreement
    blended = torch.where(torch.isnan(agreement), observed, blended)
    return torch.where(torch.isnan(observed), agreement, blended)
