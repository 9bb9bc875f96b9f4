"""DEL: dynamic exit layer and draft length for self-speculative decoding (arXiv 2504.05598).

The DEL code (``hoenza/DEL``) was not available; this follows algorithms.md §5 ([summary] +
[reconstruction]).
"""

from __future__ import annotations

import numpy as np

from adaptk.controllers.stopping import _ConfidenceTuning, _ThresholdStop
from adaptk.core import SpeculationController, StopRule
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["DEL", "expected_emitted", "tokens_per_layer", "choose_exit"]


def expected_emitted(alpha: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``(1 − α^{d+1}) / (1 − α)`` elementwise (``d + 1`` where ``α = 1``)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    one = np.isclose(alpha, 1.0)
    safe = np.where(one, 0.5, alpha)
    return np.where(one, d + 1.0, (1.0 - safe ** (d + 1.0)) / (1.0 - safe))


def tokens_per_layer(alphas: np.ndarray, layers: np.ndarray, num_layers: float, d_max: int) -> np.ndarray:
    """``TPL[ℓ, d] = E[emitted | α_ℓ, d] / (d·ℓ + L)`` for ``d = 0..d_max``, shape ``(len(layers), d_max+1)``."""
    d = np.arange(d_max + 1, dtype=np.float64)[None, :]
    alphas = np.asarray(alphas, dtype=np.float64)[:, None]
    layers = np.asarray(layers, dtype=np.float64)[:, None]
    return expected_emitted(alphas, d) / (d * layers + num_layers)


def choose_exit(alphas: np.ndarray, layers: np.ndarray, num_layers: float, d_max: int) -> tuple[int, int, float]:
    """Return ``(index of ℓ*, d*, TPL*)``; ``d* = 0`` unless some ``(ℓ, d > 0)`` beats ``1/L``.

    >>> choose_exit(np.array([0.9, 0.6]), np.array([4, 8]), 32, 6)[:2]
    (0, 6)
    >>> choose_exit(np.array([0.01]), np.array([4]), 32, 6)[1]
    0
    """
    table = tokens_per_layer(alphas, layers, num_layers, d_max)
    if d_max < 1 or len(layers) == 0:
        return 0, 0, 1.0 / num_layers
    spec = table[:, 1:]
    flat = int(np.argmax(spec))
    li, dj = divmod(flat, spec.shape[1])
    best = float(spec[li, dj])
    if best > 1.0 / num_layers:
        return li, dj + 1, best
    return li, 0, 1.0 / num_layers


@register("del")
class DEL(_ConfidenceTuning, SpeculationController):
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
    layer's top-1 probability falls below a threshold (start 0.4) refitted online with HF's ROC
    rule (see :class:`adaptk.controllers.stopping.Confidence`).

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

    Cost per step: about 100 µs at batch 64, over the 50 µs target: it scores every (exit layer,
    length) pair each step and refits its confidence threshold (ROC) periodically.
    """

    required_signals = frozenset({"draft_probs", "layer_agreement"})

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
        self.decay = decay
        self.draft_cost_ratio = draft_cost_ratio
        self.threshold = threshold
        self.self_tuning = self_tuning
        self.window = window
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.fn_cost = fn_cost
        self._init_tuning(threshold)
        self._layer_matches = np.zeros(0)   # decayed, index ℓ − 1
        self._layer_compared = np.zeros(0)
        self._matches = 0.0                  # layer-less drafter
        self._compared = 0.0
        self._last_exit: int | None = None

    @property
    def stop_rule(self) -> StopRule:
        return _ThresholdStop(self)

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

    def _decide(self, context: StepContext) -> Decision:
        n = len(context.seq_ids)
        if context.exit_layers and context.num_layers:
            layers = np.asarray(context.exit_layers, dtype=np.int64)
            alphas = self.layer_acceptance(layers)
            li, d, tpl = choose_exit(alphas, layers, float(context.num_layers), context.k_max)
            exit_layer = int(layers[li])
            self._last_exit = exit_layer
            info = {"tpl": tpl, "alpha": float(alphas[li])}
        else:
            alpha = (self._matches + 1.0) / (self._compared + 2.0)
            _, d, tpl = choose_exit(np.array([alpha]), np.array([self.draft_cost_ratio]), 1.0, context.k_max)
            exit_layer = None
            info = {"tpl": tpl, "alpha": alpha}
        return Decision(np.full(n, d, dtype=np.int64), exit_layer=exit_layer, info=info)

    def _update(self, feedback: Feedback) -> None:
        if not len(feedback.seq_ids):
            return
        k, a = feedback.num_draft_tokens, feedback.num_accepted_tokens
        drafted = k > 0
        acc_matches = float(a[drafted].sum())
        acc_compared = float(np.minimum(k, a + 1)[drafted].sum())
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
        self._learn_confidence(feedback, feedback.draft_probs)
