"""The SMC-SD round loop, as specified in docs/algorithm.md (shared/docs in the project repo).

Reads top to bottom like the spec: start, then rounds of draft -> verify -> bonus ->
weight -> finish -> resample, then the final pick. It talks to the two models only through
`Runner`s and never imports transformers.

Layout: a batch of B prompts is B groups of N particles; every tensor over particles is
`[rows]` with rows group-major (`group * N + particle`). Rows of groups that have ended
leave the runners' batch; `rows` maps the live rows back to the full `[B * N]` arrays that
hold every particle's tokens and weights until the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .resampling import RESAMPLING_METHODS, CopyPlan, copy_plan, resample
from .runners.base import Runner
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
History = Callable[[], torch.Tensor]
LogProbsFn = Callable[[torch.Tensor, History], torch.Tensor]
# A stop function marks, for the last w tokens of each row's sequence `[rows, S]`, which
# positions complete a stop (a stopping criterion that holds there): `[rows, w]` bool.
StopFn = Callable[[torch.Tensor, int], torch.Tensor]


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
        if not self.temperature or self.temperature <= 0:
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


@dataclass
class SMCResult:
    """Every particle of every prompt, with the diagnostics of the run."""

    tokens: torch.Tensor  # [B, N, max_new_tokens], pad after each particle's end
    lengths: torch.Tensor  # [B, N] new tokens per particle
    log_weights: torch.Tensor  # [B, N] final log weights (float64)
    log_z: torch.Tensor  # [B] log of the estimated normalising constant
    chosen: torch.Tensor  # [B, num_return_sequences] particles returned for each prompt
    ess: list[torch.Tensor]  # per prompt, the ESS after each round it ran
    num_resamples: torch.Tensor  # [B] resampling events per prompt
    num_dead_resets: torch.Tensor  # [B] rounds where every weight was zero (uniform reset)
    num_rounds: int = 0
    stats: dict = field(default_factory=dict)


def _first_stops(is_stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether a stop occurs among the new tokens, and how many tokens to keep (up
    to and including the first stop; all of them if none)."""
    stopped = is_stop.any(dim=1)
    first = is_stop.int().argmax(dim=1)  # argmax returns the first maximal index
    return stopped, torch.where(stopped, first + 1, is_stop.shape[1])


def _temperature_only(temperature: float) -> LogProbsFn:
    return lambda logits, history: log_probs(logits, temperature)


def _shared_prefix(tokens: torch.Tensor, lengths: torch.Tensor) -> int:
    """Length of the prefix every particle `[N, T]` of one prompt shares (within its length)."""
    same = (tokens == tokens[:1]).all(dim=0)
    shared = int(same.long().cumprod(dim=0).sum())
    return min(shared, int(lengths.min()))


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
    """Run SMC-SD on a left-padded batch of prompts; see the module docstring for layout.

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
    tokens = torch.full((total, budget), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(total, dtype=torch.long, device=device)
    finished = torch.zeros(total, dtype=torch.bool, device=device)
    log_weights = torch.zeros(total, dtype=WEIGHT_DTYPE, device=device)
    log_z = torch.zeros(batch, dtype=WEIGHT_DTYPE, device=device)
    num_resamples = torch.zeros(batch, dtype=torch.long, device=device)
    num_dead_resets = torch.zeros(batch, dtype=torch.long, device=device)
    ess_per_round: list[tuple[torch.Tensor, torch.Tensor]] = []

    rows = torch.arange(total, device=device)  # live row -> row of the full arrays

    def sequences(*new: torch.Tensor) -> torch.Tensor:
        """Every live row's padded prompt, tokens generated so far, then `new` tokens."""
        return torch.cat([input_ids[rows // n], tokens[rows, :generated], *new], dim=1)

    def stops(new_tokens: torch.Tensor) -> torch.Tensor:
        is_stop = torch.isin(new_tokens, stop_ids)
        if stop_fn is not None:
            is_stop |= stop_fn(sequences(new_tokens), new_tokens.shape[1])
        return is_stop

    streamed = 0

    def stream_settled() -> None:
        nonlocal streamed
        if stream is not None:
            shared = _shared_prefix(tokens, lengths)
            if shared > streamed:
                stream(tokens[0, streamed:shared])
                streamed = shared

    # --- Start: prefill once per model, expand to N rows, sample x0 from the target. ---
    first_logits = target.prefill(input_ids, attention_mask, n).unsqueeze(1)
    draft.prefill(input_ids, attention_mask, n)
    first_lp = target_log_probs(first_logits, lambda: input_ids)[:, 0]
    first_dist, first_log_z = power_log_probs(first_lp, alpha)
    x0 = sample(first_dist.repeat_interleave(n, dim=0))  # each particle draws its own x0
    log_z += first_log_z.to(WEIGHT_DTYPE)  # p^alpha / Z sampled: Z is the same for the whole group
    generated = 0  # `sequences()` reads it: nothing generated before x0
    finished |= stops(x0.unsqueeze(1))[:, 0]
    tokens[:, 0] = x0
    lengths[:] = 1
    generated = 1
    stream_settled()

    groups = torch.arange(batch, device=device)  # live group -> prompt index
    last_token = x0  # x_last: the target has not seen it yet
    draft_pending = x0.unsqueeze(1)  # tokens the draft has not seen yet: [x0], later [d_K, b]
    num_rounds = 0

    while generated < budget:
        # A group ends when all its particles are finished; its rows leave the batch.
        group_done = finished[rows].view(-1, n).all(dim=1)
        if group_done.any():
            if group_done.all():
                break
            keep_groups = (~group_done).nonzero().squeeze(1)
            keep = (keep_groups.unsqueeze(1) * n + torch.arange(n, device=device)).flatten()
            for runner in (target, draft):
                runner.keep(keep)
            rows, groups = rows[keep], groups[keep_groups]
            last_token, draft_pending = last_token[keep], draft_pending[keep]

        remaining = budget - generated
        k = min(gamma, remaining)  # the last round drafts only what the budget can keep
        with_bonus = remaining > k

        # --- Draft: k tokens per particle, autoregressively, recording log q. ---
        drafted, draft_lq = [], []
        logits = draft.extend(draft_pending)[:, -1:]
        for step in range(k):
            if step:
                logits = draft.extend(drafted[-1].unsqueeze(1))
            lq = draft_log_probs(logits, lambda: sequences(*(d.unsqueeze(1) for d in drafted)))[:, 0]
            token = sample(lq)
            drafted.append(token)
            draft_lq.append(gather(lq, token))
        drafted_t = torch.stack(drafted, dim=1)  # [rows, k]
        log_q = torch.stack(draft_lq, dim=1)

        # --- Verify: one target forward over [x_last, d_1 .. d_k] (d_k only if a bonus follows). ---
        fed = drafted_t if with_bonus else drafted_t[:, : k - 1]
        target_lp = target_log_probs(target.extend(torch.cat([last_token.unsqueeze(1), fed], dim=1)), lambda: sequences(fed))
        log_p = gather(target_lp[:, :k], drafted_t)
        increments = alpha * log_p.to(WEIGHT_DTYPE) - log_q.to(WEIGHT_DTYPE)  # [rows, k]

        # --- Bonus: one more token from the target's last position. ---
        if with_bonus:
            bonus_dist, bonus_log_z = power_log_probs(target_lp[:, k], alpha)
            bonus = sample(bonus_dist)
            new_tokens = torch.cat([drafted_t, bonus.unsqueeze(1)], dim=1)
        else:
            new_tokens = drafted_t
        width = new_tokens.shape[1]

        # --- Weight and finish: count only the tokens a particle keeps. ---
        active = ~finished[rows]
        stopped, kept = _first_stops(stops(new_tokens))
        kept = torch.where(active, kept, 0)
        keep_mask = torch.arange(width, device=device) < kept.unsqueeze(1)
        increment = torch.where(keep_mask[:, :k], increments, 0.0).sum(dim=1)
        if with_bonus:
            increment = increment + torch.where(keep_mask[:, k], bonus_log_z.to(WEIGHT_DTYPE), 0.0)
        log_weights[rows] += increment
        written = tokens[rows, generated : generated + width]
        tokens[rows, generated : generated + width] = torch.where(keep_mask, new_tokens, written)
        lengths[rows] += kept
        finished[rows] |= active & stopped
        generated += width
        num_rounds += 1
        if with_bonus:
            last_token = bonus
            draft_pending = new_tokens[:, -2:]  # [d_k, b]: d_k was sampled but never fed

        # --- Resample: per group, when the ESS falls below tau * N. ---
        group_lw = log_weights[rows].view(-1, n)
        ess = effective_sample_size(group_lw)
        ess_per_round.append((groups, ess))
        if generated >= budget:
            break  # resampling after the last round would only add variance to the pick
        dead = torch.isneginf(group_lw).all(dim=1)
        all_finished = finished[rows].view(-1, n).all(dim=1)
        needs = ((ess < settings.resample_threshold * n) | dead) & ~all_finished
        if needs.any():
            chosen_groups = needs.nonzero().squeeze(1)
            chosen_lw = group_lw[chosen_groups]
            log_z[groups[chosen_groups]] += log_mean_weight(chosen_lw)
            ancestors = resample(normalized_weights(chosen_lw), settings.resample_method)
            local = (chosen_groups.unsqueeze(1) * n + torch.arange(n, device=device)).flatten()
            plan = copy_plan(ancestors).offset(local)  # in live-row coordinates
            for runner in (target, draft):
                runner.reorder(plan)
            last_token = _copy_rows(last_token, plan)
            draft_pending = _copy_rows(draft_pending, plan)
            full = plan.offset(rows)  # in full-array coordinates
            for state in (tokens, lengths, finished):
                state[full.dest] = state[full.src]
            log_weights[rows[local]] = 0.0
            num_resamples[groups[chosen_groups]] += 1
            num_dead_resets[groups[chosen_groups]] += dead[chosen_groups].long()
        stream_settled()

    # --- End: log Z and one particle per prompt, drawn by final weight. ---
    final_lw = log_weights.view(batch, n)
    log_z += log_mean_weight(final_lw)
    # No particle left with weight: the pick below is uniform. Count it, as for a dead round.
    num_dead_resets += torch.isneginf(final_lw).all(dim=1).long()
    # With replacement: each returned particle is, on its own, a draw of the SMC-SD output.
    chosen = torch.multinomial(normalized_weights(final_lw).float(), settings.num_return_sequences, replacement=True)
    return SMCResult(
        tokens=tokens.view(batch, n, budget),
        lengths=lengths.view(batch, n),
        log_weights=final_lw,
        log_z=log_z,
        chosen=chosen,
        ess=_ess_by_group(ess_per_round, batch),
        num_resamples=num_resamples,
        num_dead_resets=num_dead_resets,
        num_rounds=num_rounds,
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
