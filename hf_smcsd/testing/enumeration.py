"""Exact fidelity on enumerable models: the target's true distribution over short outputs.

With a vocabulary of a few tokens and a few new tokens, every possible continuation can be
scored, so the output distribution of any sampler can be compared with the exact target
distribution by total variation. Used by the exactness tests and the fidelity harness.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import torch


def _truncate(sequence: tuple[int, ...], eos: set[int]) -> tuple[int, ...]:
    for i, token in enumerate(sequence):
        if token in eos:
            return sequence[: i + 1]
    return sequence


@torch.no_grad()
def exact_distribution(
    model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_ids: tuple[int, ...] = (),
    logits_processor=None,
    alpha: float = 1.0,
) -> dict[tuple[int, ...], float]:
    """Probability of every output (new tokens, cut after the first stop token).

    Scores all `V ** max_new_tokens` continuations in one batched forward; keep V and the
    length small. With `logits_processor` (a transformers `LogitsProcessorList`, which
    then also carries the temperature), each position's scores are processed as
    transformers' sampling does, seeing the sequence up to that position. With `alpha`
    != 1 it is the power-tempered target `prod_t p(x_t)^alpha`, normalised over outputs.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    continuations = torch.tensor(list(itertools.product(range(vocab), repeat=max_new_tokens)))
    count = continuations.shape[0]
    inputs = torch.cat([torch.tensor(prompt).expand(count, -1), continuations[:, :-1]], dim=1)
    logits = model(inputs).logits[:, len(prompt) - 1 :].double()
    if logits_processor is None:
        log_p = torch.log_softmax(logits / temperature, dim=-1)
    else:
        log_p = torch.stack(
            [torch.log_softmax(logits_processor(inputs[:, : len(prompt) + j], logits[:, j]), dim=-1)
             for j in range(max_new_tokens)],
            dim=1,
        )
    per_token = log_p.gather(-1, continuations.unsqueeze(-1)).squeeze(-1)  # [count, new]
    # Tokens after a stop do not count: the output ends there.
    eos = set(eos_token_ids)
    is_stop = torch.isin(continuations, torch.tensor(sorted(eos), dtype=torch.long)) if eos else None
    if is_stop is not None:
        after_stop = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0
        per_token = per_token.masked_fill(after_stop, 0.0)
    seq_log_p = per_token.sum(dim=1)
    # Each truncated output is reached by V^(cut tokens) continuations sharing its probability:
    # count it once (the first continuation, with all cut tokens 0).
    distribution: dict[tuple[int, ...], float] = {}
    for sequence, lp in zip(map(tuple, continuations.tolist()), (alpha * seq_log_p).tolist()):
        out = _truncate(sequence, eos)
        if len(out) < len(sequence) and any(sequence[len(out) :]):
            continue
        distribution[out] = distribution.get(out, 0.0) + math.exp(lp)
    total = sum(distribution.values())
    return {key: value / total for key, value in distribution.items()}


def empirical_distribution(samples: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    counts = Counter(samples)
    total = len(samples)
    return {key: value / total for key, value in counts.items()}


def total_variation(p: dict, q: dict) -> float:
    """`0.5 * sum |p - q|` over the union of supports."""
    return 0.5 * sum(abs(p.get(key, 0.0) - q.get(key, 0.0)) for key in set(p) | set(q))


def sampling_noise_tv(exact: dict, samples: int, repeats: int = 200, seed: int = 0) -> torch.Tensor:
    """TVs of `repeats` empirical distributions of `samples` exact draws: the noise floor of
    a perfect sampler at this sample size (compare a sampler's TV with its quantiles)."""
    keys = list(exact)
    probs = torch.tensor([exact[k] for k in keys], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    counts = torch.stack(
        [torch.bincount(torch.multinomial(probs, samples, replacement=True, generator=generator), minlength=len(keys))
         for _ in range(repeats)]
    ).double()
    return 0.5 * (counts / samples - probs).abs().sum(dim=1)
