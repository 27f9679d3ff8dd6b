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
  is `agreement`, a running average over past rounds of how evenly this round's drafts
  would have been weighted (`round_agreement`): the effective sample size of the round's
  weight increments `sum_t log p(d_t) - log q(d_t)` over the group's N rows, divided by N.
  It is 1 when the draft proposes as the target would and falls toward 1/N when one
  particle would take all the weight: exactly the degeneracy that biases SMC-SD at small
  N. Exact rounds measure it too (their N drafts are i.i.d. from one prefix), so a group
  can return to SMC-SD. With N = 1 there is no spread to measure, and the estimated
  single-token acceptance `1 - TV(p, q)` stands in. Above `smc_auto_threshold` the next
  round is SMC-SD; at or below it, or with no evidence yet (the first round), exact (so a
  threshold of 1 is exact mode, 0 nearly SMC-SD mode).
"""

from __future__ import annotations

import torch

from .verify import acceptance_estimate
from .weights import effective_sample_size

MODES = ("smc", "exact", "mixed", "auto")
DEFAULT_SCHEDULE = (4, 1)
DEFAULT_AUTO_THRESHOLD = 0.5
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
    docstring): the ESS of the rows' summed log ratios over the `counted` drafted tokens
    `[G * N, k]`, divided by N; with N = 1 the mean single-token acceptance. NaN for a group
    with nothing counted."""
    if particles == 1:
        return acceptance_estimate(log_p, log_q, counted)
    ratios = torch.where(counted, log_p.double() - log_q.double(), 0.0).sum(dim=1).view(-1, particles)
    measured = counted.view(-1, particles, counted.shape[1]).any(dim=2).any(dim=1)
    return torch.where(measured, effective_sample_size(ratios) / particles, float("nan"))


def update_agreement(agreement: torch.Tensor, observed: torch.Tensor, decay: float = AGREEMENT_DECAY) -> torch.Tensor:
    """Running average of the per-round acceptance estimates; NaN observations change nothing."""
    blended = decay * observed + (1.0 - decay) * agreement
    blended = torch.where(torch.isnan(agreement), observed, blended)
    return torch.where(torch.isnan(observed), agreement, blended)
