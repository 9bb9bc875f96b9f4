"""Goodput controllers: SmartSpec (Liu et al., arXiv 2406.14066) and vLLM's dynamic speculation.

All three maximise predicted token goodput, expected emitted tokens per second of step time, with
a latency (cost) model and an acceptance estimate:

* ``smartspec`` (:class:`SmartSpec`) — as in the authors' vLLM fork (``spec_decode/dsd.py``): one
  global EWMA acceptance rate, a regression cost model, a batch-uniform length re-chosen every 20
  steps by scanning ``k`` upwards until goodput drops, with a 10% bonus for not speculating.
* ``smartspec-per-request`` (:class:`SmartSpecPerRequest`) — [reconstruction] of the paper's
  per-request lengths: a greedy allocation of draft tokens by per-request acceptance.
* ``dsd`` (:class:`DynamicSD`) — vLLM's dynamic speculative decoding: per-position acceptance from
  cumulative counts and ``K(B) = argmax_k (1 + Σ_{j<k} r_j) / ITL(B, k)``, ITL interpolated
  linearly in the batch size.

The cost model is the ``latency`` parameter (a bundled profile / preset name, a JSON path or a
:class:`~adaptk.estimators.latency.LatencyModel`), which the bench fills with the cell's cost
profile; with ``latency=None`` costs are learned online from the feedback timings (see
:class:`adaptk.controllers.analytic._CostAware`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from adaptk.controllers.analytic import (
    LatencySpec,
    _check_int,
    _check_prob,
    _CostAware,
    _GlobalAcceptance,
    _PositionCounts,
    expected_emitted_vector,
)
from adaptk.estimators.acceptance import AcceptanceEWMA
from adaptk.estimators.latency import LatencyModel, RegressionLatency, get_latency_model
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["SmartSpec", "SmartSpecPerRequest", "DynamicSD", "smartspec_select"]

#: The grid SmartSpec's regression is "profiled" on when ``latency`` names a profile.
PROFILE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROFILE_KS = (0, 1, 2, 3, 4, 5, 6, 7, 8)
PROFILE_CONTEXT_LENS = (128, 512, 2048)


def smartspec_select(goodput: np.ndarray, bonus: float = 1.1) -> int:
    """SmartSpec's scan: ``g(0)·bonus``, then ``k = 1, 2, …`` while goodput keeps rising.

    Returns the last ``k`` before the first ``k`` whose goodput is not higher than the one before
    it (goodput is assumed unimodal, so the scan stops at the first drop).

    >>> smartspec_select(np.array([1.0, 1.05, 1.2]))          # 1.05 < 1.1: stays at 0
    0
    >>> smartspec_select(np.array([1.0, 1.2, 1.1, 1.5]))      # stops at the first drop
    1
    """
    best_k, best = 0, float(goodput[0]) * bonus
    for k in range(1, len(goodput)):
        value = float(goodput[k])
        if not value > best:
            break
        best_k, best = k, value
    return best_k


class _Goodput(_CostAware):
    """SmartSpec's parameters and cost side: the profile is refitted with SmartSpec's regression
    (``regression``)."""

    def __init__(self, latency: LatencySpec, initial_acceptance: float, weight_new: float,
                 redecide_every: int, bonus: float, regression: bool) -> None:
        super().__init__(latency)
        _check_common(initial_acceptance, weight_new, redecide_every, bonus)
        self.latency = latency
        self.initial_acceptance = initial_acceptance
        self.weight_new = weight_new
        self.redecide_every = redecide_every
        self.bonus = bonus
        self.regression = regression

    def latency_model(self) -> LatencyModel:
        if self._online is not None:
            return self._online
        if self._model is None:
            latency = self.latency
            base = latency if isinstance(latency, LatencyModel) else get_latency_model(latency)
            if self.regression:
                base = RegressionLatency.from_model(base, batch_sizes=PROFILE_BATCH_SIZES, ks=PROFILE_KS,
                                                    context_lens=PROFILE_CONTEXT_LENS, seed=0)
            self._model = base
        return self._model


def _check_common(initial_acceptance: Any, weight_new: Any, redecide_every: Any, bonus: Any) -> None:
    _check_prob(initial_acceptance, "initial_acceptance")
    if isinstance(weight_new, bool) or not isinstance(weight_new, (int, float)) or not 0.0 < weight_new <= 1.0:
        raise ValueError(f"weight_new must lie in (0, 1], got {weight_new!r}")
    _check_int(redecide_every, "redecide_every", 1)
    if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not bonus > 0:
        raise ValueError(f"bonus must be a positive number, got {bonus!r}")


@register("smartspec")
class SmartSpec(_Goodput):
    """SmartSpec's batch-uniform goodput rule [code, authors' vLLM fork ``spec_decode/dsd.py``].

    * Acceptance: one global ``α ← (1 − w)·α + w·α_obs`` (``w = weight_new`` = 0.15, start 0.7),
      ``α_obs`` = accepted / drafted over the step's batch; steps that draft nothing leave it.
    * Costs: with ``regression=True`` (the authors' setup) the ``latency`` profile is "profiled" on a
      grid (batch sizes 1…256, ``k`` 0…8, contexts 128/512/2048) and SmartSpec's regression
      (:class:`~adaptk.estimators.latency.RegressionLatency`, features ``[B, B·(k+1), Σ context]``,
      linear or degree 2 by held-out R²) is fitted to it on first use; ``regression=False`` prices
      steps with the profile itself. ``latency=None``: learned online from the feedback timings.
    * Every ``redecide_every`` (20) steps: ``g(k) = B·E[emitted | k] / T(B, k)`` for the current batch
      size and contexts, ``g(0)·bonus`` (1.1: speculation must win by 10%), ``k`` scanned upwards
      from 0 and the scan stops at the first drop (:func:`smartspec_select`). All requests use that
      ``k`` (clipped to the step's ``k_max``) until the next re-decision.

    The authors' prompt-lookup path (propose 8 tokens if ``B ≤ 32``) is not reproduced; with a
    prompt-lookup drafter the same goodput rule applies, the engine drafting what the lookup offers.
    """

    def __init__(
        self,
        latency: LatencySpec = None,
        initial_acceptance: float = 0.7,
        weight_new: float = 0.15,
        redecide_every: int = 20,
        bonus: float = 1.1,
        regression: bool = True,
    ) -> None:
        super().__init__(latency, initial_acceptance, weight_new, redecide_every, bonus, regression)
        self._alpha = _GlobalAcceptance(weight_new, initial_acceptance, "ratio")
        self._k: int | None = None
        self._since = 0

    @property
    def acceptance_rate(self) -> float:
        return self._alpha.rate()

    def goodput(self, batch_size: int, context_lens: Any, k_max: int) -> np.ndarray:
        """Predicted ``g(k) = B·E[emitted | k] / T(B, k)`` for ``k = 0..k_max`` (no bonus)."""
        bucket, ctx = self._ctx_bucket(np.asarray(context_lens))
        costs = self._uniform_costs(batch_size, bucket, ctx, k_max)
        return batch_size * expected_emitted_vector(self._alpha.rate(), k_max) / costs

    def _decide(self, context: StepContext) -> Decision:
        batch, k_max = len(context.seq_ids), int(context.k_max)
        if not batch:
            return Decision(np.zeros(0, dtype=np.int64))
        if self._k is None or self._since >= self.redecide_every:
            self._k = smartspec_select(self.goodput(batch, context.context_lens, k_max), self.bonus) if k_max else 0
            self._since = 0
        else:
            self._ctx_bucket(context.context_lens)  # remembered for online cost learning
        self._since += 1
        return Decision(np.full(batch, min(self._k, k_max), dtype=np.int64))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
        self._alpha.observe(feedback.num_draft_tokens, feedback.num_accepted_tokens)


@register("smartspec-per-request")
class SmartSpecPerRequest(_Goodput):
    """Per-request lengths by greedy goodput allocation [reconstruction of SmartSpec's per-request mode].

    Each request ``i`` keeps its own EWMA acceptance ``α_i`` (weight ``weight_new``, started from the
    global rate; :class:`~adaptk.estimators.AcceptanceEWMA`, ratio mode as SmartSpec). Every
    ``redecide_every`` steps draft tokens are handed out greedily: start with every ``k_i = 0`` and
    repeatedly give one more token to the request whose next token has the largest expected gain
    ``α_i^{k_i+1}``, keeping the point where the predicted goodput ``Σ_i E[emitted_i | k_i] / T(k⃗)``
    is highest (plain decoding's goodput counts ``bonus`` times, as in SmartSpec).

    Deviation from "stop when goodput stops rising": step costs are not convex in the tokens given —
    a drafter forward is paid once by every row that drafts that far — so the first-drop rule almost
    never leaves ``k = 0``, and an unrestricted greedy path spends forwards on one confident
    request. So the greedy path is priced (one vectorised call) for each longest draft
    ``L = 1..k_max`` (requests capped at ``L``, ``L`` forwards paid) and the best point over all ``L``
    and the plain step is kept. ``T(k⃗)`` is priced as the latency model prices a ragged batch
    (``padded``: the longest draft sets the verify width, so the rule becomes batch-uniform;
    ``packed``: the total token count); the drafting rows are taken as all rows (exact for padded,
    slightly high for packed).

    The allocation is kept per request until the next re-decision; a request that joins in between
    gets, once, the tokens whose gain clears the last one given (threshold ``θ``), capped at ``L``:
    ``k_i = #{1 ≤ j ≤ L : α_i^j ≥ θ}``. With one shared ``α`` this is the batch-uniform rule.
    """

    def __init__(
        self,
        latency: LatencySpec = None,
        initial_acceptance: float = 0.7,
        weight_new: float = 0.15,
        redecide_every: int = 20,
        bonus: float = 1.1,
        regression: bool = True,
    ) -> None:
        super().__init__(latency, initial_acceptance, weight_new, redecide_every, bonus, regression)
        self._alpha = AcceptanceEWMA(weight_new=weight_new, initial=initial_acceptance, mode="ratio")
        self._alloc: dict[int, int] = {}
        self._theta = math.inf
        self._level = 0
        self._since: int | None = None

    def allocate(self, rates: np.ndarray, batch_size: int, context_lens: Any, k_max: int) -> tuple[np.ndarray, float, int]:
        """Greedy allocation for per-request rates: ``(k_i per request, threshold θ, longest draft)``."""
        rates = np.clip(np.asarray(rates, dtype=np.float64), 0.0, 1.0)
        batch = int(batch_size)
        bucket, ctx = self._ctx_bucket(np.asarray(context_lens))
        k = np.zeros(batch, dtype=np.int64)
        if k_max == 0 or batch == 0:
            return k, math.inf, 0
        model = self.latency_model()
        ctx_sum = ctx * batch
        padded = model.ragged == "padded"
        draft = model._draft(batch, np.arange(k_max + 1, dtype=np.float64), ctx_sum, None)
        plain = float(model._verify(batch, np.ones(1), np.full(1, float(batch)), ctx_sum, ctx)[0])
        best = (batch / plain * self.bonus, None, math.inf, 0)
        gains = rates[:, None] ** np.arange(1, k_max + 1)[None, :]          # gain of token j+1 of request i
        # one stable sort; the greedy path capped at L is the full path restricted to positions <= L
        order = np.argsort(-gains.ravel(), kind="stable")
        ordered = gains.ravel()[order]
        position = order % k_max + 1
        paths, emitted, tokens, levels = [], [], [], []
        for level in range(1, k_max + 1):
            keep = np.flatnonzero(position <= level)
            paths.append(keep)
            emitted.append(batch + np.cumsum(ordered[keep]))
            tokens.append(batch + np.arange(1, keep.size + 1, dtype=np.float64))
            levels.append(np.full(keep.size, level))
        emitted_all, tokens_all, level_all = np.concatenate(emitted), np.concatenate(tokens), np.concatenate(levels)
        if padded:
            n = np.arange(2.0, k_max + 2.0)
            verify = model._verify(batch, n, n * batch, ctx_sum, ctx)[level_all - 1]
        else:
            verify = model._verify(batch, tokens_all / batch, tokens_all, ctx_sum, ctx)
        goodput = emitted_all / (verify + draft[level_all])
        i = int(np.argmax(goodput))
        if goodput[i] > best[0]:
            level = int(level_all[i])
            start = sum(p.size for p in paths[: level - 1])
            keep = paths[level - 1][: i - start + 1]
            best = (float(goodput[i]), order[keep], float(ordered[keep[-1]]), level)
        _, given, theta, level = best
        if given is not None:
            np.add.at(k, given // k_max, 1)
        return k, theta, level

    def _threshold_k(self, rates: np.ndarray, k_max: int) -> np.ndarray:
        theta, level = self._theta, min(self._level, k_max)
        if not math.isfinite(theta) or level == 0:
            return np.zeros(rates.size, dtype=np.int64)
        gains = rates[:, None] ** np.arange(1, level + 1)[None, :]
        return (gains >= theta).sum(axis=1).astype(np.int64)

    def _decide(self, context: StepContext) -> Decision:
        ids = context.seq_ids
        batch, k_max = len(ids), int(context.k_max)
        if not batch:
            return Decision(np.zeros(0, dtype=np.int64))
        if self._since is None or self._since >= self.redecide_every:
            k, self._theta, self._level = self.allocate(self._alpha.rates(ids), batch, context.context_lens, k_max)
            self._alloc = dict(zip(ids.tolist(), k.tolist(), strict=True))
            self._since = 0
            self._scratch["batch"] = (ids.copy(), k)
        else:
            self._ctx_bucket(context.context_lens)
            cached = self._scratch.get("batch")
            if cached is not None and cached[0].shape == ids.shape and np.array_equal(cached[0], ids):
                k = cached[1]
            else:
                get = self._alloc.get
                k = np.fromiter((get(s, -1) for s in ids.tolist()), dtype=np.int64, count=batch)
                new = np.flatnonzero(k < 0)
                if new.size:
                    # joiners get the threshold rule once, then keep it until the next re-decision
                    k[new] = self._threshold_k(self._alpha.rates(ids[new]), k_max)
                    self._alloc.update(zip(ids[new].tolist(), k[new].tolist(), strict=True))
                self._scratch["batch"] = (ids.copy(), k)
        self._since += 1
        return Decision(np.minimum(k, k_max))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
        self._alpha.observe(feedback.seq_ids, feedback.num_draft_tokens, feedback.num_accepted_tokens)

    def _end_sequence(self, seq_id: int) -> None:
        self._alloc.pop(seq_id, None)
        self._alpha.end_sequence(seq_id)
        self._scratch.pop("batch", None)


@register("dsd")
class DynamicSD(_CostAware):
    """vLLM's dynamic speculative decoding [code, ``vllm/v1/spec_decode/dynamic/``].

    * Offline: the step time ``ITL(b, k)`` on a sweep of batch sizes ``batch_sizes`` × ``k``, here
      read from the ``latency`` profile at the batch's (bucketed) context. (vLLM measures the median
      inter-token latency of the sweep; at one engine step per emitted position that is the step
      time, which is what the expected tokens per step divide.)
    * Online, after ``warmup_steps`` (10) steps drafting ``default_k``: per-position acceptance
      ``r_j`` from cumulative counts (:class:`adaptk.estimators.PositionAcceptance`'s estimator:
      ``r_j = P(positions 0..j accepted)``, well defined when ``k`` varies), and
      ``K(B) = argmax_k (1 + Σ_{j<k} r_j) / ITL(B, k)`` with ``ITL(B, ·)`` linearly interpolated
      between the two sweep batch sizes around ``B`` (extrapolated from the last two above the
      sweep). One ``K`` for the whole batch; ``r_j`` is refreshed every 4 steps that drafted
      (cumulative counts move slowly) and ``K`` recomputed then or when ``B`` or the context changes.

    ``latency=None``: the sweep is read from costs learned online from the feedback timings.
    """

    DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    _TRANSIENT = _CostAware._TRANSIENT + ("_itl_cache",)

    def __init__(
        self,
        latency: LatencySpec = None,
        warmup_steps: int = 10,
        default_k: int = 3,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    ) -> None:
        super().__init__(latency)
        _check_int(warmup_steps, "warmup_steps", 0)
        _check_int(default_k, "default_k", 0)
        grid = list(batch_sizes)
        if not grid or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in grid) \
                or sorted(set(grid)) != grid:
            raise ValueError(f"batch_sizes must be increasing positive ints, got {batch_sizes!r}")
        self.latency = latency
        self.warmup_steps = warmup_steps
        self.default_k = default_k
        self.batch_sizes = batch_sizes
        self._positions = _PositionCounts(decay=1.0)
        self._steps = 0
        self._drafted_steps = 0
        self._emitted: np.ndarray | None = None  # 1 + Σ_{j<k} r_j as of the last refresh
        self._itl_cache: dict[tuple[int, int], np.ndarray] = {}

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._itl_cache.clear()

    def itl(self, batch_size: int, bucket: int, ctx: float, k_max: int) -> np.ndarray:
        """``ITL(B, k)`` for ``k = 0..k_max``, linearly interpolated in ``B`` over the sweep."""
        key = (batch_size, bucket)
        out = self._itl_cache.get(key)
        if out is None or out.size <= k_max:
            grid = np.asarray(self.batch_sizes, dtype=np.float64)
            if grid.size == 1:
                lo = hi = 0
            else:
                hi = int(np.clip(np.searchsorted(grid, batch_size), 1, grid.size - 1))
                lo = hi - 1
            size = max(k_max, 8)
            t_lo = self._uniform_costs(int(grid[lo]), bucket, ctx, size)
            if lo == hi or batch_size <= grid[lo]:
                out = t_lo.copy()
            else:
                t_hi = self._uniform_costs(int(grid[hi]), bucket, ctx, size)
                w = (batch_size - grid[lo]) / (grid[hi] - grid[lo])
                out = t_lo + w * (t_hi - t_lo)
                out = np.maximum(out, 1e-12)
            self._itl_cache[key] = out
        return out[: k_max + 1]

    def _decide(self, context: StepContext) -> Decision:
        batch, k_max = len(context.seq_ids), int(context.k_max)
        if not batch:
            return Decision(np.zeros(0, dtype=np.int64))
        bucket, ctx = self._ctx_bucket(context.context_lens)
        if self._steps < self.warmup_steps or k_max == 0:
            return Decision(np.full(batch, min(self.default_k, k_max), dtype=np.int64))
        key = ("K", batch, bucket, k_max)
        k = self._scratch.get(key)
        if k is None:
            emitted = self._emitted
            if emitted is None or emitted.size <= k_max:
                emitted = self._emitted = self._positions.expected_emitted(max(k_max, 8))
            k = int(np.argmax(emitted[: k_max + 1] / self.itl(batch, bucket, ctx, k_max)))
            self._scratch[key] = k
        return Decision(np.full(batch, k, dtype=np.int64))

    def _update(self, feedback: Feedback) -> None:
        self._learn_costs(feedback)
        self._steps += 1
        if self._positions.observe(feedback.num_draft_tokens, feedback.num_accepted_tokens):
            self._drafted_steps += 1
            if self._drafted_steps % self._REFRESH_EVERY == 1 or self._REFRESH_EVERY == 1:
                size = self._emitted.size - 1 if self._emitted is not None else max(self._k_max or 8, 8)
                self._emitted = self._positions.expected_emitted(size)
                self._scratch.clear()  # r_j moved: K(B) must be recomputed (ITL stays cached)
