"""Two models whose logits differ in width only by padding rows run on their shared ids.

Checkpoints of one family often pad their embeddings to different widths (Qwen2.5-7B has
152064 rows, Qwen2.5-0.5B 151936, one tokenizer of 151665 tokens). SMC-SD then runs on the
first `vocab_size` ids, those both models have: each model's distribution is its softmax
over those ids alone, i.e. its own distribution restricted to the shared ids and
renormalised. A padding row is no token of the tokenizer, so the target's mass there is nil
by definition (a trained model gives it almost none anyway); `validation.shared_vocabulary`
checks that the extra rows really are padding before this is used.
"""

from __future__ import annotations

import torch


class SharedVocabulary:
    """A runner whose logits are cut to the first `vocab_size` ids; everything else is the
    wrapped runner's (reorder, keep, rollback, ...)."""

    def __init__(self, runner, vocab_size: int):
        self.runner = runner
        self.vocab_size = vocab_size

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, particles: int) -> torch.Tensor:
        return self.runner.prefill(input_ids, attention_mask, particles)[..., : self.vocab_size]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.runner.extend(tokens)[..., : self.vocab_size]

    def __getattr__(self, name):
        if name == "runner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.runner, name)
