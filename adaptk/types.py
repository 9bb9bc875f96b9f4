"""The per-step records exchanged between an engine and a controller.

Glossary (as in vLLM's rejection sampler):

* **drafted tokens** — the ``num_draft_tokens[i]`` tokens the drafter proposed for sequence ``i``
  this step (0 means plain decoding for that sequence).
* **accepted tokens** — the leading drafted tokens the target agreed with,
  ``num_accepted_tokens[i] <= num_draft_tokens[i]``.
* **bonus token** — the one token the target always contributes after the accepted ones (its own
  next token after a full acceptance, or the correction at the first rejection).
* **acceptance length** — tokens emitted per step for a sequence: ``accepted + 1``.
* **token goodput** — emitted tokens per second of step time (not ``slo_goodput``, which counts
  requests per second that meet a latency SLO).

Per-sequence fields are 1-D numpy arrays aligned with ``seq_ids``. Per-drafted-position signals are
2-D arrays of shape ``(num_seqs, width)`` with ``width >= max(num_draft_tokens)``; entry ``[i, j]``
describes the ``j``-th drafted token of sequence ``i`` and entries at ``j >= num_draft_tokens[i]``
are ignored (conventionally NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "StepContext",
    "Decision",
    "Feedback",
    "ControllerError",
    "as_int_array",
]

IntArray = np.ndarray
FloatArray = np.ndarray


def as_int_array(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D int64 array, or raise ``ValueError`` naming ``name``."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        if array.size == 0:
            return np.zeros(0, dtype=np.int64)
        if array.dtype.kind == "b" or not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold integers, got {array.dtype} values {array[:4]}")
    return array.astype(np.int64, copy=False)


def _optional_int_array(values: Any, name: str) -> np.ndarray | None:
    return None if values is None else as_int_array(values, name)


def _optional_float_matrix(values: Any, name: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (num_seqs, width) matrix, got shape {array.shape}")
    return array


class ControllerError(RuntimeError):
    """A controller broke the step protocol (an out-of-range or wrongly sized decision)."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """What the engine knows before drafting, handed to :meth:`SpeculationController.decide`.

    Parameters
    ----------
    step
        Engine step counter, increasing.
    seq_ids
        Stable ids of the running sequences, in batch order.
    context_lens
        Tokens each sequence already holds (prompt + generated).
    k_max
        The most draft tokens the engine can verify per sequence this step.
    num_layers
        Target depth, for self-speculative (early-exit) drafting.
    exit_layers
        Exit layers the engine can draft from this step (early exit); ``None`` otherwise.
    draft_available
        Drafter hint: how many draft tokens the drafter can offer each sequence right now (prompt
        lookup often has fewer than ``k_max``, or none). ``None`` when unknown / unbounded.
    match_ngram_lens
        Drafter hint for prompt lookup: length of the matched suffix n-gram (0 = no match).
    queue_len
        Requests waiting for a slot (serving-aware controllers).
    """

    step: int
    seq_ids: IntArray
    context_lens: IntArray
    k_max: int
    num_layers: int | None = None
    exit_layers: tuple[int, ...] | None = None
    draft_available: IntArray | None = None
    match_ngram_lens: IntArray | None = None
    queue_len: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "seq_ids", as_int_array(self.seq_ids, "seq_ids"))
        set_(self, "context_lens", as_int_array(self.context_lens, "context_lens"))
        set_(self, "draft_available", _optional_int_array(self.draft_available, "draft_available"))
        set_(self, "match_ngram_lens", _optional_int_array(self.match_ngram_lens, "match_ngram_lens"))
        n = len(self.seq_ids)
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, (int, np.integer)) or self.k_max < 0:
            raise ValueError(f"k_max must be a non-negative int, got {self.k_max!r}")
        for name in ("context_lens", "draft_available", "match_ngram_lens"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} seq_ids")
        if n > 1 and len(set(self.seq_ids.tolist())) != n:
            raise ValueError("seq_ids must be unique within a step")

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)


@dataclass(frozen=True, slots=True)
class Decision:
    """A controller's answer: draft ``num_draft_tokens[i]`` tokens for sequence ``i``.

    ``exit_layer`` picks the draft exit layer for self-speculation (one per step, shared by the
    batch); ``info`` is free-form and only for logging.
    """

    num_draft_tokens: IntArray
    exit_layer: int | None = None
    info: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_draft_tokens", as_int_array(self.num_draft_tokens, "num_draft_tokens"))


@dataclass(frozen=True, slots=True)
class Feedback:
    """What happened in one step, handed to :meth:`SpeculationController.update`.

    ``num_accepted_tokens`` excludes the bonus token: a sequence emitted ``accepted + 1`` tokens.
    Timings are for the whole step (the batch shares one draft and one verify pass). Both 0 means
    the step is untimed: engines report that for a step whose time is not a decode step's cost
    (it also prefilled a prompt), and controllers learning costs skip it.

    Optional per-drafted-position signals, each ``(num_seqs, width)``:
    ``draft_probs`` (draft top-1 probability), ``draft_entropies`` (nats), ``kl_divergences``
    (KL(target ‖ draft)). ``layer_matches``/``layer_compared`` are ``(num_seqs, num_layers)``
    counts of early-exit shadow tokens that agreed with / were compared to the target this step.
    """

    seq_ids: IntArray
    num_draft_tokens: IntArray
    num_accepted_tokens: IntArray
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    step: int = -1
    exit_layer: int | None = None
    finished: np.ndarray | None = None
    draft_probs: FloatArray | None = None
    draft_entropies: FloatArray | None = None
    kl_divergences: FloatArray | None = None
    layer_matches: IntArray | None = None
    layer_compared: IntArray | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "seq_ids", as_int_array(self.seq_ids, "seq_ids"))
        set_(self, "num_draft_tokens", as_int_array(self.num_draft_tokens, "num_draft_tokens"))
        set_(self, "num_accepted_tokens", as_int_array(self.num_accepted_tokens, "num_accepted_tokens"))
        for name in ("draft_probs", "draft_entropies", "kl_divergences"):
            set_(self, name, _optional_float_matrix(getattr(self, name), name))
        for name in ("layer_matches", "layer_compared"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, np.asarray(value, dtype=np.int64))
        if self.finished is not None:
            set_(self, "finished", np.asarray(self.finished, dtype=bool))

    @property
    def step_time_s(self) -> float:
        return self.draft_time_s + self.verify_time_s

    @property
    def num_emitted_tokens(self) -> np.ndarray:
        """Tokens each sequence gained this step (accepted drafts + the bonus token)."""
        return self.num_accepted_tokens + 1

    def validate(self, k_max: int | None = None, signals: frozenset[str] | None = None) -> None:
        """Raise ``ValueError`` naming the first invalid field.

        ``signals`` limits which optional per-position signals are checked (``None``: all of them);
        a controller only needs the ones it reads to be valid.
        """
        n = len(self.seq_ids)
        for name in ("num_draft_tokens", "num_accepted_tokens"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} seq_ids")
        if n > 1 and len(set(self.seq_ids.tolist())) != n:
            raise ValueError("seq_ids in feedback must be unique")
        width = 0
        if n:
            drafted, accepted = self.num_draft_tokens, self.num_accepted_tokens
            width = int(drafted.max())
            if drafted.min() < 0:
                raise ValueError("num_draft_tokens must be >= 0")
            if accepted.min() < 0:
                raise ValueError("num_accepted_tokens must be >= 0")
            if (accepted > drafted).any():
                raise ValueError("num_accepted_tokens exceeds num_draft_tokens")
            if k_max is not None and width > k_max:
                raise ValueError(f"num_draft_tokens exceeds k_max={k_max}")
        for name, value in (("draft_time_s", self.draft_time_s), ("verify_time_s", self.verify_time_s)):
            if not (isinstance(value, (int, float, np.floating, np.integer)) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite non-negative number of seconds, got {value!r}")
        for name in ("draft_probs", "draft_entropies", "kl_divergences"):
            signal = getattr(self, name)
            if signal is None or (signals is not None and name not in signals):
                continue
            if signal.shape[0] != n or signal.shape[1] < width:
                raise ValueError(f"{name} has shape {signal.shape}, need ({n}, >= {width})")
            drafted = np.arange(signal.shape[1])[None, :] < self.num_draft_tokens[:, None]
            used = signal[drafted]
            if not np.all(np.isfinite(used)) or np.any(used < 0):
                raise ValueError(f"{name} holds NaN/inf/negative values at drafted positions")
            if name == "draft_probs" and np.any(used > 1):
                raise ValueError("draft_probs must lie in [0, 1]")
        check_layers = signals is None or "layer_agreement" in signals
        if check_layers and (self.layer_matches is None) != (self.layer_compared is None):
            raise ValueError("layer_matches and layer_compared must be given together")
        if check_layers and self.layer_matches is not None:
            if self.layer_matches.shape != self.layer_compared.shape or self.layer_matches.shape[:1] != (n,):
                raise ValueError("layer_matches/layer_compared must both have shape (num_seqs, num_layers)")
            if np.any(self.layer_matches < 0) or np.any(self.layer_matches > self.layer_compared):
                raise ValueError("layer_matches must lie in [0, layer_compared]")
        if self.finished is not None and self.finished.shape != (n,):
            raise ValueError(f"finished has shape {self.finished.shape} for {n} seq_ids")
