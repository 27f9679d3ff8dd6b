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
- `"auto"`: each group's mode and the round's K chosen by the round planner
  (`planner.py`) from the evidence of earlier rounds: SMC-SD only where its predicted bias
  stays within `smc_auto_threshold`, then the K (0 = a plain target step) with the most
  expected tokens per second. Its first round is exact (no evidence yet), as here.
"""

from __future__ import annotations

import torch

MODES = ("smc", "exact", "mixed", "auto")
DEFAULT_SCHEDULE = (4, 1)


def exact_rounds(mode: str, rounds_run: torch.Tensor, schedule: tuple[int, int] = DEFAULT_SCHEDULE) -> torch.Tensor:
    """Per group, True where its next round runs in exact mode (`rounds_run` `[G]`: rounds
    each group has run so far). For "auto" this is only its first round's mode."""
    if mode == "smc":
        return torch.zeros_like(rounds_run, dtype=torch.bool)
    if mode in ("exact", "auto"):
        return torch.ones_like(rounds_run, dtype=torch.bool)
    if mode == "mixed":
        exact, smc = schedule
        return (rounds_run % (exact + smc)) < exact
    raise ValueError(f"Unknown smc_mode={mode!r}; use one of {', '.join(MODES)}.")
