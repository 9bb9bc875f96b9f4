"""Token-level stop rules (algorithms.md §7): HF/DISCO confidence, AdaEDL, SpecDec++-like.

Each controller here fixes the *cap* of a round and exposes a :class:`~adaptk.core.StopRule` that
the drafter consults after every drafted token; the rule's threshold is what the controller learns
from :class:`~adaptk.types.Feedback`.

Which drafted positions teach a stop rule: for sequence ``i`` with ``a_i`` accepted of ``k_i``
drafted, positions ``j < a_i`` were accepted and position ``a_i`` (when ``a_i < k_i``) was the first
rejection; positions after it were judged on a wrong prefix and are not used (exactly as
Hugging Face's ``AssistedCandidateGenerator.update_candidate_strategy`` trims its ``probs``).

The round cap (``schedule``, confidence and AdaEDL): a stop rule only ends a round *after* a
drafted token, so it can shorten a round to one token but never to none, and the two published
threshold updates cannot even do that on a draft that is confidently wrong (each class's docstring
has the numbers). Hugging Face runs its confidence stop together with a length schedule in the same
``update_candidate_strategy``; the controllers here do too:

* ``schedule="constant"`` — every round is capped at ``min(base_k, k_max)`` (``base_k=None``:
  ``k_max``); the stop rule alone adapts. HF 5.x's default, and the AdaEDL reference's.
* ``schedule="heuristic"`` — HF's ``num_assistant_tokens_schedule="heuristic"`` [code,
  transformers 5.23] on the cap, per sequence: after a round in which every *drafted* token was
  accepted (after any stop; a round that drafted nothing counts, HF's quirk) ``cap += 2``,
  otherwise ``cap = max(1, cap − 1)``; the cap starts at ``base_k`` (or ``k_max``), is held in
  ``[1, k_max]`` and, as HF keeps ``num_assistant_tokens`` across calls, a new sequence starts
  from the cap the last updated sequence reached.
* ``schedule="heuristic_transient"`` — the same, but every sequence starts at ``base_k``.

Per-step cost: per-sequence state lives in rows of numpy columns (:class:`_SeqTable`), so
``decide`` and ``update`` are a handful of vectorised operations at any batch size, and ``update``
checks only the per-position signals the controller declares in ``required_signals`` (checking
a ``(64, 8)`` matrix costs about 10 µs). Timings below
are ``benchmarks/bench_overhead.py``'s ``step_overhead(name, 64)`` medians on a shared 2-core
machine, where ``fixed`` takes about 12 µs (the calls only: building the records is not counted).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from adaptk import _state
from adaptk.core import SpeculationController, StopRule
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["Confidence", "AdaEDL", "SpecDecPPLike", "judged_positions", "roc_threshold"]

SCHEDULES = ("constant", "heuristic", "heuristic_transient")


# -- shared helpers ---------------------------------------------------------------------------------
def judged_positions(feedback: Feedback) -> tuple[np.ndarray, np.ndarray]:
    """Mask of drafted positions judged on the true prefix, and their accepted labels.

    Returns ``(mask, accepted)``, both ``(num_seqs, width)`` bool, where ``width`` is the widest
    per-position signal present (or ``max(num_draft_tokens)``). ``mask[i, j]`` is true for
    ``j < num_draft_tokens[i]`` and ``j <= num_accepted_tokens[i]``; ``accepted[i, j]`` is
    ``j < num_accepted_tokens[i]``.

    >>> fb = Feedback(seq_ids=[1, 2], num_draft_tokens=[3, 2], num_accepted_tokens=[1, 2])
    >>> mask, accepted = judged_positions(fb)
    >>> mask.astype(int).tolist(), accepted.astype(int).tolist()
    ([[1, 1, 0], [1, 1, 0]], [[1, 0, 0], [1, 1, 0]])
    """
    width = 0
    for name in ("draft_probs", "draft_entropies", "kl_divergences"):
        signal = getattr(feedback, name)
        if signal is not None:
            width = max(width, signal.shape[1])
    if width == 0:
        width = int(feedback.num_draft_tokens.max()) if len(feedback.num_draft_tokens) else 0
    j = np.arange(width)[None, :]
    k = feedback.num_draft_tokens[:, None]
    a = feedback.num_accepted_tokens[:, None]
    return (j < k) & (j <= a), j < a


def refit_due(seen: int, seen_at_fit: int, since_fit: int, refit_every: int, window: int) -> bool:
    """HF's refit schedule for a self-tuned confidence threshold.

    Refit at the first chance, then every time the samples seen double while they still fit in
    the window, and otherwise every ``refit_every`` updates.
    """
    return seen_at_fit == 0 or since_fit >= refit_every or (seen <= window and seen >= 2 * seen_at_fit)


def roc_threshold(probs: np.ndarray, labels: np.ndarray, fn_cost: float = 3.0) -> float:
    """HF's self-tuned confidence threshold: ``argmin(fpr + fn_cost * fnr)`` over the ROC curve.

    ``labels`` are 1 for accepted drafts; both classes must be present. The curve is the one
    scikit-learn's ``roc_curve`` returns with its default ``drop_intermediate=True`` (what HF
    calls), computed here in numpy at a fraction of its fixed cost (tests check equality): one
    point per distinct score, from the highest, minus the points collinear with both neighbours,
    after a first point ``(0, 0)`` at threshold ``inf`` ("stop always"), which is mapped to ``1.0``.
    Ties in the cost go to the earlier (higher) threshold, as ``np.argmin`` does on sklearn's curve.

    >>> round(roc_threshold(np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])), 2)
    0.8
    """
    scores = np.asarray(probs, dtype=np.float64)
    # descending; the order within a run of equal scores does not matter (counts are taken at the
    # run's end), so the fast unstable sort will do
    order = np.argsort(-scores)
    scores = scores[order]
    # the last position of each run of equal scores: one ROC point per distinct score
    ends = np.flatnonzero(np.diff(scores))
    ends = np.append(ends, scores.size - 1)
    tps = np.cumsum(np.asarray(labels)[order] != 0)[ends]
    fps = 1 + ends - tps
    thresholds = scores[ends]
    if len(fps) > 2:  # drop points on a straight segment (both second differences zero)
        corner = np.empty(len(fps), dtype=bool)
        corner[0] = corner[-1] = True
        corner[1:-1] = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        fps, tps, thresholds = fps[corner], tps[corner], thresholds[corner]
    fpr = np.concatenate(([0], fps)) / fps[-1]
    tpr = np.concatenate(([0], tps)) / tps[-1]
    costs = fpr + fn_cost * (1.0 - tpr)
    best = int(np.argmin(costs))
    return 1.0 if best == 0 else float(min(thresholds[best - 1], 1.0))


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_base_k(base_k: int | None) -> None:
    if base_k is not None and (isinstance(base_k, bool) or not isinstance(base_k, (int, np.integer)) or base_k < 0):
        raise ValueError(f"base_k must be None or a non-negative int, got {base_k!r}")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class _SeqTable:
    """Per-sequence state as rows of numpy columns, one row per live sequence id.

    ``columns`` name each column and its default (an ``int`` default makes an int64 column, a
    ``float`` one a float64 column). :meth:`rows` maps a batch's ids to rows, allocating rows (set
    to the defaults, or to ``init`` overrides) for new ids; controllers then read and write
    ``cols[name][rows]`` instead of looping over a dict. The engine hands ``decide`` and ``update``
    the same batch, mostly unchanged from step to step, so the rows of the last batch are reused
    when its ids are byte-identical (one bytes comparison instead of a dict lookup per id). The
    state (ids, free rows, columns) survives JSON; the cache is not state.
    """

    def __init__(self, **columns: int | float) -> None:
        self._defaults = dict(columns)
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = list(range(7, -1, -1))
        self.cols: dict[str, np.ndarray] = {
            name: np.full(8, value, dtype=np.int64 if isinstance(value, int) else np.float64)
            for name, value in columns.items()
        }
        self._key: bytes | None = None
        self._rows = np.zeros(0, dtype=np.int64)

    def rows(self, seq_ids: np.ndarray, **init: int | float) -> np.ndarray:
        """Rows of ``seq_ids`` (an int64 array), in order; new ids get fresh rows."""
        key = seq_ids.tobytes()
        if key == self._key:
            return self._rows
        slot_of = self.slot_of
        ids = seq_ids.tolist()
        missing = [s for s in ids if s not in slot_of]
        if missing:
            self._allocate(missing, init)
        rows = np.fromiter(map(slot_of.__getitem__, ids), dtype=np.int64, count=len(ids))
        self._key, self._rows = key, rows
        return rows

    def lookup(self, seq_ids: np.ndarray, name: str, default: float) -> np.ndarray:
        """Column ``name`` for ``seq_ids`` without allocating rows (unknown ids read ``default``)."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        if seq_ids.tobytes() == self._key:
            return self.cols[name][self._rows]
        get = self.slot_of.get
        rows = np.fromiter((get(s, -1) for s in seq_ids.tolist()), dtype=np.int64, count=len(seq_ids))
        return np.where(rows >= 0, self.cols[name][rows], default)

    def _allocate(self, ids: list[int], init: Mapping[str, int | float]) -> None:
        free = self.free
        if len(free) < len(ids):
            n = len(next(iter(self.cols.values())))
            size = max(2 * n, n + len(ids))
            for name, old in self.cols.items():
                grown = np.full(size, self._defaults[name], dtype=old.dtype)
                grown[:n] = old
                self.cols[name] = grown
            free[:0] = range(size - 1, n - 1, -1)  # keep popping the lowest free row first
        new = [free.pop() for _ in ids]
        self.slot_of.update(zip(ids, new, strict=True))
        for name, column in self.cols.items():
            column[new] = init.get(name, self._defaults[name])

    def discard(self, seq_id: int) -> None:
        row = self.slot_of.pop(seq_id, None)
        if row is not None:
            self.free.append(row)
            self._key = None  # the row may be handed to another id

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.slot_of

    def state_dict(self) -> dict[str, Any]:
        # int keys (not JSON-encoded pairs) so the conformance kit can see ids that were not freed
        return {"slot_of": dict(self.slot_of), "free": list(self.free),
                "cols": {name: _state.encode(col) for name, col in self.cols.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slot_of = {int(k): int(v) for k, v in state["slot_of"].items()}
        self.free = [int(r) for r in state["free"]]
        self.cols = {name: _state.decode(col) for name, col in state["cols"].items()}
        self._key = None


class _SeqColumn(Mapping):
    """Read-only ``{seq_id: value}`` view of one column of a :class:`_SeqTable`."""

    def __init__(self, table: _SeqTable, name: str) -> None:
        self._table, self._name = table, name

    def __getitem__(self, seq_id: int) -> Any:
        return self._table.cols[self._name][self._table.slot_of[seq_id]].item()

    def __iter__(self) -> Iterator[int]:
        return iter(self._table.slot_of)

    def __len__(self) -> int:
        return len(self._table.slot_of)


class _ConfidenceTuning:
    """Mixin: the HF self-tuning of a top-1 confidence threshold from (prob, accepted?) samples.

    Expects on the host: params ``self_tuning``, ``window``, ``refit_every``, ``min_samples``,
    ``fn_cost``; state from :meth:`_init_tuning`.

    Refit schedule (HF refits every round, with scikit-learn's ``roc_curve``: about 0.7 ms at 4096
    samples; :func:`roc_threshold` computes the same in about 0.13 ms): the first fit
    happens as soon as HF's condition holds (more than ``min_samples`` samples, both classes);
    then again whenever the number of samples seen has doubled while the window is still filling,
    and every ``refit_every`` updates. ``refit_every=1`` with a huge ``window`` is HF exactly.
    Once fitted with a full window, a refit that finds one class only is retried ``refit_every``
    updates later (``_seen`` stops counting there: only ``refit_every`` matters from then on).

    Cost: an update queues the round (and, while the window fills, counts its judged samples);
    the queued rounds are folded into the window of the last ``window`` samples when a refit is
    due (or when they would fill the window on their own), so the per-step cost does not grow
    with the window.
    """

    def _init_tuning(self, threshold: float) -> None:
        self._threshold = float(threshold)
        self._window_probs = np.zeros(0, dtype=np.float64)
        self._window_labels = np.zeros(0, dtype=np.int8)
        self._window_accepted = 0  # label sum of the window
        self._queued: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (probs, drafted, accepted)
        self._queued_samples = 0
        self._queued_accepted = 0
        self._since_fit = 0
        self._seen = 0
        self._seen_at_fit = 0

    @property
    def _probs(self) -> np.ndarray:
        """The window of judged draft probabilities (queued rounds folded in)."""
        self._fold_queue()
        return self._window_probs

    @property
    def _labels(self) -> np.ndarray:
        """Accepted? (1/0) for each entry of :attr:`_probs`."""
        self._fold_queue()
        return self._window_labels

    def _learn_confidence(self, feedback: Feedback, probs: np.ndarray | None) -> None:
        if not self.self_tuning or probs is None or len(feedback.seq_ids) == 0:
            return
        k, a = feedback.num_draft_tokens, feedback.num_accepted_tokens
        if self._seen_at_fit and self._seen > self.window:
            # steady state: the window is full and has been fitted, so only ``refit_every`` matters
            if not np.count_nonzero(k):
                return  # nothing drafted, nothing judged
            self._queued.append((probs.copy(), k.copy(), a.copy()))
            self._since_fit += 1
            if self._since_fit >= self.refit_every:
                self._fold_queue()
                labels = self._window_labels
                if len(labels) > self.min_samples and 0 < self._window_accepted < len(labels):
                    self._threshold = roc_threshold(self._window_probs, labels, self.fn_cost)
                self._since_fit = 0  # without both classes, try again refit_every updates later
            return
        # judged per sequence: min(k, a + 1) positions, of which a accepted (a <= k)
        accepted = int(a.sum())
        samples = accepted + int(np.count_nonzero(a < k))
        if samples == 0:
            return
        self._queued.append((probs.copy(), k.copy(), a.copy()))
        self._queued_samples += samples
        self._queued_accepted += accepted
        self._seen += samples
        self._since_fit += 1
        due = refit_due(self._seen, self._seen_at_fit, self._since_fit, self.refit_every, self.window)
        # the window after folding holds a subset of (window + queue): if the union lacks a class
        # or is too small, so does the window, and folding can wait
        total = len(self._window_probs) + self._queued_samples
        positives = self._window_accepted + self._queued_accepted
        if due and total > self.min_samples and 0 < positives < total:
            self._fold_queue()
            labels = self._window_labels
            # HF: more than 5 samples and at least one of each class
            if len(labels) > self.min_samples and 0 < self._window_accepted < len(labels):
                self._threshold = roc_threshold(self._window_probs, labels, self.fn_cost)
                self._since_fit = 0
                self._seen_at_fit = self._seen
        elif self._queued_samples >= self.window:
            self._fold_queue()  # bounded memory while no fit is possible

    def _fold_queue(self) -> None:
        queue = self._queued
        if not queue:
            return
        widths = {probs.shape[1] for probs, _, _ in queue}
        if len(widths) == 1:  # the usual case: one stacked mask for all queued rounds
            groups = [tuple(np.concatenate(part) for part in zip(*queue, strict=True))] if len(queue) > 1 else queue
        else:
            groups = queue
        probs_parts, label_parts = [self._window_probs], [self._window_labels]
        for probs, k, a in groups:
            j = np.arange(probs.shape[1])[None, :]
            judged = j < np.minimum(k, a + 1)[:, None]
            probs_parts.append(probs[judged])
            label_parts.append((j < a[:, None])[judged].astype(np.int8))
        self._window_probs = np.concatenate(probs_parts)[-self.window :]
        self._window_labels = np.concatenate(label_parts)[-self.window :]
        self._window_accepted = int(self._window_labels.sum())
        self._queued = []
        self._queued_samples = self._queued_accepted = 0


class _ThresholdStop(StopRule):
    """Stop when the draft's top-1 probability is below the owner's current threshold."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        return np.asarray(draft_probs, dtype=np.float64) < self._owner._threshold


class _CappedLength(SpeculationController):
    """Base: the round cap of the module docstring (``schedule`` and ``base_k``); the stop rule trims.

    Hosts keep their per-sequence state in ``self._seqs``, a :class:`_SeqTable` with an int column
    ``cap``, and call :meth:`_init_caps` in ``__init__`` and :meth:`_learn_caps` from ``_update``.
    """

    base_k: int | None
    schedule: str = "constant"

    def _init_caps(self) -> None:
        self._last_cap = 0  # the constant cap of the last decision
        self._carry_cap = 0  # "heuristic": the cap the last updated sequence reached (0: none yet)

    def _base_cap(self, k_max: int) -> int:
        return k_max if self.base_k is None else min(int(self.base_k), k_max)

    def _decide(self, context: StepContext) -> Decision:
        k_max = context.k_max
        if self.schedule == "constant" or not len(context.seq_ids):
            cap = self._last_cap = self._base_cap(k_max)
            if self._seqs is not None:
                self._seqs.rows(context.seq_ids)  # per-sequence state other than the cap
            return Decision(np.full(len(context.seq_ids), cap, dtype=np.int64))
        start = self._carry_cap if self.schedule == "heuristic" and self._carry_cap else self._base_cap(k_max)
        rows = self._seqs.rows(context.seq_ids, cap=start)
        return Decision(np.minimum(self._seqs.cols["cap"][rows], k_max))

    def _round_caps(self, rows: np.ndarray) -> np.ndarray | int:
        """The cap each sequence of ``rows`` drafted under in the last decided step."""
        if self.schedule == "constant":
            return self._last_cap
        return np.minimum(self._seqs.cols["cap"][rows], self._k_max or 0)

    def _learn_caps(self, rows: np.ndarray, drafted: np.ndarray, accepted: np.ndarray) -> None:
        if self.schedule == "constant" or not len(rows):
            return
        column = self._seqs.cols["cap"]
        cap = column[rows]
        cap += np.where(accepted == drafted, 2, -1)  # fully accepted: +2, else −1 ...
        np.minimum(cap, max(1, self._k_max or 1), out=cap)  # ... held in [1, k_max]
        np.maximum(cap, 1, out=cap)
        column[rows] = cap
        self._carry_cap = int(cap[-1])

    def _end_sequence(self, seq_id: int) -> None:
        if self._seqs is not None:
            self._seqs.discard(seq_id)


# -- confidence (HF / DISCO-style) ------------------------------------------------------------------
@register("confidence")
class Confidence(_ConfidenceTuning, _CappedLength):
    """HF assisted generation's confidence stop: stop drafting when the top-1 probability < threshold.

    Rule [code, transformers 5.23 ``ConfidenceCriteria`` and ``update_candidate_strategy``]:
    threshold starts at 0.4. With ``self_tuning`` the controller collects (probability, accepted?)
    per judged drafted token (module docstring) and, once more than ``min_samples`` samples with
    both classes exist, sets the threshold to ``argmin(fpr + 3·fnr)`` of scikit-learn's
    ``roc_curve``. One threshold for the whole batch. Departures from HF, for speed and bounded
    memory: samples live in a window of the last ``window`` tokens (HF keeps all) and the ROC is
    refitted on the schedule of ``_ConfidenceTuning`` — first as soon as possible, then on doubling
    sample counts and every ``refit_every`` updates (HF: every round; ``refit_every=1,
    window=10**9`` is HF exactly).

    Why the threshold alone cannot back off: ``fpr + 3·fnr`` weighs *rates*, so it ignores how rare
    accepted drafts are. When the confidence barely separates the classes, stopping everything
    costs ``fnr = 1`` (3.0) while stopping nothing costs ``fpr ≈ 1`` (1.0), and the optimum sits
    near the lowest accepted probability. On the bundled early-exit trace at exit layer 6 (4.4% of
    first drafts accepted, top-1 AUC 0.57) the ROC optimum over all its tokens is 0.217 (cost 0.995,
    against 1.22 at 0.4 and 3.0 for "stop always"): it stops 1.4% of tokens, and drafting runs to
    the cap. The round cap therefore follows HF's ``heuristic`` schedule by default
    (``schedule``, module docstring), which HF runs alongside the threshold in the same
    ``update_candidate_strategy``; ``schedule="constant"`` is HF 5.x's default configuration.

    Parameters
    ----------
    base_k
        The cap, or the cap's starting value under a heuristic schedule (HF's
        ``num_assistant_tokens``, default 20); ``None`` is ``k_max``.
    threshold, self_tuning, window, refit_every, min_samples, fn_cost
        The stop threshold's start and its ROC self-tuning (above).
    schedule
        ``"heuristic"`` (default), ``"heuristic_transient"`` or ``"constant"`` (module docstring).

    Per-step cost: about 31 µs (median) for decide + update at batch 64, of which about 10 µs
    checks the ``draft_probs`` matrix. The update moves the round caps and queues the round. A
    refit (every ``refit_every`` updates once the window is full) folds the queue into the window
    and computes the ROC in numpy (about 0.13 ms at 4096 samples, against about 0.7 ms for
    scikit-learn's ``roc_curve``): about 0.4 ms at batch 64, or about 9 µs per step on average —
    the exception to the 50 µs budget on the steps where it runs.

    >>> import adaptk
    >>> from adaptk import StepContext, Feedback
    >>> from adaptk.controllers.stopping import Confidence
    >>> c = Confidence(self_tuning=False)
    >>> c.decide(StepContext(step=0, seq_ids=[1, 2], context_lens=[5, 5], k_max=6)).num_draft_tokens
    array([6, 6])
    >>> c.stop_rule.should_stop(np.array([1, 2]), 0, np.array([0.9, 0.2]))
    array([False,  True])
    >>> c.update(Feedback(seq_ids=[1, 2], num_draft_tokens=[2, 6], num_accepted_tokens=[2, 1],
    ...                   draft_probs=np.full((2, 6), 0.5)))
    >>> c.decide(StepContext(step=1, seq_ids=[1, 2], context_lens=[8, 7], k_max=6)).num_draft_tokens
    array([6, 5])
    """

    required_signals = frozenset({"draft_probs"})

    def __init__(
        self,
        base_k: int | None = None,
        threshold: float = 0.4,
        self_tuning: bool = True,
        window: int = 4096,
        refit_every: int = 50,
        min_samples: int = 5,
        fn_cost: float = 3.0,
        schedule: str = "heuristic",
    ) -> None:
        super().__init__()
        _check_base_k(base_k)
        _check_prob("threshold", threshold)
        _check_schedule(schedule)
        if window < 2 or refit_every < 1:
            raise ValueError("window must be >= 2 and refit_every >= 1")
        self.base_k = base_k
        self.threshold = threshold
        self.self_tuning = self_tuning
        self.window = window
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.fn_cost = fn_cost
        self.schedule = schedule
        self._init_tuning(threshold)
        self._init_caps()
        self._seqs = None if schedule == "constant" else _SeqTable(cap=0)

    @property
    def stop_rule(self) -> StopRule:
        return _ThresholdStop(self)

    def _update(self, feedback: Feedback) -> None:
        if self._seqs is not None:
            self._learn_caps(self._seqs.rows(feedback.seq_ids), feedback.num_draft_tokens,
                             feedback.num_accepted_tokens)
        self._learn_confidence(feedback, feedback.draft_probs)


# -- AdaEDL -------------------------------------------------------------------------------------------
class _EntropyStop(StopRule):
    def __init__(self, owner: AdaEDL) -> None:
        self._owner = owner

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        owner = self._owner
        if draft_entropies is None:  # no entropy signal: the rule cannot judge, never stops
            return np.zeros(len(seq_ids), dtype=bool)
        lam = owner._seqs.lookup(seq_ids, "lam", owner.lambda0)
        beta = 1.0 - np.sqrt(owner.gamma * np.maximum(np.asarray(draft_entropies, dtype=np.float64), 0.0))
        return beta < lam


@register("adaedl")
class AdaEDL(_CappedLength):
    """AdaEDL: stop drafting when the entropy-based acceptance lower bound falls below ``λ``.

    Rule [code, DSDE repository's ``AdaEDLScheduler`` and its draft runner; abstract]: for each
    drafted token with draft entropy ``H`` (nats), ``β = 1 − sqrt(γ·H)``; stop after it when
    ``β < λ``. After each round, per sequence (the reference keeps one scheduler per request, each a
    copy of a template with ``λ = λ0``)::

        AR_ema ← β1·AR_ema + (1 − β1)·a/k                 (AR_ema starts at 0)
        λ'     = λ + ε   if AR_ema < target
               = λ − ε   if AR_ema > target and a == cap (fully accepted at the round's cap)
               = λ       otherwise
        λ      ← β2·λ + (1 − β2)·λ'

    A round that drafted nothing (``k = 0``) is skipped, as in the reference. Without
    ``draft_entropies`` the stop rule never stops (documented fallback; the cap alone then sets
    the length). The reference stops the whole batch when any sequence's bound fails; here each
    sequence stops on its own.

    Why the published rule cannot back off on short requests: while ``AR_ema < target`` each round
    raises ``λ`` by exactly ``(1 − β2)·ε = 0.001``, and every request restarts at ``λ0 = 0.5``. On
    the bundled early-exit trace at exit layer 6 (4.4% of first drafts accepted) ``β`` of a drafted
    token has median 0.647 and 80th percentile 0.731, so stopping after the first token in 80% of
    rounds needs ``λ ≈ 0.73``, about 230 rounds into a request; the trace's requests are 13–256
    tokens (median 190), so ``λ`` is still near 0.6 for most rounds and drafts run 6 tokens on
    average. [reconstruction] The round cap therefore follows HF's ``heuristic`` schedule by default
    (``schedule``, module docstring), which falls by one per round that had a rejection and so
    reaches one token within ``cap`` rounds; "the round's cap" in the ``λ`` update is then that
    sequence's cap. ``schedule="constant"`` is the reference (cap ``min(base_k, k_max)``).

    Per-step cost: about 34 µs for decide + update at batch 64, of which about 10 µs checks the
    ``draft_entropies`` matrix; the rest is one row lookup per batch (cached while the batch is
    unchanged) and about twenty vectorised operations for ``AR_ema``, ``λ`` and the cap.

    >>> from adaptk import StepContext, Feedback
    >>> from adaptk.controllers.stopping import AdaEDL
    >>> c = AdaEDL()
    >>> _ = c.decide(StepContext(step=0, seq_ids=[1], context_lens=[5], k_max=4))
    >>> c.update(Feedback(seq_ids=[1], num_draft_tokens=[4], num_accepted_tokens=[2]))
    >>> round(c._lambda[1], 6)   # AR_ema = 0.25 < 0.9: λ' = 0.51, λ = 0.9·0.5 + 0.1·0.51
    0.501
    >>> c.decide(StepContext(step=1, seq_ids=[1], context_lens=[8], k_max=4)).num_draft_tokens
    array([3])
    """

    required_signals = frozenset({"draft_entropies"})

    def __init__(
        self,
        base_k: int | None = None,
        beta1: float = 0.5,
        beta2: float = 0.9,
        target: float = 0.9,
        epsilon: float = 0.01,
        gamma: float = 0.1,
        lambda0: float = 0.5,
        schedule: str = "heuristic",
    ) -> None:
        super().__init__()
        _check_base_k(base_k)
        _check_schedule(schedule)
        for name, value in (("beta1", beta1), ("beta2", beta2), ("target", target)):
            _check_prob(name, value)
        if gamma < 0 or epsilon < 0:
            raise ValueError("gamma and epsilon must be non-negative")
        self.base_k = base_k
        self.beta1 = beta1
        self.beta2 = beta2
        self.target = target
        self.epsilon = epsilon
        self.gamma = gamma
        self.lambda0 = lambda0
        self.schedule = schedule
        self._seqs = _SeqTable(cap=0, lam=float(lambda0), ar=0.0)
        self._init_caps()

    @property
    def stop_rule(self) -> StopRule:
        return _EntropyStop(self)

    @property
    def _lambda(self) -> Mapping[int, float]:
        """``{seq_id: λ}`` of the live sequences."""
        return _SeqColumn(self._seqs, "lam")

    @property
    def _ar_ema(self) -> Mapping[int, float]:
        """``{seq_id: AR_ema}`` of the live sequences."""
        return _SeqColumn(self._seqs, "ar")

    def _update(self, feedback: Feedback) -> None:
        n = len(feedback.seq_ids)
        if not n:
            return
        rows = self._seqs.rows(feedback.seq_ids)
        k, a = feedback.num_draft_tokens, feedback.num_accepted_tokens
        at_cap = a == self._round_caps(rows)
        if np.count_nonzero(k) == n:
            r, kk, aa = rows, k, a
        else:  # rounds that drafted nothing are skipped, as in the reference
            drafted = k > 0
            r, kk, aa, at_cap = rows[drafted], k[drafted], a[drafted], at_cap[drafted]
        if len(r):
            cols = self._seqs.cols
            ar = self.beta1 * cols["ar"][r] + (1.0 - self.beta1) * (aa / kk)
            lam = cols["lam"][r]
            # λ' − λ is +ε, −ε or 0; λ ← β2·λ + (1 − β2)·λ' = λ + (1 − β2)·(λ' − λ)
            up = ar < self.target
            down = (ar > self.target) & at_cap
            cols["lam"][r] = lam + ((1.0 - self.beta2) * self.epsilon) * (up.view(np.int8) - down.view(np.int8))
            cols["ar"][r] = ar
        self._learn_caps(rows, k, a)


# -- SpecDec++-like -----------------------------------------------------------------------------------
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.minimum(np.maximum(p, 1e-6), 1.0 - 1e-6)  # np.clip costs several times more per call
    return np.log(p / (1.0 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class _RiskStop(StopRule):
    def __init__(self, owner: SpecDecPPLike) -> None:
        self._owner = owner

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        owner = self._owner
        ids = np.asarray(seq_ids, dtype=np.int64)
        p_accept = owner._p_accept(np.asarray(draft_probs, dtype=np.float64), draft_entropies, position)
        if position == 0:  # a new round: remember its ids (sorted, for lookups at later positions)
            order = np.argsort(ids, kind="stable")
            owner._round_ids, owner._round_order = ids[order], order
            survival = owner._round_survival = p_accept.copy()
        elif len(owner._round_ids):
            sorted_ids = owner._round_ids
            at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
            index, known = owner._round_order[at], sorted_ids[at] == ids
            # an id not seen at position 0 (not expected from a drafter) starts a product of its own
            survival = np.where(known, owner._round_survival[index], 1.0) * p_accept
            owner._round_survival[index[known]] = survival[known]
        else:
            survival = p_accept
        return (1.0 - survival > owner.threshold) & (position + 1 >= owner.min_k)


@register("specdecpp-like")
class SpecDecPPLike(_CappedLength):
    """SpecDec++-like: stop when the chance that some drafted token is rejected exceeds ``h``.

    Rule [code, SpecDec++ ``hf_generation.py``]: after drafting token ``j`` stop when
    ``1 − Π_{j' ≤ j} P(accept_j') > h`` (``h = 0.3``), drafting between ``min_k`` and ``max_k``
    tokens (``max_k`` clipped to the engine's ``k_max``). SpecDec++ trains an acceptance head on the
    draft's hidden state; this reconstruction has none:

    * ``acceptance_model="logistic"`` (default): an online logistic regression of accepted? on the
      draft features ``[1, logit(p), H, position/16]`` (``H = 0`` when the engine sends no
      entropies), fitted by one gradient step of the mean log loss (rate ``learning_rate``, L2
      ``l2``) every ``fit_every`` updates over the judged positions (module docstring) of the
      rounds since the last step. Its weights start at ``[0, 1, 0, 0]``,
      i.e. exactly the confidence model, so it is sensible before any data, and it learns the
      acceptance rate the raw confidence misstates (at exit layer 6 of the bundled early-exit trace
      the median top-1 probability is 0.58 while 4.4% of drafts are accepted). Written in numpy
      rather than with river's ``linear_model.LogisticRegression`` so its state is a JSON-safe
      array and an update is a few vectorised operations instead of a Python loop over tokens.
    * ``acceptance_model="confidence"``: ``P(accept) =`` the draft's top-1 probability.

    ``min_k`` departs from the reference on purpose. The published runs use ``--bound 2 20``, and
    the reference's head scores token ``j`` only after token ``j + 1`` is drafted (it reads token
    ``j``'s hidden state when it is fed back), so it always drafts at least two tokens and cannot
    back off below two whatever it predicts. Here ``P(accept_j)`` comes from token ``j``'s own
    draft signals, known as soon as it is drafted, so the rule may stop after the first token:
    ``min_k = 1`` by default; ``min_k=2`` reproduces the reference's bound.

    The running product of a round lives in ``_round_survival`` (restarted at position 0).

    Per-step cost, at batch 64: with the logistic model about 35 µs (median; about 46 µs median and
    57 µs mean when the benchmark also counted building the records) for decide + update, of which
    about 20 µs checks the two per-position matrices the model reads, ``draft_probs`` and
    ``draft_entropies``. An update queues the round; every ``fit_every``-th
    update takes the gradient step over the queued rounds stacked into one pass (about 90 µs for
    eight rounds, so about 11 µs per update on average — over the 50 µs budget on those steps;
    ``fit_every=1`` steps on every update: about 75 µs per step, records included). On the bundled
    early-exit trace ``fit_every=8`` gives the same goodput as ``fit_every=1`` or better (a less noisy gradient).
    The confidence model learns nothing and reads one matrix: about 35 µs, records included.

    >>> from adaptk import StepContext
    >>> c = SpecDecPPLike(acceptance_model="confidence")
    >>> c.decide(StepContext(step=0, seq_ids=[1, 2], context_lens=[5, 5], k_max=8)).num_draft_tokens
    array([8, 8])
    >>> c.stop_rule.should_stop(np.array([1, 2]), 0, np.array([0.9, 0.6]))   # risks 0.1 and 0.4
    array([False,  True])
    >>> c.stop_rule.should_stop(np.array([1]), 1, np.array([0.7]))           # 1 − 0.9·0.7 = 0.37
    array([ True])
    """

    required_signals = frozenset({"draft_probs"})

    def __init__(
        self,
        threshold: float = 0.3,
        min_k: int = 1,
        max_k: int = 20,
        acceptance_model: str = "logistic",
        learning_rate: float = 0.5,
        l2: float = 1e-4,
        fit_every: int = 8,
    ) -> None:
        super().__init__()
        _check_prob("threshold", threshold)
        if isinstance(fit_every, bool) or not isinstance(fit_every, (int, np.integer)) or fit_every < 1:
            raise ValueError(f"fit_every must be an int >= 1, got {fit_every!r}")
        if acceptance_model not in ("confidence", "logistic"):
            raise ValueError(f"acceptance_model must be 'confidence' or 'logistic', got {acceptance_model!r}")
        if min_k < 1 or max_k < min_k:
            raise ValueError(f"need 1 <= min_k <= max_k, got min_k={min_k!r}, max_k={max_k!r}")
        self.threshold = threshold
        self.min_k = min_k
        self.max_k = max_k
        self.acceptance_model = acceptance_model
        self.learning_rate = learning_rate
        self.l2 = l2
        self.fit_every = fit_every
        if acceptance_model == "logistic":  # the features include the entropy (0 when absent)
            self.required_signals = frozenset({"draft_probs", "draft_entropies"})
        self._weights = np.array([0.0, 1.0, 0.0, 0.0])
        # rounds not yet learned from: (probs, entropies or None, drafted, accepted)
        self._queued: list[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]] = []
        self._seqs = None  # no per-sequence state beyond the round's running product
        self._init_caps()
        self._round_ids = np.zeros(0, dtype=np.int64)
        self._round_order = np.zeros(0, dtype=np.int64)
        self._round_survival = np.zeros(0, dtype=np.float64)

    @property
    def base_k(self) -> int:  # the round cap used by _CappedLength
        return self.max_k

    @property
    def stop_rule(self) -> StopRule:
        return _RiskStop(self)

    def _p_accept(self, probs: np.ndarray, entropies: Any, position: int) -> np.ndarray:
        if self.acceptance_model == "confidence":
            return probs
        w = self._weights
        z = w[0] + w[1] * _logit(probs) + w[3] * (position / 16.0)
        if entropies is not None:
            z = z + w[2] * np.asarray(entropies, dtype=np.float64)
        return _sigmoid(z)

    def _update(self, feedback: Feedback) -> None:
        probs = feedback.draft_probs
        if self.acceptance_model != "logistic" or probs is None or not len(feedback.seq_ids):
            return
        k = feedback.num_draft_tokens
        if not np.count_nonzero(k):
            return  # nothing drafted, nothing judged
        ent = feedback.draft_entropies
        if ent is not None and ent.shape[1] < probs.shape[1]:
            ent = None
        self._queued.append((probs.copy(), None if ent is None else ent.copy(), k.copy(),
                             feedback.num_accepted_tokens.copy()))
        if len(self._queued) >= self.fit_every:
            self._fit_queue()

    def _fit_queue(self) -> None:
        """One gradient step of the mean log loss over the judged positions of the queued rounds."""
        queue = self._queued
        if len(queue) > 1 and len({q[0].shape[1] for q in queue}) == 1 and len({q[1] is None for q in queue}) == 1:
            # the usual case (equal widths): stack the rounds and gather once
            probs, ent, k, a = (None if parts[0] is None else np.concatenate(parts) for parts in zip(*queue, strict=True))
            queue = [(probs, ent, k, a)]
        logits, ents, positions, labels = [], [], [], []
        for probs, ent, k, a in queue:
            rows, pos = np.nonzero(np.arange(probs.shape[1]) < np.minimum(k, a + 1)[:, None])  # judged
            logits.append(_logit(probs[rows, pos]))
            ents.append(np.zeros(len(pos)) if ent is None else ent[rows, pos])  # feature 0 when absent
            positions.append(pos)
            labels.append(pos < a[rows])
        self._queued = []
        if len(logits) == 1:
            logit, h, pos, y = logits[0], ents[0], positions[0], labels[0]
        else:
            logit, h, pos, y = (np.concatenate(x) for x in (logits, ents, positions, labels))
        n = len(pos)
        if not n:
            return
        # σ(z) = (1 + tanh(z/2)) / 2, so the residual σ(z) − y is computed from z/2 with halved
        # weights (fewer array operations)
        w0, w1, w2, w3 = self._weights.tolist()
        half_z = (0.5 * w1) * logit
        half_z += (w3 / 32.0) * pos  # feature pos/16
        half_z += (0.5 * w2) * h
        half_z += 0.5 * w0
        r = np.tanh(half_z)
        r *= 0.5
        r += 0.5
        r -= y  # d(log loss)/dz
        grad = (float(r.sum()), float(r @ logit), float(r @ h), float(r @ pos) / 16.0)
        lr, l2 = self.learning_rate, self.l2
        self._weights = np.array([w - lr * (g / n + l2 * w) for w, g in zip((w0, w1, w2, w3), grad, strict=True)])
