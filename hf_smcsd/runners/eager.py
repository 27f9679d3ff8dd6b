"""The eager runner: a transformers causal LM and its own dynamic KV cache.

This is the reference backend: plain `model(...)` forwards, so it runs wherever the model
runs (CPU, one GPU, an accelerate device map with layers on several devices or offloaded to
CPU / disk). The cache only grows: prefill once, expand to N rows per prompt, append K or
K+1 tokens per call, overwrite dead rows on resampling.

Nothing here assumes that the logits or the cache live on `model.device`: inputs go to the
device the embedding runs on, logits come back to the caller's device, and every cache
layer is copied or shrunk on its own device.

Positions are passed explicitly (`position_ids`, counting real tokens only, as generate()
does with left padding); every supported family takes them (`hf_smcsd.families.SUPPORTED`), and
the attention mask is always passed at full length, for those that also read it (OPT, ALiBi).
Sliding-window layers need nothing special: their window is over cache positions, and left
padding only shifts every row's real tokens to the right by the same amount.

Rows of different lengths (exact mode, `rollback`): all rows share one physical cache
length. A rollback first crops the positions that every row drops, then masks each row's
remaining dropped positions out (attention mask 0: *holes*) and moves its next position id
back, so its next tokens get the positions they would have had without the dropped ones.
Positions come from `position_ids` (RoPE, learned positions) or from the mask's cumulative
sum (ALiBi), and both count real tokens only, so a row with holes attends and positions
exactly as a recompute of its kept tokens (tested per family against recomputes). When
every row carries at least `_COMPACT_MIN` holes or padding columns, the rows are compacted:
each row's real tokens move right, its holes become left padding, and the shared columns
are freed (one gather of the cache, amortised over many rounds). Sliding-window layers
count cache positions, holes included, so for them rows are compacted after every rollback
and the whole sequence must fit in the window (`compat.check_rollback_fits`).
"""

from __future__ import annotations

import inspect

import torch

from .. import compat
from ..resampling import CopyPlan

_COMPACT_MIN = 16  # compact when every row has at least this many masked columns ...
_COMPACT_FRACTION = 0.25  # ... and they are at least this share of the cache length


class EagerRunner:
    def __init__(self, model):
        compat.check_supported_model(model)  # recurrent / hybrid caches: a clear error, not wrong text
        self.model = model
        self.vocab_size = compat.output_vocab_size(model)
        self.input_device = compat.input_device(model)
        parameters = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in parameters
        self._takes_logits_to_keep = "logits_to_keep" in parameters
        self._sliding_window = compat.sliding_window(model)
        # Learned position tables (GPT-2, OPT) end at a fixed position. A round drafts K for
        # the group with the most budget left, so rows of other groups are fed past their own
        # budget; their tokens there are never kept (the loop counts only a row's budget), and
        # generate() refuses requests whose kept tokens would not fit. Those rows are fed the
        # last position the table holds instead of one it does not.
        self._position_limit = compat.learned_position_limit(model)
        self.cache = None
        self.attention_mask: torch.Tensor | None = None  # [rows, cached length]
        self.next_position: torch.Tensor | None = None  # [rows], position id of the next token

    @torch.no_grad()
    def _forward(self, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask, compat.cache_kwarg(self.model): self.cache, "use_cache": True}
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=input_ids, **kwargs)
        self.cache = compat.output_cache(out)
        return out.logits[:, -keep:, :].float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, particles: int) -> torch.Tensor:
        out_device = input_ids.device
        mask = attention_mask.to(self.input_device, torch.long)
        # Left padding: positions count real tokens only (as transformers' generate() does).
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        self.cache = None
        logits = self._forward(input_ids.to(self.input_device), mask, positions, keep=1)[:, -1]
        compat.check_supported_cache(self.cache, self.model)
        # The prompt's KV is computed once, then shared by its N particles.
        self.cache.batch_repeat_interleave(particles)
        self.attention_mask = mask.repeat_interleave(particles, dim=0)
        self.next_position = mask.sum(-1).repeat_interleave(particles, dim=0)
        return logits.to(out_device)

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, k = tokens.shape
        new = torch.ones(rows, k, dtype=self.attention_mask.dtype, device=self.input_device)
        self.attention_mask = torch.cat([self.attention_mask, new], dim=1)
        positions = self.next_position.unsqueeze(1) + torch.arange(k, device=self.input_device)
        if self._position_limit is not None:
            positions = positions.clamp(max=self._position_limit - 1)
        logits = self._forward(tokens.to(self.input_device), self.attention_mask, positions, keep=k)
        self.next_position = self.next_position + k
        return logits.to(tokens.device)

    def reorder(self, plan: CopyPlan) -> None:
        if len(plan) == 0:
            return
        dest = plan.dest.to(self.input_device)
        src = plan.src.to(self.input_device)
        compat.copy_cache_rows(self.cache, dest, src, total_rows=self.attention_mask.shape[0], tail=plan.tail)
        self.attention_mask[dest] = self.attention_mask[src]
        self.next_position[dest] = self.next_position[src]

    def expand(self, copies: int) -> None:
        """Every row becomes `copies` consecutive rows with its history (auto's plain rounds
        run one row per group, then give each group its N rows back)."""
        self.cache.batch_repeat_interleave(copies)
        self.attention_mask = self.attention_mask.repeat_interleave(copies, dim=0)
        self.next_position = self.next_position.repeat_interleave(copies, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.input_device)
        compat.select_cache_rows(self.cache, rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]

    def rollback(self, drop: torch.Tensor) -> None:
        drop = drop.to(self.input_device, torch.long)
        common = int(drop.min()) if drop.numel() else 0
        if common < 0:
            raise ValueError(f"rollback needs drop >= 0 for every row; got {common}.")
        if common > 0:  # positions every row drops: crop them off the shared length
            self.cache.crop(-common)
            self.attention_mask = self.attention_mask[:, :-common]
        holes = drop - common
        length = self.attention_mask.shape[1]
        column = torch.arange(length, device=self.input_device)
        self.attention_mask[column >= length - holes.unsqueeze(1)] = 0
        self.next_position = self.next_position - drop
        if self._sliding_window is not None:
            self._compact(minimum=1)
        else:
            self._compact(minimum=max(_COMPACT_MIN, int(_COMPACT_FRACTION * length)))

    def _compact(self, minimum: int) -> None:
        """Move every row's real tokens to the right end and drop the columns that are
        masked in every row, if there are at least `minimum` of them."""
        mask = self.attention_mask
        free = int((mask == 0).sum(dim=1).min())
        if free < minimum:
            return
        # A stable sort puts each row's masked columns first, its real tokens after, in order.
        order = torch.sort(mask, dim=1, stable=True).indices[:, free:]
        compat.gather_cache_positions(self.cache, order)
        self.attention_mask = mask.gather(1, order)
