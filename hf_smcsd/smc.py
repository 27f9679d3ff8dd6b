"""The round loop of SMC-SD and its exact mode, as specified in docs/algorithm.md
(shared/docs in the project repo).

Reads top to bottom like the spec: start; then rounds of choose a mode per group -> draft
-> verify -> apply the group's operator (SMC-SD weights, or the exact accept walk) -> stop
-> resample or redo; then the final pick. It talks to the two models only through
`Runner`s and never imports transformers; the math after the verify pass lives in
`verify.py`, the mode choice in `policy.py`, resampling in `resampling.py`.

Layout: a batch of B prompts is B groups of N particles; every tensor over particles is
`[rows]` with rows group-major (`group * N + particle`). Rows of groups that have ended
leave the runners' batch; `rows` maps the live rows back to the full `[B * N]` arrays that
hold every particle's tokens and weights until the end. Exact rounds commit a different
number of tokens per group, so each group has its own clock (`clock[g]`: tokens generated
so far), and rows of one batch can differ in length (the runners' `rollback`).
"""

from __future__ import annotations

import time
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
_INITIAL_TOKENS = 256  # new-token columns allocated at the start (doubled as needed)


@dataclass
class SMCSettings:
    """Everything the loop needs to know besides the models and the prompts."""

    particles: int = 4
    gamma: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    draft_temperature: float | None = None  # None: same as `temperature`
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

    def __post_init__(self):
        self.validate()

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
            bad("smc_draft_temperature", self.draft_temperature, "use a temperature > 0, or None for the target's.")
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
    stats: dict = field(default_factory=dict)


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
    n, gamma, alpha = settings.particles, settings.gamma, float(settings.alpha)
    budget = settings.max_new_tokens
    pad = settings.pad_token_id
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    target_log_probs = target_log_probs or _temperature_only(settings.temperature)
    draft_log_probs = draft_log_probs or _temperature_only(settings.draft_temperature or settings.temperature)
    stop_ids = torch.tensor(list(settings.eos_token_ids), dtype=torch.long, device=device)

    batch = input_ids.shape[0]
    if stream is not None and batch != 1:
        raise ValueError(f"Streaming supports one prompt at a time; got a batch of {batch}.")
    total = batch * n
    # Every particle's new tokens. It grows as the clocks advance (a huge max_new_tokens does
    # not allocate up front) and keeps room for one round past the furthest clock, so writes
    # at any group's clock never need clamping.
    tokens = torch.full((total, min(budget, _INITIAL_TOKENS) + gamma + 1), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(total, dtype=torch.long, device=device)
    finished = torch.zeros(total, dtype=torch.bool, device=device)
    log_weights = torch.zeros(total, dtype=WEIGHT_DTYPE, device=device)
    clock = torch.zeros(batch, dtype=torch.long, device=device)  # tokens generated per group
    log_z = torch.zeros(batch, dtype=WEIGHT_DTYPE, device=device)

    rows = torch.arange(total, device=device)  # live row -> row of the full arrays
    groups = torch.arange(batch, device=device)  # live group -> prompt index

    # --- Sequences for processors and stopping criteria that read them. ---
    def history(index: torch.Tensor | None, new: Sequence[torch.Tensor]) -> torch.Tensor:
        """Padded prompt, tokens so far and `new` tokens of the live rows `index` (all rows
        if None), which must share one clock."""
        full = rows if index is None else rows[index]
        start = int(clock[full[0] // n])
        pieces = [input_ids[full // n], tokens[full, :start]]
        pieces += [x if index is None else x[index] for x in new]
        return torch.cat(pieces, dim=1)

    def by_clock(reads_history: bool, compute: Callable) -> torch.Tensor:
        """`compute(index, history_fn)` for the live rows, one call per distinct group clock
        (rows of different lengths cannot share one sequence tensor)."""
        if not reads_history:
            return compute(None)
        row_clock = clock[rows // n]
        values = torch.unique(row_clock)
        if values.numel() == 1:
            return compute(None)
        out = None
        for value in values.tolist():
            index = (row_clock == value).nonzero().squeeze(1)
            part = compute(index)
            if out is None:
                out = part.new_empty((rows.shape[0],) + part.shape[1:])
            out[index] = part
        return out

    def history_fn(index: torch.Tensor | None, new: Sequence[torch.Tensor]) -> History:
        fn = lambda: history(index, new)  # noqa: E731
        fn.prompts = (rows if index is None else rows[index]) // n  # for processors with per-prompt state
        return fn

    def distribution(fn: LogProbsFn, logits: torch.Tensor, new: Sequence[torch.Tensor]) -> torch.Tensor:
        return by_clock(
            getattr(fn, "reads_history", True),
            lambda index: fn(logits if index is None else logits[index], history_fn(index, new)),
        )

    def group_distribution(fn: LogProbsFn, logits: torch.Tensor) -> torch.Tensor:
        """`fn` at the first row of each live group only (`logits` `[groups, w, V]`, nothing
        new beyond each row's tokens so far): auto's narrow plain rounds."""
        first = torch.arange(groups.shape[0], device=device) * n
        if not getattr(fn, "reads_history", True):
            return fn(logits, history_fn(first, []))
        group_clock = clock[groups]
        out = None
        for value in torch.unique(group_clock).tolist():
            index = (group_clock == value).nonzero().squeeze(1)
            part = fn(logits[index], history_fn(first[index], []))
            if out is None:
                out = part.new_empty((logits.shape[0],) + part.shape[1:])
            out[index] = part
        return out

    def stops(new_tokens: torch.Tensor) -> torch.Tensor:
        is_stop = torch.isin(new_tokens, stop_ids)
        if stop_fn is not None:
            width = new_tokens.shape[1]
            is_stop |= by_clock(True, lambda index: stop_fn(history(index, [new_tokens]), width))
        return is_stop

    def copy_particles(plan: CopyPlan, last_token, draft_pending):
        """Apply row copies (live rows) to both caches and every particle's state; returns
        the copied `last_token` and `draft_pending`."""
        for runner in (target, draft):
            runner.reorder(plan)
        full = plan.offset(rows)  # in full-array coordinates
        for state in (tokens, lengths, finished):
            state[full.dest] = state[full.src]
        return _copy_rows(last_token, plan), _copy_rows(draft_pending, plan)

    streamed = 0

    def stream_settled() -> None:
        nonlocal streamed
        if stream is not None:
            shared = _shared_prefix(tokens[:, :budget], lengths)
            if shared > streamed:
                stream(tokens[0, streamed:shared])
                streamed = shared

    def plain_step(last_token, draft_pending, narrow):
        """K = 0: one target sampling step per live row, no draft pass (lossless). Rows of a
        group whose particles are identical share one draw, so they stay identical; other
        groups' particles each draw their own (an SMC-SD round with no drafts: their weights
        do not change at alpha = 1, the only alpha auto allows). The draft sees the new
        tokens when drafting resumes. `narrow`: the runners hold one row per group (every
        group identical), whose logits serve the group's N rows."""
        logits = target.extend((last_token[::n] if narrow else last_token).unsqueeze(1))
        if auto is not None:
            auto.clock.stop("verify")
        if narrow:
            lp = group_distribution(target_log_probs, logits)[:, 0]
        else:
            lp = distribution(target_log_probs, logits, [])[:, 0]
        if settings.greedy:
            lp = verify.one_hot(lp).log()
        token = sample(lp)
        if narrow:
            token = token.repeat_interleave(n)
        live = groups.shape[0]
        shared = token.view(live, n)[:, :1].expand(live, n).flatten()
        token = torch.where(identical[groups].repeat_interleave(n), shared, token)
        active = ~finished[rows]
        stopped = stops(token.unsqueeze(1))[:, 0]
        columns = clock[rows // n]
        tokens[rows, columns] = torch.where(active, token, tokens[rows, columns])
        lengths[rows] += active.long()
        finished[rows] |= active & stopped
        clock[groups] += 1
        rounds_run[groups] += 1
        return token, torch.cat([draft_pending, token.unsqueeze(1)], dim=1)

    # --- Start: prefill once per model, expand to N rows, sample x0 from the target. ---
    rounds_run = torch.zeros(batch, dtype=torch.long, device=device)
    exact_first = policy.exact_rounds(settings.mode, rounds_run, settings.schedule)
    exact_first |= settings.greedy
    first_logits = target.prefill(input_ids, attention_mask, n).unsqueeze(1)
    draft.prefill(input_ids, attention_mask, n)
    first_lp = distribution(target_log_probs, first_logits.repeat_interleave(n, dim=0), [])[:, 0]
    if settings.greedy:
        first_lp = verify.one_hot(first_lp).log()
    first_dist, first_log_z = power_log_probs(first_lp, alpha)
    x0 = sample(first_dist)  # each particle draws its own x0 ...
    shared_x0 = x0.view(batch, n)[:, :1].expand(batch, n).flatten()
    x0 = torch.where(exact_first.repeat_interleave(n), shared_x0, x0)  # ... except where the group starts exact
    identical = exact_first.clone()  # groups whose particles all hold the same tokens
    log_z += first_log_z.view(batch, n)[:, 0].to(WEIGHT_DTYPE)  # p^alpha / Z sampled: Z is the group's
    finished |= stops(x0.unsqueeze(1))[:, 0]
    tokens[:, 0] = x0
    lengths[:] = 1
    clock[:] = 1
    stats = _Stats(batch, exact_first)
    stream_settled()

    last_token = x0  # x_last: the target has not seen it yet
    # Tokens the draft has not seen yet: [x0], then 2 (1 after a redo, one more after each
    # plain round); one width for all rows.
    draft_pending = x0.unsqueeze(1)
    force_exact = torch.zeros(batch, dtype=torch.bool, device=device)  # redo of a dead SMC-SD round
    auto = _AutoState(settings, batch, device, target, draft, x0) if settings.mode == "auto" else None
    # Plain rounds of groups whose particles are identical run one row per group when both
    # runners can give the rows back (`expand`); `narrow` while they do.
    can_narrow = auto is not None and n > 1 and all(hasattr(r, "expand") for r in (target, draft))
    narrow = False

    while True:
        # One host synchronisation decides the round's shape: which groups end (all their
        # particles finished or their budget spent), whether any group switches SMC-SD ->
        # exact, whether any runs exact, and the budgets left (K of the round, buffer size).
        group_done = finished[rows].view(-1, n).all(dim=1) | (clock[groups] >= budget)
        if auto is not None:  # the planner: each group's mode and the round's K, from earlier rounds only
            auto.clock.start("round")
            plan = auto.plan(groups, group_done, rows.shape[0], groups.shape[0] if can_narrow else rows.shape[0])
            round_k = plan.k
            exact = plan.exact | ((force_exact[groups] | settings.greedy) & (round_k > 0))
            plan_bias = plan.bias
        else:
            round_k = gamma
            exact = policy.exact_rounds(settings.mode, rounds_run[groups], settings.schedule)
            exact |= force_exact[groups] | settings.greedy  # fixed before this round's drafts are drawn
        # A plain round collapses a group too: its weights would not change, so drawing the
        # particle now (by weight, as the final pick would) loses nothing, and the group's
        # plain rounds can run on one row.
        collapse = (exact | (round_k == 0)) & ~identical[groups] & ~group_done
        remaining = budget - clock[groups]
        left = torch.where(group_done, -1, remaining)
        flags = torch.stack([group_done.sum(), collapse.sum(), (exact & ~group_done).sum(), left.max(),
                             torch.where(group_done, budget, remaining).min(),
                             (~identical[groups] & ~group_done).sum()]).tolist()
        num_done, num_collapse, num_exact, most, least, num_diverse = flags
        if auto is not None:
            auto.observe_last_round()  # its spans are complete: the synchronisation above passed them
        if num_done:
            if num_done == groups.shape[0]:
                break
            keep_groups = (~group_done).nonzero().squeeze(1)
            keep = _group_rows(keep_groups, n)
            for runner in (target, draft):
                runner.keep(keep_groups if narrow else keep)
            rows, groups = rows[keep], groups[keep_groups]
            last_token, draft_pending = last_token[keep], draft_pending[keep]
            exact, collapse, remaining = exact[keep_groups], collapse[keep_groups], remaining[keep_groups]
            if auto is not None:
                plan_bias = plan_bias[keep_groups]
        live = groups.shape[0]
        if narrow and round_k > 0:  # drafting resumes: the draft catches up on one row per group, then N rows again
            if draft_pending.shape[1] > 1:
                draft.extend(draft_pending[::n, :-1])
                draft_pending = draft_pending[:, -1:]
            for runner in (target, draft):
                runner.expand(n)
            narrow = False

        if num_collapse:  # SMC-SD -> exact: one particle drawn by weight becomes the whole group
            plan = _collapse(log_weights, rows, groups, collapse, n, log_z)
            last_token, draft_pending = copy_particles(plan, last_token, draft_pending)
            identical[groups[collapse]] = True
            continue  # the chosen particle may have finished: re-check which groups end
        exact_rows = exact.repeat_interleave(n)
        if budget - least + gamma + 1 > tokens.shape[1]:
            grown = max(budget - least, min(budget, 2 * (tokens.shape[1] - gamma - 1))) + gamma + 1
            tokens = torch.cat([tokens, tokens.new_full((total, grown - tokens.shape[1]), pad)], dim=1)
        k = min(round_k, most)  # the last rounds draft only what some budget can keep
        with_bonus = most > k
        if k == 0:  # a plain round: one target sampling step per row, no draft pass
            if can_narrow and not narrow and num_diverse == 0:
                first = torch.arange(live, device=device) * n
                for runner in (target, draft):
                    runner.keep(first)
                narrow = True
            auto.clock.start("verify")
            last_token, draft_pending = plain_step(last_token, draft_pending, narrow)
            stats.round(groups, exact, torch.ones_like(groups), None, plain=True, plan=(0, plan_bias, plan.tokens_per_s))
            stats.ess.append((groups, effective_sample_size(log_weights[rows].view(-1, n))))
            auto.round_done(live if narrow else rows.shape[0], 0, 1)
            stream_settled()
            continue
        if draft_pending.shape[1] > 2:  # drafting resumes after plain rounds: the draft catches up in one pass
            draft.extend(draft_pending[:, :-1])
            draft_pending = draft_pending[:, -1:]
        saved = _Saved(log_weights[rows].clone(), lengths[rows].clone(), finished[rows].clone(), last_token,
                       draft_pending, identical[groups].clone())

        # --- Draft: k tokens per particle, autoregressively, recording log q (and, for exact
        # groups, q itself: [exact rows, k, V], kept only until the walk below). ---
        drafted, draft_lq, draft_probs, draft_dists = [], [], [], []
        any_exact = num_exact > 0
        if auto is not None:
            auto.clock.start("draft")
        logits = draft.extend(draft_pending)[:, -1:]
        for step in range(k):
            if step:
                logits = draft.extend(drafted[-1].unsqueeze(1))
            lq = distribution(draft_log_probs, logits, [d.unsqueeze(1) for d in drafted])[:, 0]
            token = sample(lq)
            drafted.append(token)
            draft_lq.append(gather(lq, token))
            if any_exact:
                draft_probs.append(lq[exact_rows].exp())
            if auto is not None:
                draft_dists.append(lq)
        if auto is not None:
            auto.clock.stop("draft")
        drafted_t = torch.stack(drafted, dim=1)  # [rows, k]
        log_q = torch.stack(draft_lq, dim=1)
        draft_fed = draft_pending.shape[1] + k - 1

        # --- Verify: one target forward over [x_last, d_1 .. d_k] (d_k only if a bonus follows). ---
        fed = drafted_t if with_bonus else drafted_t[:, : k - 1]
        target_fed = fed.shape[1] + 1
        if auto is not None:
            auto.clock.start("verify")
        target_logits = target.extend(torch.cat([last_token.unsqueeze(1), fed], dim=1))
        if auto is not None:
            auto.clock.stop("verify")
        target_lp = distribution(target_log_probs, target_logits, [fed])
        log_p = gather(target_lp[:, :k], drafted_t)
        row_remaining = remaining.repeat_interleave(n)
        active = ~finished[rows]
        counted = active.unsqueeze(1) & (torch.arange(k, device=device) < row_remaining.unsqueeze(1))
        if auto is not None:  # evidence for later rounds: divergences at every drafted position
            auto.observe_positions(groups, target_lp[:, :k], torch.stack(draft_dists, dim=1), counted)

        # --- SMC-SD operator: every particle keeps its drafts and a bonus, weighted. ---
        if with_bonus:
            bonus_dist, bonus_log_z = power_log_probs(target_lp[:, k], alpha)
            bonus = sample(bonus_dist)
            new_tokens = torch.cat([drafted_t, bonus.unsqueeze(1)], dim=1)
        else:
            new_tokens = drafted_t.clone()  # exact groups overwrite their rows below
        width = new_tokens.shape[1]
        valid = row_remaining.clamp(max=width)

        # --- Exact operator: the accept walk per exact group; its rows take the winner's tokens. ---
        if any_exact:
            walk, exact_groups = _exact_walk(
                exact, drafted_t, draft_probs, target_lp[exact_rows], remaining, n, k, settings.greedy, pad
            )
            ex_rows = _group_rows(exact_groups, n)
            new_tokens[ex_rows] = walk.tokens[:, :width].repeat_interleave(n, dim=0)
            valid[ex_rows] = walk.num_committed.repeat_interleave(n)

        # --- Finish and weigh: count only the tokens a particle keeps. ---
        position = torch.arange(width, device=device)
        is_stop = stops(new_tokens) & (position < valid.unsqueeze(1))
        stopped, kept = _first_stops(is_stop)
        kept = torch.where(active, torch.minimum(kept, valid), 0)
        keep_mask = position < kept.unsqueeze(1)
        increments = verify.smc_increments(log_p, log_q, alpha)
        increment = torch.where(keep_mask[:, :k], increments, 0.0).sum(dim=1)
        if with_bonus:
            increment = increment + torch.where(keep_mask[:, k], bonus_log_z.to(WEIGHT_DTYPE), 0.0)
        log_weights[rows] += torch.where(exact_rows, 0.0, increment)
        columns = clock[rows // n].unsqueeze(1) + position
        written = tokens[rows.unsqueeze(1), columns]
        tokens[rows.unsqueeze(1), columns] = torch.where(keep_mask, new_tokens, written)
        lengths[rows] += kept
        finished[rows] |= active & stopped
        advance = valid.view(live, n)[:, 0]
        clock[groups] += advance
        stats.round(groups, exact, advance, walk.num_accepted if any_exact else None,
                    plan=(k, plan_bias, plan.tokens_per_s) if auto is not None else None)
        if auto is not None and any_exact:
            auto.observe_walk(groups[exact_groups], walk.num_accepted, remaining[exact_groups].clamp(max=k))

        # --- Caches: SMC-SD rows keep everything; exact rows take the winner's tail, then roll
        # back to what the committed tokens justify. ---
        if with_bonus:
            last_token, draft_pending = new_tokens[:, k], new_tokens[:, k - 1 : k + 1]  # [d_k, b]
        else:  # every SMC-SD group spends its budget in this round; exact groups are set below
            last_token, draft_pending = new_tokens[:, -1], new_tokens[:, -1:].expand(-1, 2)
        if any_exact:
            last_token, draft_pending = _commit_exact(
                target, draft, walk, exact_groups, n, k, target_fed, draft_fed, rows, saved.last_token,
                last_token, draft_pending,
            )
        identical[groups] = exact
        rounds_run[groups] += 1

        # --- Dead populations: an SMC-SD round that left a group no weight is discarded and
        # redone in exact mode (its fresh draws do not depend on that decision). Resample:
        # per SMC-SD group, when the ESS falls below tau * N. (One synchronisation for both.)
        group_lw = log_weights[rows].view(-1, n)
        dead = torch.isneginf(group_lw).all(dim=1) & ~exact
        ess = effective_sample_size(group_lw)
        stats.ess.append((groups, ess))
        all_finished = finished[rows].view(-1, n).all(dim=1)
        spent = clock[groups] >= budget  # resampling after the last round only adds variance to the pick
        needs = (ess < settings.resample_threshold * n) & ~exact & ~dead & ~all_finished & ~spent
        any_dead, any_needs = torch.stack([dead.any(), needs.any()]).tolist()
        if any_dead:
            dead_rows = dead.repeat_interleave(n)
            full = rows[dead_rows]
            target.rollback(torch.where(dead_rows, target_fed, 0))
            draft.rollback(torch.where(dead_rows, draft_fed, 0))
            draft_pending = _restore_pending(draft, dead_rows, saved.draft_pending, draft_pending)
            columns = clock[full // n].unsqueeze(1) - advance.repeat_interleave(n)[dead_rows].unsqueeze(1) + position
            tokens[full.unsqueeze(1), columns] = pad
            clock[groups[dead]] -= advance[dead]
            log_weights[full] = saved.log_weights[dead_rows]
            lengths[full], finished[full] = saved.lengths[dead_rows], saved.finished[dead_rows]
            last_token = torch.where(dead_rows, saved.last_token, last_token)
            identical[groups[dead]] = saved.identical[dead]
            force_exact[groups[dead]] = True
            rounds_run[groups[dead]] -= 1
            stats.redo(groups[dead])
        force_exact[groups[exact]] = False
        if any_needs:
            chosen_groups = needs.nonzero().squeeze(1)
            chosen_lw = group_lw[chosen_groups]
            log_z[groups[chosen_groups]] += log_mean_weight(chosen_lw)
            ancestors = resample(normalized_weights(chosen_lw), settings.resample_method)
            local = _group_rows(chosen_groups, n)
            plan = copy_plan(ancestors).offset(local)  # in live-row coordinates
            last_token, draft_pending = copy_particles(plan, last_token, draft_pending)
            log_weights[rows[local]] = 0.0
            stats.num_resamples[groups[chosen_groups]] += 1
        if auto is not None:
            auto.round_done(rows.shape[0], k, target_fed)
        stream_settled()

    # --- End: log Z and one particle per prompt, drawn by final weight. ---
    longest = int(lengths.max())
    final_lw = log_weights.view(batch, n)
    log_z += log_mean_weight(final_lw)
    # With replacement: each returned particle is, on its own, a draw of the SMC-SD output.
    chosen = torch.multinomial(normalized_weights(final_lw).float(), settings.num_return_sequences, replacement=True)
    return stats.result(
        tokens=tokens[:, :longest].reshape(batch, n, longest),
        lengths=lengths.view(batch, n),
        log_weights=final_lw,
        log_z=log_z,
        chosen=chosen,
    )


_COST_CACHE: dict[tuple, planner.CostModel] = {}  # measured costs per (models, dtype, device, rows, K)
_COST_CACHE_SIZE = 64


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

    def __init__(self, settings: SMCSettings, batch: int, device, target: Runner, draft: Runner, x0: torch.Tensor):
        self.n, self.gamma, self.bound = settings.particles, settings.gamma, float(settings.auto_threshold)
        self.greedy = settings.greedy
        nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        self.rate = nan.clone()  # per-token SIR bias bound (planner.update_rate)
        self.single_acceptance = nan.clone()  # running mean of 1 - TV(p_t, q_t) at drafted positions
        self.positions = torch.zeros(batch, dtype=torch.float64, device=device)  # drafted positions measured, per chain
        self.accepted = torch.zeros(batch, dtype=torch.float64, device=device)  # drafts accepted by exact walks
        self.rejected = torch.zeros(batch, dtype=torch.float64, device=device)  # exact walks that ended on a rejection
        self.clock = PhaseClock(device)
        self.probes = planner.ProbeSchedule(wait=planner.FIRST_PROBE)
        self.last_round: tuple[int, int, int] | None = None  # (rows, K, verify width) of the round just run
        self.measure = settings.auto_costs is None
        if not self.measure:
            self.costs = settings.auto_costs
            return
        keys = (_cost_key(target), _cost_key(draft))
        key = None if None in keys else keys + (x0.shape[0], self.gamma)
        self.costs = _COST_CACHE.get(key) if key is not None else None
        if self.costs is None:
            self.costs = self._calibrate(target, draft, x0)
            if key is not None:
                if len(_COST_CACHE) >= _COST_CACHE_SIZE:
                    _COST_CACHE.pop(next(iter(_COST_CACHE)))
                _COST_CACHE[key] = self.costs

    def _calibrate(self, target: Runner, draft: Runner, x0: torch.Tensor) -> planner.CostModel:
        """A short calibration before the first round (then cached): the verify pass at width
        1 and K + 1 and one draft step, each the faster of two runs, fed and rolled back."""
        costs = planner.CostModel()
        rows = x0.shape[0]
        for runner, widths, cost in ((target, (1, self.gamma + 1), costs.verify), (draft, (1,), costs.draft_step)):
            for width in widths:
                best = float("inf")
                for _ in range(2):
                    self.clock.synchronize()
                    start = time.perf_counter()
                    runner.extend(x0.unsqueeze(1).expand(rows, width).contiguous())
                    self.clock.synchronize()
                    best = min(best, time.perf_counter() - start)
                    runner.rollback(torch.full((rows,), width, dtype=torch.long, device=x0.device))
                cost.observe(rows * width, best)
        return costs

    def plan(self, groups: torch.Tensor, group_done: torch.Tensor, rows: int, plain_rows: int) -> planner.Plan:
        probe = self.probes.must_draft()
        accept = planner.acceptance(self.accepted[groups], self.rejected[groups], self.single_acceptance[groups])
        rate = planner.usable_rate(self.rate[groups], self.positions[groups])
        plan = planner.plan_round(rate, accept, self.costs, rows, self.gamma, self.bound,
                                  allow_plain=not probe, allow_smc=not self.greedy, live=~group_done,
                                  plain_rows=plain_rows)
        self.probes.after(plan.k, probe)
        return plan

    def observe_positions(self, groups, target_lp, draft_lp, counted) -> None:
        bias, tv = planner.position_measures(target_lp, draft_lp, self.n)
        self.rate[groups] = planner.update_rate(self.rate[groups], planner.group_means(bias, counted, self.n))
        self.positions[groups] += counted.view(-1, self.n * counted.shape[1]).sum(dim=1) / self.n
        observed = 1.0 - planner.group_means(tv, counted, self.n)
        self.single_acceptance[groups] = planner.update_mean(self.single_acceptance[groups], observed)

    def observe_walk(self, groups, accepted, tried) -> None:
        self.accepted[groups] += accepted.double()
        self.rejected[groups] += (accepted < tried).double()

    def round_done(self, rows: int, k: int, verify_width: int) -> None:
        self.clock.stop("round")
        self.last_round = (rows, k, verify_width)

    def observe_last_round(self) -> None:
        """Feed the spans of the round before into the cost model (after a synchronisation)."""
        spans = self.clock.collect()
        if self.last_round is None or not self.measure or "round" not in spans:
            return
        rows, k, width = self.last_round
        self.last_round = None
        model_seconds = spans.get("verify", 0.0) + spans.get("draft", 0.0)
        if "verify" in spans:
            self.costs.verify.observe(rows * width, spans["verify"])
        if k > 0 and "draft" in spans:
            self.costs.draft_step.observe(rows, spans["draft"] / k)
        self.costs.observe_overhead("spec" if k > 0 else "plain", spans["round"] - model_seconds)


@dataclass
class _Saved:
    """The live rows' state before a round, to discard the round if its population dies."""

    log_weights: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    last_token: torch.Tensor
    draft_pending: torch.Tensor
    identical: torch.Tensor  # per live group


def _collapse(log_weights, rows, groups, collapse, n, log_z) -> CopyPlan:
    """SMC-SD -> exact: per collapsing group, one particle drawn by its normalised weights
    (as the final pick draws) is copied into every row; log Z takes the group's mean weight,
    as a resample would, and the weights restart at 0. Returns the row copies (live rows)."""
    chosen_groups = collapse.nonzero().squeeze(1)
    group_lw = log_weights[rows].view(-1, n)[chosen_groups]
    log_z[groups[chosen_groups]] += log_mean_weight(group_lw)
    winner = torch.multinomial(normalized_weights(group_lw).float(), 1).squeeze(1)
    plan = _winner_plan(_group_rows(chosen_groups, n).view(-1, n)[:, 0] + winner, n)
    log_weights[rows[_group_rows(chosen_groups, n)]] = 0.0
    return plan


def _winner_plan(winners: torch.Tensor, n: int) -> CopyPlan:
    """Copies that make every row of each winner's group a copy of the winner (live rows)."""
    group_rows = _group_rows(winners // n, n).view(-1, n)
    dest_mask = group_rows != winners.unsqueeze(1)
    src = winners.unsqueeze(1).expand(-1, n)
    return CopyPlan(dest=group_rows[dest_mask], src=src[dest_mask])


def _exact_walk(exact, drafted, draft_probs, target_lp, remaining, n, k, greedy, pad):
    """The accept walk of every exact group this round (see verify.accept_walk)."""
    exact_groups = exact.nonzero().squeeze(1)
    groups = exact_groups.shape[0]
    rows = _group_rows(exact_groups, n)
    vocab = target_lp.shape[-1]
    target_probs = verify.one_hot(target_lp) if greedy else target_lp.exp()
    u_accept, u_final = verify.draw_uniforms(groups, k, n, device=drafted.device)
    walk = verify.accept_walk(
        drafted[rows].view(groups, n, k),
        torch.stack(draft_probs, dim=1).view(groups, n, k, vocab),
        target_probs.view(groups, n, -1, vocab),
        remaining[exact_groups],
        u_accept,
        u_final,
        pad=pad,
    )
    return walk, exact_groups


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


def _commit_exact(target, draft, walk, exact_groups, n, k, target_fed, draft_fed, rows, x_last, last_token, draft_pending):
    """Exact groups after their walk: every row becomes the winner (a copy of only the
    positions fed this round: before the round the rows were identical), then both caches
    roll back to what the committed tokens justify (docs/algorithm.md, Exact mode, step 5).
    Returns the next `last_token` and `draft_pending` of all live rows."""
    ex_rows = _group_rows(exact_groups, n)
    accepted = walk.num_accepted.repeat_interleave(n)
    plan = _winner_plan(ex_rows.view(-1, n)[:, 0] + walk.winner, n)
    for runner, tail in ((target, target_fed), (draft, draft_fed)):
        runner.reorder(CopyPlan(dest=plan.dest, src=plan.src, tail=tail))
    # The target keeps [x_last, d_1 .. d_a]; the committed token after them is the next x_last.
    target_drop = torch.zeros_like(rows)
    # (A full accept in a round without a bonus fed only [x_last, d_1 .. d_(k-1)]: nothing to drop.)
    target_drop[ex_rows] = (target_fed - 1 - accepted).clamp(min=0)
    target.rollback(target_drop)
    # The draft keeps up to d_(a-1) and next sees [d_a, c] (d_0 = x_last), so that every row's
    # pending is 2 wide; after a full accept it already holds d_(k-1) and sees [d_k, bonus].
    draft_drop = torch.zeros_like(rows)
    draft_drop[ex_rows] = torch.where(accepted < k, k - accepted, 0)
    draft.rollback(draft_drop)
    committed = walk.tokens.repeat_interleave(n, dim=0)
    last = committed.gather(1, (walk.num_committed.repeat_interleave(n) - 1).unsqueeze(1)).squeeze(1)
    before = committed.gather(1, (accepted - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(accepted > 0, before, x_last[ex_rows])
    last_token = last_token.clone()
    last_token[ex_rows] = last
    draft_pending = draft_pending.clone()
    full_accept = (accepted == k).unsqueeze(1)
    draft_pending[ex_rows] = torch.where(full_accept, draft_pending[ex_rows], torch.stack([before, last], dim=1))
    return last_token, draft_pending


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

    def round(self, groups, exact, advance, accepted, plain=False, plan=None) -> None:
        """`plan`: (K drafted, bias bound per group [G], predicted tokens/s) for auto."""
        # Kept on the device until the end: no host synchronisation per round.
        self.records.append(("round", groups, exact, advance.clone(), accepted, plain, plan))

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
            _, groups, exact, advance, walk_accepted, plain, plan = record
            exact_index = 0
            walk_accepted = walk_accepted.tolist() if walk_accepted is not None else []
            bias = plan[1].tolist() if plan is not None else None
            for i, (g, is_exact, adv) in enumerate(zip(groups.tolist(), exact.tolist(), advance.tolist())):
                letter = PLAIN_ROUND if plain else EXACT_ROUND if is_exact else SMC_ROUND
                modes[g].append(letter)
                last_advance[g] = adv
                if plan is not None:
                    plans[g].append({"mode": letter, "k": plan[0], "bias_bound": None if plain else bias[i],
                                     "predicted_tokens_per_s": plan[2]})
                if plain:
                    plain_tokens[g] += adv
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
