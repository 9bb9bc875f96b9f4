"""Token-level stop rules (algorithms.md §7): HF/DISCO confidence, AdaEDL, SpecDec++-like.

Each controller here fixes the *cap* of a round (``base_k``, default the engine's ``k_max``) and
exposes a :class:`~adaptk.core.StopRule` that the drafter consults after every drafted token; the
rule's threshold is what the controller learns from :class:`~adaptk.types.Feedback`.

Which drafted positions teach a stop rule: for sequence ``i`` with ``a_i`` accepted of ``k_i``
drafted, positions ``j < a_i`` were accepted and position ``a_i`` (when ``a_i < k_i``) was the first
rejection; positions after it were judged on a wrong prefix and are not used (exactly as
Hugging Face's ``AssistedCandidateGenerator.update_candidate_strategy`` trims its ``probs``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adaptk.core import SpeculationController, StopRule
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["Confidence", "AdaEDL", "SpecDecPPLike", "judged_positions", "roc_threshold"]


# -- shared helpers ---------------------------------------------------------------------------------
def judged_positions(feedback: Feedback) -> tuple[np.ndarray, np.ndarray]:
    """Mask of drafted positions judged on the true prefix, and their accepted labels.

    Returns ``(mask, accepted)``, both ``(num_seqs, width)`` bool, where ``width`` is the widest
    per-position signal present (or ``max(num_draft_tokens)``). ``mask[i, j]`` is true for
    ``j < num_draft_tokens[i]`` and ``j <= num_accepted_tokens[i]``; ``accepted[i, j]`` is
    ``j < num_accepted_tokens[i]``.
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


def roc_threshold(probs: np.ndarray, labels: np.ndarray, fn_cost: float = 3.0) -> float:
    """HF's self-tuned confidence threshold: ``argmin(fpr + fn_cost * fnr)`` over sklearn's ROC.

    ``labels`` are 1 for accepted drafts. The ROC's first threshold is ``inf`` ("stop always");
    it is mapped to ``1.0``. scikit-learn is imported here, lazily.

    >>> round(roc_threshold(np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])), 2)
    0.8
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, probs)
    costs = fpr + fn_cost * (1.0 - tpr)
    return float(min(thresholds[int(np.argmin(costs))], 1.0))


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_base_k(base_k: int | None) -> None:
    if base_k is not None and (isinstance(base_k, bool) or not isinstance(base_k, (int, np.integer)) or base_k < 0):
        raise ValueError(f"base_k must be None or a non-negative int, got {base_k!r}")


class _ConfidenceTuning:
    """Mixin: the HF self-tuning of a top-1 confidence threshold from (prob, accepted?) samples.

    Expects on the host: params ``self_tuning``, ``window``, ``refit_every``, ``min_samples``,
    ``fn_cost``; state from :meth:`_init_tuning`.

    Refit schedule (HF refits every round; a ROC costs about 1 ms at 4096 samples): the first fit
    happens as soon as HF's condition holds (more than ``min_samples`` samples, both classes);
    then again whenever the number of samples seen has doubled while the window is still filling,
    and every ``refit_every`` updates. ``refit_every=1`` with a huge ``window`` is HF exactly.
    """

    def _init_tuning(self, threshold: float) -> None:
        self._threshold = float(threshold)
        self._probs = np.zeros(0, dtype=np.float64)
        self._labels = np.zeros(0, dtype=np.int8)
        self._since_fit = 0
        self._seen = 0
        self._seen_at_fit = 0

    def _learn_confidence(self, feedback: Feedback, probs: np.ndarray | None) -> None:
        if not self.self_tuning or probs is None or len(feedback.seq_ids) == 0:
            return
        mask, accepted = judged_positions(feedback)
        width = min(mask.shape[1], probs.shape[1])
        mask = mask[:, :width]
        values = probs[:, :width][mask]
        if values.size == 0:
            return
        labels = accepted[:, :width][mask].astype(np.int8)
        self._probs = np.concatenate([self._probs, values])[-self.window :]
        self._labels = np.concatenate([self._labels, labels])[-self.window :]
        self._seen += int(values.size)
        self._since_fit += 1
        due = (
            self._seen_at_fit == 0
            or self._since_fit >= self.refit_every
            or (self._seen <= self.window and self._seen >= 2 * self._seen_at_fit)
        )
        # HF: more than 5 samples and at least one of each class
        if due and len(self._probs) > self.min_samples and 0 < int(self._labels.sum()) < len(self._labels):
            self._threshold = roc_threshold(self._probs, self._labels, self.fn_cost)
            self._since_fit = 0
            self._seen_at_fit = self._seen


class _ThresholdStop(StopRule):
    """Stop when the draft's top-1 probability is below the owner's current threshold."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        return np.asarray(draft_probs, dtype=np.float64) < self._owner._threshold


class _CappedLength(SpeculationController):
    """Base: every sequence gets ``min(base_k, k_max)``; the stop rule does the adapting."""

    base_k: int | None

    def _cap(self, context: StepContext) -> int:
        return context.k_max if self.base_k is None else min(int(self.base_k), context.k_max)

    def _decide(self, context: StepContext) -> Decision:
        cap = self._cap(context)
        self._last_cap = cap
        return Decision(np.full(len(context.seq_ids), cap, dtype=np.int64))


# -- confidence (HF / DISCO-style) ------------------------------------------------------------------
@register("confidence")
class Confidence(_ConfidenceTuning, _CappedLength):
    """Draft up to ``base_k`` (default ``k_max``); stop when the draft's top-1 probability < threshold.

    Rule [code, transformers ``ConfidenceCriteria`` and ``update_candidate_strategy``]: threshold
    starts at 0.4. With ``self_tuning`` the controller collects (probability, accepted?) per judged
    drafted token (see the module docstring) and, once more than ``min_samples`` samples with both
    classes exist, sets the threshold to ``argmin(fpr + 3·fnr)`` of scikit-learn's ``roc_curve``.
    Departures from HF, for speed and bounded memory: samples live in a window of the last
    ``window`` tokens (HF keeps all) and the ROC is refitted on the schedule of
    ``_ConfidenceTuning`` — first as soon as possible, then on doubling sample counts and every
    ``refit_every`` updates (HF: every round; ``refit_every=1, window=10**9`` is HF exactly).
    One threshold for the whole batch.

    Cost: decide+update are vectorised; a refit calls ``roc_curve`` (about 1 ms at 4096 samples
    on a slow CPU), amortised over ``refit_every`` steps — the exception to the 50 µs budget on
    the steps where it runs.

    >>> import adaptk
    >>> from adaptk import StepContext, Feedback
    >>> from adaptk.controllers.stopping import Confidence
    >>> c = Confidence(self_tuning=False)
    >>> c.decide(StepContext(step=0, seq_ids=[1, 2], context_lens=[5, 5], k_max=6)).num_draft_tokens
    array([6, 6])
    >>> c.stop_rule.should_stop(np.array([1, 2]), 0, np.array([0.9, 0.2]))
    array([False,  True])
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
    ) -> None:
        super().__init__()
        _check_base_k(base_k)
        _check_prob("threshold", threshold)
        if window < 2 or refit_every < 1:
            raise ValueError("window must be >= 2 and refit_every >= 1")
        self.base_k = base_k
        self.threshold = threshold
        self.self_tuning = self_tuning
        self.window = window
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.fn_cost = fn_cost
        self._init_tuning(threshold)
        self._last_cap = 0

    @property
    def stop_rule(self) -> StopRule:
        return _ThresholdStop(self)

    def _update(self, feedback: Feedback) -> None:
        self._learn_confidence(feedback, feedback.draft_probs)


# -- AdaEDL -------------------------------------------------------------------------------------------
class _EntropyStop(StopRule):
    def __init__(self, owner: AdaEDL) -> None:
        self._owner = owner

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        owner = self._owner
        if draft_entropies is None:  # no entropy signal: the rule cannot judge, never stops
            return np.zeros(len(seq_ids), dtype=bool)
        lam = owner._lambdas(np.asarray(seq_ids).tolist())
        beta = 1.0 - np.sqrt(owner.gamma * np.maximum(np.asarray(draft_entropies, dtype=np.float64), 0.0))
        return beta < lam


@register("adaedl")
class AdaEDL(_CappedLength):
    """AdaEDL: stop drafting when the entropy-based acceptance lower bound falls below ``λ``.

    Rule [code, DSDE repository's ``AdaEDLScheduler``; abstract]: for each drafted token with draft
    entropy ``H`` (nats), ``β = 1 − sqrt(γ·H)``; stop when ``β < λ``. After each round, per sequence
    (the reference keeps one scheduler per request)::

        AR_ema ← β1·AR_ema + (1 − β1)·a/k                 (AR_ema starts at 0)
        λ'     = λ + ε   if AR_ema < target
               = λ − ε   if AR_ema > target and a == cap (fully accepted at the round's cap)
               = λ       otherwise
        λ      ← β2·λ + (1 − β2)·λ'

    The round's cap is ``min(base_k, k_max)`` (default ``k_max``). Departure: a round that drafted
    nothing (``k = 0``) carries no acceptance information and is skipped (the reference would
    count it as ``AR = 0``). Without ``draft_entropies`` the stop rule never stops (documented
    fallback; the cap alone then sets the length). New sequences start at ``λ0``.

    >>> from adaptk import StepContext, Feedback
    >>> from adaptk.controllers.stopping import AdaEDL
    >>> c = AdaEDL()
    >>> _ = c.decide(StepContext(step=0, seq_ids=[1], context_lens=[5], k_max=4))
    >>> c.update(Feedback(seq_ids=[1], num_draft_tokens=[4], num_accepted_tokens=[2]))
    >>> round(c._lambda[1], 6)   # AR_ema = 0.25 < 0.9: λ' = 0.51, λ = 0.9·0.5 + 0.1·0.51
    0.501
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
    ) -> None:
        super().__init__()
        _check_base_k(base_k)
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
        self._lambda: dict[int, float] = {}
        self._ar_ema: dict[int, float] = {}
        self._last_cap = 0

    @property
    def stop_rule(self) -> StopRule:
        return _EntropyStop(self)

    def _lambdas(self, seq_ids: list[int]) -> np.ndarray:
        get, lam0 = self._lambda.get, self.lambda0
        return np.fromiter((get(s, lam0) for s in seq_ids), dtype=np.float64, count=len(seq_ids))

    def _update(self, feedback: Feedback) -> None:
        k = feedback.num_draft_tokens
        keep = k > 0
        if not keep.any():
            return
        ids = feedback.seq_ids[keep].tolist()
        k = k[keep]
        a = feedback.num_accepted_tokens[keep]
        ar_get = self._ar_ema.get
        ar = np.fromiter((ar_get(s, 0.0) for s in ids), dtype=np.float64, count=len(ids))
        ar = self.beta1 * ar + (1.0 - self.beta1) * (a / k)
        lam = self._lambdas(ids)
        full_at_cap = a == self._last_cap
        lam_prime = np.where(ar < self.target, lam + self.epsilon,
                             np.where((ar > self.target) & full_at_cap, lam - self.epsilon, lam))
        lam = self.beta2 * lam + (1.0 - self.beta2) * lam_prime
        self._ar_ema.update(zip(ids, ar.tolist(), strict=True))
        self._lambda.update(zip(ids, lam.tolist(), strict=True))

    def _end_sequence(self, seq_id: int) -> None:
        self._lambda.pop(seq_id, None)
        self._ar_ema.pop(seq_id, None)


# -- SpecDec++-like -----------------------------------------------------------------------------------
def _features(probs: np.ndarray, entropies: np.ndarray | None, positions: np.ndarray) -> np.ndarray:
    """Logistic features: [1, logit(p), H, position/16]; weights [0, 1, 0, 0] give P = p exactly."""
    p = np.clip(probs, 1e-6, 1.0 - 1e-6)
    ent = np.zeros_like(p) if entropies is None else np.asarray(entropies, dtype=np.float64)
    return np.stack([np.ones_like(p), np.log(p) - np.log1p(-p), ent, positions / 16.0], axis=-1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class _RiskStop(StopRule):
    def __init__(self, owner: SpecDecPPLike) -> None:
        self._owner = owner

    def should_stop(self, seq_ids, position, draft_probs, draft_entropies=None):
        owner = self._owner
        ids = np.asarray(seq_ids).tolist()
        p_accept = owner._p_accept(np.asarray(draft_probs, dtype=np.float64), draft_entropies, position)
        if position == 0:
            survival = p_accept
        else:
            get = owner._survival.get
            survival = np.fromiter((get(s, 1.0) for s in ids), dtype=np.float64, count=len(ids)) * p_accept
        owner._survival.update(zip(ids, survival.tolist(), strict=True))
        return (1.0 - survival > owner.threshold) & (position + 1 >= owner.min_k)


@register("specdecpp-like")
class SpecDecPPLike(_CappedLength):
    """SpecDec++-like: stop when the chance that some drafted token is rejected exceeds ``h``.

    Rule [code, SpecDec++]: after drafting token ``j`` stop when ``1 − Π_{j' ≤ j} P(accept_j') > h``
    (``h = 0.3``), drafting between ``min_k = 2`` and ``max_k = 20`` tokens (``max_k`` clipped to the
    engine's ``k_max``). SpecDec++ trains an acceptance head; this reconstruction has none:

    * ``acceptance_model="confidence"``: ``P(accept) =`` the draft's top-1 probability.
    * ``acceptance_model="logistic"``: an online logistic regression of accepted? on the draft
      features ``[1, logit(p), H, position/16]``, fitted by one mini-batch SGD step per update on the
      judged positions (module docstring). Its weights start at ``[0, 1, 0, 0]``, i.e. exactly the
      confidence model, so it is sensible before any data. Written in numpy rather than with
      river's ``linear_model.LogisticRegression`` so its state is a JSON-safe array and an update is
      one vectorised step instead of a Python loop over tokens.

    The running product per sequence lives in ``_survival`` and is restarted at position 0.
    """

    required_signals = frozenset({"draft_probs"})

    def __init__(
        self,
        threshold: float = 0.3,
        min_k: int = 2,
        max_k: int = 20,
        acceptance_model: str = "confidence",
        learning_rate: float = 0.5,
        l2: float = 1e-4,
    ) -> None:
        super().__init__()
        _check_prob("threshold", threshold)
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
        self._weights = np.array([0.0, 1.0, 0.0, 0.0])
        self._survival: dict[int, float] = {}
        self._last_cap = 0

    @property
    def base_k(self) -> int:  # the round cap used by _CappedLength
        return self.max_k

    @property
    def stop_rule(self) -> StopRule:
        return _RiskStop(self)

    def _p_accept(self, probs: np.ndarray, entropies: Any, position: int) -> np.ndarray:
        if self.acceptance_model == "confidence":
            return probs
        ent = None if entropies is None else np.asarray(entropies, dtype=np.float64)
        x = _features(probs, ent, np.full(probs.shape, float(position)))
        return _sigmoid(x @ self._weights)

    def _update(self, feedback: Feedback) -> None:
        if self.acceptance_model != "logistic" or feedback.draft_probs is None or not len(feedback.seq_ids):
            return
        mask, accepted = judged_positions(feedback)
        width = min(mask.shape[1], feedback.draft_probs.shape[1])
        mask, accepted = mask[:, :width], accepted[:, :width]
        if not mask.any():
            return
        probs = feedback.draft_probs[:, :width][mask]
        ent = feedback.draft_entropies
        ent = None if ent is None or ent.shape[1] < width else ent[:, :width][mask]
        pos = np.broadcast_to(np.arange(width, dtype=np.float64)[None, :], mask.shape)[mask]
        x = _features(probs, ent, pos)
        y = accepted[mask].astype(np.float64)
        grad = x.T @ (_sigmoid(x @ self._weights) - y) / len(y) + self.l2 * self._weights
        self._weights = self._weights - self.learning_rate * grad

    def _end_sequence(self, seq_id: int) -> None:
        self._survival.pop(seq_id, None)
