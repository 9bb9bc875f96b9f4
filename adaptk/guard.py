"""Keep generation alive when a controller fails: every adapter drives controllers through this."""

from __future__ import annotations

import warnings

import numpy as np

from adaptk.core import SpeculationController, StopRule
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["GuardedController", "ControllerFallbackWarning"]


class ControllerFallbackWarning(RuntimeWarning):
    """A controller raised inside an engine; the engine continues with a fixed draft length."""


class GuardedController:
    """Wraps a controller for an engine: the first exception switches to a fixed ``fallback_k``.

    Engines call :meth:`decide`, :meth:`update`, :meth:`on_sequence_end` and :meth:`should_stop`
    exactly as they would on the controller. After a failure the wrapped controller is no longer
    consulted (its state may be inconsistent) and one :class:`ControllerFallbackWarning` is issued.

    >>> import adaptk
    >>> from adaptk import StepContext
    >>> class Broken(adaptk.SpeculationController):
    ...     def _decide(self, context):
    ...         raise RuntimeError("boom")
    >>> import warnings
    >>> guarded = GuardedController(Broken(), fallback_k=2)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     guarded.decide(StepContext(step=0, seq_ids=[1], context_lens=[3], k_max=4)).num_draft_tokens
    array([2])
    >>> guarded.failed, len(caught)
    (True, 1)
    """

    def __init__(self, controller: SpeculationController, fallback_k: int = 2) -> None:
        self.controller = controller
        self.fallback_k = fallback_k
        self.failed = False
        self.error: BaseException | None = None

    def _fail(self, where: str, exc: BaseException) -> None:
        self.failed = True
        self.error = exc
        warnings.warn(
            f"controller {self.controller!r} raised in {where}: {type(exc).__name__}: {exc}; "
            f"continuing with a fixed draft length of {self.fallback_k}",
            ControllerFallbackWarning,
            stacklevel=3,
        )

    def _fixed(self, context: StepContext) -> Decision:
        return Decision(np.full(len(context.seq_ids), min(self.fallback_k, context.k_max), dtype=np.int64))

    def decide(self, context: StepContext) -> Decision:
        if not self.failed:
            try:
                return self.controller.decide(context)
            except Exception as exc:  # noqa: BLE001 - any controller failure must not stop generation
                self._fail("decide", exc)
        return self._fixed(context)

    def update(self, feedback: Feedback) -> None:
        if not self.failed:
            try:
                self.controller.update(feedback)
            except Exception as exc:  # noqa: BLE001
                self._fail("update", exc)

    def on_sequence_end(self, seq_id: int) -> None:
        if not self.failed:
            try:
                self.controller.on_sequence_end(seq_id)
            except Exception as exc:  # noqa: BLE001
                self._fail("on_sequence_end", exc)

    @property
    def stop_rule(self) -> StopRule | None:
        if self.failed:
            return None
        try:
            return self.controller.stop_rule
        except Exception as exc:  # noqa: BLE001
            self._fail("stop_rule", exc)
            return None

    def should_stop(
        self, seq_ids: np.ndarray, position: int, draft_probs: np.ndarray, draft_entropies: np.ndarray | None = None
    ) -> np.ndarray:
        """Ask the stop rule (if any); never stops when there is none or it failed."""
        rule = self.stop_rule
        if rule is not None:
            try:
                stop = np.asarray(rule.should_stop(seq_ids, position, draft_probs, draft_entropies), dtype=bool)
                if stop.shape == (len(seq_ids),):
                    return stop
                raise ValueError(f"stop rule returned shape {stop.shape} for {len(seq_ids)} sequences")
            except Exception as exc:  # noqa: BLE001
                self._fail("stop_rule.should_stop", exc)
        return np.zeros(len(seq_ids), dtype=bool)
