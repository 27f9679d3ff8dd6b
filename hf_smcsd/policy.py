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

K in fixed modes: the user's `smc_gamma` every round, unless the user asks for adaptation
the way transformers' assisted generation is asked, `num_assistant_tokens_schedule` on the
assistant's generation config (`K_SCHEDULES`); `adapt_draft_tokens` is the rule.
"""

from __future__ import annotations

import torch

MODES = ("smc", "exact", "mixed", "auto")
DEFAULT_SCHEDULE = (4, 1)
# transformers' `num_assistant_tokens_schedule` values. "constant": K never changes (the
# default: transformers 4.57's config default, and what 5.x's None means). "heuristic":
# K adapts from the exact rounds' accepted counts and the K reached is stored on the
# assistant's generation config as `num_assistant_tokens` (the next call starts from it).
# "heuristic_transient": adapts the same way, stores nothing.
K_SCHEDULES = ("constant", "heuristic", "heuristic_transient")
# The largest K an adaptive schedule may reach (unless the starting K is larger, which is
# then the cap). Buffers, the memory check and sliding-window checks are sized for it
# before the run; 16 is twice the reference engine's largest K (8 at N = 8).
ADAPTIVE_K_LIMIT = 16


def adaptive_k_limit(start: int, max_new_tokens: int, backend_limit: int | None = None) -> int:
    """The cap of an adaptive K: `ADAPTIVE_K_LIMIT`, or the starting K if larger, and never
    more than a budget can keep (`max_new_tokens`) or the backend verifies in one step
    (`backend_limit`, e.g. a TensorRT engine's built K), but never below the start either."""
    cap = min(ADAPTIVE_K_LIMIT, max_new_tokens)
    if backend_limit is not None:
        cap = min(cap, backend_limit)
    return max(start, cap)


def adapt_draft_tokens(k: torch.Tensor, accepted: torch.Tensor, drafted: torch.Tensor, limit: int) -> torch.Tensor:
    """The next round's K (before its integer part is taken) after one round's exact walks:
    transformers' heuristic, one vote per group, averaged over the groups that share K.

    `k`: the current K, a float64 scalar tensor (it carries fractions between rounds; a
    round drafts `floor(k)`). `accepted` `[G]`: the drafts each exact group's walk accepted;
    `drafted` `[G]`: the drafts it could accept (K, or less where its budget ends). A group
    that accepted all of them votes +2, any other -1 (transformers' rule for its one
    sequence); K moves by the mean vote, within [1, `limit`]. With one group this is
    transformers' `update_candidate_strategy` exactly (K += 2, else K = max(1, K - 1)).
    No groups (a round without exact groups): K unchanged. Device ops only (no host read).
    """
    if accepted.numel() == 0:
        return k
    votes = torch.where(accepted >= drafted, 2.0, -1.0).to(torch.float64)
    return (k + votes.mean()).clamp(1.0, float(limit))


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
