"""Resampling: normalised weights -> ancestors -> a copy plan. Pure tensor functions.

A resampling step is split in two, as in the reference engine: first decide which particle
each slot descends from (`ancestors`), then turn that into the cheapest set of row copies
(`CopyPlan`). Every particle that survives keeps its own row; only the rows of particles
that die are overwritten, each with a copy of a particle that was drawn more than once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RESAMPLING_METHODS = ("systematic", "stratified", "multinomial", "residual")


def _search(weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Ancestor = first index whose cumulative weight exceeds the position."""
    cumulative = weights.cumsum(dim=-1)
    # Scale positions to the actual total (rounding leaves it a hair off 1) and keep them
    # strictly below it, so a trailing zero-weight particle can never be picked.
    total = cumulative[..., -1:]
    positions = torch.minimum(positions.to(cumulative.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    ancestors = torch.searchsorted(cumulative, positions, right=True)
    return ancestors.clamp_(max=weights.shape[-1] - 1)


def systematic(weights: torch.Tensor) -> torch.Tensor:
    """One uniform per group; positions `(u + k) / N` for k = 0..N-1."""
    groups, n = weights.shape
    u = torch.rand(groups, 1, device=weights.device, dtype=weights.dtype)
    positions = (u + torch.arange(n, device=weights.device, dtype=weights.dtype)) / n
    return _search(weights, positions)


def stratified(weights: torch.Tensor) -> torch.Tensor:
    """One uniform per slot; positions `(u_k + k) / N`."""
    groups, n = weights.shape
    u = torch.rand(groups, n, device=weights.device, dtype=weights.dtype)
    positions = (u + torch.arange(n, device=weights.device, dtype=weights.dtype)) / n
    return _search(weights, positions)


def multinomial(weights: torch.Tensor) -> torch.Tensor:
    """N independent draws per group."""
    n = weights.shape[-1]
    return torch.multinomial(weights, n, replacement=True)


def residual(weights: torch.Tensor) -> torch.Tensor:
    """`floor(N w)` deterministic copies, the remaining slots drawn from the residuals."""
    groups, n = weights.shape
    expected = weights * n
    # The tolerance keeps e.g. 49 * (1/49) = 0.99999... from losing its guaranteed copy;
    # the counts still sum to at most N (the tolerance adds less than 1 in total).
    counts = (expected + 1e-9).floor().long()
    remaining = n - counts.sum(dim=-1)  # [groups], 0 <= remaining < n
    leftover = (expected - counts).clamp_(min=0)
    # Groups with nothing left to draw have all-zero residuals; give them something valid
    # to draw from (the draws are discarded below).
    leftover = torch.where(remaining.unsqueeze(-1) > 0, leftover, torch.ones_like(leftover))
    draws = torch.multinomial(leftover, n, replacement=True)  # [groups, n]
    use = torch.arange(n, device=weights.device) < remaining.unsqueeze(-1)
    counts.scatter_add_(1, draws, use.long())
    return counts_to_ancestors(counts)


_METHODS = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}


def resample(weights: torch.Tensor, method: str = "systematic") -> torch.Tensor:
    """Ancestors `[groups, N]` (indices within each group) drawn from normalised weights."""
    try:
        fn = _METHODS[method]
    except KeyError:
        raise ValueError(
            f"Unknown smc_resample_method={method!r}; use one of {', '.join(RESAMPLING_METHODS)}."
        ) from None
    return fn(weights)


def ancestor_counts(ancestors: torch.Tensor) -> torch.Tensor:
    """How many slots descend from each particle: `[groups, N]`."""
    counts = torch.zeros_like(ancestors)
    return counts.scatter_add_(1, ancestors, torch.ones_like(ancestors))


def counts_to_ancestors(counts: torch.Tensor) -> torch.Tensor:
    """Sorted ancestors `[groups, N]` with particle j repeated `counts[g, j]` times."""
    groups, n = counts.shape
    particle = torch.arange(n, device=counts.device).repeat(groups)
    return torch.repeat_interleave(particle, counts.flatten()).view(groups, n)


@dataclass(frozen=True)
class CopyPlan:
    """Row copies that realise a resampling step: `rows[dest] <- rows[src]`.

    Rows are flat indices `group * N + particle` over the groups that were resampled.
    `dest` are the rows of particles that died, `src` the rows of particles drawn more
    than once; the two never overlap, so the copies can be applied in any order (or all at
    once with `index_copy_`).

    `tail`, when set, promises that each `dest` row already equals its `src` row except in
    the last `tail` positions (the exact mode's rows, identical before a round, differ only
    in what they drafted in it): a runner may copy just those. Ignoring it is correct too.
    """

    dest: torch.Tensor
    src: torch.Tensor
    tail: int | None = None

    def __len__(self) -> int:
        return int(self.dest.numel())

    def offset(self, rows: torch.Tensor) -> CopyPlan:
        """The same plan with group-local rows mapped through `rows` (a flat index map)."""
        return CopyPlan(dest=rows[self.dest], src=rows[self.src], tail=self.tail)

    def ancestors(self, total_rows: int) -> torch.Tensor:
        """The equivalent full ancestor vector: row i becomes a copy of row `ancestors[i]`."""
        full = torch.arange(total_rows, device=self.dest.device)
        full[self.dest] = self.src
        return full


def copy_plan(ancestors: torch.Tensor) -> CopyPlan:
    """The fewest row copies that turn the population into its resampled one.

    Particles drawn at least once stay where they are; each extra draw of a particle is
    copied into the row of a particle drawn zero times. Group-major on both sides, so the
    i-th dead row of a group receives the i-th surplus copy of the same group.
    """
    groups, n = ancestors.shape
    counts = ancestor_counts(ancestors).flatten()
    flat = torch.arange(groups * n, device=ancestors.device)
    dest = flat[counts == 0]
    src = torch.repeat_interleave(flat, (counts - 1).clamp(min=0))
    return CopyPlan(dest=dest, src=src)
