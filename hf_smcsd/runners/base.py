"""The interface between the SMC loop and a model backend.

The loop (`hf_smcsd.smc`) sees a model only through these five calls. A runner owns its
KV cache, its attention bookkeeping and its device; rows are particles, group-major
(`prompt * N + particle`), and every call acts on all rows at once.

Rows may hold different numbers of tokens: after an exact-mode round (see `rollback`) each
prompt keeps only the tokens its accept walk committed. Every call must handle that: `extend`
appends each row's new tokens right after that row's own last kept token (its position ids
continue from there), `reorder` copies a row's whole history *and its length*, `keep` keeps
each kept row's length.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..resampling import CopyPlan


@runtime_checkable
class Runner(Protocol):
    vocab_size: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, particles: int) -> torch.Tensor:
        """Run the prompts once (one row each, left padded), then give every prompt
        `particles` rows that share its prompt cache. Returns the last position's logits,
        `[prompts, vocab]`, float32, on the device of `input_ids`."""
        ...

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` `[rows, k]` to every row; return logits for each of the k new
        positions, `[rows, k, vocab]`, float32, on the device of `tokens`."""
        ...

    def reorder(self, plan: CopyPlan) -> None:
        """Overwrite rows `plan.dest` with rows `plan.src` (the whole history of each)."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (sorted indices), in that order; the rest leave the batch."""
        ...

    # Optional: `expand(copies: int) -> None`, every row becomes `copies` consecutive rows with
    # its whole history (as the prefill's expansion). Runners that have it let auto's plain
    # rounds run one row per group (`keep`), then give each group its N rows back.

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[r]` tokens of each row r (`[rows]`, integer, `0 <= drop[r]`
        <= tokens that row received since its prefill; 0 leaves the row as it is).

        Afterwards the row behaves exactly as if the dropped tokens had never been fed: the
        next `extend` writes right after its last kept token, with the position ids that
        follow it, and attends to nothing that was dropped. Only the rows' tails change:
        no runner may copy whole caches to do this."""
        ...
