"""Analytic batch model of Su, Giannoula and Pekhimenko (arXiv 2310.18813), two forms.

Per-token latency of a round that drafts ``s`` tokens for every sequence of a batch of ``b``::

    τ(b, s) = (s · t_draft(b) + t_target(b, s + 1)) / l(s),      s*(b) = argmin_s τ(b, s)

``t_target(b, n)`` is flat while ``b·n`` is below the hardware knee and grows after it, so ``s*``
shrinks as the batch grows (possibly to 0). The numerator is exactly a latency model's
:meth:`~adaptk.estimators.latency.LatencyModel.predict_uniform`; ``l(s)`` is the expected number of
tokens a round emits.

* ``analytic-table`` (:class:`AnalyticTable`, the faithful form): a batch-size → length table built
  from a latency profile and ``l(s)`` measured in a profiling phase on the real drafter (the first
  steps, optionally repeated); one length for the whole batch.
* ``analytic`` (:class:`Analytic`, continuous form): the same model with ``l(s)`` and ``t(b, n)``
  learned online from feedback, so it needs no profiling phase.

This module also holds the small machinery the other cost-model controllers share
(:mod:`adaptk.controllers.goodput`, :mod:`~adaptk.controllers.budget`, :mod:`~adaptk.controllers.cap`):
resolving a ``latency`` parameter, learning costs online when there is none, caching cost vectors
per (batch size, context bucket), and light acceptance estimators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaptk.core import SpeculationController
from adaptk.estimators.latency import ONLINE, LatencyModel, OnlineLatency, get_latency_model, is_online
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["Analytic", "AnalyticTable", "LatencySpec"]

#: A ``latency`` parameter: bundled profile / preset name, JSON path, a model instance, or ``None``.
LatencySpec = str | Path | LatencyModel | None

#: Context buckets per doubling of the context length (cost vectors are cached per bucket).
_CTX_BUCKETS_PER_OCTAVE = 4


def _check_prob(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_latency(latency: Any) -> None:
    if latency is not None and not isinstance(latency, (str, Path, dict, LatencyModel)):
        raise ValueError(
            f"latency must be a profile/preset name, a JSON path, a spec dict, a LatencyModel or None, got {type(latency).__name__}"
        )


def expected_emitted_vector(rate: float, k: int) -> np.ndarray:
    """``E[emitted | s] = (1 − α^{s+1}) / (1 − α)`` for ``s = 0..k`` (``s + 1`` at ``α = 1``)."""
    ks = np.arange(k + 1, dtype=np.float64)
    if rate >= 1.0:
        return ks + 1.0
    return (1.0 - rate ** (ks + 1.0)) / (1.0 - rate)


class _GlobalAcceptance:
    """One global EWMA acceptance rate, updated once per step from the pooled batch.

    ``mode="ratio"``: evidence ``Σ accepted / Σ drafted`` (SmartSpec's estimator, biased low for
    long drafts). ``mode="per_token"``: successes over Bernoulli trials (a round of ``d`` drafted,
    ``a`` accepted is ``a`` successes plus one failure if ``a < d``), the unbiased truncated-geometric
    estimate of :class:`adaptk.estimators.AcceptanceEWMA`. Global only, so a step costs two sums.
    """

    def __init__(self, weight_new: float, initial: float, mode: str) -> None:
        self.weight_new = float(weight_new)
        self.mode = mode
        self.num = float(initial)
        self.den = 1.0

    def rate(self) -> float:
        return min(max(self.num / self.den, 0.0), 1.0)

    def observe(self, drafted: np.ndarray, accepted: np.ndarray) -> bool:
        """Learn from one step; return whether anything was drafted."""
        total = int(drafted.sum())
        if total == 0:
            return False
        acc = int(accepted.sum())
        w = self.weight_new
        if self.mode == "ratio":
            num, den = acc / total, 1.0
        else:
            mask = drafted > 0
            rounds = int(mask.sum())
            num = acc / rounds
            den = (acc + int(np.count_nonzero(accepted[mask] < drafted[mask]))) / rounds
        self.num += w * (num - self.num)
        self.den += w * (den - self.den)
        return True

    def state_dict(self) -> dict:
        return {"num": self.num, "den": self.den}

    def load_state_dict(self, state: dict) -> None:
        self.num, self.den = float(state["num"]), float(state["den"])


class _PositionCounts:
    """Per-position acceptance counts, as :class:`adaptk.estimators.PositionAcceptance` estimates them.

    A round that drafted ``d`` and accepted ``a`` *tried* positions ``0..min(a, d−1)`` and accepted
    ``0..a−1``; the conditional rate ``c_j = accepted_j / tried_j`` (a position never tried takes the
    rate before it, ``initial`` at position 0), ``r_j = Π_{i≤j} c_i`` and
    ``E[emitted | k] = 1 + Σ_{j<k} r_j``. Unlike the shared estimator it grows with ``k_max`` (the
    engine's cap may change between steps) and keeps histograms of how far rounds reached, so a
    step costs two ``bincount`` calls; ``decay`` multiplies the counts before each step
    (1 = vLLM's cumulative counts).
    """

    def __init__(self, decay: float = 1.0, initial: float = 0.7, size: int = 8) -> None:
        self.decay = float(decay)
        self.initial = float(initial)
        self.reached = np.zeros(size + 1)   # rounds whose tried positions were 0..r-1
        self.accepted = np.zeros(size + 1)  # rounds that accepted a drafts

    def observe(self, drafted: np.ndarray, accepted: np.ndarray) -> bool:
        if not drafted.size:
            return False
        width = int(drafted.max())
        if width == 0:
            return False
        if width >= self.reached.size:
            grow = max(width + 1, 2 * self.reached.size) - self.reached.size
            self.reached = np.concatenate([self.reached, np.zeros(grow)])
            self.accepted = np.concatenate([self.accepted, np.zeros(grow)])
        size = self.reached.size
        if self.decay != 1.0:
            self.reached *= self.decay
            self.accepted *= self.decay
        self.reached += np.bincount(np.minimum(accepted + 1, drafted), minlength=size)
        self.accepted += np.bincount(accepted, minlength=size)
        return True

    def curve(self, k: int) -> np.ndarray:
        """Conditional rates ``c_j`` for ``j < k``."""
        tried = self.reached[::-1].cumsum()[::-1][1 : k + 1]
        acc = self.accepted[::-1].cumsum()[::-1][1 : k + 1]
        c = np.full(k, self.initial)
        n = tried.size
        if n:
            valid = tried > 1e-9
            idx = np.maximum.accumulate(np.where(valid, np.arange(n), -1))
            rates = acc / np.where(valid, tried, 1.0)
            c[:n] = np.where(idx >= 0, rates[np.maximum(idx, 0)], self.initial)
            if n < k:
                c[n:] = c[n - 1]
        return c

    def expected_emitted(self, k: int) -> np.ndarray:
        """``E[emitted | s]`` for ``s = 0..k``."""
        out = np.ones(k + 1)
        out[1:] += np.cumsum(np.cumprod(self.curve(k)))
        return out

    def state_dict(self) -> dict:
        return {"reached": self.reached.tolist(), "accepted": self.accepted.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.reached = np.asarray(state["reached"], dtype=np.float64)
        self.accepted = np.asarray(state["accepted"], dtype=np.float64)


class _CostAware(SpeculationController):
    """Shared plumbing for controllers that price a step with a latency (cost) model.

    * ``latency`` given (name / path / model): resolved with
      :func:`~adaptk.estimators.latency.get_latency_model` on first use (the profile's default
      drafter applies) and treated as static: not saved in the state, rebuilt on load.
    * ``latency=None``: an :class:`~adaptk.estimators.latency.OnlineLatency` learns step costs from
      the ``Feedback`` timings, at the batch size and the (bucketed) context of the decided step.
      To stay within a few µs per step it learns from every step for the first ``64`` steps, then
      from every 16th; steps whose feedback carries no timing (both times 0) are skipped.

    Cost vectors ``t(B, k)``, ``k = 0..k_max``, are cached per (batch size, context bucket), with
    ``4`` buckets per doubling of the context; the representative context is the longest one
    (``ragged="padded"`` models) or the mean (``"packed"``). Caches are pure functions of the
    saved state (cleared whenever the online model learns), so a restored controller decides
    exactly as the original.
    """

    #: Attributes that are derived caches or the static latency model: never saved.
    _TRANSIENT = ("_model", "_cost_cache", "_scratch")
    _OBSERVE_ALL_FIRST = 64
    _OBSERVE_EVERY = 16
    #: Acceptance-derived vectors are refreshed every this many steps that drafted.
    _REFRESH_EVERY = 4

    def __init__(self, latency: LatencySpec = None) -> None:
        super().__init__()
        _check_latency(latency)
        self._model: LatencyModel | None = None
        self._online: OnlineLatency | None = (
            get_latency_model(ONLINE if latency is None else latency) if is_online(latency) else None)
        self._observed_steps = 0
        self._last_ctx = 0.0
        self._cost_cache: dict[tuple[int, int], np.ndarray] = {}
        self._scratch: dict[Any, Any] = {}

    # -- state -------------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._clear_caches()

    def _clear_caches(self) -> None:
        self._cost_cache.clear()
        self._scratch.clear()

    # -- the cost model ----------------------------------------------------------------------
    def latency_model(self) -> LatencyModel:
        """The latency model in use (resolving a named profile on first call)."""
        if self._online is not None:
            return self._online
        if self._model is None:
            latency = self.latency  # type: ignore[attr-defined]
            self._model = latency if isinstance(latency, LatencyModel) else get_latency_model(latency)
        return self._model

    def _ctx_bucket(self, context_lens: np.ndarray) -> tuple[int, float]:
        """(bucket index, representative context) for the batch's context lengths."""
        if not context_lens.size:
            return 0, 0.0
        padded = self._scratch.get("padded")
        if padded is None:
            padded = self._scratch["padded"] = getattr(self.latency_model(), "ragged", "padded") == "padded"
        if padded:
            rep = float(context_lens.max())
        else:
            rep = float(context_lens.sum()) / context_lens.size
        index = int(round(_CTX_BUCKETS_PER_OCTAVE * math.log2(rep + 1.0)))
        self._last_ctx = rep
        return index, 2.0 ** (index / _CTX_BUCKETS_PER_OCTAVE) - 1.0

    def _uniform_costs(self, batch: int, bucket: int, ctx: float, k: int) -> np.ndarray:
        """Step seconds if every sequence drafts ``s``, for ``s = 0..k`` (cached)."""
        key = (batch, bucket)
        costs = self._cost_cache.get(key)
        if costs is None or costs.size <= k:
            size = max(k, 8) + 1
            costs = np.asarray(self.latency_model().predict_uniform(batch, np.arange(size), ctx), dtype=np.float64)
            self._cost_cache[key] = costs
        return costs[: k + 1]

    def _learn_costs(self, feedback: Feedback) -> None:
        """Feed the online cost model (no-op with a static profile)."""
        online = self._online
        if online is None:
            return
        batch = len(feedback.seq_ids)
        if not batch or (feedback.draft_time_s == 0 and feedback.verify_time_s == 0):
            return
        n = self._observed_steps
        self._observed_steps = n + 1
        if n >= self._OBSERVE_ALL_FIRST and n % self._OBSERVE_EVERY != self._OBSERVE_EVERY - 1:
            return
        online.observe(batch, feedback.num_draft_tokens, self._last_ctx, float(feedback.draft_time_s),
                       float(feedback.verify_time_s), feedback.exit_layer)
        self._clear_caches()


def _log_bucket(values: Sequence[int], batch: int) -> int:
    """Index of the value nearest ``batch`` in log space."""
    logs = np.log2(np.asarray(values, dtype=np.float64))
    return int(np.argmin(np.abs(logs - math.log2(batch))))


@register("analytic-table")
class AnalyticTable(_CostAware):
    """Su et al.'s batch-size → speculation-length table (the faithful, profiled form).

    For each batch-size bucket ``b`` the table holds ``s*(b) = argmin_s τ(b, s)`` with
    ``τ(b, s) = t(b, s) / l(s)``, where ``t(b, s)`` is the latency model's step time when all ``b``
    sequences draft ``s`` tokens (``s`` drafter forwards + a target pass over ``s + 1`` tokens) at
    context ``context_len``, and ``l(s)`` the expected tokens a round emits. A batch of ``B`` uses
    the bucket nearest ``B`` in log space; the whole batch drafts that length.

    ``l(s)`` comes from a profiling phase on the real drafter, as in the paper ([summary]: a brief
    profiling before deployment, ``l(s)`` measured empirically):

    * ``profile_acceptance=None`` (default): the first steps are the profiling phase, until
      ``profile_rounds`` (32) sequence-rounds have drafted — ``ceil(32 / B)`` steps at batch ``B``
      (statistical precision depends on rounds, not steps, and a long phase at a large batch
      would spend a good part of a run drafting ``k_max``). Every sequence drafts ``k_max``; the
      feedback's accepted counts give per-position acceptance ``r_j`` (the fraction of rounds in
      which position ``j`` was accepted, counted where it was reached, as
      :class:`adaptk.estimators.PositionAcceptance`). Then ``l(s) = 1 + Σ_{j<s} r_j`` is frozen
      and the table built from it. A drafter whose first token is rarely accepted measures
      ``l(s) ≈ 1``, and the table says ``s* = 0`` wherever a drafted token costs anything. The
      phase has a price: those steps draft ``k_max`` whatever it costs (with an expensive
      drafter, a few percent of a short run).
    * ``reprofile_every=N`` (default 0: never, as the paper): after ``N`` steps with the table, a
      new profiling phase measures acceptance afresh (from zero counts) and replaces ``l(s)`` —
      for text whose predictability drifts. The previous table stays available through
      :meth:`table` meanwhile.
    * ``profile_acceptance=α``: no profiling phase, i.i.d. acceptance ``α`` assumed,
      ``l(s) = (1 − α^{s+1}) / (1 − α)`` — for an ``α`` measured elsewhere.

    Costs: ``latency`` names the profile (the bench passes the cell's cost profile); with
    ``latency=None`` they come from an online model learned from the feedback timings (see
    :class:`_CostAware`), and the table follows that model as it learns.

    >>> from adaptk import StepContext, Feedback
    >>> c = AnalyticTable(latency="h100-llama3-8b", profile_rounds=4)
    >>> ctx = StepContext(step=0, seq_ids=[0, 1], context_lens=[512, 512], k_max=8)
    >>> c.decide(ctx).num_draft_tokens.tolist()   # profiling: draft k_max
    [8, 8]
    >>> for step in range(2):                     # 2 steps x 2 rounds; the first token is never accepted
    ...     c.update(Feedback(seq_ids=[0, 1], num_draft_tokens=[8, 8], num_accepted_tokens=[0, 0]))
    >>> c.decide(ctx).num_draft_tokens.tolist()   # l(s) = 1: speculation cannot pay
    [0, 0]
    >>> fixed = AnalyticTable(latency="h100-llama3-8b", profile_acceptance=0.7)
    >>> [row for row in fixed.table(k_max=8) if row[0] in (1, 79, 111, 444)]   # [lo, hi, s*]: falls with the batch
    [[1, 1, 3], [79, 110, 2], [111, 156, 1], [444, 627, 0]]
    """

    DEFAULT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

    def __init__(
        self,
        latency: LatencySpec = None,
        profile_acceptance: float | None = None,
        profile_rounds: int = 32,
        reprofile_every: int = 0,
        batch_buckets: Sequence[int] = DEFAULT_BUCKETS,
        context_len: int = 512,
    ) -> None:
        super().__init__(latency)
        if profile_acceptance is not None:
            _check_prob(profile_acceptance, "profile_acceptance")
        _check_int(profile_rounds, "profile_rounds", 1)
        _check_int(reprofile_every, "reprofile_every", 0)
        _check_int(context_len, "context_len", 0)
        buckets = list(batch_buckets)
        if not buckets or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in buckets) \
                or sorted(set(buckets)) != buckets:
            raise ValueError(f"batch_buckets must be increasing positive ints, got {batch_buckets!r}")
        self.latency = latency
        self.profile_acceptance = profile_acceptance
        self.profile_rounds = profile_rounds
        self.reprofile_every = reprofile_every
        self.batch_buckets = batch_buckets
        self.context_len = context_len
        self._positions = _PositionCounts() if profile_acceptance is None else None
        self._profiling = profile_acceptance is None
        self._profiled_rounds = 0
        self._deployed_steps = 0
        self._l: np.ndarray | None = None  # l(s), s = 0..len-1, from the last profiling phase

    @property
    def profiling(self) -> bool:
        """Whether the controller is in a profiling phase (every sequence drafts ``k_max``)."""
        return self._profiling

    def _emitted(self, k: int) -> np.ndarray:
        if self.profile_acceptance is not None:
            return expected_emitted_vector(float(self.profile_acceptance), k)
        if self._l is None:
            raise ValueError("the table is built after the profiling phase: "
                             f"{self._profiled_rounds} of {self.profile_rounds} rounds profiled so far")
        if self._l.size <= k:  # k_max grew after profiling: positions never measured add nothing
            return np.concatenate([self._l, np.full(k + 1 - self._l.size, self._l[-1])])
        return self._l[: k + 1]

    def bucket_length(self, batch_size: int, k_max: int) -> int:
        """``s*`` for the bucket that ``batch_size`` falls in (the table entry)."""
        key = ("s", batch_size, k_max)
        s = self._scratch.get(key)
        if s is None:
            b = int(self.batch_buckets[_log_bucket(self.batch_buckets, batch_size)])
            ctx = float(self.context_len)
            bucket = int(round(_CTX_BUCKETS_PER_OCTAVE * math.log2(ctx + 1.0)))
            tau = self._uniform_costs(b, bucket, ctx, k_max) / self._emitted(k_max)
            s = int(np.argmin(tau))
            self._scratch[key] = s
        return s

    def table(self, k_max: int = 8) -> list[list[int]]:
        """The deployed table, ``[[lo, hi, s], ...]`` (inclusive batch-size ranges), vLLM style.

        Raises ``ValueError`` before the first profiling phase has ended.
        """
        buckets = [int(b) for b in self.batch_buckets]
        bounds = [1] + [int(math.floor(math.sqrt(a * b))) + 1 for a, b in zip(buckets, buckets[1:], strict=False)]
        his = [lo - 1 for lo in bounds[1:]] + [max(buckets[-1], bounds[-1])]
        return [[lo, hi, self.bucket_length(b, k_max)] for lo, hi, b in zip(bounds, his, buckets, strict=False)]

    def _decide(self, context: StepContext) -> Decision:
        batch, k_max = len(context.seq_ids), int(context.k_max)
        if batch and self._online is not None:
            self._ctx_bucket(context.context_lens)  # remembered for online cost learning
        if not batch or k_max == 0:
            return Decision(np.zeros(batch, dtype=np.int64))
        if self._profiling:
            return Decision(np.full(batch, k_max, dtype=np.int64))
        return Decision(np.full(batch, self.bucket_length(batch, k_max), dtype=np.int64))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
        positions = self._positions
        if positions is None:
            return
        if self._profiling:
            if positions.observe(feedback.num_draft_tokens, feedback.num_accepted_tokens):
                self._profiled_rounds += int(np.count_nonzero(feedback.num_draft_tokens))
                if self._profiled_rounds >= self.profile_rounds:
                    self._l = positions.expected_emitted(positions.reached.size - 1)
                    self._profiling = False
                    self._deployed_steps = 0
                    self._scratch.clear()
        elif self.reprofile_every:
            self._deployed_steps += 1
            if self._deployed_steps >= self.reprofile_every:
                # a fresh profiling phase from zero counts; the old l(s) serves table() meanwhile
                self._positions = _PositionCounts()
                self._profiling = True
                self._profiled_rounds = 0


@register("analytic")
class Analytic(_CostAware):
    """Su et al.'s model in continuous form: ``l(s)`` and ``t(b, n)`` learned online, no profiling.

    Every step: ``s* = argmin_s t(B, s, contexts) / l(s)`` over ``s = 0..k_max`` for the current batch
    size ``B`` and (bucketed) contexts, one length for the whole batch. Costs come from an
    :class:`~adaptk.estimators.latency.OnlineLatency` fed with each step's measured draft and verify
    times (see :class:`_CostAware`); acceptance from

    * ``acceptance="position"`` (default): per-position acceptance counts (``l(s) = 1 + Σ_{j<s} r_j``,
      the estimator of :class:`adaptk.estimators.PositionAcceptance`), forgotten by ``decay`` per
      step so it follows the text;
    * ``acceptance="ewma"``: one global i.i.d. rate ``α`` (per-token EWMA with weight ``1 − decay``),
      ``l(s) = (1 − α^{s+1}) / (1 − α)``.

    Both start from ``initial_acceptance``; ``l(s)`` is refreshed every 4 steps that drafted. When ``s* = 0`` nothing is drafted and the acceptance
    estimate holds still; the cost side still tracks the batch size, which is what moves ``s*``.
    """

    def __init__(self, acceptance: str = "position", decay: float = 0.99, initial_acceptance: float = 0.7,
                 probe_every: int = 16) -> None:
        super().__init__(None)
        _check_int(probe_every, "probe_every", 0)
        self.probe_every = probe_every
        if acceptance not in ("position", "ewma"):
            raise ValueError(f"acceptance must be 'position' or 'ewma', got {acceptance!r}")
        if not 0.0 < decay < 1.0 or isinstance(decay, bool):
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        _check_prob(initial_acceptance, "initial_acceptance")
        self.acceptance = acceptance
        self.decay = decay
        self.initial_acceptance = initial_acceptance
        if acceptance == "position":
            self._acc: Any = _PositionCounts(decay=decay, initial=initial_acceptance)
        else:
            self._acc = _GlobalAcceptance(1.0 - decay, initial_acceptance, "per_token")
        self._acc_steps = 0
        self._l_cur: np.ndarray | None = None

    def _emitted(self, k: int) -> np.ndarray:
        """``l(s)`` for ``s = 0..k`` as of the last refresh (part of the state)."""
        current = self._l_cur
        if current is None or current.size <= k:
            current = self._fresh_emitted(max(k, 8))
            self._l_cur = current
        return current[: k + 1]

    def _fresh_emitted(self, k: int) -> np.ndarray:
        if self.acceptance == "position":
            return self._acc.expected_emitted(k)
        return expected_emitted_vector(self._acc.rate(), k)

    def _decide(self, context: StepContext) -> Decision:
        batch, k_max = len(context.seq_ids), int(context.k_max)
        if not batch:
            return Decision(np.zeros(0, dtype=np.int64))
        bucket, ctx = self._ctx_bucket(context.context_lens)
        if k_max == 0:
            return Decision(np.zeros(batch, dtype=np.int64))
        key = (batch, bucket, k_max)
        s = self._scratch.get(key)
        if s is None:
            s = int(np.argmin(self._uniform_costs(batch, bucket, ctx, k_max) / self._emitted(k_max)))
            self._scratch[key] = s
        if self.probe_every and self._observed_steps % self.probe_every == self.probe_every - 1 and s < k_max:
            s += 1  # probe: measure the cost one token beyond the current choice (this step is observed)
        return Decision(np.full(batch, s, dtype=np.int64))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
        if self._acc.observe(feedback.num_draft_tokens, feedback.num_accepted_tokens):
            self._acc_steps += 1
            if self._acc_steps % self._REFRESH_EVERY == 1 or self._REFRESH_EVERY == 1:
                # acceptance moved: refresh l(s); decisions are recomputed, cost vectors stay cached
                size = self._l_cur.size - 1 if self._l_cur is not None else max(self._k_max or 8, 8)
                self._l_cur = self._fresh_emitted(size)
                self._scratch.clear()
