"""Acceptance heuristics: Hugging Face's +2/-1 schedule and GammaTune-like smoothed lengths."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from adaptk.controllers.stopping import _ConfidenceTuning, _SeqColumn, _SeqTable, _ThresholdStop
from adaptk.core import SpeculationController, StopRule
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
        ids = feedback.seq_ids.tolist()
        if not ids:
            return
        cap = max(1, self._k_max or 1)
        get, initial = self._k.get, self.initial_k
        k = np.fromiter((get(s, initial) for s in ids), dtype=np.int64, count=len(ids))
        full = feedback.num_accepted_tokens == feedback.num_draft_tokens
        lengths = np.where(full, np.minimum(k + 2, cap), np.maximum(k - 1, 1)).tolist()
        self._k.update(zip(ids, lengths, strict=True))
        self._last_k = lengths[-1]  # HF keeps one length: the last sequence updated carries over

    def _end_sequence(self, seq_id: int) -> None:
        self._k.pop(seq_id, None)


@register("gammatune-like")
class GammaTuneLike(SpeculationController):
    """A smoothed acceptance-driven length, *in the spirit of* GammaTune (arXiv 2504.00030).

    GammaTune's exact rule is not public (only its abstract: training-free, adjusts the length
    from token acceptance with a heuristic switching mechanism). This is our reconstruction
    [algorithms.md §3], not the paper's method, and makes no claim to its numbers. Per sequence::

        full acceptance (a == k):  γ ← γ + delta_up
        otherwise:                 γ ← η·γ + (1 − η)·(a + 1)
        k = clip(round(γ), k_min, k_max)

    ``γ`` itself is kept in ``[k_min, k_max]`` so a long run of successes does not take long to
    undo. A round that drafted nothing carries no information and leaves ``γ`` unchanged. New
    sequences start at ``initial_k``, or with ``carry_over`` at the mean ``γ`` of the last update
    (the text's predictability is shared across requests more than it is not).

    Per-step cost: about 21 µs for decide + update at batch 64 (``fixed``: 12 µs). ``γ`` lives in
    rows of a numpy column (``_gamma`` is a ``{seq_id: γ}`` view), so a step is one row lookup
    (cached while the batch is unchanged) and a few vectorised operations.

    >>> from adaptk import StepContext, Feedback
    >>> from adaptk.controllers.heuristic import GammaTuneLike
    >>> c = GammaTuneLike(initial_k=4, delta_up=1.0, eta=0.5)
    >>> c.decide(StepContext(step=0, seq_ids=[1], context_lens=[5], k_max=8)).num_draft_tokens
    array([4])
    >>> c.update(Feedback(seq_ids=[1], num_draft_tokens=[4], num_accepted_tokens=[4]))   # γ = 5
    >>> c.update(Feedback(seq_ids=[1], num_draft_tokens=[5], num_accepted_tokens=[0]))   # γ = 3
    >>> c.decide(StepContext(step=2, seq_ids=[1], context_lens=[13], k_max=8)).num_draft_tokens
    array([3])
    """

    def __init__(
        self,
        initial_k: int = 4,
        delta_up: float = 1.0,
        eta: float = 0.5,
        k_min: int = 1,
        carry_over: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(k_min, bool) or not isinstance(k_min, (int, np.integer)) or k_min < 0:
            raise ValueError(f"k_min must be a non-negative int, got {k_min!r}")
        if isinstance(initial_k, bool) or not isinstance(initial_k, (int, np.integer)) or initial_k < k_min:
            raise ValueError(f"initial_k must be an int >= k_min, got {initial_k!r}")
        if not 0.0 <= eta < 1.0:
            raise ValueError(f"eta must lie in [0, 1), got {eta!r}")
        if delta_up < 0:
            raise ValueError(f"delta_up must be >= 0, got {delta_up!r}")
        self.initial_k = initial_k
        self.delta_up = delta_up
        self.eta = eta
        self.k_min = k_min
        self.carry_over = carry_over
        self._seqs = _SeqTable(gamma=float(initial_k))
        self._start: float = float(initial_k)

    @property
    def _gamma(self) -> Mapping[int, float]:
        """``{seq_id: γ}`` of the live sequences."""
        return _SeqColumn(self._seqs, "gamma")

    def _start_gamma(self) -> float:
        return self._start if self.carry_over else float(self.initial_k)

    def _decide(self, context: StepContext) -> Decision:
        rows = self._seqs.rows(context.seq_ids, gamma=self._start_gamma())
        k = np.rint(self._seqs.cols["gamma"][rows])  # half to even, as round()
        # γ >= k_min always (it starts there or above and updates keep it there): only k_max clips
        np.minimum(k, context.k_max, out=k)
        return Decision(k.astype(np.int64))

    def _update(self, feedback: Feedback) -> None:
        k = feedback.num_draft_tokens
        n = len(k)
        drafted = np.count_nonzero(k)
        if not drafted:
            return
        rows = self._seqs.rows(feedback.seq_ids, gamma=self._start_gamma())
        a = feedback.num_accepted_tokens
        if drafted < n:  # a round that drafted nothing carries no information
            keep = k > 0
            rows, k, a = rows[keep], k[keep], a[keep]
        column = self._seqs.cols["gamma"]
        gamma = column[rows]
        gamma = np.where(a == k, gamma + self.delta_up, self.eta * gamma + (a + 1) * (1.0 - self.eta))
        if self.k_min > 1:  # with k_min <= 1 neither branch can go below k_min (a + 1 >= 1)
            np.maximum(gamma, self.k_min, out=gamma)
        np.minimum(gamma, max(self.k_min, self._k_max or 1), out=gamma)
        column[rows] = gamma
        self._start = float(gamma.sum()) / len(gamma)

    def _end_sequence(self, seq_id: int) -> None:
        self._seqs.discard(seq_id)


@register("gammatune-like+")
class GammaTuneLikePlus(_ConfidenceTuning, GammaTuneLike):
    """``gammatune-like`` plus the draft-confidence stop rule of §7 (our reconstruction of GammaTune+).

    The length rule is :class:`GammaTuneLike`'s; inside a round the drafter stops when the draft's
    top-1 probability falls below a threshold (start 0.4) that, with ``self_tuning``, is refitted
    as in :class:`adaptk.controllers.stopping.Confidence` (HF's ROC rule, ``argmin(fpr + 3·fnr)``).
    Not GammaTune+ itself: its rule is not public.

    Per-step cost: about 38 µs (median) for decide + update at batch 64 — ``gammatune-like``'s
    21 µs plus about 10 µs checking the ``draft_probs``
    matrix its threshold tuning reads (only declared signals are checked) and about 2 µs queueing the round
    for the next refit; refits as in :class:`adaptk.controllers.stopping.Confidence` (about 9 µs
    per step on average).
    """

    required_signals = frozenset({"draft_probs"})

    def __init__(
        self,
        initial_k: int = 4,
        delta_up: float = 1.0,
        eta: float = 0.5,
        k_min: int = 1,
        carry_over: bool = True,
        threshold: float = 0.4,
        self_tuning: bool = True,
        window: int = 4096,
        refit_every: int = 50,
        min_samples: int = 5,
        fn_cost: float = 3.0,
    ) -> None:
        super().__init__(initial_k=initial_k, delta_up=delta_up, eta=eta, k_min=k_min, carry_over=carry_over)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
        self.threshold = threshold
        self.self_tuning = self_tuning
        self.window = window
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.fn_cost = fn_cost
        self._init_tuning(threshold)

    @property
    def stop_rule(self) -> StopRule:
        return _ThresholdStop(self)

    def _update(self, feedback: Feedback) -> None:
        super()._update(feedback)
        self._learn_confidence(feedback, feedback.draft_probs)
