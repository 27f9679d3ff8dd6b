"""The round loop of SMC-SD and its exact mode, as specified in docs/algorithm.md
(shared/docs in the project repo).

Reads top to bottom like the spec. `smc_sample` is the loop: start; then rounds of
choose the round's shape -> draft -> verify -> SMC-SD operator -> exact operator -> finish
and weigh -> commit caches -> redo dead populations -> resample; then the final pick. Each
of those is one function below, in that order, taking the run's state (`Population`) and
what it needs, returning what it produces; its docstring names the state it changes. The
loop's two host synchronisations per round stay in the loop. It talks to the two models
only through `Runner`s and never imports transformers; the math after the verify pass lives
in `verify.py` and `weights.py`, the mode choice in `policy.py` (fixed modes) and
`planner.py` (auto: each group's mode and the round's K, K = 0 a plain target step),
resampling in `resampling.py`.

Layout: a batch of B prompts is B groups of N particles; every tensor over particles is
`[rows]` with rows group-major (`group * N + particle`). Rows of groups that have ended
leave the runners' batch; `Population.rows` maps the live rows back to the full `[B * N]`
arrays that hold every particle's tokens and weights until the end. Exact rounds commit a
different number of tokens per group, so each group has its own clock (`clock[g]`: tokens
generated so far), and rows of one batch can differ in length (the runners' `rollback`).

`tests/test_golden.py` pins the loop's behaviour: a grid of seeded runs must reproduce its
recorded tokens, weights and diagnostics bit for bit (same random draws in the same order).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import planner, policy, verify
from .resampling import RESAMPLING_METHODS, CopyPlan, copy_plan, resample
from .runners.base import Runner
from .timing import PhaseClock
from .weights import (
    WEIGHT_DTYPE,
    effective_sample_size,
    gather,
    log_mean_weight,
    log_probs,
    normalized_weights,
    power_log_probs,
    sample,
)

# A distribution function turns logits `[rows, w, V]` for the last w fed positions into
# normalised log-probabilities of what that model samples from. Its second argument builds,
# on demand, every row's tokens so far `[rows, S]` (padded prompt included, ending with the
# w fed positions), for processors that look at the sequence: position j sees
# `sequences[:, : S - w + 1 + j]`, exactly what transformers' sampling would pass there.
# Its attribute `prompts` `[rows]` says which prompt each row belongs to (for processors
# that carry per-prompt state, such as the prompt's padding length). A function that never
# calls it says so with an attribute `reads_history = False`; the loop then need not group
# rows of different lengths.
History = Callable[[], torch.Tensor]
LogProbsFn = Callable[[torch.Tensor, History], torch.Tensor]
# A stop function marks, for the last w tokens of each row's sequence `[rows, S]`, which
# positions complete a stop (a stopping criterion that holds there): `[rows, w]` bool.
StopFn = Callable[[torch.Tensor, int], torch.Tensor]

SMC_ROUND, EXACT_ROUND, REDONE_ROUND, PLAIN_ROUND = "s", "e", "x", "p"  # letters of `SMCResult.round_modes`
# The draft proposes at the target's temperature, but never below this (the reference
# engine proposes at 0.7 whatever the target's). A sharper proposal stops covering the
# target: near temperature 0 every particle would propose the draft's argmax, and where it
# is not the target's no N recovers (issue 19; build_scripts/draft_temperature_sweep.py).
MIN_DRAFT_TEMPERATURE = 0.7
TARGET, DRAFT = 0, 1  # indices of `Population.invalid`
_MODEL_NAMES = ("target model (generate()'s model)", "draft model (assistant_model)")


class InvalidDistributionError(ValueError):
    """A model's logits gave no probability distribution (NaN)."""


def check_distributions(invalid: Sequence[bool]) -> None:
    """Raise InvalidDistributionError naming the model(s) whose distributions held a NaN
    (`invalid`: host copies of `Population.invalid`)."""
    bad = [name for name, flag in zip(_MODEL_NAMES, invalid) if flag]
    if bad:
        raise InvalidDistributionError(
            f"The {' and the '.join(bad)} gave NaN probabilities: its logits hold NaN or infinite values (a float16 "
            "overflow is the usual cause: load it in bfloat16 or float32, and check its weights), or logits "
            "processors removed every token. SMC-SD stops rather than return tokens drawn from no distribution."
        )
_INITIAL_TOKENS = 256  # new-token columns allocated at the start (doubled as needed)


@dataclass
class SMCSettings:
    """Everything the loop needs to know besides the models and the prompts."""

    particles: int = 4
    gamma: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    draft_temperature: float | None = None  # None: `temperature`, at least MIN_DRAFT_TEMPERATURE
    resample_threshold: float = 0.5
    resample_method: str = "systematic"
    alpha: float = 1.0
    eos_token_ids: Sequence[int] = ()
    pad_token_id: int = 0
    num_return_sequences: int = 1  # particles returned per prompt, drawn by final weight
    mode: str = "smc"  # "smc", "exact", "mixed" or "auto" (see policy.py)
    schedule: tuple[int, int] = policy.DEFAULT_SCHEDULE  # mixed: (exact rounds, SMC-SD rounds), repeating
    auto_threshold: float = planner.DEFAULT_BIAS_BOUND  # auto: largest predicted bias of an SMC-SD round
    auto_costs: planner.CostModel | None = None  # auto: fixed costs (reproducible plans); None measures them
    greedy: bool = False  # exact rounds verify against the target's argmax (do_sample=False)
    # transformers' num_assistant_tokens_schedule (policy.K_SCHEDULES): "constant" keeps K =
    # `gamma`; the heuristic ones adapt the K of exact rounds (`adapts_gamma`).
    gamma_schedule: str = "constant"
    gamma_limit: int | None = None  # the most K the backend verifies in one step (None: no limit)

    def __post_init__(self):
        self.validate()

    @property
    def proposal_temperature(self) -> float:
        """The temperature the draft proposes at: `draft_temperature`, or else the target's
        temperature but at least MIN_DRAFT_TEMPERATURE, so the proposal keeps covering it."""
        if self.draft_temperature is not None:
            return self.draft_temperature
        return max(self.temperature or 1.0, MIN_DRAFT_TEMPERATURE)

    @property
    def adapts_gamma(self) -> bool:
        """Whether K adapts during the run: a heuristic schedule, and rounds that run exact
        (exact, mixed, or greedy). SMC-SD rounds accept every draft, so they carry no
        acceptance signal, and auto plans K itself (planner.py)."""
        exact_rounds_run = self.greedy or self.mode in ("exact", "mixed")
        return self.gamma_schedule != "constant" and exact_rounds_run

    @property
    def max_gamma(self) -> int:
        """The largest K a round may draft: `gamma`, or with an adaptive schedule its cap
        (policy.adaptive_k_limit). Buffers and checks sized before the run use it."""
        if not self.adapts_gamma:
            return self.gamma
        return policy.adaptive_k_limit(self.gamma, self.max_new_tokens, self.gamma_limit)

    def validate(self) -> None:
        def bad(name, value, fix):
            raise ValueError(f"Invalid {name}={value!r}: {fix}")

        if not isinstance(self.particles, int) or self.particles < 1:
            bad("smc_particles", self.particles, "use an integer >= 1 (8 is a good start).")
        if not isinstance(self.gamma, int) or self.gamma < 1:
            bad("smc_gamma", self.gamma, "use an integer >= 1 draft tokens per round (4 to 8 is typical).")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "use an integer >= 1.")
        if not self.greedy and (not self.temperature or self.temperature <= 0):
            bad("temperature", self.temperature, "SMC-SD samples; use a temperature > 0.")
        if self.draft_temperature is not None and not self.draft_temperature > 0:
            bad("smc_draft_temperature", self.draft_temperature,
                f"use a temperature > 0, or None for the target's (at least {MIN_DRAFT_TEMPERATURE}).")
        if not 0.0 <= float(self.resample_threshold) <= 1.0:
            bad(
                "smc_resample_threshold",
                self.resample_threshold,
                "use a fraction in [0, 1] of N (0 never resamples, 1 resamples every round).",
            )
        if not float(self.alpha) > 0:
            bad("smc_alpha", self.alpha, "use a power > 0 (1.0 samples the target itself).")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            bad("num_return_sequences", self.num_return_sequences, "use an integer >= 1.")
        if self.resample_method not in RESAMPLING_METHODS:
            bad("smc_resample_method", self.resample_method, f"use one of {', '.join(RESAMPLING_METHODS)}.")
        if self.mode not in policy.MODES:
            bad("smc_mode", self.mode, f"use one of {', '.join(repr(m) for m in policy.MODES)}.")
        if self.gamma_schedule not in policy.K_SCHEDULES:
            bad("num_assistant_tokens_schedule", self.gamma_schedule,
                f"use one of {', '.join(repr(m) for m in policy.K_SCHEDULES)} (how K adapts between rounds).")
        schedule = tuple(self.schedule) if isinstance(self.schedule, (tuple, list)) else None
        if (
            schedule is None
            or len(schedule) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in schedule)
            or sum(schedule) == 0
        ):
            bad("smc_schedule", self.schedule, "use (exact_rounds, smc_rounds), two integers >= 0, not both 0, e.g. (4, 1).")
        self.schedule = schedule
        if not 0.0 <= float(self.auto_threshold) <= 1.0:
            bad(
                "smc_auto_threshold",
                self.auto_threshold,
                "use a total-variation bound in [0, 1] (0: auto never runs SMC-SD; larger allows more SMC-SD rounds).",
            )
        if self.auto_costs is not None and not isinstance(self.auto_costs, planner.CostModel):
            bad("smc_auto_costs", self.auto_costs, "use an hf_smcsd.planner.CostModel, or None to measure the costs.")
        exact_rounds_possible = self.greedy or self.mode != "smc"
        if exact_rounds_possible and float(self.alpha) != 1.0:
            what = "do_sample=False" if self.greedy else f"smc_mode={self.mode!r}"
            bad(
                "smc_alpha",
                self.alpha,
                f"{what} runs exact rounds, which sample the target itself; a power target has no exact "
                "sampler. Use smc_alpha=1.0, or smc_mode='smc' for a power target.",
            )


@dataclass
class SMCResult:
    """Every particle of every prompt, with the diagnostics of the run."""

    tokens: torch.Tensor  # [B, N, longest particle], pad after each particle's end
    lengths: torch.Tensor  # [B, N] new tokens per particle
    log_weights: torch.Tensor  # [B, N] final log weights (float64)
    log_z: torch.Tensor  # [B] log of the estimated normalising constant (SMC-SD rounds)
    chosen: torch.Tensor  # [B, num_return_sequences] particles returned for each prompt
    ess: list[torch.Tensor]  # per prompt, the ESS after each round it ran
    num_resamples: torch.Tensor  # [B] resampling events per prompt
    num_dead_redos: torch.Tensor  # [B] SMC-SD rounds discarded (every weight zero) and redone exactly
    num_rounds: int = 0
    round_modes: list[str] = field(default_factory=list)  # per prompt, one letter per round: s, e, x (redone)
    num_smc_rounds: torch.Tensor | None = None  # [B]
    num_exact_rounds: torch.Tensor | None = None  # [B]
    smc_tokens: torch.Tensor | None = None  # [B] tokens generated in SMC-SD rounds (x0 included)
    exact_tokens: torch.Tensor | None = None  # [B] tokens committed by exact rounds
    accepted: list[torch.Tensor] = field(default_factory=list)  # per prompt, drafts accepted per exact round
    num_plain_rounds: torch.Tensor | None = None  # [B] plain rounds (auto's K = 0: one target step, no draft)
    plain_tokens: torch.Tensor | None = None  # [B] tokens of plain rounds
    round_plans: list[list[dict]] = field(default_factory=list)  # auto: per prompt, per round: mode, k, why
    gamma_reached: int | None = None  # adaptive K schedules: the K the next round would draft (None: constant)
    stats: dict = field(default_factory=dict)


# --- The run's state. ---


class Population:
    """Every particle of every prompt of a run, and the two models' caches of the live ones.

    Full arrays over every particle `[B * N]`, kept until the end: `tokens` (new tokens,
    `[B * N, columns]`, pad after each particle's end), `lengths`, `finished`, `log_weights`.
    Per prompt (group) `[B]`: `clock` (tokens generated), `log_z`, `rounds_run`, `identical`
    (all its particles hold the same tokens), `force_exact` (the next round redoes a dead
    SMC-SD round). The live map: `rows` (live row -> full row) and
    `groups` (live group -> prompt), `width` live rows per live group. Per live row:
    `last_token` (x_last, which the target has not seen) and `draft_pending` (the tokens
    the draft has not seen: [x0], then 2 wide, 1 after a first-round redo, one more after
    each plain round; one width for all rows). `stats` keeps the diagnostics, `stream` the
    settled tokens' consumer. For auto: `auto` (the planner's evidence and costs,
    `_AutoState`).

    `width` is N, or 1 while auto runs *narrow*: every live group identical (plain rounds,
    exact rounds of one chain), both caches and the live map hold each group's first
    particle only, and the full arrays' other rows of the live groups are stale until
    `widen_rows` (or the group's end, `drop_groups`, or the final pick) copies the first
    row into them. `can_narrow` where both runners can give rows back (`Runner.expand`).
    """

    def __init__(self, target: Runner, draft: Runner, prompts: torch.Tensor, settings: SMCSettings, stream=None):
        self.target, self.draft, self.prompts = target, draft, prompts
        self.n, self.budget, self.pad = settings.particles, settings.max_new_tokens, settings.pad_token_id
        batch, device = prompts.shape[0], prompts.device
        total = batch * self.n
        # Grows as the clocks advance (a huge max_new_tokens does not allocate up front) and
        # keeps room for one round past the furthest clock, so writes at any group's clock
        # never need clamping.
        columns = min(self.budget, _INITIAL_TOKENS) + settings.max_gamma + 1
        self.tokens = torch.full((total, columns), self.pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(total, dtype=torch.long, device=device)
        self.finished = torch.zeros(total, dtype=torch.bool, device=device)
        self.log_weights = torch.zeros(total, dtype=WEIGHT_DTYPE, device=device)
        self.clock = torch.zeros(batch, dtype=torch.long, device=device)
        self.log_z = torch.zeros(batch, dtype=WEIGHT_DTYPE, device=device)
        self.rows = torch.arange(total, device=device)
        self.groups = torch.arange(batch, device=device)
        self.rounds_run = torch.zeros(batch, dtype=torch.long, device=device)
        self.identical = torch.zeros(batch, dtype=torch.bool, device=device)
        self.force_exact = torch.zeros(batch, dtype=torch.bool, device=device)
        # The K of rounds whose groups all run exact: `gamma`, or adapted by a heuristic
        # schedule (policy.adapt_draft_tokens; float64, a round drafts its integer part).
        # On the device, read with the round's first synchronisation (`RoundShape.settle`).
        self.gamma_now = torch.tensor(float(settings.gamma), dtype=torch.float64, device=device)
        self.adapts_gamma = settings.adapts_gamma
        self.last_token = self.draft_pending = None  # set by `start`
        # Whether the target's / the draft's distributions held a NaN since the start (NaN or
        # infinite logits, or processors that removed every token). Kept on the device and
        # read with the round's two synchronisations: checking costs none of its own.
        self.invalid = torch.zeros(2, dtype=torch.bool, device=device)
        self.stats: _Stats | None = None
        self.stream, self.streamed = stream, 0
        self.auto: _AutoState | None = None
        self.can_narrow = settings.mode == "auto" and self.n > 1 and all(hasattr(r, "expand") for r in (target, draft))
        self.width = self.n
        # Auto prefills the draft when it first drafts (`prefill_draft`): a run that never
        # drafts, or drafts late, does not pay for the draft's prompt up front.
        self.draft_ready = settings.mode != "auto"
        self.attention_mask: torch.Tensor | None = None  # the prompts' (set by `start`)

    @property
    def narrow(self) -> bool:
        return self.width < self.n

    def note_distribution(self, model: int, log_probs: torch.Tensor) -> None:
        """Record whether `log_probs` of `model` (TARGET or DRAFT) hold a NaN (no sync)."""
        self.invalid[model] |= torch.isnan(log_probs).any()

    @property
    def batch(self) -> int:
        return self.clock.shape[0]

    @property
    def num_live_groups(self) -> int:
        return self.groups.shape[0]

    # Particles in and out.

    def drop_groups(self, ended: torch.Tensor) -> torch.Tensor:
        """Rows of the `ended` live groups leave both caches and the live map; returns the
        kept groups' indices in the old live numbering."""
        keep_groups = (~ended).nonzero().squeeze(1)
        keep = _group_rows(keep_groups, self.width)
        if self.narrow:  # the ended groups' stale rows take their first particle's tokens
            self.fill_stale_rows(self.rows[ended])
        for runner in self.runners:
            runner.keep(keep)
        self.rows, self.groups = self.rows[keep], self.groups[keep_groups]
        self.last_token, self.draft_pending = self.last_token[keep], self.draft_pending[keep]
        return keep_groups

    def copy_rows(self, plan: CopyPlan) -> None:
        """Apply row copies (live rows) to both caches and every particle's tokens, length,
        finished flag and pending tokens (not the weights: the callers reset them)."""
        for runner in self.runners:
            runner.reorder(plan)
        full = plan.offset(self.rows)  # in full-array coordinates
        for state in (self.tokens, self.lengths, self.finished):
            state[full.dest] = state[full.src]
        self.last_token, self.draft_pending = _copy_rows(self.last_token, plan), _copy_rows(self.draft_pending, plan)

    def grow_token_buffer(self, least: int, gamma: int) -> None:
        """Widen `tokens` to keep room for one round (`gamma + 1`) past the furthest clock,
        `budget - least` (`least`: the fewest tokens any live group has left); it at least
        doubles, up to the budget, so the copies stay rare."""
        if self.budget - least + gamma + 1 > self.tokens.shape[1]:
            grown = max(self.budget - least, min(self.budget, 2 * (self.tokens.shape[1] - gamma - 1))) + gamma + 1
            extra = self.tokens.new_full((self.tokens.shape[0], grown - self.tokens.shape[1]), self.pad)
            self.tokens = torch.cat([self.tokens, extra], dim=1)

    def narrow_rows(self) -> None:
        """Both caches and the live map keep one row per live group (every group identical:
        plain rounds, one-chain exact rounds); the other rows go stale (class docstring)."""
        first = torch.arange(self.num_live_groups, device=self.rows.device) * self.n
        for runner in self.runners:
            runner.keep(first)
        self.rows, self.last_token, self.draft_pending = self.rows[first], self.last_token[first], self.draft_pending[first]
        self.width = 1

    def widen_rows(self) -> None:
        """Every live group gets its N rows back (an N-chain round follows narrow ones): the
        stale rows take the first particle's tokens, both caches copy each row N times."""
        self.fill_stale_rows(self.rows)
        for runner in self.runners:
            runner.expand(self.n)
        self.rows = _group_rows(self.rows // self.n, self.n)
        self.last_token = self.last_token.repeat_interleave(self.n)
        self.draft_pending = self.draft_pending.repeat_interleave(self.n, dim=0)
        self.width = self.n

    def fill_stale_rows(self, first: torch.Tensor) -> None:
        """The full arrays' other rows of the groups whose first particles are `first` (full
        rows) become copies of it (narrow rounds wrote the first rows only)."""
        if self.n == 1 or first.numel() == 0:
            return
        others = (first.unsqueeze(1) + torch.arange(1, self.n, device=first.device)).flatten()
        source = first.repeat_interleave(self.n - 1)
        for state in (self.tokens, self.lengths, self.finished, self.log_weights):
            state[others] = state[source]

    def particle_ess(self, live_ess: torch.Tensor) -> torch.Tensor:
        """The ESS of each group's N particles from the ESS of its live rows: the same while
        they are N; narrow, the one live row stands for N copies of itself (ESS N)."""
        return live_ess * (self.n / self.width)

    @property
    def runners(self) -> tuple[Runner, ...]:
        """The runners whose caches hold the live rows (the draft's once prefilled)."""
        return (self.target, self.draft) if self.draft_ready else (self.target,)

    def prefill_draft(self) -> None:
        """The draft's prompt cache for the live groups, `width` rows each (auto defers it to
        the first drafted round: `draft_pending` holds every token since the prompt)."""
        if not self.draft_ready:
            self.draft.prefill(self.prompts[self.groups], self.attention_mask[self.groups], self.width)
            self.draft_ready = True

    def catch_up_draft(self) -> None:
        """Drafting resumes after plain rounds: the draft sees the tokens it missed in one
        pass (all pending tokens but the last, which the round's first draft step feeds)."""
        self.prefill_draft()
        if self.draft_pending.shape[1] > 2:  # (a round's first draft step feeds up to two)
            self.auto.clock.start("catch-up")  # model time, not the loop's own (_AutoState.observe_last_round)
            self.draft.extend(self.draft_pending[:, :-1])
            self.auto.clock.stop("catch-up")
            self.draft_pending = self.draft_pending[:, -1:]

    # Rounds in and out.

    def save(self) -> _Saved:
        """The live rows' state before a round, to discard the round if its population dies."""
        return _Saved(self.log_weights[self.rows].clone(), self.lengths[self.rows].clone(),
                      self.finished[self.rows].clone(), self.last_token, self.draft_pending,
                      self.identical[self.groups].clone())

    def commit_tokens(self, new_tokens, keep_mask, kept, stopped, active, increment, advance) -> None:
        """Append the kept new tokens `[rows, width]` at each group's clock, add the weight
        `increment` `[rows]`, mark the rows that `stopped` finished, and advance the clocks."""
        rows = self.rows
        self.log_weights[rows] += increment
        position = torch.arange(new_tokens.shape[1], device=new_tokens.device)
        columns = self.clock[rows // self.n].unsqueeze(1) + position
        written = self.tokens[rows.unsqueeze(1), columns]
        self.tokens[rows.unsqueeze(1), columns] = torch.where(keep_mask, new_tokens, written)
        self.lengths[rows] += kept
        self.finished[rows] |= active & stopped
        self.clock[self.groups] += advance

    def roll_back(self, dead: torch.Tensor, saved: _Saved, advance: torch.Tensor, width: int,
                  target_fed: int, draft_fed: int) -> None:
        """Discard the round just run for the `dead` live groups: both caches drop what the
        round fed, tokens, clocks, weights, lengths, flags and pending tokens return to
        `saved`, and the round is uncounted."""
        n, per_group, groups = self.n, self.width, self.groups
        dead_rows = dead.repeat_interleave(per_group)
        full = self.rows[dead_rows]
        self.target.rollback(torch.where(dead_rows, target_fed, 0))
        self.draft.rollback(torch.where(dead_rows, draft_fed, 0))
        self.draft_pending = _restore_pending(self.draft, dead_rows, saved.draft_pending, self.draft_pending)
        position = torch.arange(width, device=advance.device)
        columns = self.clock[full // n].unsqueeze(1) - advance.repeat_interleave(per_group)[dead_rows].unsqueeze(1) + position
        self.tokens[full.unsqueeze(1), columns] = self.pad
        self.clock[groups[dead]] -= advance[dead]
        self.log_weights[full] = saved.log_weights[dead_rows]
        self.lengths[full], self.finished[full] = saved.lengths[dead_rows], saved.finished[dead_rows]
        self.last_token = torch.where(dead_rows, saved.last_token, self.last_token)
        self.identical[groups[dead]] = saved.identical[dead]
        self.rounds_run[groups[dead]] -= 1

    # Sequences for processors and stopping criteria that read them.

    def history(self, index: torch.Tensor | None, new: Sequence[torch.Tensor]) -> torch.Tensor:
        """Padded prompt, tokens so far and `new` tokens of the live rows `index` (all rows
        if None), which must share one clock."""
        full = self.rows if index is None else self.rows[index]
        start = int(self.clock[full[0] // self.n])
        pieces = [self.prompts[full // self.n], self.tokens[full, :start]]
        pieces += [x if index is None else x[index] for x in new]
        return torch.cat(pieces, dim=1)

    def by_clock(self, reads_history: bool, compute: Callable, clocks: torch.Tensor | None = None) -> torch.Tensor:
        """`compute(index)` over the entries of `clocks` (default: every live row's group
        clock), one call per distinct clock (rows of different lengths cannot share one
        sequence tensor)."""
        if not reads_history:
            return compute(None)
        if clocks is None:
            clocks = self.clock[self.rows // self.n]
        values = torch.unique(clocks)
        if values.numel() == 1:
            return compute(None)
        out = None
        for value in values.tolist():
            index = (clocks == value).nonzero().squeeze(1)
            part = compute(index)
            if out is None:
                out = part.new_empty((clocks.shape[0],) + part.shape[1:])
            out[index] = part
        return out

    def distribution(self, fn: LogProbsFn, logits: torch.Tensor, new: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fn` (a `LogProbsFn`) over the live rows' `logits`, each row seeing its own history
        followed by `new`."""

        def compute(index):
            history = lambda: self.history(index, new)  # noqa: E731
            history.prompts = (self.rows if index is None else self.rows[index]) // self.n  # per-prompt state
            return fn(logits if index is None else logits[index], history)

        return self.by_clock(getattr(fn, "reads_history", True), compute)

    def group_distribution(self, fn: LogProbsFn, logits: torch.Tensor) -> torch.Tensor:
        """`fn` at the first row of each live group only (`logits` `[groups, w, V]`, nothing
        new beyond each row's tokens so far): plain rounds."""
        first = torch.arange(self.num_live_groups, device=logits.device) * self.width

        def compute(index):
            rows = first if index is None else first[index]
            history = lambda: self.history(rows, [])  # noqa: E731
            history.prompts = self.rows[rows] // self.n
            return fn(logits if index is None else logits[index], history)

        return self.by_clock(getattr(fn, "reads_history", True), compute, self.clock[self.groups])

    def stream_settled(self) -> None:
        """Hand the stream the new tokens every particle now shares (resampling and the final
        pick can no longer change them)."""
        if self.stream is not None:
            rows = self.rows if self.narrow and self.rows.numel() else slice(None)  # narrow: the live particle
            shared = _shared_prefix(self.tokens[rows, : self.budget], self.lengths[rows])
            if shared > self.streamed:
                self.stream(self.tokens[0, self.streamed : shared])
                self.streamed = shared


@dataclass
class _Saved:
    """The live rows' state before a round, to discard the round if its population dies."""

    log_weights: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    last_token: torch.Tensor
    draft_pending: torch.Tensor
    identical: torch.Tensor  # per live group


@dataclass
class Rules:
    """What the particles are sampled from and stopped by (fixed for the run)."""

    settings: SMCSettings
    target_log_probs: LogProbsFn
    draft_log_probs: LogProbsFn
    stop_ids: torch.Tensor
    stop_fn: StopFn | None

    def stops(self, population: Population, new_tokens: torch.Tensor) -> torch.Tensor:
        """`[rows, w]`: which of the live rows' new tokens complete a stop (EOS or a criterion)."""
        is_stop = torch.isin(new_tokens, self.stop_ids)
        if self.stop_fn is not None:
            width = new_tokens.shape[1]
            is_stop |= population.by_clock(
                True, lambda index: self.stop_fn(population.history(index, [new_tokens]), width)
            )
        return is_stop

    def group_stops(self, population: Population, tokens: torch.Tensor) -> torch.Tensor:
        """`[groups]`: whether each live group's newest token (`tokens`, already committed to
        its first row, within its clock) completes a stop (plain rounds)."""
        is_stop = torch.isin(tokens, self.stop_ids)
        if self.stop_fn is not None:
            first = torch.arange(population.num_live_groups, device=tokens.device) * population.width
            is_stop |= population.by_clock(
                True, lambda index: self.stop_fn(population.history(first if index is None else first[index], []), 1)[:, 0],
                population.clock[population.groups],
            )
        return is_stop


# --- What the phases of a round hand each other. ---


@dataclass
class RoundShape:
    """Per live group: whether it ended (`done`), runs exact (`exact`), must first collapse
    onto one particle (`collapse`), and its budget left (`remaining`); `summary` is what the
    loop reads on the host. After `settle`: those counts, and the round's K."""

    done: torch.Tensor
    exact: torch.Tensor
    collapse: torch.Tensor
    remaining: torch.Tensor
    summary: torch.Tensor
    plan: planner.Plan | None = None  # auto: the planner's choice (its K is read with `summary`)
    num_done: int = 0
    num_collapse: int = 0
    any_exact: bool = False
    num_diverse: int = 0  # live groups whose particles differ
    least: int = 0  # fewest tokens any live group has left
    most: int = 0  # most tokens any live group has left
    k: int = 0  # draft tokens per row this round (0: a plain round, auto only)
    chains: int = 0  # auto: rows per group the round drafts on (1 or N); 0: as the population runs
    with_bonus: bool = True  # whether a bonus token follows the k drafts
    invalid: list = field(default_factory=list)  # host copy of `Population.invalid`

    def settle(self, summary: list, gamma: int) -> None:
        """Take the host's copy of `summary`, and fix the round's K: the planner's for auto;
        else `gamma`, or where every live group runs exact the K of the schedule
        (`Population.gamma_now`: `gamma` unless a heuristic schedule adapted it; SMC-SD
        rounds keep the user's K, a quality knob for them). The last rounds draft only what
        some budget can keep, and skip the bonus where no budget reaches it."""
        self.num_done, self.num_collapse, num_exact, most, self.least, self.num_diverse, gamma_now, *rest = summary
        self.most = most
        if self.plan is not None:
            k, self.chains = rest.pop(0), rest.pop(0)  # auto: the planner's K and chains
        else:
            k = gamma_now if num_exact == self.done.shape[0] - self.num_done else gamma
        self.invalid = rest
        self.any_exact = num_exact > 0
        self.k = min(k, most)
        self.with_bonus = most > self.k

    def only(self, keep_groups: torch.Tensor) -> RoundShape:
        """The shape of the kept live groups (after `Population.drop_groups`)."""
        self.exact, self.collapse = self.exact[keep_groups], self.collapse[keep_groups]
        self.remaining = self.remaining[keep_groups]
        if self.plan is not None:  # a copy: the planner may reuse its plan
            self.plan = dataclasses.replace(self.plan, bias=self.plan.bias[keep_groups])
        return self

    def exact_rows(self, width: int) -> torch.Tensor:
        return self.exact.repeat_interleave(width)


@dataclass
class Drafts:
    tokens: torch.Tensor  # [rows, k]
    log_q: torch.Tensor  # [rows, k]
    probs: list[torch.Tensor]  # exact rows only: q at each depth, k x [exact rows, V]
    fed: int  # positions the draft was fed this round
    log_dists: torch.Tensor | None = None  # auto: every row's processed log q, [rows, k, V]


@dataclass
class Verified:
    target_lp: torch.Tensor  # [rows, fed, V] processed target log-probs
    log_p: torch.Tensor  # [rows, k] of the drafted tokens
    fed: int  # positions the target was fed this round


@dataclass
class Block:
    """The round's new tokens per live row before stops, `[rows, width]`; the first `valid`
    of each row count (what its budget keeps, or what the exact walk committed)."""

    tokens: torch.Tensor
    valid: torch.Tensor
    bonus_log_z: torch.Tensor | None  # SMC-SD bonus normaliser (0 at alpha = 1); None without bonus
    walk: verify.WalkResult | None = None  # the exact groups' accept walk
    exact_groups: torch.Tensor | None = None  # live groups it ran for


# --- The loop. ---


@torch.no_grad()
def smc_sample(
    target: Runner,
    draft: Runner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: SMCSettings,
    target_log_probs: LogProbsFn | None = None,
    draft_log_probs: LogProbsFn | None = None,
    stop_fn: StopFn | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
) -> SMCResult:
    """Run SMC-SD (or its exact mode, or a mix) on a left-padded batch of prompts; see the
    module docstring for the layout.

    `target_log_probs` / `draft_log_probs` (see `LogProbsFn`) give the distributions the
    target and the draft sample from (temperature and, for the target, its logits
    processors); they default to temperature-only softmax. `stop_fn` adds stopping
    criteria to the EOS ids. `stream` (batch of one prompt only) receives, as soon as they
    are settled, the new tokens that every particle shares: resampling and the final pick
    can no longer change them. The caller streams the rest of the returned particle.
    """
    settings.validate()
    if stream is not None and input_ids.shape[0] != 1:
        raise ValueError(f"Streaming supports one prompt at a time; got a batch of {input_ids.shape[0]}.")
    rules = Rules(
        settings,
        target_log_probs or _temperature_only(settings.temperature),
        draft_log_probs or _temperature_only(settings.proposal_temperature),
        torch.tensor(list(settings.eos_token_ids), dtype=torch.long, device=input_ids.device),
        stop_fn,
    )
    population = Population(target, draft, input_ids, settings, stream)
    start(population, rules, attention_mask)
    auto = population.auto = _AutoState(population, settings) if settings.mode == "auto" else None

    while True:
        # Choose the round's shape: which groups end, each group's mode (auto: the round
        # planner, which also plans K, on the device), then, from one host synchronisation,
        # the round's K.
        if auto is not None:
            auto.clock.start("round")
        shape = choose_round_shape(population, settings)
        shape.settle(shape.summary.tolist(), settings.gamma)  # host synchronisation 1 of 2
        check_distributions(shape.invalid)  # NaN from the last round (or the start): stop, before the pick
        if auto is not None:
            auto.observe_last_round()  # its spans are complete: the synchronisation above passed them
            auto.left = shape.most
        if shape.num_done == population.num_live_groups:
            break
        if shape.num_done:
            shape = shape.only(population.drop_groups(shape.done))
        if shape.num_collapse:  # SMC-SD -> exact (or plain): one particle drawn by weight becomes the whole group
            collapse_groups(population, shape.collapse)
            continue  # the chosen particle may have finished: re-check which groups end
        if auto is not None:
            arrange_rows(population, shape)
        if shape.k == 0:  # auto's plain rounds: target sampling steps, no draft pass, until a probe is due
            steps = auto.burst_length(shape.least, shape.most)
            population.grow_token_buffer(shape.least, max(settings.max_gamma, steps))
            plain_burst(population, rules, shape, steps)
            population.stream_settled()
            continue
        population.grow_token_buffer(shape.least, settings.max_gamma)
        if auto is not None:
            auto.drafting(shape.k)
        saved = population.save()

        drafts = draft_block(population, rules, shape)
        verified = verify_block(population, rules, shape, drafts)
        block = smc_operator(population, shape, drafts, verified, settings.alpha)
        if shape.any_exact:
            exact_operator(population, shape, drafts, verified, block, settings)
        advance = finish_and_weigh(population, rules, shape, drafts, verified, block)
        commit_caches(population, shape, drafts, verified, block, saved)

        # Dead populations and resampling: one host synchronisation decides both.
        dead, needs, group_log_weights = check_populations(population, shape, settings)
        any_dead, any_needs, *invalid = torch.cat(  # host synchronisation 2 of 2
            [torch.stack([dead.any(), needs.any()]), population.invalid]).tolist()
        check_distributions(invalid)  # before NaN weights reach the redo or the resampling
        if any_dead:
            redo_dead_populations(population, dead, saved, advance, block, drafts, verified)
        if any_needs:
            resample_populations(population, needs, group_log_weights, settings)
        if auto is not None:
            auto.round_done(population.rows.shape[0], shape.k, verified.fed)
        population.stream_settled()

    if auto is not None:
        auto.remember()
    return final_pick(population, settings)


_COST_CACHE: dict[tuple, planner.CostModel] = {}  # measured costs per (models, dtype, device, rows, K)
_COST_CACHE_SIZE = 64
# What earlier runs measured of a pair's per-depth acceptance (their exact walks' estimate,
# the mean over their prompts), per (target, draft, temperatures): where it
# could not make drafting pay (`planner.drafting_can_pay`), the next run skips its first
# probe, so a process that generates again and again with one pair does not pay a probe
# per call for a draft that does not pay (the probe schedule still tries it later in long
# outputs). The plans themselves keep the usual prior: the memory decides only the first
# probe. Entries are keyed by
# the models' `id` and hold weak references to them: a model freed and another allocated
# at its address does not inherit the entry (it did, in a benchmark that loads one pair
# after another: the committed pair took the weak pair's acceptance and decoded plainly).
# Not used with fixed costs (`smc_auto_costs`: reproducible plans).
_ACCEPTANCE_MEMORY: dict[tuple, tuple[weakref.ref, weakref.ref, float]] = {}
_ACCEPTANCE_MEMORY_SIZE = 64


def _memory_key(target_model, draft_model, settings: SMCSettings) -> tuple | None:
    """The `_ACCEPTANCE_MEMORY` key of a pair at the run's temperatures (None: a runner
    without a model to name)."""
    if target_model is None or draft_model is None:
        return None
    return id(target_model), id(draft_model), settings.temperature, settings.proposal_temperature


def remembered_acceptance(target_model, draft_model, settings: SMCSettings) -> float | None:
    """What earlier calls measured of this pair's per-depth acceptance (None: nothing, or
    the entry was left by other models at the same addresses)."""
    entry = _ACCEPTANCE_MEMORY.get(_memory_key(target_model, draft_model, settings))
    if entry is None or entry[0]() is not target_model or entry[1]() is not draft_model:
        return None
    return entry[2]


def remember_acceptance(target_model, draft_model, settings: SMCSettings, value: float) -> None:
    key = _memory_key(target_model, draft_model, settings)
    if key is None:
        return
    if len(_ACCEPTANCE_MEMORY) >= _ACCEPTANCE_MEMORY_SIZE and key not in _ACCEPTANCE_MEMORY:
        _ACCEPTANCE_MEMORY.pop(next(iter(_ACCEPTANCE_MEMORY)))
    _ACCEPTANCE_MEMORY[key] = (weakref.ref(target_model), weakref.ref(draft_model), value)


# Plain rounds one plan may run in a row (`plain_burst`), unless a probe is due sooner: the
# loop's own work (planning, diagnostics, cost observations) is paid once per burst, not per
# token; the cap keeps the measured costs fresh.
MAX_BURST = 32


def _cost_key(runner) -> tuple | None:
    """What a runner's costs depend on: backend, model shape, dtype and device (not the
    weights). None when the runner has no transformers model to describe."""
    model = getattr(runner, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return None
    shape = tuple(getattr(config, name, None) for name in (
        "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
        "num_attention_heads", "num_key_value_heads"))
    parameter = next(model.parameters(), None)
    where = (str(parameter.dtype), str(parameter.device)) if parameter is not None else ()
    return (type(runner).__name__, shape) + where


class _AutoState:
    """The auto mode's side of the loop: the evidence of earlier rounds per group, the
    measured costs, and the planner's calls (hf_smcsd.planner)."""

    def __init__(self, population: Population, settings: SMCSettings):
        target, draft, x0 = population.target, population.draft, population.last_token
        batch, device = population.batch, x0.device
        self.population = population
        self.n, self.gamma, self.bound = settings.particles, settings.gamma, float(settings.auto_threshold)
        self.greedy = settings.greedy
        nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        self.rate = nan.clone()  # per-token SIR bias bound (planner.update_rate)
        self.single_acceptance = nan.clone()  # running mean of 1 - TV(p_t, q_t) at drafted positions
        self.positions = torch.zeros(batch, dtype=torch.float64, device=device)  # drafted positions measured, per chain
        # Per chain count (row 0: one chain, row 1: N chains): drafts accepted by exact walks,
        # and exact walks that ended on a rejection (N chains accept at least as often as one).
        self.accepted = torch.zeros(2, batch, dtype=torch.float64, device=device)
        self.rejected = torch.zeros(2, batch, dtype=torch.float64, device=device)
        self.clock = PhaseClock(device)
        self.probes = planner.ProbeSchedule(wait=planner.FIRST_PROBE, factor=planner.PROBE_FACTOR)
        self.last_round: tuple[int, int, int, int] | None = None  # (rows, K, verify width, rounds) just run
        self.probing = False  # the round planned last is a probe (the schedule forced a draft)
        self.probe_seconds = self.plain_seconds = 0.0  # predicted seconds of a probe / a plain round
        self.left: int | None = None  # host copy: the most tokens a live group has left (`RoundShape.most`)
        self.measure = settings.auto_costs is None
        self.models = None  # (target, draft, settings) for `_ACCEPTANCE_MEMORY`
        self.remembered = 1.0  # the acceptance the first probe is decided by (1: any that could pay)
        if not self.measure:
            self.costs = settings.auto_costs
            return
        models = (getattr(target, "model", None), getattr(draft, "model", None))
        if None not in models:
            self.models = models + (settings,)
            remembered = remembered_acceptance(*self.models)
            self.remembered = 1.0 if remembered is None else remembered
        keys = (_cost_key(target), _cost_key(draft))
        key = None if None in keys else keys + (x0.shape[0], self.gamma)
        self.costs = _COST_CACHE.get(key) if key is not None else None
        if self.costs is None:
            population.prefill_draft()
            self.costs = self._calibrate(target, draft, x0)
            if key is not None:
                if len(_COST_CACHE) >= _COST_CACHE_SIZE:
                    _COST_CACHE.pop(next(iter(_COST_CACHE)))
                _COST_CACHE[key] = self.costs

    def _calibrate(self, target: Runner, draft: Runner, x0: torch.Tensor) -> planner.CostModel:
        """A short calibration before the first round (then cached): one step of each model
        over every row, fed and rolled back: what a plain round and a draft step cost. The
        rounds measure the rest (the verify pass at other widths), each observed at the
        start of the round after it, so the second round is planned from these two. (It
        used to time both models at two widths, twice each: four forwards more, a tenth of
        a 48-token output the first time a shape is met.)"""
        costs = planner.CostModel()
        rows = x0.shape[0]
        for runner, cost in ((target, costs.verify), (draft, costs.draft_step)):
            self.clock.synchronize()
            start = time.perf_counter()
            runner.extend(x0.unsqueeze(1))
            self.clock.synchronize()
            cost.observe(rows, time.perf_counter() - start)
            runner.rollback(torch.ones(rows, dtype=torch.long, device=x0.device))
        return costs

    def plan(self, group_done: torch.Tensor) -> planner.Plan:
        """The planner's choice for the live groups (`group_done`: those ending now), on the
        device: the loop reads its K with the round's first host synchronisation."""
        p = self.population
        groups = p.groups
        rows = groups.shape[0] * self.n  # an N-chain round's
        plain_rows = groups.shape[0] if p.can_narrow else rows  # a plain or one-chain round's
        known = self.costs.verify.known
        self.probe_seconds = self.costs.round_seconds(plain_rows, self.gamma) if known else 0.0  # one chain where it can
        self.plain_seconds = self.costs.round_seconds(plain_rows, 0) if known else 0.0
        if self.probes.first and not planner.drafting_can_pay(self.costs, plain_rows, plain_rows, self.gamma,
                                                               self.remembered):
            # No acceptance could pay by the (cached) costs, or not the one earlier calls
            # measured of this pair: no first probe; the schedule still probes later, so
            # costs measured wrongly (a loaded machine) get measured again.
            self.probes.first = False
        self.probing = self.probes.must_draft(self.probe_seconds, self.left)
        single = self.single_acceptance[groups]
        accept = planner.acceptance(self.accepted[1, groups], self.rejected[1, groups], single)
        accept_one = planner.acceptance(self.accepted[0, groups], self.rejected[0, groups], single)
        rate = planner.usable_rate(self.rate[groups], self.positions[groups])
        return planner.plan_round(rate, accept, self.costs, rows, self.gamma, self.bound,
                                  allow_plain=not self.probing, allow_smc=not self.greedy, live=~group_done,
                                  plain_rows=plain_rows, single_accept=accept_one if p.can_narrow else None,
                                  particles=self.n)

    def drafting(self, k: int) -> None:
        """The planned round drafts `k` tokens (it runs: no collapse came first)."""
        self.probes.after(k, self.probing)

    def burst_length(self, least: int, most: int) -> int:
        """Plain rounds the loop runs in one burst: until a probe is due (unless it would come
        too late to pay: `planner.LATE_PROBE`), at most `MAX_BURST` and at most `least` (the
        fewest tokens any live group has left; `most`: the most)."""
        if self.measure and "plain" not in self.costs.overhead:
            return 1  # measure a plain round's own time first (planner.CostModel.round_seconds)
        before = self.probes.plain_rounds_before_probe(self.probe_seconds, self.plain_seconds, most)
        return max(1, min(least, MAX_BURST, before or MAX_BURST))

    def plain_done(self, rows: int, steps: int) -> None:
        """A burst of `steps` plain rounds over `rows` target rows ran."""
        self.probes.after(0, False, self.plain_seconds, rounds=steps)
        self.left -= steps
        self.clock.stop("round")
        self.last_round = (rows, 0, 1, steps)

    def observe_positions(self, groups, target_lp, draft_lp, counted, width: int) -> None:
        """Evidence of a round's drafted positions, `width` rows per group (N, or one chain).
        The bias bound is SMC-SD's at N particles however many chains drafted: it needs only
        both models' distributions at each position."""
        bias, tv = planner.position_measures(target_lp, draft_lp, self.n)
        self.rate[groups] = planner.update_rate(self.rate[groups], planner.group_means(bias, counted, width))
        self.positions[groups] += counted.view(-1, width * counted.shape[1]).sum(dim=1) / width
        observed = 1.0 - planner.group_means(tv, counted, width)
        self.single_acceptance[groups] = planner.update_mean(self.single_acceptance[groups], observed)

    def observe_walk(self, groups, accepted, tried, chains: int) -> None:
        which = 1 if chains == self.n else 0
        self.accepted[which, groups] += accepted.double()
        self.rejected[which, groups] += (accepted < tried).double()

    def round_done(self, rows: int, k: int, verify_width: int) -> None:
        self.clock.stop("round")
        self.last_round = (rows, k, verify_width, 1)

    def remember(self) -> None:
        """At the end of a run: the per-depth acceptance of its exact walks (the planner's
        own estimate, `planner.acceptance`, mean over the prompts that ran one) becomes the
        pair's remembered one (a run without exact rounds leaves it; one host read per run)."""
        walked = (self.accepted + self.rejected).sum(dim=0) > 0
        if self.models is None or not bool(walked.any()):
            return
        estimate = planner.acceptance(self.accepted.sum(dim=0), self.rejected.sum(dim=0), self.single_acceptance)
        measured = estimate[walked]
        remember_acceptance(*self.models, float(measured.mean()))

    def observe_last_round(self) -> None:
        """Feed the spans of the round before into the cost model (after a synchronisation)."""
        spans = self.clock.collect()
        if self.last_round is None or not self.measure or "round" not in spans:
            return
        rows, k, width, rounds = self.last_round  # a plain burst: `rounds` of the same shape
        self.last_round = None
        # The draft's catch-up after plain rounds is model time too (its length varies): not overhead.
        model_seconds = spans.get("verify", 0.0) + spans.get("draft", 0.0) + spans.get("catch-up", 0.0)
        if "verify" in spans:
            self.costs.verify.observe(rows * width, spans["verify"] / rounds)
        if k > 0 and "draft" in spans:
            self.costs.draft_step.observe(rows, spans["draft"] / k)
        self.costs.observe_overhead("spec" if k > 0 else "plain", (spans["round"] - model_seconds) / rounds)


# --- The phases, in the loop's order. ---


def start(population: Population, rules: Rules, attention_mask: torch.Tensor | None) -> None:
    """Start: prefill once per model, expand to N rows, sample x0 from the target (one x0
    per group where the group starts exact). Auto, where it can, starts narrow (one row per
    group: its first round is exact, so x0 is shared). Sets every particle's first token,
    `log_z`, `finished`, the clocks, `identical`, `last_token`, `draft_pending` and `stats`."""
    p, settings = population, rules.settings
    prompts, batch = p.prompts, p.batch
    if attention_mask is None:
        attention_mask = torch.ones_like(prompts)
    exact_first = policy.exact_rounds(settings.mode, p.rounds_run, settings.schedule)
    exact_first |= settings.greedy
    if p.can_narrow:  # (auto: every group's first round is exact)
        p.width, p.rows = 1, p.rows[:: p.n]
    n = p.width
    p.attention_mask = attention_mask
    first_logits = p.target.prefill(prompts, attention_mask, n).unsqueeze(1)
    if p.draft_ready:  # (auto: at its first drafted round)
        p.draft.prefill(prompts, attention_mask, n)
    first_lp = p.distribution(rules.target_log_probs, first_logits.repeat_interleave(n, dim=0), [])[:, 0]
    p.note_distribution(TARGET, first_lp)
    if settings.greedy:
        first_lp = verify.one_hot(first_lp).log()
    first_dist, first_log_z = power_log_probs(first_lp, float(settings.alpha))
    x0 = sample(first_dist)  # each particle draws its own x0 ...
    shared_x0 = x0.view(batch, n)[:, :1].expand(batch, n).flatten()
    x0 = torch.where(exact_first.repeat_interleave(n), shared_x0, x0)  # ... except where the group starts exact
    p.identical = exact_first.clone()
    p.log_z += first_log_z.view(batch, n)[:, 0].to(WEIGHT_DTYPE)  # p^alpha / Z sampled: Z is the group's
    p.finished[p.rows] |= rules.stops(p, x0.unsqueeze(1))[:, 0]
    p.tokens[p.rows, 0] = x0
    if p.narrow:
        p.fill_stale_rows(p.rows)
    p.lengths[:] = 1
    p.clock[:] = 1
    p.stats = _Stats(batch, exact_first)
    p.stream_settled()
    p.last_token = x0  # x_last: the target has not seen it yet
    p.draft_pending = x0.unsqueeze(1)


def arrange_rows(population: Population, shape: RoundShape) -> None:
    """Auto: the rows the planned round runs on. Plain and one-chain rounds run narrow (one
    row per group, where both runners can give rows back; every live group is identical:
    the shape collapsed the others), N-chain rounds on N rows per group. A drafted round
    first lets the draft catch up on the tokens plain rounds gave it, on as few rows as
    the caches hold."""
    p = population
    narrow = p.can_narrow and (shape.k == 0 or shape.chains == 1)
    if narrow and not p.narrow:
        p.narrow_rows()
    if shape.k > 0:
        p.catch_up_draft()
    if p.narrow and not narrow:
        p.widen_rows()


def choose_round_shape(population: Population, settings: SMCSettings) -> RoundShape:
    """Choose the round's shape, on the device: which live groups end (all their particles
    finished or their budget spent) and each group's mode, fixed before this round's drafts
    are drawn (policy.py; a dead round's redo and greedy decoding force exact). For auto the
    round planner (planner.py, docs/algorithm.md "Planning a round") fixes each group's mode
    and plans K from earlier rounds only, on the device (its K joins `summary`); K = 0, a
    plain round, collapses every diverse group (its weights would not change: drawing its
    particle now loses nothing). The loop reads `summary` on the host and
    `RoundShape.settle` fixes K. Changes nothing."""
    p, budget = population, population.budget
    groups = p.groups
    done = p.finished[p.rows].view(-1, p.width).all(dim=1) | (p.clock[groups] >= budget)
    plan = None
    if p.auto is not None:
        plan = p.auto.plan(done)
        exact = plan.exact | ((p.force_exact[groups] | settings.greedy) & (plan.k > 0))
        wants_one_particle = exact | (plan.k == 0)
    else:
        exact = policy.exact_rounds(settings.mode, p.rounds_run[groups], settings.schedule)
        exact |= p.force_exact[groups] | settings.greedy
        wants_one_particle = exact
    collapse = wants_one_particle & ~p.identical[groups] & ~done
    remaining = budget - p.clock[groups]
    left = torch.where(done, -1, remaining)
    counts = [done.sum(), collapse.sum(), (exact & ~done).sum(), left.max(), torch.where(done, budget, remaining).min(),
              (~p.identical[groups] & ~done).sum(), p.gamma_now.long()]
    if plan is not None:
        counts += [plan.k, plan.chains]
    summary = torch.cat([torch.stack(counts), p.invalid.long()])
    return RoundShape(done, exact, collapse, remaining, summary, plan)


def collapse_groups(population: Population, collapse: torch.Tensor) -> None:
    """SMC-SD -> exact, per `collapse` live group: one particle drawn by its normalised
    weights (as the final pick draws) is copied into every row (both caches, every array);
    `log_z` takes the group's mean weight, as a resample would; the weights restart at 0;
    the group becomes `identical`."""
    p, n = population, population.width  # (N: a diverse group never runs narrow)
    chosen_groups = collapse.nonzero().squeeze(1)
    group_lw = p.log_weights[p.rows].view(-1, n)[chosen_groups]
    p.log_z[p.groups[chosen_groups]] += log_mean_weight(group_lw)
    winner = torch.multinomial(normalized_weights(group_lw).float(), 1).squeeze(1)
    plan = _winner_plan(_group_rows(chosen_groups, n).view(-1, n)[:, 0] + winner, n)
    p.log_weights[p.rows[_group_rows(chosen_groups, n)]] = 0.0
    p.copy_rows(plan)
    p.identical[p.groups[collapse]] = True


def plain_burst(population: Population, rules: Rules, shape: RoundShape, steps: int) -> None:
    """Auto's plain rounds (K = 0): up to `steps` target sampling steps in a row, no draft
    pass (lossless), in a tight loop like transformers' own sampling loop: per step one
    target forward, the processors, one draw, the stop check. Every live group is identical
    (the shape collapsed the others) and none of its rows has finished (it would be done),
    so one row per group is drawn for; where both runners can give rows back, the loop
    first narrowed the caches to one row per group (`Population.narrow_rows`), until an
    N-chain round follows (`Population.widen_rows`). The burst ends early after a step where some group stops
    (read on the host each step, as transformers does, only when a stop is possible).
    The loop's own work is paid once per burst: the tokens go to each group's first row
    as they are drawn (processors and stops read them there) and to the others at the end,
    with the diagnostics (one plain round per step) and the cost observations. Commits the
    tokens (`tokens`, `lengths`, `finished`, `clock`), counts the rounds (`rounds_run`,
    `stats`), sets `last_token`; the draft sees the new tokens when drafting resumes
    (`draft_pending` grows by them); weights do not change (alpha = 1 in auto)."""
    p, n, auto, settings = population, population.width, population.auto, rules.settings
    groups, live, device = p.groups, p.num_live_groups, p.rows.device
    first = p.rows[::n]  # each group's first particle (full rows)
    start_clock = p.clock[groups].clone()
    can_stop = rules.stop_ids.numel() > 0 or rules.stop_fn is not None
    stopped = None
    token = p.last_token[::n]
    if p.stream is not None:
        p.stream_settled()  # a collapse may have settled tokens; the burst streams its own as drawn
    for step in range(steps):
        auto.clock.start("verify")
        logits = p.target.extend((token if n == 1 else token.repeat_interleave(n)).unsqueeze(1))
        auto.clock.stop("verify")
        lp = p.group_distribution(rules.target_log_probs, logits if n == 1 else logits[::n])[:, 0]
        p.note_distribution(TARGET, lp)
        if settings.greedy:
            lp = verify.one_hot(lp).log()
        token = sample(lp)
        p.tokens[first, start_clock + step] = token
        p.clock[groups] += 1  # processors and stopping criteria read the tokens up to the clock
        if p.stream is not None:  # one prompt, identical particles: every drawn token is settled
            p.stream(token)
            p.streamed += 1
        if can_stop:
            stopped = rules.group_stops(p, token)
            if bool(stopped.any()):  # host read, as transformers' loop reads its finished rows
                break
    ran = step + 1
    new = p.tokens[first.unsqueeze(1), start_clock.unsqueeze(1) + torch.arange(ran, device=device)]
    new = new.repeat_interleave(n, dim=0)  # [rows, ran]: every particle of a group the same
    rows = p.rows.shape[0]
    p.clock[groups] = start_clock  # commit_tokens advances the clocks
    every = torch.ones(rows, dtype=torch.bool, device=device)
    stopped = torch.zeros_like(every) if stopped is None else stopped.repeat_interleave(n)
    p.commit_tokens(new, every.unsqueeze(1).expand(rows, ran), torch.full((rows,), ran, device=device), stopped, every,
                    0.0, torch.full((live,), ran, device=device))
    p.rounds_run[groups] += ran
    p.stats.round(groups, torch.zeros_like(shape.exact), torch.ones(live, dtype=torch.long, device=device), None,
                  plain=True, plan=(0, shape.plan.bias, shape.plan.tokens_per_s, n), rounds=ran)
    p.stats.ess.append((groups.repeat(ran), p.particle_ess(effective_sample_size(p.log_weights[p.rows].view(-1, n))).repeat(ran)))
    p.last_token = new[:, -1]
    p.draft_pending = torch.cat([p.draft_pending, new], dim=1)
    auto.plain_done(rows, ran)


def draft_block(population: Population, rules: Rules, shape: RoundShape) -> Drafts:
    """Draft: k tokens per live row, autoregressively from the draft, recording log q (and,
    for exact groups, q itself: `[exact rows, k, V]`, kept only until the walk). Feeds the
    draft cache its pending tokens and k - 1 drafts."""
    p, k = population, shape.k
    exact_rows = shape.exact_rows(p.width)
    drafted, draft_lq, draft_probs, dists = [], [], [], []
    if p.auto is not None:
        p.auto.clock.start("draft")
    logits = p.draft.extend(p.draft_pending)[:, -1:]
    for step in range(k):
        if step:
            logits = p.draft.extend(drafted[-1].unsqueeze(1))
        lq = p.distribution(rules.draft_log_probs, logits, [d.unsqueeze(1) for d in drafted])[:, 0]
        p.note_distribution(DRAFT, lq)
        token = sample(lq)
        drafted.append(token)
        draft_lq.append(gather(lq, token))
        if shape.any_exact:
            draft_probs.append(lq[exact_rows].exp())
        if p.auto is not None:
            dists.append(lq)
    fed = p.draft_pending.shape[1] + k - 1
    log_dists = None
    if p.auto is not None:
        p.auto.clock.stop("draft")
        log_dists = torch.stack(dists, dim=1)
    return Drafts(torch.stack(drafted, dim=1), torch.stack(draft_lq, dim=1), draft_probs, fed, log_dists)


def verify_block(population: Population, rules: Rules, shape: RoundShape, drafts: Drafts) -> Verified:
    """Verify: one target forward over [x_last, d_1 .. d_k] (d_k only if a bonus follows),
    giving the processed target log-probs at every fed position. Feeds the target cache;
    for auto, records the evidence of the round's drafted positions (`_AutoState`)."""
    p, k = population, shape.k
    fed = drafts.tokens if shape.with_bonus else drafts.tokens[:, : k - 1]
    if p.auto is not None:
        p.auto.clock.start("verify")
    logits = p.target.extend(torch.cat([p.last_token.unsqueeze(1), fed], dim=1))
    if p.auto is not None:
        p.auto.clock.stop("verify")
    target_lp = p.distribution(rules.target_log_probs, logits, [fed])
    p.note_distribution(TARGET, target_lp)
    log_p = gather(target_lp[:, :k], drafts.tokens)
    if p.auto is not None:  # evidence for later rounds: divergences at every drafted position
        row_remaining = shape.remaining.repeat_interleave(p.width)
        active = ~p.finished[p.rows]
        counted = active.unsqueeze(1) & (torch.arange(k, device=log_p.device) < row_remaining.unsqueeze(1))
        p.auto.observe_positions(p.groups, target_lp[:, :k], drafts.log_dists, counted, p.width)
    return Verified(target_lp, log_p, fed.shape[1] + 1)


def smc_operator(population: Population, shape: RoundShape, drafts: Drafts, verified: Verified, alpha: float) -> Block:
    """SMC-SD operator: every particle keeps its drafts and, if the round has one, a bonus
    drawn from the (power) target. Returns the block for every live row (exact groups
    overwrite theirs). Changes nothing in the population."""
    if shape.with_bonus:
        bonus_dist, bonus_log_z = power_log_probs(verified.target_lp[:, shape.k], float(alpha))
        bonus = sample(bonus_dist)
        new_tokens = torch.cat([drafts.tokens, bonus.unsqueeze(1)], dim=1)
    else:
        new_tokens, bonus_log_z = drafts.tokens.clone(), None  # exact groups overwrite their rows
    valid = shape.remaining.repeat_interleave(population.width).clamp(max=new_tokens.shape[1])
    return Block(new_tokens, valid, bonus_log_z)


def exact_operator(population: Population, shape: RoundShape, drafts: Drafts, verified: Verified,
                   block: Block, settings: SMCSettings) -> None:
    """Exact operator: the accept walk of every exact group (verify.accept_walk); every row
    of such a group takes the walk's committed tokens. Each group's rows are its chains (N, or
    one where auto runs narrow). Changes `block` (those rows, and its `walk`), nothing in the
    population."""
    n, k = population.width, shape.k
    exact_groups = shape.exact.nonzero().squeeze(1)
    num_groups = exact_groups.shape[0]
    rows = _group_rows(exact_groups, n)
    target_lp = verified.target_lp[shape.exact_rows(n)]
    vocab = target_lp.shape[-1]
    target_probs = verify.one_hot(target_lp) if settings.greedy else target_lp.exp()
    u_accept, u_final = verify.draw_uniforms(num_groups, k, n, device=drafts.tokens.device)
    walk = verify.accept_walk(
        drafts.tokens[rows].view(num_groups, n, k),
        torch.stack(drafts.probs, dim=1).view(num_groups, n, k, vocab),
        target_probs.view(num_groups, n, -1, vocab),
        shape.remaining[exact_groups],
        u_accept,
        u_final,
        pad=population.pad,
    )
    block.tokens[rows] = walk.tokens[:, : block.tokens.shape[1]].repeat_interleave(n, dim=0)
    block.valid[rows] = walk.num_committed.repeat_interleave(n)
    block.walk, block.exact_groups = walk, exact_groups
    if population.adapts_gamma:  # the next rounds' K (read with the next round's shape)
        drafted = shape.remaining[exact_groups].clamp(max=k)
        population.gamma_now = policy.adapt_draft_tokens(population.gamma_now, walk.num_accepted, drafted,
                                                         settings.max_gamma)
    if population.auto is not None:
        population.auto.observe_walk(population.groups[exact_groups], walk.num_accepted,
                                     shape.remaining[exact_groups].clamp(max=k), n)


def finish_and_weigh(population: Population, rules: Rules, shape: RoundShape, drafts: Drafts,
                     verified: Verified, block: Block) -> torch.Tensor:
    """Finish and weigh: each live row keeps its block up to its first stop (and within the
    budget); SMC-SD rows add the log weight of what they keep. Commits the tokens
    (`tokens`, `lengths`, `finished`, `log_weights`, `clock`), counts the round
    (`identical`, `rounds_run`, `force_exact`, `stats`). Returns each live group's advance."""
    p, n, k, alpha = population, population.width, shape.k, float(rules.settings.alpha)
    width = block.tokens.shape[1]
    position = torch.arange(width, device=block.tokens.device)
    active = ~p.finished[p.rows]
    is_stop = rules.stops(p, block.tokens) & (position < block.valid.unsqueeze(1))
    stopped, kept = _first_stops(is_stop)
    kept = torch.where(active, torch.minimum(kept, block.valid), 0)
    keep_mask = position < kept.unsqueeze(1)
    increments = verify.smc_increments(verified.log_p, drafts.log_q, alpha)
    increment = torch.where(keep_mask[:, :k], increments, 0.0).sum(dim=1)
    if shape.with_bonus:
        increment = increment + torch.where(keep_mask[:, k], block.bonus_log_z.to(WEIGHT_DTYPE), 0.0)
    advance = block.valid.view(p.num_live_groups, n)[:, 0]
    increment = torch.where(shape.exact_rows(n), 0.0, increment)
    p.commit_tokens(block.tokens, keep_mask, kept, stopped, active, increment, advance)
    plan = None if shape.plan is None else (k, shape.plan.bias, shape.plan.tokens_per_s, n)
    p.stats.round(p.groups, shape.exact, advance, block.walk.num_accepted if shape.any_exact else None, plan=plan)
    p.identical[p.groups] = shape.exact
    p.rounds_run[p.groups] += 1
    p.force_exact[p.groups[shape.exact]] = False  # a redo, if one was due, has run
    return advance


def commit_caches(population: Population, shape: RoundShape, drafts: Drafts, verified: Verified,
                  block: Block, saved: _Saved) -> None:
    """Commit caches: SMC-SD rows keep everything they were fed; exact groups take the
    winner's rows, then both caches roll back to what the committed tokens justify
    (docs/algorithm.md, Exact mode, step 5). Sets `last_token` and `draft_pending`."""
    p, k = population, shape.k
    if shape.with_bonus:
        p.last_token, p.draft_pending = block.tokens[:, k], block.tokens[:, k - 1 : k + 1]  # [d_k, b]
    else:  # every SMC-SD group spends its budget in this round; exact groups are set below
        p.last_token, p.draft_pending = block.tokens[:, -1], block.tokens[:, -1:].expand(-1, 2)
    if shape.any_exact:
        _commit_exact(p, block.walk, block.exact_groups, k, verified.fed, drafts.fed, saved.last_token)


def check_populations(population: Population, shape: RoundShape, settings: SMCSettings):
    """Per live group, on the device: whether its SMC-SD round left it no weight (`dead`),
    and whether it needs resampling (ESS below tau * N, not after its last round); also its
    log weights `[groups, N]`. Records the ESS in `stats`."""
    p, n = population, population.width
    group_lw = p.log_weights[p.rows].view(-1, n)
    dead = torch.isneginf(group_lw).all(dim=1) & ~shape.exact
    ess = effective_sample_size(group_lw)
    p.stats.ess.append((p.groups, p.particle_ess(ess)))
    all_finished = p.finished[p.rows].view(-1, n).all(dim=1)
    spent = p.clock[p.groups] >= p.budget  # resampling after the last round only adds variance to the pick
    needs = (ess < settings.resample_threshold * n) & ~shape.exact & ~dead & ~all_finished & ~spent
    return dead, needs, group_lw


def redo_dead_populations(population: Population, dead: torch.Tensor, saved: _Saved, advance: torch.Tensor,
                          block: Block, drafts: Drafts, verified: Verified) -> None:
    """Redo dead populations: an SMC-SD round that left a group no weight is discarded
    (`Population.roll_back`) and its group's next round runs exact (`force_exact`; its fresh
    draws do not depend on that decision)."""
    p = population
    p.roll_back(dead, saved, advance, block.tokens.shape[1], verified.fed, drafts.fed)
    p.force_exact[p.groups[dead]] = True
    p.stats.redo(p.groups[dead])


def resample_populations(population: Population, needs: torch.Tensor, group_lw: torch.Tensor,
                         settings: SMCSettings) -> None:
    """Resample: per live group that `needs` it, draw N ancestors by the normalised weights
    and copy rows (both caches, every array); `log_z` takes the group's mean weight, the
    weights restart at 0, `stats` counts the event."""
    p, n = population, population.width  # (N: only SMC-SD rounds resample)
    chosen_groups = needs.nonzero().squeeze(1)
    chosen_lw = group_lw[chosen_groups]
    p.log_z[p.groups[chosen_groups]] += log_mean_weight(chosen_lw)
    ancestors = resample(normalized_weights(chosen_lw), settings.resample_method)
    local = _group_rows(chosen_groups, n)
    p.copy_rows(copy_plan(ancestors).offset(local))  # in live-row coordinates
    p.log_weights[p.rows[local]] = 0.0
    p.stats.num_resamples[p.groups[chosen_groups]] += 1


def final_pick(population: Population, settings: SMCSettings) -> SMCResult:
    """End: log Z takes the final mean weight; `num_return_sequences` particles per prompt
    are drawn by final weight. Changes `log_z`; returns the result."""
    p, n, batch = population, population.n, population.batch
    if p.narrow:  # the live groups' stale rows take their first particle's tokens
        p.fill_stale_rows(p.rows)
    longest = int(p.lengths.max())
    final_lw = p.log_weights.view(batch, n)
    p.log_z += log_mean_weight(final_lw)
    # With replacement: each returned particle is, on its own, a draw of the SMC-SD output.
    chosen = torch.multinomial(normalized_weights(final_lw).float(), settings.num_return_sequences, replacement=True)
    return p.stats.result(
        gamma_reached=int(p.gamma_now) if p.adapts_gamma else None,
        tokens=p.tokens[:, :longest].reshape(batch, n, longest),
        lengths=p.lengths.view(batch, n),
        log_weights=final_lw,
        log_z=p.log_z,
        chosen=chosen,
    )


# --- Helpers. ---


def _commit_exact(population: Population, walk: verify.WalkResult, exact_groups: torch.Tensor, k: int,
                  target_fed: int, draft_fed: int, x_last: torch.Tensor) -> None:
    """Exact groups after their walk: every row becomes the winner (a copy of only the
    positions fed this round: before the round the rows were identical), then both caches
    roll back to what the committed tokens justify (docs/algorithm.md, Exact mode, step 5).
    Sets the exact rows' `last_token` and `draft_pending`; `x_last` is the round's."""
    p, n, rows = population, population.width, population.rows
    ex_rows = _group_rows(exact_groups, n)
    accepted = walk.num_accepted.repeat_interleave(n)
    plan = _winner_plan(ex_rows.view(-1, n)[:, 0] + walk.winner, n)
    for runner, tail in ((p.target, target_fed), (p.draft, draft_fed)):
        runner.reorder(CopyPlan(dest=plan.dest, src=plan.src, tail=tail))
    # The target keeps [x_last, d_1 .. d_a]; the committed token after them is the next x_last.
    target_drop = torch.zeros_like(rows)
    # (A full accept in a round without a bonus fed only [x_last, d_1 .. d_(k-1)]: nothing to drop.)
    target_drop[ex_rows] = (target_fed - 1 - accepted).clamp(min=0)
    p.target.rollback(target_drop)
    # The draft keeps up to d_(a-1) and next sees [d_a, c] (d_0 = x_last), so that every row's
    # pending is 2 wide; after a full accept it already holds d_(k-1) and sees [d_k, bonus].
    draft_drop = torch.zeros_like(rows)
    draft_drop[ex_rows] = torch.where(accepted < k, k - accepted, 0)
    p.draft.rollback(draft_drop)
    committed = walk.tokens.repeat_interleave(n, dim=0)
    last = committed.gather(1, (walk.num_committed.repeat_interleave(n) - 1).unsqueeze(1)).squeeze(1)
    before = committed.gather(1, (accepted - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(accepted > 0, before, x_last[ex_rows])
    p.last_token = p.last_token.clone()
    p.last_token[ex_rows] = last
    draft_pending = p.draft_pending.clone()
    full_accept = (accepted == k).unsqueeze(1)
    draft_pending[ex_rows] = torch.where(full_accept, draft_pending[ex_rows], torch.stack([before, last], dim=1))
    p.draft_pending = draft_pending


def _first_stops(is_stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether a stop occurs among the new tokens, and how many tokens to keep (up
    to and including the first stop; all of them if none)."""
    stopped = is_stop.any(dim=1)
    first = is_stop.int().argmax(dim=1)  # argmax returns the first maximal index
    return stopped, torch.where(stopped, first + 1, is_stop.shape[1])


def _temperature_only(temperature: float) -> LogProbsFn:
    def fn(logits, history):
        return log_probs(logits, temperature)

    fn.reads_history = False
    return fn


def _shared_prefix(tokens: torch.Tensor, lengths: torch.Tensor) -> int:
    """Length of the prefix every particle `[N, T]` of one prompt shares (within its length)."""
    same = (tokens == tokens[:1]).all(dim=0)
    shared = int(same.long().cumprod(dim=0).sum())
    return min(shared, int(lengths.min()))


def _group_rows(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `[len(groups) * n]` of the given groups (group-major)."""
    return (groups.unsqueeze(1) * n + torch.arange(n, device=groups.device)).flatten()


def _winner_plan(winners: torch.Tensor, n: int) -> CopyPlan:
    """Copies that make every row of each winner's group a copy of the winner (live rows)."""
    group_rows = _group_rows(winners // n, n).view(-1, n)
    dest_mask = group_rows != winners.unsqueeze(1)
    src = winners.unsqueeze(1).expand(-1, n)
    return CopyPlan(dest=group_rows[dest_mask], src=src[dest_mask])


def _restore_pending(draft, dead_rows, saved_pending, pending):
    """The draft's pending tokens after the rows of dead groups went back to the state before
    the round (the draft already rolled back), so that every row's pending has one width.

    After the first round the saved pending is as wide as the others (2). In the first round
    it was x0 alone, while the other rows hold 2 (`[d_k, b]` or `[d_a, c]`, whose first token
    the draft has not seen): those rows feed their first token now (the dead rows feed x0,
    and drop it again, within what they received since the prefill), and every row is left
    with one pending token."""
    if saved_pending.shape[1] == pending.shape[1]:
        return torch.where(dead_rows.unsqueeze(1), saved_pending, pending)
    draft.extend(torch.where(dead_rows, saved_pending[:, 0], pending[:, 0]).unsqueeze(1))
    draft.rollback(dead_rows.long())
    return torch.where(dead_rows, saved_pending[:, 0], pending[:, -1]).unsqueeze(1)


class _Stats:
    """Diagnostics per prompt: rounds and tokens per mode, accepted drafts per exact round,
    the mode of each round, ESS after each round, resampling events, dead-round redos, and
    for auto each round's plan (K, the bias bound, the predicted tokens per second)."""

    def __init__(self, batch: int, first_exact: torch.Tensor):
        self.batch = batch
        self.first_exact = first_exact.cpu()  # x0 counts toward the mode of the first round
        # ("round", groups, exact, advance, accepted, plain, plan) | ("redo", groups)
        self.records: list[tuple] = []
        self.ess: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_resamples = torch.zeros(batch, dtype=torch.long, device=first_exact.device)

    def round(self, groups, exact, advance, accepted, plain=False, plan=None, rounds=1) -> None:
        """`plan`: (K drafted, bias bound per group [G], predicted tokens/s, rows per group) for auto;
        `rounds`: a burst of that many plain rounds of the same shape (one per step)."""
        # Kept on the device until the end: no host synchronisation per round.
        self.records.append(("round", groups, exact, advance.clone(), accepted, plain, plan, rounds))

    def redo(self, groups) -> None:
        self.records.append(("redo", groups))

    def result(self, **fields) -> SMCResult:
        b = self.batch
        modes = [[] for _ in range(b)]
        plans = [[] for _ in range(b)]
        smc_tokens = (~self.first_exact).long().clone()
        exact_tokens = self.first_exact.long().clone()
        plain_tokens = torch.zeros(b, dtype=torch.long)
        accepted = [[] for _ in range(b)]
        last_advance = [0] * b
        for record in self.records:
            if record[0] == "redo":
                for g in record[1].tolist():
                    modes[g][-1] = REDONE_ROUND
                    if plans[g]:
                        plans[g][-1]["mode"] = REDONE_ROUND
                    smc_tokens[g] -= last_advance[g]
                continue
            _, groups, exact, advance, walk_accepted, plain, plan, rounds = record
            exact_index = 0
            walk_accepted = walk_accepted.tolist() if walk_accepted is not None else []
            bias = plan[1].tolist() if plan is not None else None
            speed = float(plan[2]) if plan is not None else None
            for i, (g, is_exact, adv) in enumerate(zip(groups.tolist(), exact.tolist(), advance.tolist())):
                letter = PLAIN_ROUND if plain else EXACT_ROUND if is_exact else SMC_ROUND
                modes[g].extend(letter * rounds)
                last_advance[g] = adv
                if plan is not None:
                    plans[g].extend({"mode": letter, "k": plan[0], "chains": plan[3], "bias_bound": None if plain else bias[i],
                                     "predicted_tokens_per_s": speed} for _ in range(rounds))
                if plain:
                    plain_tokens[g] += adv * rounds
                elif is_exact:
                    exact_tokens[g] += adv
                    accepted[g].append(walk_accepted[exact_index])
                    exact_index += 1
                else:
                    smc_tokens[g] += adv
        device = fields["log_z"].device
        round_modes = ["".join(m) for m in modes]
        count = lambda letter: torch.tensor([m.count(letter) for m in round_modes], device=device)  # noqa: E731
        return SMCResult(
            **fields,
            ess=_ess_by_group(self.ess, b),
            num_resamples=self.num_resamples,
            num_dead_redos=count(REDONE_ROUND),
            num_rounds=max((len(m) for m in round_modes), default=0),
            round_modes=round_modes,
            num_smc_rounds=count(SMC_ROUND),
            num_exact_rounds=count(EXACT_ROUND),
            smc_tokens=smc_tokens.to(device),
            exact_tokens=exact_tokens.to(device),
            accepted=[torch.tensor(a, dtype=torch.long) for a in accepted],
            num_plain_rounds=count(PLAIN_ROUND),
            plain_tokens=plain_tokens.to(device),
            round_plans=plans if any(plans) else [],
        )


def _copy_rows(state: torch.Tensor, plan: CopyPlan) -> torch.Tensor:
    state = state.clone()
    state[plan.dest] = state[plan.src]
    return state


def _ess_by_group(per_round: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> list[torch.Tensor]:
    """Turn the per-round (groups, ess) records into one ESS trace per prompt."""
    if not per_round:
        return [torch.empty(0, dtype=WEIGHT_DTYPE) for _ in range(batch)]
    group_ids = torch.cat([g for g, _ in per_round]).cpu()
    values = torch.cat([e for _, e in per_round]).cpu()
    order = torch.argsort(group_ids, stable=True)  # keeps rounds in order within a group
    counts = torch.bincount(group_ids, minlength=batch).tolist()
    return list(torch.split(values[order], counts))
