"""The two operators that follow a verify pass. Pure tensor functions.

After the target has scored `[x_last, d_1 .. d_k]` for every particle, a group of N
particles is finished in one of two ways (docs/algorithm.md, "One round" and "Exact mode"):

- **SMC-SD** (`smc_increments`): every particle keeps all its drafted tokens and gets an
  importance weight increment `alpha * log p(d) - log q(d)` per token.
- **Exact** (`accept_walk`): lossless multi-draft speculative sampling. The N drafted
  chains are tried depth by depth; at each depth the candidates of the rows still
  consistent with what was committed are accepted with probability `min(1, r(c) / q(c))`,
  `r` the target's distribution at first and, after each rejection, the normalised residual
  `max(r - q, 0)`. A depth where every candidate is rejected commits one token drawn from
  the last residual and ends the walk; a walk that accepts every depth commits a bonus token
  from the target's next position. The committed span is distributed exactly as the
  target's, whatever the draft.

`accept_walk` is vectorised over groups and the vocabulary and loops only over the K depths
and the N candidate slots within a depth. `accept_walk_reference` is the same walk written
as a plain per-group loop, for audit; the tests check the two agree on the same uniforms.
Greedy verification is the same walk with point-mass target distributions (`one_hot`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A residual whose mass is below this is rounding noise (the candidates already covered the
# target); the walk then keeps the distribution it had, as the spec's guard says.
RESIDUAL_EPS = 1e-6


def smc_increments(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Per drafted token, `alpha * log p(d) - log q(d)` in float64 (`[rows, k]` in, out).

    A token whose target probability is 0 in float32 (`log p` below about -103.3, e.g. every
    token but the argmax at a temperature near 0) is one the target's sampling never draws:
    it is outside the target's support and its increment is -inf, as for a token a
    truncating processor removed. (Finite but astronomically small weights would keep a
    population alive that holds no token the target could produce.)"""
    log_p = torch.where(log_p.float().exp() > 0, log_p.double(), float("-inf"))
    return alpha * log_p - log_q.double()


def acceptance_estimate(log_p: torch.Tensor, log_q: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of `min(1, p(d) / q(d))` over the `counted` drafted tokens `[rows, k]`.

    For d drawn from q this estimates `1 - TV(p, q)`: the chance that single-draft
    speculative sampling accepts a token. A row with no counted token gets NaN (no evidence).
    """
    ratio = torch.exp((log_p.double() - log_q.double()).clamp(max=0.0))
    total = torch.where(counted, ratio, 0.0).sum(dim=-1)
    count = counted.sum(dim=-1).double()
    return torch.where(count > 0, total / count.clamp(min=1.0), float("nan"))


def one_hot(log_p: torch.Tensor) -> torch.Tensor:
    """Point masses on each position's most likely token: the target of greedy verification."""
    return torch.zeros_like(log_p).scatter_(-1, log_p.argmax(dim=-1, keepdim=True), 1.0)


def sample_with(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative interval holds `u * total` (`probs` `[G, V]`, `u` `[G]`).

    The inverse-CDF draw of `weights.sample`, with the uniforms given, so the walk can be
    replayed on the same draws. Never returns a zero-probability token.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    position = torch.minimum(u.double().unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, position, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


@dataclass
class WalkResult:
    """What an accept walk commits, per group."""

    tokens: torch.Tensor  # [G, k + 1] committed tokens, left-aligned; pad beyond `num_committed`
    num_committed: torch.Tensor  # [G] tokens committed (accepted drafts, then a correction or bonus)
    num_accepted: torch.Tensor  # [G] drafted tokens accepted (the first `num_accepted` committed ones)
    winner: torch.Tensor  # [G] a row (within the group) whose draft holds every accepted token


def draw_uniforms(groups: int, depth: int, particles: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The walk's random numbers from torch's global generator: one per candidate and depth
    (`[G, depth, N]`, float64) and one for the final draw (`[G]`)."""
    return (
        torch.rand(groups, depth, particles, dtype=torch.float64, device=device),
        torch.rand(groups, dtype=torch.float64, device=device),
    )


def accept_walk(
    drafted: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    depth_limit: torch.Tensor,
    u_accept: torch.Tensor,
    u_final: torch.Tensor,
    pad: int = 0,
    skip_done: bool | None = None,
) -> WalkResult:
    """Lossless multi-draft verification of G groups of N drafted chains.

    drafted       `[G, N, k]` the drafted tokens, row order within a group fixed in advance.
    draft_probs   `[G, N, k, V]` each row's (processed) draft distribution at each depth.
    target_probs  `[G, N, k or k + 1, V]` each row's processed target distribution; with
                  k + 1 positions, a walk that accepts all k depths commits a bonus token.
    depth_limit   `[G]` depths to walk at most (the length budget left); a walk that accepts
                  them all commits no bonus unless the limit is k and the bonus position exists.
    u_accept      `[G, k, N]` uniforms of the accept tests; `u_final` `[G]` of the final draw.
    skip_done     skip slots and depths no group needs (host reads); default: on CPUs only.

    Every entry of `depth_limit` must be >= 1, so every group commits at least one token.
    """
    groups, particles, k = drafted.shape
    device = drafted.device
    with_bonus = target_probs.shape[2] > k
    group_index = torch.arange(groups, device=device)
    tokens = torch.full((groups, k + 1), pad, dtype=torch.long, device=device)
    accepted_count = torch.zeros(groups, dtype=torch.long, device=device)
    walking = torch.ones(groups, dtype=torch.bool, device=device)  # every depth so far accepted
    viable = torch.ones(groups, particles, dtype=torch.bool, device=device)
    final_probs = target_probs.new_zeros(groups, target_probs.shape[-1])  # what the final draw samples
    needs_final = torch.zeros(groups, dtype=torch.bool, device=device)

    # On a CPU a host read is free: skip the candidate slots and depths no group still needs
    # (most walks end within a few slots). On a GPU every read would be a synchronisation,
    # and the masked steps cost less than that.
    skip = drafted.device.type == "cpu" if skip_done is None else skip_done
    for depth in range(k):
        at_depth = walking & (depth < depth_limit)
        if skip and not bool(at_depth.any()):
            break  # nothing below changes a group that is not at this depth
        # The viable rows share one prefix, hence one target distribution: take the first's.
        first_viable = viable.int().argmax(dim=1)
        residual = target_probs[group_index, first_viable, depth].float()
        decided = torch.zeros(groups, dtype=torch.bool, device=device)
        accepted_token = torch.zeros(groups, dtype=torch.long, device=device)
        for slot in range(particles):
            trying = at_depth & ~decided & viable[:, slot]
            if skip and not bool(trying.any()):
                if not bool((at_depth & ~decided).any()):
                    break  # every group at this depth has accepted a candidate
                continue  # a slot no group tries changes nothing
            candidate = drafted[:, slot, depth]
            q = draft_probs[:, slot, depth].float()
            r_c = residual.gather(1, candidate.unsqueeze(1)).squeeze(1).double()
            q_c = q.gather(1, candidate.unsqueeze(1)).squeeze(1).double()
            # u < r/q accepts with probability min(1, r/q); q(c) = 0 with r(c) = 0 is NaN: rejected.
            accept = trying & (u_accept[:, depth, slot] * q_c < r_c)
            accepted_token = torch.where(accept, candidate, accepted_token)
            decided |= accept
            reject = trying & ~accept
            left = (residual - q).clamp_(min=0.0)
            mass = left.sum(dim=1, keepdim=True)
            updated = torch.where(mass > RESIDUAL_EPS, left / mass.clamp(min=1e-30), residual)
            residual = torch.where(reject.unsqueeze(1), updated, residual)
        rejected_all = at_depth & ~decided
        tokens[:, depth] = torch.where(decided, accepted_token, tokens[:, depth])
        accepted_count += decided.long()
        viable &= ~decided.unsqueeze(1) | (drafted[:, :, depth] == accepted_token.unsqueeze(1))
        final_probs = torch.where(rejected_all.unsqueeze(1), residual, final_probs)
        needs_final |= rejected_all
        walking &= decided

    bonus = walking & with_bonus & (depth_limit > k)
    if with_bonus:
        first_viable = viable.int().argmax(dim=1)
        final_probs = torch.where(bonus.unsqueeze(1), target_probs[group_index, first_viable, k].float(), final_probs)
    needs_final |= bonus
    drawn = sample_with(final_probs, u_final)
    num_committed = accepted_count + needs_final.long()
    tokens.scatter_(1, accepted_count.unsqueeze(1), torch.where(needs_final, drawn, pad).unsqueeze(1))
    return WalkResult(tokens, num_committed, accepted_count, viable.int().argmax(dim=1))


def accept_walk_reference(drafted, draft_probs, target_probs, depth_limit, u_accept, u_final, pad: int = 0) -> WalkResult:
    """`accept_walk` as the spec writes it: one group at a time, plain Python control flow."""
    groups, particles, k = drafted.shape
    with_bonus = target_probs.shape[2] > k
    tokens = torch.full((groups, k + 1), pad, dtype=torch.long)
    committed, accepted, winners = [], [], []
    for g in range(groups):
        viable = list(range(particles))
        out: list[int] = []
        final = None
        for depth in range(min(k, int(depth_limit[g]))):
            r = target_probs[g, viable[0], depth].float().clone()
            chosen = None
            for row in viable:
                c = int(drafted[g, row, depth])
                q = draft_probs[g, row, depth].float()
                if float(u_accept[g, depth, row]) * float(q[c]) < float(r[c]):
                    chosen = c
                    break
                left = (r - q).clamp(min=0.0)
                if float(left.sum()) > RESIDUAL_EPS:
                    r = left / left.sum()
            if chosen is None:
                final = r
                break
            out.append(chosen)
            viable = [row for row in viable if int(drafted[g, row, depth]) == chosen]
        num_accepted = len(out)
        if final is None and with_bonus and int(depth_limit[g]) > k:
            final = target_probs[g, viable[0], k].float()
        if final is not None:
            out.append(int(sample_with(final.unsqueeze(0), u_final[g : g + 1])[0]))
        tokens[g, : len(out)] = torch.tensor(out, dtype=torch.long)
        committed.append(len(out))
        accepted.append(num_accepted)
        winners.append(viable[0])
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return WalkResult(tokens, as_long(committed), as_long(accepted), as_long(winners))
