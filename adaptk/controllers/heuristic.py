"""Acceptance heuristics: Hugging Face's +2/-1 schedule (and, later, GammaTune-like rules)."""

from __future__ import annotations

import numpy as np

from adaptk.core import SpeculationController
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext


@register("hf-heuristic")
class HFHeuristic(SpeculationController):
    """Hugging Face's ``num_assistant_tokens_schedule="heuristic"``, per sequence.

    Rule [code, transformers 5.23]: after a round in which every drafted token was accepted,
    ``k += 2``; otherwise ``k = max(1, k - 1)``. A round that drafted nothing counts as fully
    accepted (HF's quirk, kept). HF lets ``k`` grow without bound; here it is held in
    ``[1, k_max]`` so a long run of successes does not take as long to undo.

    Parameters
    ----------
    initial_k
        Starting length (HF 5.x default 20; older releases 5), capped at ``k_max``.
    carry_over
        ``True`` is HF's ``heuristic``: a new sequence starts from the length the last finished
        round reached. ``False`` is ``heuristic_transient``: every sequence starts at ``initial_k``.

    >>> import adaptk
    >>> from adaptk import StepContext, Feedback
    >>> c = adaptk.make("hf-heuristic", initial_k=4)
    >>> c.decide(StepContext(step=0, seq_ids=[1], context_lens=[5], k_max=8)).num_draft_tokens
    array([4])
    >>> c.update(Feedback(seq_ids=[1], num_draft_tokens=[4], num_accepted_tokens=[4]))
    >>> c.decide(StepContext(step=1, seq_ids=[1], context_lens=[10], k_max=8)).num_draft_tokens
    array([6])
    >>> c.update(Feedback(seq_ids=[1], num_draft_tokens=[6], num_accepted_tokens=[2]))
    >>> c.decide(StepContext(step=2, seq_ids=[1], context_lens=[13], k_max=8)).num_draft_tokens
    array([5])
    """

    def __init__(self, initial_k: int = 20, carry_over: bool = True) -> None:
        super().__init__()
        if isinstance(initial_k, bool) or not isinstance(initial_k, (int, np.integer)) or initial_k < 1:
            raise ValueError(f"initial_k must be an int >= 1, got {initial_k!r}")
        self.initial_k = initial_k
        self.carry_over = carry_over
        self._k: dict[int, int] = {}
        self._last_k: int = initial_k

    def _decide(self, context: StepContext) -> Decision:
        start = self._last_k if self.carry_over else self.initial_k
        lengths = [self._k.setdefault(seq_id, start) for seq_id in context.seq_ids.tolist()]
        return Decision(np.minimum(np.asarray(lengths, dtype=np.int64), context.k_max))

    def _update(self, feedback: Feedback) -> None:
        cap = max(1, self._k_max or 1)
        full = feedback.num_accepted_tokens == feedback.num_draft_tokens
        for seq_id, all_accepted in zip(feedback.seq_ids.tolist(), full.tolist()):
            k = self._k.get(seq_id, self.initial_k)
            k = min(k + 2, cap) if all_accepted else max(1, k - 1)
            self._k[seq_id] = k
            self._last_k = k

    def _end_sequence(self, seq_id: int) -> None:
        self._k.pop(seq_id, None)
