"""The controller interface every policy implements, and the token-level stop-rule protocol."""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from adaptk import _state
from adaptk.types import ControllerError, Decision, Feedback, StepContext

__all__ = ["SpeculationController", "StopRule"]


class StopRule(ABC):
    """Token-level stop inside a drafting round (HF confidence, AdaEDL, SpecDec++-style).

    Call order: after the drafter has produced draft token ``position`` (0-based) for every
    sequence still drafting, it calls :meth:`should_stop` once for those sequences. Where the answer
    is ``True`` the sequence stops drafting this round; the token just drafted is kept and verified.
    A stop rule learns through its owning controller's :meth:`SpeculationController.update`, which
    receives the same signals per drafted position together with what was accepted.
    """

    @abstractmethod
    def should_stop(
        self,
        seq_ids: np.ndarray,
        position: int,
        draft_probs: np.ndarray,
        draft_entropies: np.ndarray | None = None,
    ) -> np.ndarray:
        """Return a bool array, one per entry of ``seq_ids``: stop drafting after this token."""


class SpeculationController(ABC):
    """Chooses how many tokens to draft for each sequence, every step.

    Call order, per engine step::

        decision = controller.decide(context)      # before drafting
        # drafter drafts decision.num_draft_tokens[i] tokens for sequence i; if
        # controller.stop_rule is not None it is asked after every drafted token
        controller.update(feedback)                # after verification
        controller.on_sequence_end(seq_id)         # for each sequence that finished

    ``reset()`` forgets everything learned. Sequences may join and leave between any two steps.

    Writing a controller: store every constructor argument unchanged under its own name (they
    are the hyperparameters, see :meth:`params`), keep learned state in attributes whose names
    start with ``_`` (they are what :meth:`state_dict` saves), call ``super().__init__()``, and
    implement :meth:`_decide` and, where it learns, :meth:`_update` and :meth:`_end_sequence`.
    The public methods validate inputs and outputs so subclasses need not.
    """

    #: Registry name, set by :func:`adaptk.register`.
    name: ClassVar[str] = ""
    #: Per-position feedback signals this controller (and its stop rule, when learning from
    #: feedback) reads; engines may skip computing others, and ``update`` validates only these.
    #: Any of ``draft_probs``, ``draft_entropies``, ``kl_divergences``, ``layer_agreement``.
    required_signals: ClassVar[frozenset[str]] = frozenset()

    #: Private attributes that are caches derived from the learned state (rebuilt on demand):
    #: left out of :meth:`state_dict`.
    _TRANSIENT: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._live_seq_ids: set[int] = set()
        self._k_max: int | None = None

    # -- the protocol ----------------------------------------------------------------------
    def decide(self, context: StepContext) -> Decision:
        """Return the draft length for every sequence in ``context`` (0 = plain decoding)."""
        decision = self._decide(context)
        num_draft = decision.num_draft_tokens
        if len(num_draft) != len(context.seq_ids):
            raise ControllerError(
                f"controller {self._label()} returned {len(num_draft)} draft lengths for "
                f"{len(context.seq_ids)} sequences"
            )
        if len(num_draft) and (num_draft.min() < 0 or num_draft.max() > context.k_max):
            raise ControllerError(
                f"controller {self._label()} returned num_draft_tokens outside [0, {context.k_max}]: "
                f"{num_draft.tolist()}"
            )
        if (
            decision.exit_layer is not None
            and context.exit_layers is not None
            and decision.exit_layer not in context.exit_layers
        ):
            raise ControllerError(
                f"controller {self._label()} chose exit_layer {decision.exit_layer}, not one of "
                f"{list(context.exit_layers)}"
            )
        self._live_seq_ids.update(context.seq_ids.tolist())
        self._k_max = int(context.k_max)
        return decision

    def update(self, feedback: Feedback) -> None:
        """Learn from one verified step. Invalid feedback raises ``ValueError`` naming the field."""
        # signals a controller does not read cannot corrupt it: only the declared ones are checked
        # (a (64, 8) matrix costs ~10 µs to check, a fifth of a step's budget)
        feedback.validate(self._k_max, self.required_signals)
        ids = feedback.seq_ids.tolist()
        if not self._live_seq_ids.issuperset(ids):
            unknown = sorted(set(ids) - self._live_seq_ids)
            raise ValueError(f"seq_ids: unknown sequence ids {unknown[:8]} (never decided, or already ended)")
        self._update(feedback)

    def on_sequence_end(self, seq_id: int) -> None:
        """Free the state kept for ``seq_id``. Ending an unknown sequence is a no-op."""
        seq_id = int(seq_id)
        if seq_id in self._live_seq_ids:
            self._live_seq_ids.discard(seq_id)
            self._end_sequence(seq_id)

    def reset(self) -> None:
        """Forget everything learned; hyperparameters stay."""
        self.__dict__.update(self.clone().__dict__)

    @property
    def stop_rule(self) -> StopRule | None:
        """A token-level stop rule the drafter should consult, or ``None``."""
        return None

    # -- for subclasses ------------------------------------------------------------------------
    @abstractmethod
    def _decide(self, context: StepContext) -> Decision:
        """Policy: return a :class:`Decision` for ``context``."""

    def _update(self, feedback: Feedback) -> None:
        """Learn from validated feedback. Default: learn nothing."""

    def _end_sequence(self, seq_id: int) -> None:
        """Drop per-sequence state for ``seq_id``. Default: nothing kept."""

    # -- parameters and state ------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        signature = inspect.signature(cls.__init__)
        return {
            name: (None if signature.parameters[name].default is inspect.Parameter.empty
                   else signature.parameters[name].default)
            for name in cls._param_names()
        }

    def params(self) -> dict[str, Any]:
        """The constructor arguments, as given."""
        return {name: getattr(self, name) for name in self._param_names()}

    def clone(self) -> SpeculationController:
        """A fresh, untrained controller with the same hyperparameters."""
        return type(self)(**self.params())

    def _state_attrs(self) -> list[str]:
        return sorted(k for k in vars(self) if k.startswith("_") and k not in self._TRANSIENT)

    def state_dict(self) -> dict[str, Any]:
        """Learned state as a JSON-safe dict (data only; loading it runs no code)."""
        return {
            "controller": self.name or type(self).__name__,
            "params": _state.encode(self.params()),
            "state": {attr: _state.encode(getattr(self, attr)) for attr in self._state_attrs()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the controller then decides exactly as before."""
        expected = self.name or type(self).__name__
        if not isinstance(state, dict) or state.get("controller") != expected:
            found = state.get("controller") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state is for controller {found!r}, not {expected!r}")
        if json.dumps(state.get("params"), sort_keys=True) != json.dumps(_state.encode(self.params()), sort_keys=True):
            raise ValueError(f"state was saved with parameters {state.get('params')}, this controller has {self.params()}")
        for attr, value in state["state"].items():
            if not attr.startswith("_"):
                raise ValueError(f"state entry {attr!r} is not a private attribute")
            setattr(self, attr, _state.decode(value, current=getattr(self, attr, None)))

    # -- display -------------------------------------------------------------------------------
    def _label(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name or type(self).__name__}({args})"
