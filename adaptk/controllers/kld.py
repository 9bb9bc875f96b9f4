"""DSDE: draft length from the stability of KL(target ‖ draft) (Yang et al., arXiv 2509.01083).

Implemented from the authors' vLLM fork (``samsungsds-research-paper/DSDE``,
``vllm/spec_decode/dynamic_scheduler.py``: ``_weighted_intensity_ratio``, ``_dsl_step``,
``KLScheduler``, ``coordinate_batch_k``) as summarised in algorithms.md §4. Per-sequence state is
held in rows of small numpy arrays (a slot per live sequence, freed at sequence end) so one update
computes every sequence's WVIR at once.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from adaptk.core import SpeculationController
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["DSDE", "wvir", "dsl_step"]

#: ``exp`` overflows above ~709; ``2·D̄`` is clipped below that (the product is ``> 1`` long before).
_MAX_EXPONENT = 700.0


def _weighted_variance(values: np.ndarray, weights: np.ndarray) -> float:
    mean = (weights * values).sum() / weights.sum()
    return float((weights * (values - mean) ** 2).sum() / weights.sum())


def wvir(history: np.ndarray, decay: float = 0.9) -> float:
    """Weighted variance intensity ratio of a KL history (oldest first), scalar reference form.

    ``n = len(history)``; 0 if ``n < 2``; short window ``s = max(1, n // 3)``; weights
    ``decay**age`` with the newest value at age 0; ``var_w(last s) / var_w(all)``, or 20 when
    ``var_w(all) < 1e-6``.

    >>> wvir(np.array([0.0, 4.0, 1.0, 1.0]))   # last s = 1 value: zero short-window variance
    0.0
    >>> wvir(np.array([2.0, 2.0, 2.0]))         # flat history
    20.0
    """
    history = np.asarray(history, dtype=np.float64)
    n = len(history)
    if n < 2:
        return 0.0
    s = max(1, n // 3)
    long_var = _weighted_variance(history, decay ** np.arange(n - 1, -1, -1))
    if long_var < 1e-6:
        return 20.0
    return _weighted_variance(history[-s:], decay ** np.arange(s - 1, -1, -1)) / long_var


def dsl_step(wvir_value: float, mean_kl: float, k_min: int, k_max: int, temperature: float = 0.0) -> int:
    """DSDE's length rule: ``SF = exp(2·D̄) − 1``; ``k = max(k_min, ceil((k_max−k_min)(1−WVIR·SF)+k_min))``
    if ``WVIR·SF <= 1`` else ``k_min``. ``D̄`` is divided by the temperature when sampling.

    >>> dsl_step(0.0, 3.0, 6, 20)
    20
    >>> dsl_step(0.5, 0.2, 6, 20)   # SF = e^0.4 − 1 = 0.4918; 14·(1 − 0.2459) + 6 = 16.56
    17
    >>> dsl_step(0.3, 11.7, 1, 4)   # a poorly matched drafter: KL ≈ 12 nats, SF ≈ e^23
    1
    """
    d = mean_kl if abs(temperature) < 1e-8 else mean_kl / (temperature + 1e-8)
    product = wvir_value * math.expm1(min(2.0 * d, _MAX_EXPONENT))
    if product <= 1.0:
        return max(k_min, math.ceil((k_max - k_min) * (1.0 - product) + k_min))
    return k_min


@functools.lru_cache(maxsize=8)
def _constants(decay: float, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(arange(window), decay**age, cumsum(decay**age))`` — read-only, shared by instances."""
    cols = np.arange(window)
    pw = decay ** np.arange(window, dtype=np.float64)
    cum = np.cumsum(pw)
    for array in (cols, pw, cum):
        array.flags.writeable = False
    return cols, pw, cum


@register("dsde")
class DSDE(SpeculationController):
    """DSDE: per-sequence length from how stable the draft/target KL divergence has been.

    Per sequence ``i`` [code, DSDE fork]:

    * **History**: the KL(target ‖ draft) of every drafted position is appended to a window of the
      last ``window`` values.
    * **Warm-up** until ``warmup_tokens`` tokens were drafted for the sequence: start at
      ``initial_k`` (default ``k_min``); after a fully accepted round (``accepted >= k``)
      ``k ← min(2k, k_max)`` (``1`` from ``k = 0``), otherwise ``k`` stays (``max(k, k_min)``). The
      accepted counts and KL values of the rounds started before the threshold are kept.
    * **Bounds** when the warm-up ends: ``k_max_i = clip(round(max_acc·(1 + 0.5·mean_KL/max_KL)),
      k_min, k_max)`` and ``k_min_i = clip(ceil(0.1·k_max_i), k_min, k_max_i)`` (``max_KL = 0`` or
      no KL counts as 1; no rounds at all keeps ``[k_min, k_max]``).
    * **Length** after each later round: ``k_i = dsl_step(WVIR(history), D̄, k_min_i, k_max_i)`` with
      ``D̄`` = the round's summed KL / tokens drafted (see :func:`wvir`, :func:`dsl_step`). A round
      that drafted nothing has ``D̄ = 0``, so ``k_i = k_max_i`` (as in the fork).
    * **Anti-straggler cap** at decide time: ``SL_cap = ceil(mean of k_i over the batch's
      post-warm-up sequences)`` and ``k_i ← min(k_i, SL_cap)`` for them (``sl_cap=False`` disables).

    Finally every length is clipped to the engine's ``k_max``.

    **Defaults.** The fork's ``KLScheduler`` defaults are used for the history: the warm-up ends when
    30 KL values are held and the same 30 is the history's length (``dsl_activation_tokens=30``
    sets both there). Its engine configuration raises both to 100 and floors every length at
    ``min_spec_tokens=6``; with that floor the per-request bounds are clipped up to 6 and DSDE can
    never draft fewer than 6 tokens, however often the first drafted token is rejected. The
    default ``k_min`` here is 1, so the paper's own per-request floor ``ceil(0.1·k_max_i)`` is what
    bounds the length: when rejections come early, ``max_acc`` is small, ``k_max_i`` is small and a
    high, unstable KL sends ``k_i`` to ``k_min_i`` (usually 1). It is not 0: DSDE's only signal is
    the KL of drafted tokens, and a sequence that drafts nothing learns nothing. The warm-up never
    shrinks ``k`` (it only doubles on full acceptance), so a shorter warm-up is also a shorter
    stretch of unadapted drafting. ``DSDE(k_min=6, window=100, warmup_tokens=100)`` is the fork's
    engine configuration.

    **Without KL** (``Feedback.kl_divergences is None``, e.g. prompt lookup has no draft
    distribution) the controller behaves as DSDE would with zero KL: ``D̄ = 0``, so
    ``k_i = k_max_i`` — acceptance-only behaviour where the warm-up doubling finds the largest
    accepted run and that run (clipped to ``[k_min, k_max]``) becomes the sequence's length, still
    subject to the batch cap.

    Per-step cost (decide + update at batch 64, median, ``benchmarks/bench_overhead.py``, where
    ``fixed`` takes 12 µs checking the records): 19 µs in that benchmark, which sends no KL. With a
    KL matrix in every feedback (the benchmark's stream plus ``kl_divergences``, timed with the
    building of the records as well: ``fixed`` takes 33 µs there) it is about 91 µs at ``window=30`` and 105 µs at ``window=100``: about
    11 µs of that is the base class checking the KL matrix, the rest is DSDE's own work, which is
    proportional to the history — shifting every sequence's KL window by the round's values (one
    gather) and its two weighted variances (one matrix product with a ``(window, 2)`` weight
    matrix), plus about 20 small array operations whose fixed cost dominates at this size. Rows
    are found through a cache of the last batch's ids; WVIR is computed only for the sequences
    that drafted this step (for the others ``D̄ = 0`` makes it irrelevant).

    >>> from adaptk import StepContext, Feedback
    >>> c = DSDE(initial_k=4, warmup_tokens=8)
    >>> lengths = []
    >>> for step in range(4):   # the first drafted token is always rejected, KL about 10 nats
    ...     k = int(c.decide(StepContext(step=step, seq_ids=[7], context_lens=[10], k_max=8)).num_draft_tokens[0])
    ...     lengths.append(k)
    ...     c.update(Feedback(seq_ids=[7], num_draft_tokens=[k], num_accepted_tokens=[0],
    ...                       kl_divergences=[[9.0, 12.0, 8.0, 11.0][:k]]))
    >>> lengths                 # warm-up (8 tokens) at 4, then k_max_7 = round(max accepted 0) -> 1
    [4, 4, 1, 1]
    """

    required_signals = frozenset({"kl_divergences"})
    #: Derived from the saved state (the last batch's ids and their rows): never saved.
    _TRANSIENT = ("_ids_cache", "_rows_cache", "_gather_base")
    _ROW_ARRAYS = ("_hist", "_count", "_k", "_drafted", "_ready", "_kmin_i", "_kmax_i",
                   "_warm_rounds", "_warm_max_acc", "_warm_kl_sum", "_warm_kl_n", "_warm_kl_max")

    def __init__(
        self,
        k_min: int = 1,
        k_max: int = 20,
        initial_k: int | None = None,
        window: int = 30,
        warmup_tokens: int = 30,
        decay: float = 0.9,
        temperature: float = 0.0,
        sl_cap: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(k_min, (int, np.integer)) and isinstance(k_max, (int, np.integer)) and 0 <= k_min <= k_max):
            raise ValueError(f"need ints 0 <= k_min <= k_max, got k_min={k_min!r}, k_max={k_max!r}")
        if initial_k is not None and not (isinstance(initial_k, (int, np.integer)) and 0 <= initial_k):
            raise ValueError(f"initial_k must be None or a non-negative int, got {initial_k!r}")
        if window < 2 or warmup_tokens < 0 or not 0.0 < decay <= 1.0:
            raise ValueError("need window >= 2, warmup_tokens >= 0 and 0 < decay <= 1")
        self.k_min = k_min
        self.k_max = k_max
        self.initial_k = initial_k
        self.window = window
        self.warmup_tokens = warmup_tokens
        self.decay = decay
        self.temperature = temperature
        self.sl_cap = sl_cap
        # per-sequence rows
        self._slot: dict[int, int] = {}
        self._free: list[int] = []
        rows = 8
        self._hist = np.zeros((rows, window))        # KL values, newest first (column = age)
        self._count = np.zeros(rows, dtype=np.int64)  # values held (<= window)
        self._k = np.zeros(rows, dtype=np.int64)      # proposed length
        self._drafted = np.zeros(rows, dtype=np.int64)
        self._ready = np.zeros(rows, dtype=bool)      # warm-up over, bounds set
        self._kmin_i = np.zeros(rows, dtype=np.int64)
        self._kmax_i = np.zeros(rows, dtype=np.int64)
        self._warm_rounds = np.zeros(rows, dtype=np.int64)
        self._warm_max_acc = np.zeros(rows, dtype=np.int64)
        self._warm_kl_sum = np.zeros(rows)
        self._warm_kl_n = np.zeros(rows, dtype=np.int64)
        self._warm_kl_max = np.zeros(rows)
        self._not_full = 0  # live rows whose KL window is not full yet (0: every window is full)
        self._ids_cache: np.ndarray | None = None
        self._rows_cache: np.ndarray | None = None
        self._gather_base: dict[tuple[int, int], np.ndarray] = {}  # index grids of the history shift

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._ids_cache = self._rows_cache = None

    # -- rows ------------------------------------------------------------------------------------
    def _rows(self, seq_ids: np.ndarray) -> np.ndarray:
        """Row of every sequence (new rows for new ids). The engine sends the same batch to
        ``decide`` and ``update`` and mostly the same batch step after step, so the last answer is
        reused when the ids are unchanged (an array comparison instead of a dict lookup per id)."""
        cached = self._ids_cache
        if cached is not None and cached.shape == seq_ids.shape and (cached == seq_ids).all():
            return self._rows_cache  # type: ignore[return-value]
        slot = self._slot
        ids = seq_ids.tolist()
        for s in ids:
            if s not in slot:
                slot[s] = self._new_row()
        rows = np.array([slot[s] for s in ids], dtype=np.int64)
        self._ids_cache, self._rows_cache = seq_ids.copy(), rows
        return rows

    def _new_row(self) -> int:
        if not self._free:
            n = len(self._k)
            for name in self._ROW_ARRAYS:
                old = getattr(self, name)
                grown = np.zeros((2 * n,) + old.shape[1:], dtype=old.dtype)
                grown[:n] = old
                setattr(self, name, grown)
            self._free = list(range(2 * n - 1, n - 1, -1))
        row = self._free.pop()
        for name in self._ROW_ARRAYS:
            getattr(self, name)[row] = 0
        self._not_full += 1
        self._k[row] = self.k_min if self.initial_k is None else self.initial_k
        if self.warmup_tokens == 0:
            self._finish_warmup(np.array([row]))
        return row

    def _end_sequence(self, seq_id: int) -> None:
        row = self._slot.pop(seq_id, None)
        if row is not None:
            self._free.append(row)
            if self._count[row] < self.window:
                self._not_full -= 1
            self._ids_cache = self._rows_cache = None  # the row may be reused by another id

    # -- policy ----------------------------------------------------------------------------------
    def _decide(self, context: StepContext) -> Decision:
        n = len(context.seq_ids)
        if not n:
            return Decision(np.zeros(0, dtype=np.int64), info={"sl_cap": None})
        rows = self._rows(context.seq_ids)
        k = self._k[rows]  # a copy (fancy indexing)
        cap = None
        if self.sl_cap:
            ready = self._ready[rows]
            if ready.all():
                cap = -(-int(k.sum()) // n)  # ceil of the mean, in integers
                np.minimum(k, cap, out=k)
            elif ready.any():
                capped = k[ready]
                cap = -(-int(capped.sum()) // len(capped))
                k[ready] = np.minimum(capped, cap)
        np.minimum(k, context.k_max, out=k)
        return Decision(k, info={"sl_cap": cap})

    def _finish_warmup(self, rows: np.ndarray) -> None:
        kl_max = np.where(self._warm_kl_max[rows] > 0, self._warm_kl_max[rows], 1.0)
        kl_mean = np.where(self._warm_kl_n[rows] > 0, self._warm_kl_sum[rows] / np.maximum(self._warm_kl_n[rows], 1), 0.0)
        raw = self._warm_max_acc[rows] * (1.0 + 0.5 * kl_mean / kl_max)
        kmax_i = np.rint(raw).astype(np.int64)  # half to even, as the reference's Python round()
        kmax_i = np.minimum(self.k_max, np.maximum(self.k_min, kmax_i))
        kmin_i = np.minimum(kmax_i, np.maximum(self.k_min, np.ceil(0.1 * kmax_i).astype(np.int64)))
        none = self._warm_rounds[rows] == 0
        self._kmax_i[rows] = np.where(none, self.k_max, kmax_i)
        self._kmin_i[rows] = np.where(none, self.k_min, kmin_i)
        self._ready[rows] = True

    def _push(self, rows: np.ndarray, drafted: np.ndarray, kl: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Put each row's ``drafted[i]`` new KL values in front of its history, newest first.

        With ``cat = [kl reversed | old history]`` (``width + window`` columns), the new history
        is ``cat[width − m + c]`` for column ``c`` (``m`` = values drafted): one gather per step.
        Returns the new histories of ``rows`` and their value counts (``None`` when every live
        window is full, the usual case: counts then stay at ``window``).
        """
        n, width = kl.shape
        w = self.window
        cat = np.concatenate([kl[:, ::-1], self._hist[rows]], axis=1)
        base = self._gather_base.get((n, width))
        if base is None:
            if len(self._gather_base) >= 32:  # batch sizes and widths vary: keep the recent few
                self._gather_base.clear()
            base = self._gather_base[(n, width)] = (np.arange(n) * (width + w))[:, None] + _constants(self.decay, w)[0]
        hist = np.take(cat, base + (width - drafted)[:, None])
        self._hist[rows] = hist
        if not self._not_full:
            return hist, None
        before = self._count[rows]
        count = before + drafted
        np.minimum(count, w, out=count)
        self._count[rows] = count
        self._not_full -= int(np.count_nonzero((before < w) & (count >= w)))
        return hist, count

    def _update(self, feedback: Feedback) -> None:
        n = len(feedback.seq_ids)
        if not n:
            return
        rows = self._rows(feedback.seq_ids)
        drafted = feedback.num_draft_tokens
        accepted = feedback.num_accepted_tokens
        width = int(drafted.max())
        kl = feedback.kl_divergences
        has_kl = kl is not None and width > 0
        if has_kl:
            cols = _constants(self.decay, self.window)[0]
            valid = (cols[:width] if width <= self.window else np.arange(width)) < drafted[:, None]
            kl = np.where(valid, kl[:, :width], 0.0)  # entries past a row's drafts are ignored (NaN)
            kl_sum = kl.sum(axis=1)
            hist, count = self._push(rows, drafted, kl)

        ready = self._ready[rows]
        every = bool(ready.all())
        if not every:
            self._warm_up(rows, ready, drafted, accepted, kl if has_kl else None)
            self._drafted[rows] += drafted  # only warming sequences read it
            ready = self._ready[rows]
            if not ready.any():
                return

        # post-warm-up length rule
        rr = rows if every else rows[ready]
        kmin_i, kmax_i = self._kmin_i[rr], self._kmax_i[rr]
        if not has_kl:
            self._k[rr] = kmax_i  # D̄ = 0: SF = 0, so WVIR·SF = 0 and k = k_max_i
            return
        d, sums = (drafted, kl_sum) if every else (drafted[ready], kl_sum[ready])
        live = d > 0
        if every and live.all():
            # the usual step: WVIR straight from the histories just built
            product = self._wvir(hist, count) * self._scale(sums, d)
        else:
            # a round that drafted nothing has D̄ = 0, hence product 0 whatever its WVIR
            product = np.zeros(len(rr))
            if live.any():
                lr = rr[live]
                product[live] = self._wvir(self._hist[lr], self._count[lr]) * self._scale(sums[live], d[live])
        # ceil((k_max_i − k_min_i)(1 − WVIR·SF) + k_min_i) if WVIR·SF <= 1, else k_min_i (the same
        # expression with 1 − WVIR·SF floored at 0)
        one_minus = 1.0 - product
        np.maximum(one_minus, 0.0, out=one_minus)
        self._k[rr] = np.ceil((kmax_i - kmin_i) * one_minus + kmin_i)

    def _scale(self, kl_sums: np.ndarray, drafted: np.ndarray) -> np.ndarray:
        """``SF = exp(2·D̄) − 1`` with ``D̄`` the mean KL of the round (over the temperature)."""
        mean_kl = kl_sums / drafted
        if abs(self.temperature) >= 1e-8:
            mean_kl = mean_kl / (self.temperature + 1e-8)
        return np.expm1(np.minimum(2.0 * mean_kl, _MAX_EXPONENT))

    def _warm_up(self, rows: np.ndarray, ready: np.ndarray, drafted: np.ndarray, accepted: np.ndarray,
                 kl: np.ndarray | None) -> None:
        """Warm-up for the rounds started before the sequence reached ``warmup_tokens`` drafted."""
        warming = ~ready & (self._drafted[rows] < self.warmup_tokens)
        if warming.any():
            wr = rows[warming]
            d, a = drafted[warming], accepted[warming]
            self._warm_rounds[wr] += 1
            self._warm_max_acc[wr] = np.maximum(self._warm_max_acc[wr], a)
            if kl is not None:
                self._warm_kl_sum[wr] += kl[warming].sum(axis=1)
                self._warm_kl_n[wr] += d
                self._warm_kl_max[wr] = np.maximum(self._warm_kl_max[wr], kl[warming].max(axis=1))
            k = self._k[wr]
            full = a >= k  # the fork's test: a round that proposed 0 counts as full, so k = 0 grows to 1
            self._k[wr] = np.where(full, np.minimum(np.where(k > 0, 2 * k, 1), self.k_max), np.maximum(k, self.k_min))
        finishing = ~ready & (self._drafted[rows] + drafted >= self.warmup_tokens)
        if finishing.any():
            self._finish_warmup(rows[finishing])

    def _wvir_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectorised :func:`wvir` over the histories of ``rows``."""
        return self._wvir(self._hist[rows], self._count[rows])

    def _wvir(self, hist: np.ndarray, count: np.ndarray | None) -> np.ndarray:
        """Vectorised :func:`wvir` of histories ``hist`` (newest first) holding ``count`` values
        (``None``: every window full).

        Weighted sums are taken on values shifted by each row's newest value (exact zeros for a
        constant window, no cancellation). When every window is full (the usual case: the
        warm-up lasts as many values as the window holds) one product with a ``(window, 2)``
        weight matrix gives the long and the short window's sums; otherwise the weights are
        masked per row.
        """
        w = self.window
        cols, pw, cum_pw = _constants(self.decay, w)
        if count is None or bool((count >= w).all()):
            n = len(hist)
            x = np.empty((2 * n, w))
            np.subtract(hist, hist[:, :1], out=x[:n])
            np.multiply(x[:n], x[:n], out=x[n:])
            # rows [x; x²] × columns [long, short]: weighted means (the weights sum to 1 per column)
            means = np.dot(x, _full_window_weights(self.decay, w))
            mean = means[:n]
            var = means[n:] - mean * mean
            long_var, short_var = var[:, 0], var[:, 1]
            small = long_var < 1e-6
            return np.where(small, 20.0, np.maximum(short_var, 0.0) / np.where(small, 1.0, long_var))
        n = count
        x = np.where(cols < n[:, None], hist - hist[:, :1], 0.0)
        x2 = x * x
        s0 = cum_pw[np.maximum(n, 1) - 1]
        m1 = (x @ pw) / s0
        long_var = np.maximum((x2 @ pw) / s0 - m1 * m1, 0.0)
        width = max(1, w // 3)  # s = max(1, n // 3) <= width
        s = np.maximum(1, n // 3)
        ps = np.where(cols[:width] < s[:, None], pw[:width], 0.0)
        ss0 = cum_pw[s - 1]
        c1, c2 = (x[:, :width] * ps).sum(axis=1), (x2[:, :width] * ps).sum(axis=1)
        short_var = np.maximum(c2 / ss0 - (c1 / ss0) ** 2, 0.0)
        small = long_var < 1e-6
        ratio = np.where(small, 20.0, short_var / np.where(small, 1.0, long_var))
        return np.where(n < 2, 0.0, ratio)


@functools.lru_cache(maxsize=8)
def _full_window_weights(decay: float, window: int) -> np.ndarray:
    """``(window, 2)`` normalised weights (``decay**age / Σ``) of the long and the short window of a full history."""
    _, pw, cum = _constants(decay, window)
    short = max(1, window // 3)
    weights = np.stack([pw / cum[-1], np.where(np.arange(window) < short, pw / cum[short - 1], 0.0)], axis=1)
    weights.flags.writeable = False
    return weights
