"""Fixed speculation length: the baseline every adaptive controller must beat."""

from __future__ import annotations

import numpy as np

from adaptk.core import SpeculationController
from adaptk.registry import register
from adaptk.types import Decision, StepContext


@register("fixed")
class Fixed(SpeculationController):
    """Draft the same ``k`` tokens for every sequence, every step (capped at ``k_max``).

    ``k=0`` is plain (non-speculative) decoding.

    >>> import adaptk
    >>> from adaptk import StepContext
    >>> controller = adaptk.make("fixed", k=4)
    >>> controller.decide(StepContext(step=0, seq_ids=[7, 8], context_lens=[10, 12], k_max=3)).num_draft_tokens
    array([3, 3])
    """

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        self.k = k

    def _decide(self, context: StepContext) -> Decision:
        return Decision(np.full(len(context.seq_ids), min(self.k, context.k_max), dtype=np.int64))
