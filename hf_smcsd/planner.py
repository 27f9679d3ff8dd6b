"""The round planner of `smc_mode="auto"`: quality first, then speed. Pure functions.

Before each round's drafts are drawn, and from earlier rounds only (docs/algorithm.md,
"Planning a round"), the planner fixes each group's mode (SMC-SD or exact) and the round's
K, where K = 0 is one plain target sampling step with no draft pass.

**Quality: a bound on what one SMC-SD round can bias.** An SMC-SD round over a K-token block
is, per group, sampling-importance-resampling (SIR) from N draft blocks with weights
`w = p / q`. SIR outputs x with probability `p(x) * E[N / (w(x) + S)]`, where S is the sum of
the other N - 1 weights (mean N - 1). By Jensen, `E[N / (w + S)] >= N / (w + N - 1)`, so

    TV(SIR output, p) <= sum_x p(x) * (w(x) - 1)^+ / (w(x) + N - 1)
                       = sum_x p(x) * (p(x) - q(x))^+ / (p(x) + (N - 1) q(x))      (`sir_bias`)

which is exactly TV(p, q) at N = 1 (SIR of one draw is the draft) and falls like
`E_p[(w - 1)^+] / N` for large N. Unlike `chi2 / N` it cannot exceed the target mass the
draft misses: a token the draft almost never proposes costs at most its target
probability, not `p^2 / q`. So the heavy tail of the per-token chi-square (docs, "Measured")
does not make it useless, and a draft that is too sharp (at a low draft temperature every
particle proposes the draft's argmax, `q` is a point mass) gets the bound it deserves: the
target mass off that argmax. The loop evaluates it exactly at every drafted position from
the full processed distributions `p_t`, `q_t` both models produced there; the group's
evidence is a per-token rate `r` (its mean over the round's counted positions, raised at
once by a worse round and lowered by half the gap per better round), and the bound for a
K-token block is `1 - (1 - r)^K` (per-position bounds composed as independent couplings;
the weights of a block multiply, so this is a model, calibrated by enumeration, not a
theorem: build_scripts/planner_table.py).

`smc_auto_threshold` is the largest predicted bias (total variation of one round's tokens
from the target's) an SMC-SD round may have; a group whose bound for the round's K exceeds
it runs exact. Exact rounds and plain rounds are lossless, so auto's bias is at most the
sum of the bounds of the SMC-SD rounds it ran. 0 never runs SMC-SD (lossless auto).

**Speed: expected tokens per second from measured costs.** Among the choices the bound
allows (every K from 0 to the user's `smc_gamma`; on N chains per group, SMC-SD where
allowed and exact elsewhere, or, where the loop can narrow its caches, on one exact chain
per group), pick the one with the most expected tokens per second for the whole batch:
tokens per round (SMC-SD K + 1, exact `1 + a + ... + a^K` from the acceptance `a` measured
on the group's exact rounds of as many chains, plain 1) over the predicted time of the
round (`CostModel`:
a draft step, a verify pass linear in the tokens it processes, and the loop's own time per
round, all measured where the run happens). K = 0 is always a choice, so auto is never much
slower than the target alone. One chain matters where rows cost: N chains accept a
little more per depth, but verify N times the tokens, which a compute-bound target (a
CPU, a large batch) pays in full; the bias evidence needs no N rows (it is computed from
both models' distributions at each drafted position), so probes run on one chain. A run
that decodes plainly probes the draft again after
`probe_after` plain rounds (doubling each time the draft still does not pay), so a draft
that starts paying later is found at a logarithmic cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_BIAS_BOUND = 0.1  # smc_auto_threshold: see build_scripts/planner_table.py, auto_sweep.py and docs/benchmarks.md
RATE_DECAY = 0.1  # a better round lowers the evidence by this share of the gap (slowly: see update_rate)
PRIOR_ACCEPTANCE = 0.5  # per-depth acceptance assumed before anything was measured
PRIOR_WEIGHT = 2.0  # the single-chain estimate counts as this many exact rounds
FIRST_PROBE = 8  # plain rounds before the draft is tried again (then doubling) ...
PROBE_FACTOR = 8.0  # ... and plain time, in multiples of the probe's predicted time (ProbeSchedule)
# A scheduled probe with fewer tokens than this left to any prompt is skipped: a draft it
# found paying could not earn back the probe's cost (one drafted round, a few plain steps'
# time) in what is left. (Not the first probe, where the whole output is left.)
LATE_PROBE = 16
# Drafted positions (per chain) a group must have been measured at before its first SMC-SD
# round: text alternates between easy and hard spots (see update_rate), and a rate taken from
# one easy round let SMC-SD land on the answers of the weak pair. 16 is about one line of
# the additions task.
MIN_EVIDENCE = 16


# --- Quality -------------------------------------------------------------------------


def sir_bias(target_probs: torch.Tensor, draft_probs: torch.Tensor, particles: int) -> torch.Tensor:
    """`[..., V]` probabilities -> `[...]`: the bound on the total variation between one SIR
    step over `particles` draws from `draft_probs` and `target_probs` (module docstring).
    At `particles=1` it is TV(p, q)."""
    return _measures(target_probs.float(), draft_probs.float().clone(), particles)[0]


def _measures(p: torch.Tensor, q: torch.Tensor, particles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(SIR bias bound, TV) over the last dimension; overwrites `q` (a few passes over
    `[rows, k, V]` in place: this runs every auto round)."""
    gap = (p - q).clamp_(min=0.0)  # (p - q)^+: zero wherever the bound has no term
    tv = gap.sum(dim=-1)
    # p + (N - 1) q > 0 wherever gap > 0; elsewhere the clamp keeps 0 / 0 out.
    denominator = q.mul_(particles - 1).add_(p).clamp_(min=1e-30)
    bias = gap.mul_(p).div_(denominator).sum(dim=-1)
    return bias.clamp_(max=1.0), tv


def position_measures(target_lp: torch.Tensor, draft_lp: torch.Tensor, particles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per drafted position `[rows, k]`: (SIR bias bound at N = `particles`, TV(p, q)) from
    the processed log-probabilities `[rows, k, V]` of both models there."""
    return _measures(target_lp.float().exp(), draft_lp.float().exp(), particles)


def group_means(values: torch.Tensor, counted: torch.Tensor, particles: int) -> torch.Tensor:
    """Mean over each group's counted positions (`[G * N, k]` -> `[G]`, float64); NaN where
    nothing was counted."""
    values = torch.where(counted, values.double(), 0.0).view(-1, particles * values.shape[1])
    count = counted.view(-1, particles * counted.shape[1]).sum(dim=1)
    return torch.where(count > 0, values.sum(dim=1) / count.clamp(min=1), float("nan"))


def update_rate(rate: torch.Tensor, observed: torch.Tensor, decay: float = RATE_DECAY) -> torch.Tensor:
    """Evidence after a round: a worse observation is taken at once (one bad round is enough
    to stop trusting the draft), a better one lowers the rate by `decay` of the gap. NaN
    (no evidence) on either side leaves the other.

    Slowly, because text alternates: a weak draft that fails on every answer digit agrees
    on the format tokens between them (per-round rates of the weak pair's additions at N = 4
    swing between 0.03 and 0.7, the committed pair's stay within 0.01 to 0.08), and the
    round after an easy one is often a hard one. A rate that fell back after each easy
    round let SMC-SD rounds land on answers (auto_sweep, weak pair: 75% where the target
    has 98%)."""
    lowered = rate - decay * (rate - observed)
    blended = torch.where(observed > rate, observed, lowered)
    blended = torch.where(torch.isnan(rate), observed, blended)
    return torch.where(torch.isnan(observed), rate, blended)


def update_mean(mean: torch.Tensor, observed: torch.Tensor, decay: float = RATE_DECAY) -> torch.Tensor:
    """Running mean, `decay` the weight of the newest observation; NaN changes nothing."""
    blended = mean + decay * (observed - mean)
    blended = torch.where(torch.isnan(mean), observed, blended)
    return torch.where(torch.isnan(observed), mean, blended)


def usable_rate(rate: torch.Tensor, positions: torch.Tensor, minimum: int | None = None) -> torch.Tensor:
    """The rate where at least `minimum` (default `MIN_EVIDENCE`) drafted positions were
    measured, NaN (no SMC-SD) elsewhere."""
    minimum = MIN_EVIDENCE if minimum is None else minimum
    return torch.where(positions >= minimum, rate, float("nan"))


def block_bias(rate: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """The bound for a K-token block from the per-token rate: `1 - (1 - r)^K` (NaN: no
    evidence, stays NaN, which allows no SMC-SD round)."""
    return 1.0 - (1.0 - rate.clamp(0.0, 1.0)) ** k


# --- Speed ---------------------------------------------------------------------------


def acceptance(accepted: torch.Tensor, rejected: torch.Tensor, single_chain: torch.Tensor) -> torch.Tensor:
    """Per-depth acceptance of a group's exact rounds `[G]`: the truncated-geometric
    estimate `accepted / (accepted + rejections)` over its exact rounds (`accepted`: drafts
    accepted in all of them, `rejected`: rounds that ended on a rejection), with the
    single-chain estimate `1 - TV` (or `PRIOR_ACCEPTANCE` where NaN) as `PRIOR_WEIGHT`
    pseudo-rounds. N chains accept at least as often as one."""
    prior = torch.where(torch.isnan(single_chain), PRIOR_ACCEPTANCE, single_chain).clamp(0.0, 1.0)
    a = (accepted.double() + PRIOR_WEIGHT * prior) / (accepted.double() + rejected.double() + PRIOR_WEIGHT)
    return a.clamp(0.0, 0.999)


def expected_exact_tokens(a: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens an exact round commits on average: `1 + a + ... + a^K`."""
    powers = a.unsqueeze(-1) ** torch.arange(k + 1, device=a.device, dtype=a.dtype)
    return powers.sum(dim=-1)


def _exact_tokens_by_k(a: torch.Tensor, k_column: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """`expected_exact_tokens` for every K of `k_column` `[C, 1]` at once (`depth`: 0 .. the
    largest K), per group of `a` `[G]` -> `[C, G]`; K = 0 is one (plain) token. Device only."""
    powers = a.unsqueeze(-1) ** depth
    return torch.where(depth <= k_column.unsqueeze(-1), powers.unsqueeze(0), 0.0).sum(dim=-1)


@dataclass
class LinearCost:
    """Seconds of a call as `fixed + per_token * tokens` (SmartSpec's model: linear in the
    tokens processed), fitted by least squares to the latest time seen at each token count."""

    points: dict[int, float] = field(default_factory=dict)
    smoothing: float = 0.5  # weight of a new observation at a token count already seen
    _fitted: tuple = field(default=((), (0.0, 0.0)), repr=False, compare=False)  # (points, fit): a plan asks ~10 times

    def observe(self, tokens: int, seconds: float) -> None:
        old = self.points.get(tokens)
        self.points[tokens] = seconds if old is None else old + self.smoothing * (seconds - old)

    def fit(self) -> tuple[float, float]:
        key = tuple(self.points.items())
        if key != self._fitted[0]:
            self._fitted = (key, self._least_squares())
        return self._fitted[1]

    def _least_squares(self) -> tuple[float, float]:
        if not self.points:
            return 0.0, 0.0
        xs, ys = list(self.points), list(self.points.values())
        if len(xs) == 1:
            return ys[0], 0.0  # one point: no slope known, assume overhead-bound
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = max(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var, 0.0)
        return max(mean_y - slope * mean_x, 0.0), slope

    def __call__(self, tokens: int) -> float:
        fixed, per_token = self.fit()
        return fixed + per_token * tokens

    @property
    def known(self) -> bool:
        return bool(self.points)


@dataclass
class CostModel:
    """Measured costs of one run: the target's forward (`verify`, by tokens = rows x width),
    one draft step (by rows), and the loop's own seconds per round besides the forwards."""

    verify: LinearCost = field(default_factory=LinearCost)
    draft_step: LinearCost = field(default_factory=LinearCost)
    overhead: dict[str, float] = field(default_factory=dict)  # "plain" / "spec" -> seconds per round
    smoothing: float = 0.3

    def observe_overhead(self, kind: str, seconds: float) -> None:
        old = self.overhead.get(kind)
        self.overhead[kind] = max(seconds, 0.0) if old is None else old + self.smoothing * (max(seconds, 0.0) - old)

    def round_seconds(self, rows: int, k: int) -> float:
        """Predicted seconds of a round over `rows` rows drafting `k` tokens. A plain round's
        own overhead counts as 0 until measured (a drafted round's, which holds far more
        work, would hide plain decoding; the loop measures it with a one-step burst)."""
        if k == 0:
            return self.verify(rows) + self.overhead.get("plain", 0.0)
        return (k * self.draft_step(rows) + self.verify(rows * (k + 1))
                + self.overhead.get("spec", self.overhead.get("plain", 0.0)))


@dataclass
class Plan:
    """One round's shape, with the numbers it was chosen by. Every field stays on the device
    (choosing costs no host synchronisation): the loop reads `k` with its round-start
    summary (`smc.choose_round_shape`), the diagnostics read the rest at the end."""

    k: torch.Tensor  # 0-dim long: draft tokens per row; 0 is a plain target step, no draft pass
    exact: torch.Tensor  # [G] bool: exact groups (SMC-SD elsewhere); all False when k == 0
    bias: torch.Tensor  # [G] the bound of an SMC-SD round at this K (NaN: no evidence)
    tokens_per_s: torch.Tensor  # 0-dim float64: predicted, whole batch
    tokens_per_s_by_k: torch.Tensor  # [choices] predicted for every choice (`ks`, `chains_by_choice`)
    ks: tuple[int, ...] = ()  # the K of each entry of `tokens_per_s_by_k`
    chains: torch.Tensor | None = None  # 0-dim long: rows per group the round runs (1: one exact chain)
    chains_by_choice: tuple[int, ...] = ()  # the chains of each entry of `tokens_per_s_by_k`


def plan_round(
    rate: torch.Tensor,
    accept: torch.Tensor,
    costs: CostModel,
    rows: int,
    gamma: int,
    bound: float,
    allow_plain: bool = True,
    allow_smc: bool = True,
    live: torch.Tensor | None = None,
    plain_rows: int | None = None,
    single_accept: torch.Tensor | None = None,
    particles: int = 0,
) -> Plan:
    """The round's shape (module docstring). `rate` `[G]`: per-token bias evidence; `accept`
    `[G]`: per-depth exact acceptance of N chains; `rows`: the rows of an N-chain round;
    `gamma`: the largest K; `allow_plain=False` forces a draft (a probe); `allow_smc=False`
    (greedy) keeps every drafting group exact; `live` `[G]`: groups whose tokens count (those
    ending now do not); `plain_rows`: the rows a plain round runs (one per group where the
    loop can narrow). Where the loop can narrow (`single_accept` `[G]`, the per-depth
    acceptance of one chain, and `particles` N > 1 given), every K is also a choice as one
    exact chain per group over `plain_rows` rows: lossless, and at a large batch or on a
    compute-bound target often faster than N chains. Costs not measured yet count as
    equal for every choice (no preference from speed), so the first rounds draft at the
    user's K. The choices are plain, N chains at K = 1 .. gamma, then one chain at K = 1 ..
    gamma; ties go to the last of them. No host synchronisation: the
    expected tokens stay on the device, the predicted seconds (host numbers of the cost
    model) go to it."""
    ks = list(range(0 if allow_plain else 1, gamma + 1))
    weight = torch.ones_like(rate) if live is None else live.to(rate.dtype)
    # Every K at once, `[choices, G]` (a handful of tensor operations: this runs every round).
    # (Built on the device: `torch.tensor(list, device=cuda)` would wait for the GPU.)
    k_values = torch.arange(ks[0], gamma + 1, device=rate.device)
    k_column = k_values.to(rate.dtype).unsqueeze(1)
    bias = block_bias(rate.unsqueeze(0), k_column)
    smc = (bias <= bound) & allow_smc & (k_column > 0)  # NaN compares False: no evidence, no SMC-SD
    depth = torch.arange(gamma + 1, device=rate.device)
    exact_tokens = _exact_tokens_by_k(accept, k_column, depth)  # 1 + a + ... + a^K (K = 0: one plain token)
    per_group = torch.where(smc, k_column + 1, exact_tokens)
    tokens = (per_group * weight).sum(dim=-1).double()
    exact_by_k = ~smc & (k_column > 0)
    bias_by_k = torch.where(k_column > 0, bias, float("nan"))
    plain_rows = rows if plain_rows is None else plain_rows
    choice_rows = [plain_rows if k == 0 else rows for k in ks]
    chains = [1 if k == 0 and plain_rows < rows else particles or 1 for k in ks]
    single = single_accept is not None and particles > 1 and plain_rows < rows
    if single:  # one exact chain per group: K = 1 .. gamma after the N-chain choices
        single_ks = list(range(1, gamma + 1))
        single_tokens = _exact_tokens_by_k(single_accept, k_column[-gamma:], depth)
        tokens = torch.cat([tokens, (single_tokens * weight).sum(dim=-1).double()])
        exact_by_k = torch.cat([exact_by_k, torch.ones_like(exact_by_k[-gamma:])])
        bias_by_k = torch.cat([bias_by_k, bias_by_k[-gamma:]])
        k_values = torch.cat([k_values, k_values[-gamma:]])
        ks, choice_rows, chains = ks + single_ks, choice_rows + [plain_rows] * gamma, chains + [1] * gamma
    if costs.verify.known and costs.draft_step.known:
        seconds = [max(costs.round_seconds(r, k), 1e-9) for r, k in zip(choice_rows, ks)]
    else:
        seconds = [1.0 for _ in ks]
        if allow_plain:  # nothing measured: draft at the user's K (the first round measures it)
            tokens[0] = -1.0
    # Host numbers to the device without waiting for it (a blocking copy would synchronise).
    speed = tokens / torch.tensor(seconds, dtype=tokens.dtype).to(tokens.device, non_blocking=True)
    # The fastest; ties go to the longer block (argmax returns the first maximum: search from the end).
    best = (len(ks) - 1 - torch.argmax(speed.flip(0))).view(1)
    pick = lambda values: values.index_select(0, best)[0]  # noqa: E731  (no host read)
    k = k_values.index_select(0, best)[0]
    chains_on_device = torch.tensor(chains, dtype=torch.long).to(rate.device, non_blocking=True)
    return Plan(k=k, exact=pick(exact_by_k), bias=pick(bias_by_k), tokens_per_s=speed.index_select(0, best)[0],
                tokens_per_s_by_k=speed, ks=tuple(ks), chains=chains_on_device.index_select(0, best)[0],
                chains_by_choice=tuple(chains))


def drafting_can_pay(costs: CostModel, rows: int, plain_rows: int, gamma: int, acceptance: float = 1.0) -> bool:
    """Whether some K could beat plain decoding at a per-depth `acceptance` (1: every draft
    accepted, K + 1 tokens per group and round; else `1 + a + ... + a^K`), by the measured
    costs: a drafted round's predicted time against that many plain rounds'. Where no K can (a compute-bound target,
    whose verify pass costs about what its tokens cost; or a pair whose acceptance an
    earlier call measured too low), a first probe only loses time (the loop skips it;
    later probes keep their schedule, so a wrong measurement is measured again). True
    while costs are unknown."""
    if not (costs.verify.known and costs.draft_step.known):
        return True
    plain = costs.round_seconds(plain_rows, 0)
    a = torch.tensor(acceptance, dtype=torch.float64)
    return any(float(expected_exact_tokens(a, k)) * plain > costs.round_seconds(rows, k) for k in range(1, gamma + 1))


@dataclass
class ProbeSchedule:
    """When a run that decodes plainly tries the draft again: after `wait` plain rounds in a
    row, and once those plain rounds took `PROBE_FACTOR` times what the probe is predicted
    to cost (so probing costs at most about 1 / PROBE_FACTOR of the plain time: at a large
    batch a probe's N x (K+1) rows cost many plain steps). A probe followed by plain decoding
    again doubles both; a round that drafts by choice resets them. The first round drafts
    (`first`): a draft that pays is found at once, one that does not costs a round; the loop
    clears `first` where no acceptance could pay, or none as high as an earlier call measured
    of the pair (`drafting_can_pay`; `smc._ACCEPTANCE_MEMORY`)."""

    wait: int = FIRST_PROBE
    factor: float = PROBE_FACTOR
    streak: int = 0
    plain_seconds: float = 0.0  # predicted time of the plain rounds since the last draft
    probed: bool = False  # the last round was a probe
    first: bool = True  # no round planned yet

    def must_draft(self, probe_seconds: float = 0.0, left: int | None = None) -> bool:
        """Whether the round now must draft. `left`: the most tokens any prompt has left
        (None: unknown); a scheduled probe with fewer than `LATE_PROBE` left is skipped."""
        if self.first:
            return True
        if left is not None and left < LATE_PROBE:
            return False
        return self.streak >= self.wait and self.plain_seconds >= self.factor * probe_seconds

    def plain_rounds_before_probe(self, probe_seconds: float, seconds: float, left: int | None = None) -> int | None:
        """How many plain rounds of `seconds` each may run, from now, before `must_draft`
        holds again (at least 1; None: never, when plain rounds take no time but a probe
        does, or when the probe would come with fewer than `LATE_PROBE` of `left` tokens
        left). The loop runs that many in one burst (`smc.plain_burst`)."""
        wait, factor = (2 * self.wait, 2 * self.factor) if self.probed else (self.wait, self.factor)
        rounds = max(wait - self.streak, 1)
        short = factor * probe_seconds - self.plain_seconds
        if short > 0:
            if seconds <= 0:
                return None
            rounds = max(rounds, math.ceil(short / seconds))
        if left is not None and left - rounds < LATE_PROBE:
            return None
        return rounds

    def after(self, k: int, probe: bool, seconds: float = 0.0, rounds: int = 1) -> None:
        """Record the round just planned: its K, whether it was a forced probe, and its
        predicted seconds; a plain K may stand for `rounds` plain rounds in a row."""
        self.first = False
        if k == 0:
            if self.probed:
                self.wait *= 2
                self.factor *= 2
            self.streak += rounds
            self.plain_seconds += rounds * seconds
        else:
            self.streak, self.plain_seconds = 0, 0.0
            if not probe:
                self.wait, self.factor = FIRST_PROBE, PROBE_FACTOR
        self.probed = probe
