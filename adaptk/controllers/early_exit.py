"""DEL: dynamic exit layer and draft length for self-speculative decoding (arXiv 2504.05598).

The DEL code (``hoenza/DEL``) was not available; this follows algorithms.md §5 ([summary] +
[reconstruction]).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from adaptk.controllers.stopping import _ThresholdStop, refit_due, roc_threshold
from adaptk.core import SpeculationController, StopRule
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["DEL", "expected_emitted", "tokens_per_layer", "choose_exit"]


def expected_emitted(alpha: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``(1 − α^{d+1}) / (1 − α)`` elementwise (``d + 1`` where ``α = 1``).

    >>> expected_emitted(np.array([0.5, 1.0]), np.array([2, 2]))
    array([1.75, 3.  ])
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    one = np.isclose(alpha, 1.0)
    safe = np.where(one, 0.5, alpha)
    return np.where(one, d + 1.0, (1.0 - safe ** (d + 1.0)) / (1.0 - safe))


@functools.lru_cache(maxsize=64)
def _positions(width: int) -> np.ndarray:
    """``arange(width)``, shared and read-only."""
    j = np.arange(width)
    j.flags.writeable = False
    return j


def _emitted_table(alphas: np.ndarray, d_max: int) -> np.ndarray:
    """``E[emitted | α_ℓ, d] = Σ_{j ≤ d} α_ℓ^j`` for ``d = 0..d_max``, shape ``(len(alphas), d_max + 1)``.

    The partial sums of the geometric series need no special case at ``α = 1``.
    """
    return np.cumsum(np.asarray(alphas, dtype=np.float64)[:, None] ** np.arange(d_max + 1), axis=1)


def tokens_per_layer(alphas: np.ndarray, layers: np.ndarray, num_layers: float, d_max: int) -> np.ndarray:
    """``TPL[ℓ, d] = E[emitted | α_ℓ, d] / (d·ℓ + L)`` for ``d = 0..d_max``, shape ``(len(layers), d_max+1)``.

    >>> tokens_per_layer(np.array([0.5]), np.array([4]), 32, 2).round(4)   # 1/32, 1.5/36, 1.75/40
    array([[0.0312, 0.0417, 0.0438]])
    """
    d = np.arange(d_max + 1, dtype=np.float64)[None, :]
    layers = np.asarray(layers, dtype=np.float64)[:, None]
    return _emitted_table(alphas, d_max) / (d * layers + num_layers)


def _best(table: np.ndarray, num_layers: float) -> tuple[int, int, float]:
    """``(index of ℓ*, d*, TPL*)`` from a TPL table: ``d* = 0`` unless some ``d > 0`` beats ``1/L``."""
    spec = table[:, 1:]
    flat = int(np.argmax(spec))
    li, dj = divmod(flat, spec.shape[1])
    best = float(spec[li, dj])
    if best > 1.0 / num_layers:
        return li, dj + 1, best
    return li, 0, 1.0 / num_layers


def choose_exit(alphas: np.ndarray, layers: np.ndarray, num_layers: float, d_max: int) -> tuple[int, int, float]:
    """Return ``(index of ℓ*, d*, TPL*)``; ``d* = 0`` unless some ``(ℓ, d > 0)`` beats ``1/L``.

    >>> choose_exit(np.array([0.9, 0.6]), np.array([4, 8]), 32, 6)[:2]
    (0, 6)
    >>> choose_exit(np.array([0.01]), np.array([4]), 32, 6)[1]
    0
    """
    if d_max < 1 or len(layers) == 0:
        return 0, 0, 1.0 / num_layers
    return _best(tokens_per_layer(alphas, layers, num_layers, d_max), num_layers)


@register("del")
class DEL(SpeculationController):
    """DEL: pick the exit layer ``ℓ`` and draft length ``d`` maximising tokens per loaded layer.

    Objective [summary]: ``TPL(ℓ, d) = [(1 − α_ℓ^{d+1}) / (1 − α_ℓ)] / (d·ℓ + L)`` over the engine's
    ``context.exit_layers`` and ``d = 0..k_max`` (``L = context.num_layers``). ``d = 0`` (plain
    decoding, ``TPL = 1/L``) is chosen unless some ``(ℓ, d > 0)`` beats it strictly. One ``(ℓ, d)``
    per step for the whole batch (the exit layer is shared by the batch; DEL itself is batch 1).

    Per-layer acceptance [summary + reconstruction]: ``α_ℓ = (M_ℓ + 1) / (C_ℓ + 2)`` from the shadow
    counts ``Feedback.layer_matches`` / ``layer_compared`` (column ``ℓ − 1`` is exit layer ``ℓ``),
    summed over the batch and decayed by ``decay`` (0.9) per round; the ``+1/+2`` is a uniform prior
    that fades within a few rounds. Where a step has no shadow counts, the round's own drafts
    update the layer that drafted them (``feedback.exit_layer``): ``Σa`` matches over
    ``Σ min(k, a + 1)`` comparisons.

    Dynamic draft exit [summary; reconstruction as §7]: a stop rule halts the round when the exit
    layer's top-1 probability falls below a threshold (start ``threshold`` = 0.4) refitted online
    with HF's ROC rule, on the schedule of :class:`adaptk.controllers.stopping.Confidence`: from the
    (probability, accepted?) pairs of the positions judged on the true prefix, the last ``window``
    of them, the first fit as soon as more than ``min_samples`` samples of both classes exist, then
    whenever the samples seen have doubled while the window fills and every ``refit_every``
    updates; the threshold is ``argmin(fpr + fn_cost·fnr)``.

    **Not self-speculation** (``context.exit_layers`` or ``num_layers`` is ``None``): the drafter is
    treated as one layer-less drafter whose draft token costs ``draft_cost_ratio`` of a target pass,
    ``TPL(d) = E[emitted | α, d] / (d·draft_cost_ratio + 1)``, with ``α`` learned from accepted
    counts as above; ``exit_layer`` is then ``None``.

    >>> from adaptk import StepContext, Feedback
    >>> from adaptk.controllers.early_exit import DEL
    >>> c = DEL()
    >>> ctx = StepContext(step=0, seq_ids=[1], context_lens=[5], k_max=4, num_layers=8, exit_layers=(2, 4))
    >>> c.decide(ctx).exit_layer in (2, 4)
    True
    >>> matches = np.zeros((1, 8), dtype=int)   # no exit layer ever agrees with the target
    >>> for step in range(10):
    ...     d = c.decide(ctx)
    ...     c.update(Feedback(seq_ids=[1], num_draft_tokens=d.num_draft_tokens, num_accepted_tokens=[0],
    ...                       layer_matches=matches, layer_compared=np.full((1, 8), 1)))
    >>> c.decide(ctx).num_draft_tokens.tolist()        # plain decoding beats every (ℓ, d > 0)
    [0]

    Per-step cost: about 30 µs for decide + update at batch 64 in ``benchmarks/bench_overhead.py``
    (median; ``fixed``: 12 µs there), of which about 10 µs is checking the ``draft_probs`` matrix
    (``update`` checks only the signals a controller declares in ``required_signals``). The ``(ℓ, d)``
    search is a few array operations over cached denominators (a scalar scan without exit
    layers); a step's (probability, accepted?) samples are queued and only extracted into the
    ``window``-sample buffer when a ROC refit is due (every ``refit_every`` updates, about 1 ms at
    4096 samples: the exception on the steps where it runs), and queued steps that the window
    would drop before the next refit are discarded unread.
    """

    required_signals = frozenset({"draft_probs", "layer_agreement"})
    #: Derived caches (index grids and TPL denominators): never saved.
    _TRANSIENT = ("_grid_cache",)

    def __init__(
        self,
        decay: float = 0.9,
        draft_cost_ratio: float = 0.1,
        threshold: float = 0.4,
        self_tuning: bool = True,
        window: int = 4096,
        refit_every: int = 50,
        min_samples: int = 5,
        fn_cost: float = 3.0,
    ) -> None:
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        if draft_cost_ratio <= 0:
            raise ValueError(f"draft_cost_ratio must be > 0, got {draft_cost_ratio!r}")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2 or refit_every < 1:
            raise ValueError("window must be an int >= 2 and refit_every >= 1")
        self.decay = decay
        self.draft_cost_ratio = draft_cost_ratio
        self.threshold = threshold
        self.self_tuning = self_tuning
        self.window = window
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.fn_cost = fn_cost
        self._layer_matches = np.zeros(0)   # decayed, index ℓ − 1
        self._layer_compared = np.zeros(0)
        self._matches = 0.0                  # layer-less drafter
        self._compared = 0.0
        self._last_exit: int | None = None
        # confidence tuning: the last `window` (probability, accepted?) samples, a ring buffer
        self._threshold = float(threshold)
        self._probs = np.zeros(0)
        self._labels = np.zeros(0, dtype=bool)
        self._head = 0        # next write position
        self._size = 0        # samples held (<= window)
        self._seen = 0        # samples ever seen
        self._seen_at_fit = 0
        self._since_fit = 0
        # steps not yet in the buffer: (draft_probs, judged positions, accepted, samples)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self._pending_samples = 0
        self._grid_cache: dict[Any, Any] = {}

    @property
    def stop_rule(self) -> StopRule:
        return _ThresholdStop(self)

    # -- acceptance ------------------------------------------------------------------------------
    def _grow(self, num_layers: int) -> None:
        if len(self._layer_matches) < num_layers:
            pad = num_layers - len(self._layer_matches)
            self._layer_matches = np.concatenate([self._layer_matches, np.zeros(pad)])
            self._layer_compared = np.concatenate([self._layer_compared, np.zeros(pad)])

    def layer_acceptance(self, layers: np.ndarray) -> np.ndarray:
        """Current ``α_ℓ`` estimates for exit layers ``layers`` (1-based)."""
        layers = np.asarray(layers, dtype=np.int64)
        self._grow(int(layers.max()) if len(layers) else 0)
        return (self._layer_matches[layers - 1] + 1.0) / (self._layer_compared[layers - 1] + 2.0)

    # -- policy ----------------------------------------------------------------------------------
    def _grid(self, layers: tuple[int, ...] | None, num_layers: float, k_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(layer indices, powers 0..k_max, TPL denominators d·ℓ + L)`` for this step's options (cached)."""
        key = (layers, num_layers, k_max)
        grid = self._grid_cache.get(key)
        if grid is None:
            if len(self._grid_cache) >= 64:
                self._grid_cache.clear()
            ls = np.asarray(layers if layers is not None else (self.draft_cost_ratio,), dtype=np.float64)
            d = np.arange(k_max + 1, dtype=np.float64)
            grid = (ls.astype(np.int64) - 1, d, d[None, :] * ls[:, None] + num_layers)
            self._grid_cache[key] = grid
        return grid

    def _decide(self, context: StepContext) -> Decision:
        n = len(context.seq_ids)
        k_max = context.k_max
        exit_layer = None
        if context.exit_layers and context.num_layers:
            num_layers = float(context.num_layers)
            index, d, denominators = self._grid(tuple(context.exit_layers), num_layers, k_max)
            self._grow(int(index.max()) + 1)
            alphas = (self._layer_matches[index] + 1.0) / (self._layer_compared[index] + 2.0)
            li, k, tpl = (0, 0, 1.0 / num_layers) if k_max < 1 else \
                _best(np.cumsum(alphas[:, None] ** d, axis=1) / denominators, num_layers)
            alpha = float(alphas[li])
            exit_layer = self._last_exit = int(context.exit_layers[li])
        else:
            # one layer-less drafter: a scan over d (a few scalar operations beat array set-up)
            alpha = (self._matches + 1.0) / (self._compared + 2.0)
            ratio = self.draft_cost_ratio
            k, tpl, emitted, power = 0, -1.0, 1.0, 1.0
            for d_ in range(1, k_max + 1):
                power *= alpha
                emitted += power
                value = emitted / (d_ * ratio + 1.0)
                if value > tpl:
                    k, tpl = d_, value
            if tpl <= 1.0:  # TPL of plain decoding is 1/L = 1
                k, tpl = 0, 1.0
        return Decision(np.full(n, k, dtype=np.int64), exit_layer=exit_layer, info={"tpl": tpl, "alpha": alpha})

    def _update(self, feedback: Feedback) -> None:
        if not len(feedback.seq_ids):
            return
        k, a = feedback.num_draft_tokens, feedback.num_accepted_tokens
        # positions judged on the true prefix: the accepted ones and the first rejection (a row that
        # drafted nothing has none; a <= k makes its accepted count 0 as well)
        judged = np.minimum(k, a + 1)
        acc_matches = float(a.sum())
        acc_compared = float(judged.sum())
        self._matches = self.decay * self._matches + acc_matches
        self._compared = self.decay * self._compared + acc_compared
        if feedback.layer_matches is not None:
            num_layers = feedback.layer_matches.shape[1]
            self._grow(num_layers)
            self._layer_matches *= self.decay
            self._layer_compared *= self.decay
            self._layer_matches[:num_layers] += feedback.layer_matches.sum(axis=0)
            self._layer_compared[:num_layers] += feedback.layer_compared.sum(axis=0)
        else:
            layer = feedback.exit_layer if feedback.exit_layer is not None else self._last_exit
            if layer is not None and acc_compared > 0:
                self._grow(int(layer))
                self._layer_matches *= self.decay
                self._layer_compared *= self.decay
                self._layer_matches[layer - 1] += acc_matches
                self._layer_compared[layer - 1] += acc_compared
        if self.self_tuning and feedback.draft_probs is not None:
            self._learn_confidence(feedback.draft_probs, judged, a, int(acc_compared))

    def _learn_confidence(self, probs: np.ndarray, judged: np.ndarray, accepted: np.ndarray, num_judged: int) -> None:
        """Queue the step's (probability, accepted?) samples; refit the threshold when due.

        Samples are extracted from the queued steps only when a refit is due: the ROC is all that
        reads them, and at large batch most samples leave the window before any refit does.
        """
        if not num_judged:
            return
        self._pending.append((probs.copy(), judged, accepted.copy(), num_judged))
        self._pending_samples += num_judged
        if self._pending_samples >= self.window:
            self._drop_superseded()
        self._seen += num_judged
        self._since_fit += 1
        due = refit_due(self._seen, self._seen_at_fit, self._since_fit, self.refit_every, self.window)
        if not due:
            return
        self._flush()
        if self._size <= self.min_samples:
            return
        held_labels = self._labels[: self._size]
        positives = int(held_labels.sum())
        if 0 < positives < self._size:  # HF: more than min_samples samples, both classes present
            self._threshold = roc_threshold(self._probs[: self._size], held_labels, self.fn_cost)
            self._since_fit = 0
            self._seen_at_fit = self._seen

    def _drop_superseded(self) -> None:
        """The queue holds a full window: the buffer's samples and the oldest queued steps beyond
        the newest ``window`` samples can never reach a refit."""
        self._head, self._size = 0, 0
        pending = self._pending
        while len(pending) > 1:
            oldest = pending[0][3]
            if self._pending_samples - oldest < self.window:
                break
            pending.pop(0)
            self._pending_samples -= oldest

    def _flush(self) -> None:
        """Move the queued steps' samples into the ring buffer, oldest first."""
        for probs, judged, accepted, _ in self._pending:
            j = _positions(probs.shape[1])  # positions past a row's judged ones are masked out
            mask = j < judged[:, None]
            self._store(probs[mask], (j < accepted[:, None])[mask])
        self._pending.clear()
        self._pending_samples = 0

    def _store(self, values: np.ndarray, labels: np.ndarray) -> None:
        """Write samples into the ring buffer (the ROC does not depend on their order)."""
        window = int(self.window)
        if self._probs.size != window:
            self._probs = np.zeros(window)
            self._labels = np.zeros(window, dtype=bool)
        m = values.size
        if m >= window:
            self._probs[:] = values[-window:]
            self._labels[:] = labels[-window:]
            self._head, self._size = 0, window
            return
        head = self._head
        end = head + m
        if end <= window:
            self._probs[head:end] = values
            self._labels[head:end] = labels
        else:
            first = window - head
            self._probs[head:] = values[:first]
            self._labels[head:] = labels[:first]
            self._probs[: m - first] = values[first:]
            self._labels[: m - first] = labels[first:]
        self._head = end % window
        self._size = min(self._size + m, window)
