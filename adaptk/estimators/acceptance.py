"""Acceptance estimators: how many drafted tokens the target will accept.

Glossary (see :mod:`adaptk.types`): in one round a sequence drafts ``d`` tokens and the target
accepts the leading ``a <= d`` of them, then emits one bonus/correction token, so the round emits
``a + 1`` tokens.

* :func:`expected_emitted` — ``E[a + 1]`` when each drafted token is accepted independently with
  probability ``α`` (the i.i.d. model of Leviathan et al.): ``(1 − α^{k+1}) / (1 − α)``.
* :class:`AcceptanceEWMA` — global and per-sequence exponentially weighted estimate of ``α``.
* :class:`PositionAcceptance` — a per-position acceptance curve (vLLM-style), for drafters whose
  acceptance falls with the position in the draft.

All estimators are numpy-only, vectorised over the batch, and expose JSON-safe
``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expected_emitted", "AcceptanceEWMA", "PositionAcceptance"]


def expected_emitted(rate: Any, k: Any) -> Any:
    """Expected tokens emitted by one round that drafts ``k`` tokens, acceptance i.i.d. ``rate``.

    ``E[accepted + 1] = 1 + α + α² + … + α^k = (1 − α^{k+1}) / (1 − α)``, and ``k + 1`` at
    ``α = 1``. Broadcasts over arrays of ``rate`` and/or ``k``; returns a float for scalar inputs.

    >>> expected_emitted(0.5, 2)
    1.75
    >>> expected_emitted(1.0, 3)
    4.0
    >>> expected_emitted(0.8, np.array([0, 1, 4])).round(4)
    array([1.    , 1.8   , 3.3616])
    >>> expected_emitted(np.array([0.0, 0.5]), 3)
    array([1.   , 1.875])
    """
    if type(rate) is float and 0.0 <= rate < 1.0 and type(k) is np.ndarray and k.ndim == 1:
        # hot path (one rate, many candidate k): ~2 µs
        if k.size and k.min() < 0:
            raise ValueError(f"k must be >= 0, got min {k.min()}")
        return (1.0 - rate ** (k + 1.0)) / (1.0 - rate)
    alpha = np.asarray(rate, dtype=np.float64)
    kk = np.asarray(k, dtype=np.float64)
    if kk.size and not kk.min() >= 0:
        raise ValueError(f"k must be >= 0, got {k!r}")
    if alpha.size and not (alpha.min() >= 0 and alpha.max() <= 1):
        raise ValueError(f"rate must lie in [0, 1], got {rate!r}")
    power = alpha ** (kk + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (1.0 - power) / (1.0 - alpha)
    if alpha.size and alpha.max() >= 1.0:
        out = np.where(alpha >= 1.0, kk + 1.0, out)
    return float(out) if out.ndim == 0 else out


def _check_round(seq_ids: Any, num_draft_tokens: Any, num_accepted_tokens: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(seq_ids)
    drafted = np.asarray(num_draft_tokens)
    accepted = np.asarray(num_accepted_tokens)
    if ids.ndim != 1:
        raise ValueError(f"seq_ids must be one-dimensional, got shape {ids.shape}")
    if drafted.shape != ids.shape:
        raise ValueError(f"num_draft_tokens has shape {drafted.shape}, seq_ids has {ids.shape}")
    if accepted.shape != ids.shape:
        raise ValueError(f"num_accepted_tokens has shape {accepted.shape}, seq_ids has {ids.shape}")
    if ids.size:
        if drafted.min() < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {drafted.tolist()[:8]}")
        if accepted.min() < 0:
            raise ValueError(f"num_accepted_tokens must be >= 0, got {accepted.tolist()[:8]}")
        if np.any(accepted > drafted):
            raise ValueError("num_accepted_tokens must not exceed num_draft_tokens")
    return ids, drafted, accepted


class AcceptanceEWMA:
    """Exponentially weighted acceptance rate ``α``, globally and per sequence.

    Each :meth:`observe` call is one verified step for a batch. Sequences that drafted nothing
    are skipped (they carry no information about ``α``). The global estimate takes one EWMA step
    per call, from the batch pooled; each sequence's estimate takes one step per round it drafted
    in, and starts from the global estimate when the sequence is first seen.

    Parameters
    ----------
    weight_new
        EWMA weight of the newest observation, in ``(0, 1]`` (SmartSpec/vLLM-style smoothing).
    initial
        Prior rate before any observation.
    mode
        How one round (``d`` drafted, ``a`` accepted) becomes evidence about ``α``:

        * ``"ratio"`` — the fraction ``a / d`` (SmartSpec's estimator). Under i.i.d. acceptance
          it is **biased low**: ``E[a/d] = (α + α² + … + α^d) / d < α`` for ``d > 1``
          (at ``α = 0.8, d = 4``: 0.59), because a rejection hides the later positions.
        * ``"per_token"`` — the truncated-geometric maximum likelihood: the round is ``a``
          Bernoulli successes plus one failure if ``a < d`` (the tokens after the first rejection
          were never tested). The estimate is ``S / N``, the EWMA of successes over the EWMA of
          trials. Each trial is a Bernoulli(``α``) draw and the number of trials is a stopping
          time, so by Wald's identity ``E[S] = α · E[N]``: the estimating equation is unbiased
          and the estimate converges to ``α`` whatever ``d`` the controller chose.

    >>> est = AcceptanceEWMA(weight_new=0.5, initial=0.5, mode="ratio")
    >>> est.observe([7, 8], [4, 0], [2, 0])       # seq 8 drafted nothing: skipped
    >>> est.rate()                                # 0.5 * 0.5 + 0.5 * (2 / 4)
    0.5
    >>> est.observe([7], [4], [4])
    >>> est.rates([7, 99])                        # unknown sequence 99 gets the global rate
    array([0.75, 0.75])
    >>> tok = AcceptanceEWMA(weight_new=1.0, mode="per_token")
    >>> tok.observe([1, 2], [4, 4], [4, 1])       # 5 successes in 6 trials
    >>> round(tok.rate(), 4), tok.rates([1, 2]).round(4).tolist()
    (0.8333, [1.0, 0.5])
    """

    def __init__(self, weight_new: float = 0.15, initial: float = 0.7, mode: str = "ratio") -> None:
        if not 0.0 < float(weight_new) <= 1.0:
            raise ValueError(f"weight_new must lie in (0, 1], got {weight_new!r}")
        if not 0.0 <= float(initial) <= 1.0:
            raise ValueError(f"initial must lie in [0, 1], got {initial!r}")
        if mode not in ("ratio", "per_token"):
            raise ValueError(f"mode must be 'ratio' or 'per_token', got {mode!r}")
        self.weight_new = weight_new
        self.initial = initial
        self.mode = mode
        self._w = float(weight_new)
        # global: successes-like numerator and trials-like denominator (ratio mode keeps den = 1)
        self._num = float(initial)
        self._den = 1.0
        # per sequence: slot arrays, seq_id -> slot
        self._slot: dict[int, int] = {}
        self._free: list[int] = []
        self._snum = np.zeros(16)
        self._sden = np.zeros(16)
        self._cache_ids: np.ndarray | None = None
        self._cache_slots: np.ndarray | None = None

    # -- reading -------------------------------------------------------------------------------
    def rate(self) -> float:
        """The global acceptance-rate estimate."""
        return float(self._num / self._den)

    def rates(self, seq_ids: Any) -> np.ndarray:
        """Per-sequence estimates, aligned with ``seq_ids``; unknown sequences get :meth:`rate`."""
        ids = np.asarray(seq_ids)
        if ids.ndim != 1:
            raise ValueError(f"seq_ids must be one-dimensional, got shape {ids.shape}")
        slots = self._lookup(ids, create=False)
        known = slots >= 0
        safe = np.where(known, slots, 0)
        return np.where(known, self._snum[safe] / np.where(known, self._sden[safe], 1.0), self.rate())

    def __len__(self) -> int:
        return len(self._slot)

    # -- learning ------------------------------------------------------------------------------
    def observe(self, seq_ids: Any, num_draft_tokens: Any, num_accepted_tokens: Any) -> None:
        """Learn from one verified step (arrays aligned with ``seq_ids``)."""
        ids, drafted, accepted = _check_round(seq_ids, num_draft_tokens, num_accepted_tokens)
        mask = drafted > 0
        if not mask.all():
            ids, drafted, accepted = ids[mask], drafted[mask], accepted[mask]
        if ids.size == 0:
            return
        if self.mode == "ratio":
            num = accepted / drafted
            den = np.ones(ids.size)
            pooled_num, pooled_den = float(accepted.sum() / drafted.sum()), 1.0
        else:
            num = accepted.astype(np.float64)
            den = num + (accepted < drafted)
            pooled_num, pooled_den = float(num.mean()), float(den.mean())
        g_num, g_den = self._num, self._den
        slots, new = self._lookup(ids, create=True), self._new_slots
        if new is not None:
            self._snum[new] = g_num / g_den
            self._sden[new] = 1.0
        w = self._w
        self._snum[slots] += w * (num - self._snum[slots])
        self._sden[slots] += w * (den - self._sden[slots])
        self._num = g_num + w * (pooled_num - g_num)
        self._den = g_den + w * (pooled_den - g_den)

    def end_sequence(self, seq_id: int) -> None:
        """Forget ``seq_id`` (a no-op for unknown ids)."""
        slot = self._slot.pop(int(seq_id), None)
        if slot is not None:
            self._free.append(slot)
            self._cache_ids = None

    # -- slots ---------------------------------------------------------------------------------
    _new_slots: np.ndarray | None = None

    def _lookup(self, ids: np.ndarray, create: bool) -> np.ndarray:
        self._new_slots = None
        cached = self._cache_ids
        if cached is not None and cached.shape == ids.shape and np.array_equal(cached, ids):
            return self._cache_slots  # type: ignore[return-value]
        table = self._slot
        slots = [table.get(s, -1) for s in ids.tolist()]
        if create and -1 in slots:
            new = []
            for i, s in enumerate(slots):
                if s < 0:
                    sid = int(ids[i])
                    if sid in table:  # duplicate id within the batch
                        slots[i] = table[sid]
                        continue
                    slot = self._free.pop() if self._free else len(table)
                    if slot >= self._snum.size:
                        grow = max(16, self._snum.size)
                        self._snum = np.concatenate([self._snum, np.zeros(grow)])
                        self._sden = np.concatenate([self._sden, np.zeros(grow)])
                    table[sid] = slot
                    slots[i] = slot
                    new.append(slot)
            self._new_slots = np.asarray(new, dtype=np.int64)
        out = np.asarray(slots, dtype=np.int64)
        if create or -1 not in slots:
            self._cache_ids, self._cache_slots = ids.copy(), out
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Learned state as JSON-safe data."""
        ids = list(self._slot)
        slots = [self._slot[s] for s in ids]
        return {
            "num": self._num,
            "den": self._den,
            "seq_ids": [int(s) for s in ids],
            "seq_num": self._snum[slots].tolist(),
            "seq_den": self._sden[slots].tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        n = len(state["seq_ids"])
        self._num, self._den = float(state["num"]), float(state["den"])
        self._slot = {int(s): i for i, s in enumerate(state["seq_ids"])}
        self._free = []
        size = max(16, n)
        self._snum, self._sden = np.zeros(size), np.zeros(size)
        self._snum[:n] = state["seq_num"]
        self._sden[:n] = state["seq_den"]
        self._cache_ids = None


class PositionAcceptance:
    """Per-position acceptance curve for drafts of up to ``k_max`` tokens.

    Positions are 0-based: position ``j`` is the ``(j+1)``-th drafted token. Two curves:

    * :meth:`curve` — the **conditional** rate ``c_j = P(position j accepted | it was drafted and
      positions 0..j-1 were accepted)``, estimated as ``accepted_j / tried_j`` where a round that
      drafted ``d`` and accepted ``a`` *tried* positions ``0..min(a, d-1)`` and accepted ``0..a-1``.
      It is well defined however the drafted lengths vary. A position never tried takes the rate of
      the position before it (``initial`` at position 0).
    * :meth:`cumulative` — ``r_j = Π_{i<=j} c_i = P(positions 0..j all accepted)``, the quantity
      vLLM's per-position metric ``num_accepted_tokens_per_pos[j] / num_drafts`` estimates (the
      two agree exactly when every round drafted ``k_max``).

    Expected emitted tokens for a round drafting ``k``:
    ``expected_emitted(k) = 1 + Σ_{j<k} r_j = 1 + Σ_{j<k} Π_{i<=j} c_i`` (equal to
    :func:`expected_emitted` when every ``c_j = α``).

    ``decay < 1`` multiplies the counts by ``decay`` before each :meth:`observe` (exponential
    forgetting); ``decay = 1`` keeps cumulative counts.

    >>> pa = PositionAcceptance(k_max=3)
    >>> pa.observe(num_draft_tokens=[3, 3, 2], num_accepted_tokens=[3, 1, 0])
    >>> pa.curve()              # tried: 3, 2, 1 rounds; accepted: 2, 1, 1
    array([0.66666667, 0.5       , 1.        ])
    >>> pa.cumulative()
    array([0.66666667, 0.33333333, 0.33333333])
    >>> pa.expected_emitted(np.arange(4))
    array([1.        , 1.66666667, 2.        , 2.33333333])
    """

    def __init__(self, k_max: int, decay: float = 1.0, initial: float = 0.7) -> None:
        if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        if not 0.0 <= float(initial) <= 1.0:
            raise ValueError(f"initial must lie in [0, 1], got {initial!r}")
        self.k_max = k_max
        self.decay = decay
        self.initial = initial
        self._tried = np.zeros(int(k_max))
        self._accepted = np.zeros(int(k_max))

    def observe(self, num_draft_tokens: Any, num_accepted_tokens: Any) -> None:
        """Learn from one step's rounds (one entry per sequence; 0 drafted is skipped)."""
        drafted = np.asarray(num_draft_tokens)
        _, drafted, accepted = _check_round(np.zeros(drafted.shape[:1] if drafted.ndim else (1,)), drafted, num_accepted_tokens)
        if drafted.size and drafted.max() > self.k_max:
            raise ValueError(f"num_draft_tokens must be <= k_max={self.k_max}, got {int(drafted.max())}")
        k = int(self.k_max)
        reached = np.minimum(accepted + 1, drafted)  # positions 0..reached-1 were tried
        tried_inc = np.bincount(reached, minlength=k + 1)[::-1].cumsum()[::-1][1:]
        acc_inc = np.bincount(accepted, minlength=k + 1)[::-1].cumsum()[::-1][1:]
        if self.decay != 1.0:
            self._tried *= self.decay
            self._accepted *= self.decay
        self._tried += tried_inc
        self._accepted += acc_inc

    def curve(self) -> np.ndarray:
        """Conditional rates ``c_j``, shape ``(k_max,)``."""
        out = np.empty(self._tried.size)
        previous = float(self.initial)
        for j, (tried, acc) in enumerate(zip(self._tried.tolist(), self._accepted.tolist(), strict=True)):
            previous = acc / tried if tried > 0 else previous
            out[j] = previous
        return out

    def cumulative(self) -> np.ndarray:
        """``r_j = P(positions 0..j all accepted)``, shape ``(k_max,)``."""
        return np.cumprod(self.curve())

    def expected_emitted(self, k: Any) -> Any:
        """``1 + Σ_{j<k} r_j`` for ``k`` in ``[0, k_max]`` (scalar or array)."""
        kk = np.asarray(k)
        if np.any(kk < 0) or np.any(kk > self.k_max):
            raise ValueError(f"k must lie in [0, {self.k_max}], got {k!r}")
        table = np.concatenate([[1.0], 1.0 + np.cumsum(self.cumulative())])
        out = table[kk.astype(np.int64)]
        return float(out) if out.ndim == 0 else out

    def state_dict(self) -> dict:
        """Learned counts as JSON-safe data."""
        return {"tried": self._tried.tolist(), "accepted": self._accepted.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        tried = np.asarray(state["tried"], dtype=np.float64)
        if tried.shape != (int(self.k_max),):
            raise ValueError(f"state holds {tried.size} positions, this estimator has k_max={self.k_max}")
        self._tried = tried
        self._accepted = np.asarray(state["accepted"], dtype=np.float64)
