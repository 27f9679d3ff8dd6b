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
- `"auto"`: exact where draft and target disagree, SMC-SD where they agree. The evidence is
  `agreement`, a running average over past rounds of the estimated single-token acceptance
  `1 - TV(p, q)` (`verify.acceptance_estimate`), measured on every drafted token of every
  round, in either mode. Above `smc_auto_threshold` the next round is SMC-SD, below (or with
  no evidence yet, as in the first round) it is exact.
"""

from __future__ import annotations

import torch

MODES = ("smc", "exact", "mixed", "auto")
DEFAULT_SCHEDULE = (4, 1)
DEFAULT_AUTO_THRESHOLD = 0.9
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
        return ~(agreement >= threshold)  # NaN (no evidence yet) compares False: exact
    raise ValueError(f"Unknown smc_mode={mode!r}; use one of {', '.join(MODES)}.")


def update_agreement(agreement: torch.Tensor, observed: torch.Tensor, decay: float = AGREEMENT_DECAY) -> torch.Tensor:
    """Running average of the per-round acceptance estimates; NaN observations change nothing."""
    blended = decay * observed + (1.0 - decay) * agreement
    blended = torch.where(torch.isnan(agreement), observed, blended)
    return torch.where(torch.isnan(observed), agreement, blended)
