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

import numpy as np

from adaptk.core import SpeculationController
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["DSDE", "wvir", "dsl_step"]


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
    """
    d = mean_kl if abs(temperature) < 1e-8 else mean_kl / (temperature + 1e-8)
    product = wvir_value * (math.exp(2.0 * d) - 1.0)
    if product <= 1.0:
        return max(k_min, math.ceil((k_max - k_min) * (1.0 - product) + k_min))
    return k_min


@register("dsde")
class DSDE(SpeculationController):
    """DSDE: per-sequence length from how stable the draft/target KL divergence has been.

    Per sequence ``i`` [code, DSDE fork]:

    * **History**: the KL(target ‖ draft) of every drafted position is appended to a window of the
      last ``window`` (100) values.
    * **Warm-up** until ``warmup_tokens`` (100) tokens were drafted for the sequence: start at
      ``initial_k`` (default ``k_min``); after a fully accepted round ``k ← min(2k, k_max)``,
      otherwise ``k`` stays (``max(k, k_min)``). The accepted counts and KL values seen are kept.
    * **Bounds** when the warm-up ends: ``k_max_i = clip(round(max_acc·(1 + 0.5·mean_KL/max_KL)),
      k_min, k_max)`` and ``k_min_i = clip(ceil(0.1·k_max_i), k_min, k_max_i)`` (``max_KL = 0`` or
      no KL counts as 1; no rounds at all keeps ``[k_min, k_max]``).
    * **Length** after each later round: ``k_i = dsl_step(WVIR(history), D̄, k_min_i, k_max_i)`` with
      ``D̄`` = the round's summed KL / tokens drafted (see :func:`wvir`, :func:`dsl_step`).
    * **Anti-straggler cap** at decide time: ``SL_cap = ceil(mean of k_i over the batch's
      post-warm-up sequences)`` and ``k_i ← min(k_i, SL_cap)`` for them (``sl_cap=False`` disables).

    Finally every length is clipped to the engine's ``k_max`` (so the defaults ``[6, 20]`` shrink
    to ``[min(6, k_max), k_max]``).

    **Without KL** (``Feedback.kl_divergences is None``, e.g. prompt lookup has no draft
    distribution) the controller behaves as DSDE would with zero KL: the history stays empty, so
    ``WVIR = 0`` and ``k_i = k_max_i`` — acceptance-only behaviour where the warm-up doubling finds
    the largest accepted run and that run (clipped to ``[k_min, k_max]``) becomes the sequence's
    length, still subject to the batch cap.

    Cost: one vectorised pass over the ``(live sequences, window)`` history matrix per update.

    Cost per step: about 140 µs for decide + update at batch 64 (``benchmarks/bench_overhead.py``),
    over the 50 µs target: the weighted variances run over every request's 100-value KL window each
    step, as the rule requires.
    """

    required_signals = frozenset({"kl_divergences"})

    def __init__(
        self,
        k_min: int = 6,
        k_max: int = 20,
        initial_k: int | None = None,
        window: int = 100,
        warmup_tokens: int = 100,
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

    # -- rows ------------------------------------------------------------------------------------
    _ROW_ARRAYS = ("_hist", "_count", "_k", "_drafted", "_ready", "_kmin_i", "_kmax_i",
                   "_warm_rounds", "_warm_max_acc", "_warm_kl_sum", "_warm_kl_n", "_warm_kl_max")

    def _rows(self, seq_ids: list[int]) -> np.ndarray:
        slot = self._slot
        if any(s not in slot for s in seq_ids):
            for s in seq_ids:
                if s not in slot:
                    slot[s] = self._new_row()
        return np.fromiter((slot[s] for s in seq_ids), dtype=np.int64, count=len(seq_ids))

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
        self._k[row] = self.k_min if self.initial_k is None else self.initial_k
        if self.warmup_tokens == 0:
            self._finish_warmup(np.array([row]))
        return row

    def _end_sequence(self, seq_id: int) -> None:
        row = self._slot.pop(seq_id, None)
        if row is not None:
            self._free.append(row)

    # -- policy ----------------------------------------------------------------------------------
    def _decide(self, context: StepContext) -> Decision:
        rows = self._rows(context.seq_ids.tolist())
        k = self._k[rows].copy()
        ready = self._ready[rows]
        cap = None
        if self.sl_cap and ready.any():
            cap = math.ceil(float(k[ready].mean()))
            k[ready] = np.minimum(k[ready], cap)
        return Decision(np.clip(k, 0, context.k_max), info={"sl_cap": cap})

    def _finish_warmup(self, rows: np.ndarray) -> None:
        kl_max = np.where(self._warm_kl_max[rows] > 0, self._warm_kl_max[rows], 1.0)
        kl_mean = np.where(self._warm_kl_n[rows] > 0, self._warm_kl_sum[rows] / np.maximum(self._warm_kl_n[rows], 1), 0.0)
        raw = self._warm_max_acc[rows] * (1.0 + 0.5 * kl_mean / kl_max)
        kmax_i = np.array([round(x) for x in raw.tolist()], dtype=np.int64)  # Python round, as the reference
        kmax_i = np.minimum(self.k_max, np.maximum(self.k_min, kmax_i))
        kmin_i = np.minimum(kmax_i, np.maximum(self.k_min, np.ceil(0.1 * kmax_i).astype(np.int64)))
        none = self._warm_rounds[rows] == 0
        self._kmax_i[rows] = np.where(none, self.k_max, kmax_i)
        self._kmin_i[rows] = np.where(none, self.k_min, kmin_i)
        self._ready[rows] = True

    def _update(self, feedback: Feedback) -> None:
        if not len(feedback.seq_ids):
            return
        rows = self._rows(feedback.seq_ids.tolist())
        drafted = feedback.num_draft_tokens
        accepted = feedback.num_accepted_tokens
        kl = feedback.kl_divergences
        width = int(drafted.max())
        if kl is not None and width:
            kl = kl[:, :width]
            valid = np.arange(width)[None, :] < drafted[:, None]
            kl_step = np.where(valid, kl, 0.0)
            kl_sum = kl_step.sum(axis=1)
            kl_max_step = kl_step.max(axis=1)
            # shift each row right by its m new values and put them in front, newest first:
            # new column c holds kl[m - 1 - c] for c < m, else old column c - m
            w = self.window
            cols = np.arange(w)[None, :]
            m = drafted[:, None]
            old = np.take_along_axis(self._hist[rows], np.clip(cols - m, 0, w - 1), axis=1)
            fresh = np.take_along_axis(kl_step, np.clip(m - 1 - cols, 0, width - 1), axis=1)
            self._hist[rows] = np.where(cols < m, fresh, old)
            self._count[rows] = np.minimum(self._count[rows] + drafted, w)
        else:
            kl_sum = np.zeros(len(rows))
            kl_max_step = np.zeros(len(rows))
        has_kl = kl is not None

        # warm-up (rounds started before the sequence reached warmup_tokens drafted tokens)
        warming = ~self._ready[rows] & (self._drafted[rows] < self.warmup_tokens)
        if warming.any():
            wr = rows[warming]
            d, a = drafted[warming], accepted[warming]
            self._warm_rounds[wr] += 1
            self._warm_max_acc[wr] = np.maximum(self._warm_max_acc[wr], a)
            if has_kl:
                self._warm_kl_sum[wr] += kl_sum[warming]
                self._warm_kl_n[wr] += d
                self._warm_kl_max[wr] = np.maximum(self._warm_kl_max[wr], kl_max_step[warming])
            k = self._k[wr]
            full = (a >= k) & (d > 0)
            self._k[wr] = np.where(full, np.minimum(np.where(k > 0, 2 * k, 1), self.k_max), np.maximum(k, self.k_min))
        self._drafted[rows] += drafted
        finishing = ~self._ready[rows] & (self._drafted[rows] >= self.warmup_tokens)
        if finishing.any():
            self._finish_warmup(rows[finishing])

        # post-warm-up length rule
        ready = self._ready[rows]
        if not ready.any():
            return
        rr = rows[ready]
        ratio = self._wvir_rows(rr)
        d = drafted[ready]
        mean_kl = np.where(d > 0, kl_sum[ready] / np.maximum(d, 1), 0.0)
        if abs(self.temperature) >= 1e-8:
            mean_kl = mean_kl / (self.temperature + 1e-8)
        product = ratio * np.expm1(2.0 * mean_kl)
        kmin_i, kmax_i = self._kmin_i[rr], self._kmax_i[rr]
        sl_hat = np.ceil((kmax_i - kmin_i) * (1.0 - product) + kmin_i).astype(np.int64)
        self._k[rr] = np.where(product <= 1.0, np.maximum(kmin_i, sl_hat), kmin_i)

    def _wvir_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectorised :func:`wvir` over the histories of ``rows``.

        Weighted sums are taken on values shifted by each row's newest value (exact zeros for a
        constant window, no cancellation), the long window by a matrix-vector product with the
        weight vector, the short one (``s <= window // 3`` newest values) by a cumulative sum.
        """
        w = self.window
        pw, cum_pw = _powers(self.decay, w)
        n = self._count[rows]
        x = self._hist[rows]
        x = np.where(np.arange(w)[None, :] < n[:, None], x - x[:, :1], 0.0)
        x2 = x * x
        idx = np.arange(len(rows))
        s0 = cum_pw[np.maximum(n, 1) - 1]
        m1 = (x @ pw) / s0
        long_var = (x2 @ pw) / s0 - m1 * m1
        s = np.maximum(1, n // 3)
        width = max(1, w // 3)
        c1 = np.cumsum(x[:, :width] * pw[:width], axis=1)[idx, s - 1]
        c2 = np.cumsum(x2[:, :width] * pw[:width], axis=1)[idx, s - 1]
        ss0 = cum_pw[s - 1]
        short_var = np.maximum(c2 / ss0 - (c1 / ss0) ** 2, 0.0)
        long_var = np.maximum(long_var, 0.0)
        ratio = np.where(long_var < 1e-6, 20.0, short_var / np.where(long_var < 1e-6, 1.0, long_var))
        return np.where(n < 2, 0.0, ratio)


@functools.lru_cache(maxsize=8)
def _powers(decay: float, window: int) -> tuple[np.ndarray, np.ndarray]:
    pw = decay ** np.arange(window, dtype=np.float64)
    return pw, np.cumsum(pw)
