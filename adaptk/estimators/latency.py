"""Latency (cost) models: how long one speculative step takes.

One step = drafting (``max_i k_i`` sequential drafter forwards) + one verify forward of the target.
Every model implements :class:`LatencyModel`:

``predict(batch_size, num_draft_tokens, context_lens, exit_layer=None) -> float``
    Seconds for one step with per-sequence draft lengths (``0`` = plain decoding for that row).
``predict_components(...) -> (draft_s, verify_s)``
    The same, split.
``predict_uniform(batch_size, ks, context_lens, exit_layer=None) -> np.ndarray``
    Vectorised over candidates: step time if *every* sequence drafted ``k``, for each ``k`` in ``ks``.
    This is what goodput controllers call every step (a few µs).
``prefill_time(prompt_lens) -> float``
    Seconds to prefill newly admitted prompts (0 where the model does not know).
``observe(batch_size, num_draft_tokens, context_lens, draft_time_s, verify_time_s, exit_layer=None)``
    Online models learn from a measured step; static models ignore it.

Ragged batches (``ragged``) — how per-sequence draft lengths ``k_i`` map to cost:

* ``"padded"`` — a padded-batch engine (the bundled reference decoder, Hugging Face): every row
  verifies ``max_i(k_i) + 1`` tokens (shorter rows are padded), drafting runs ``max_i k_i``
  forwards over all ``B`` rows, and attention/KV cost follows the longest context.
* ``"packed"`` — vLLM-style token packing: verify cost follows the total ``Σ_i (k_i + 1)`` tokens
  (and ``Σ context``); drafting still takes ``max_i k_i`` sequential forwards, each over the rows
  that are still drafting (rows with ``k_i > 0``).

So under ``"padded"`` one long draft makes every row pay; under ``"packed"`` it does not. The two
agree when all ``k_i`` are equal (``predict_uniform``).

Draft cost per drafted position, by drafter: ``prompt_lookup`` (model-free n-gram proposal, a tiny
cost paid **once per step** for the drafting rows, whatever ``k``), ``early_exit`` (a forward of
the first ``exit_layer`` layers of the target, per position), ``draft_model`` (a forward of a
separate small model, per position).

Implementations: :class:`ProfileLatency` (measured table), :class:`RegressionLatency`
(SmartSpec's least squares), :class:`OnlineLatency` (learned from ``observe`` alone),
:class:`RooflineLatency` (analytic). :func:`get_latency_model` finds one by name or path.
"""

from __future__ import annotations

import copy
import json
import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "LatencyModel",
    "LatencySample",
    "ProfileLatency",
    "RegressionLatency",
    "OnlineLatency",
    "RooflineLatency",
    "load_profile",
    "available_profiles",
    "get_latency_model",
    "is_online",
]

DRAFTERS = ("prompt_lookup", "early_exit", "draft_model")
RAGGED = ("padded", "packed")
#: The name under which :func:`get_latency_model` builds an :class:`OnlineLatency`.
ONLINE = "online"


def is_online(spec: object) -> bool:
    """Whether a ``latency`` argument asks for costs learned online (``None``, ``"online"`` or a spec
    dict naming it)."""
    return spec is None or spec == ONLINE or (isinstance(spec, dict) and spec.get("name") == ONLINE)


class LatencySample(NamedTuple):
    """One measured step, as fed to :meth:`LatencyModel.observe` or :meth:`RegressionLatency.fit`."""

    batch_size: int
    num_draft_tokens: Sequence[int] | np.ndarray
    context_lens: Sequence[int] | np.ndarray | int
    draft_time_s: float
    verify_time_s: float
    exit_layer: int | None = None


# ---------------------------------------------------------------------------------------------
# input checks (kept cheap: predict_uniform sits on every controller's hot path)
# ---------------------------------------------------------------------------------------------
def _check_batch(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (empty batch), got {batch_size}")
    return int(batch_size)


def _ctx_stats(context_lens: Any, batch: int, strict: bool = True) -> tuple[float, float]:
    """(Σ context, max context) over the batch; a scalar is every row's context length.

    ``strict=False`` (the predict_uniform hot path) skips the negative-value check.
    """
    if type(context_lens) is not np.ndarray:
        context_lens = np.asarray(context_lens, dtype=np.float64)
    if context_lens.ndim == 0:
        c = float(context_lens)
        if not c >= 0:
            raise ValueError(f"context_lens must be >= 0, got {c}")
        return c * batch, c
    if context_lens.ndim != 1 or context_lens.shape[0] != batch:
        raise ValueError(f"context_lens has shape {context_lens.shape}, expected ({batch},) for batch_size={batch}")
    if strict and not context_lens.min() >= 0:
        raise ValueError(f"context_lens must be >= 0, got min {context_lens.min()}")
    return float(context_lens.sum()), float(context_lens.max())


def _check_draft(num_draft_tokens: Any, batch: int) -> np.ndarray:
    k = np.asarray(num_draft_tokens)
    if k.ndim != 1 or k.shape[0] != batch:
        raise ValueError(f"num_draft_tokens has shape {k.shape}, expected ({batch},) for batch_size={batch}")
    if k.dtype.kind not in "iu":
        if k.dtype.kind != "f" or not np.all(k == np.round(k)):
            raise ValueError(f"num_draft_tokens must hold integers, got {k.dtype}")
        k = k.astype(np.int64)
    if k.min() < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got min {int(k.min())}")
    return k


def _check_ks(ks: Any) -> np.ndarray:
    if type(ks) is not np.ndarray:
        ks = np.asarray(ks)
    if ks.ndim != 1:
        raise ValueError(f"ks must be one-dimensional, got shape {ks.shape}")
    if ks.size and ks.min() < 0:
        raise ValueError(f"ks must be >= 0, got min {ks.min()}")
    return ks


def _check_time(value: Any, name: str) -> float:
    t = float(value)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return t


def _check_ragged(ragged: str) -> str:
    if ragged not in RAGGED:
        raise ValueError(f"ragged must be one of {RAGGED}, got {ragged!r}")
    return ragged


# ---------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------
class LatencyModel(ABC):
    """Predicts step time (seconds) from batch size, draft lengths and context lengths.

    Call order: build once; call :meth:`predict_uniform` / :meth:`predict` whenever a decision is
    needed; after a step, :meth:`observe` its measured times (a no-op for static models).
    :meth:`state_dict` / :meth:`load_state_dict` save and restore what was learned.

    Subclasses implement two vectorised primitives and inherit the ragged handling:

    * ``_verify(batch, n, total, ctx_sum, ctx_max)`` — seconds of one verify forward for arrays of
      candidates: ``n`` tokens per row (float, may be fractional under ``"packed"``) and ``total``
      tokens in the batch;
    * ``_draft(rows, forwards, ctx_sum, exit_layer)`` — seconds of drafting with ``forwards``
      (array) sequential drafter forwards over ``rows`` sequences; must be 0 where ``forwards == 0``.
    """

    ragged: str = "padded"

    @abstractmethod
    def _verify(self, batch: int, n: np.ndarray, total: np.ndarray, ctx_sum: float, ctx_max: float) -> np.ndarray:
        """Verify seconds for each candidate."""

    @abstractmethod
    def _draft(self, rows: int, forwards: np.ndarray, ctx_sum: float, exit_layer: int | None) -> np.ndarray:
        """Draft seconds for each candidate number of sequential drafter forwards."""

    # -- public API ----------------------------------------------------------------------------
    def predict_uniform(self, batch_size: int, ks: Any, context_lens: Any, exit_layer: int | None = None) -> np.ndarray:
        """Step seconds if every sequence drafted ``k``, for each ``k`` in ``ks``."""
        batch = _check_batch(batch_size)
        ks = _check_ks(ks)
        ctx_sum, ctx_max = _ctx_stats(context_lens, batch, strict=False)
        forwards = ks.astype(np.float64)
        n = forwards + 1.0
        return self._verify(batch, n, n * batch, ctx_sum, ctx_max) + self._draft(batch, forwards, ctx_sum, exit_layer)

    def predict_components(self, batch_size: int, num_draft_tokens: Any, context_lens: Any,
                           exit_layer: int | None = None) -> tuple[float, float]:
        """``(draft_s, verify_s)`` for one step with per-sequence draft lengths."""
        batch = _check_batch(batch_size)
        k = _check_draft(num_draft_tokens, batch)
        ctx_sum, ctx_max = _ctx_stats(context_lens, batch)
        n, total, rows, forwards = self._shape(batch, k)
        verify = self._verify(batch, np.array([n]), np.array([total]), ctx_sum, ctx_max)[0]
        draft = self._draft(rows, np.array([forwards]), ctx_sum, exit_layer)[0] if rows else 0.0
        return float(draft), float(verify)

    def predict(self, batch_size: int, num_draft_tokens: Any, context_lens: Any, exit_layer: int | None = None) -> float:
        """Seconds for one step (draft + verify) with per-sequence draft lengths."""
        draft, verify = self.predict_components(batch_size, num_draft_tokens, context_lens, exit_layer)
        return draft + verify

    def prefill_time(self, prompt_lens: Any) -> float:
        """Seconds to prefill newly admitted prompts; 0 where the model does not know."""
        return 0.0

    def observe(self, batch_size: int, num_draft_tokens: Any, context_lens: Any, draft_time_s: float,
                verify_time_s: float, exit_layer: int | None = None) -> None:
        """Learn from one measured step. Static models only validate the inputs."""
        batch = _check_batch(batch_size)
        _check_draft(num_draft_tokens, batch)
        _ctx_stats(context_lens, batch)
        _check_time(draft_time_s, "draft_time_s")
        _check_time(verify_time_s, "verify_time_s")

    def state_dict(self) -> dict:
        """Learned state (JSON-safe). Static models have none."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027  (optional hook, a no-op by design)
        """Restore what :meth:`state_dict` returned."""

    # -- helpers -------------------------------------------------------------------------------
    def _shape(self, batch: int, k: np.ndarray) -> tuple[float, float, int, float]:
        """Ragged draft lengths -> (tokens per row, total tokens, draft rows, draft forwards)."""
        kmax = int(k.max())
        if self.ragged == "padded":
            return kmax + 1.0, batch * (kmax + 1.0), batch if kmax else 0, float(kmax)
        total = float(k.sum()) + batch
        return total / batch, total, int(np.count_nonzero(k)), float(kmax)


# ---------------------------------------------------------------------------------------------
# interpolation on grids: linear inside, clamp below, extrapolate above with a slope >= 0
# ---------------------------------------------------------------------------------------------
def _bracket(grid: list[float], x: float) -> tuple[int, int, float]:
    """Indices (i0, i1) and weight w so that value = v[i0] + w * (v[i1] - v[i0]).

    ``grid`` is a plain increasing list (bisect on a list is ~40x faster than numpy for a scalar).
    Below the grid: (0, 0, 0) (clamp). Above: the last two points with w > 1 (extrapolation).
    """
    m = len(grid)
    if m == 1 or x <= grid[0]:
        return 0, 0, 0.0
    last = grid[-1]
    if x >= last:
        if x == last:
            return m - 1, m - 1, 0.0
        return m - 2, m - 1, (x - grid[-2]) / (last - grid[-2])
    i1 = bisect_left(grid, x)
    if grid[i1] == x:
        return i1, i1, 0.0
    i0 = i1 - 1
    return i0, i1, (x - grid[i0]) / (grid[i1] - grid[i0])


def _interp_axis0(table: np.ndarray, grid: list[float], x: float) -> np.ndarray:
    """Interpolate ``table`` along its first axis at ``x`` (extrapolating slope floored at 0)."""
    i0, i1, w = _bracket(grid, x)
    if i0 == i1:
        return table[i0]
    lo, hi = table[i0], table[i1]
    if w > 1.0:
        return hi + (w - 1.0) * np.maximum(hi - lo, 0.0)
    return lo + w * (hi - lo)


def _interp_vec(grid: np.ndarray, values: np.ndarray, xs: np.ndarray, xmax: float | None = None) -> np.ndarray:
    """1-D interpolation at many ``xs``; above the grid, extrapolate with slope floored at 0.

    ``xmax`` (``xs.max()``, if the caller knows it) saves a reduction.
    """
    out = np.interp(xs, grid, values)
    if grid.size > 1 and xs.size and (xs.max() if xmax is None else xmax) > grid[-1]:
        slope = max((values[-1] - values[-2]) / (grid[-1] - grid[-2]), 0.0)
        out = np.where(xs > grid[-1], values[-1] + slope * (xs - grid[-1]), out)
    return out


def _fill_line(values: np.ndarray, grid: np.ndarray, min_known: int = 1) -> np.ndarray:
    known = ~np.isnan(values)
    if known.all() or known.sum() < min_known:
        return values
    out = _interp_vec(grid[known], values[known], grid)
    return np.where(known, values, out)


def _fill_missing(table: np.ndarray, grids: Sequence[np.ndarray]) -> np.ndarray:
    """Fill NaN cells from their neighbours along one axis at a time.

    First only from lines with at least two measured cells (linear inter/extrapolation), trying
    the axes in the order tokens-per-sequence (axis 1 of a verify table), then the others; then,
    for cells still missing, from lines with a single measured cell (copied).
    """
    table = table.copy()
    order = [1, 2, 0] if table.ndim == 3 else list(reversed(range(table.ndim)))
    for min_known in (2, 1):
        for axis in order:
            moved = np.moveaxis(table, axis, -1)
            flat = moved.reshape(-1, moved.shape[-1]).copy()
            for i in range(flat.shape[0]):
                flat[i] = _fill_line(flat[i], grids[axis], min_known)
            table = np.moveaxis(flat.reshape(moved.shape), -1, axis)
        if not np.isnan(table).any():
            return table
    raise ValueError("profile table has no measured value to fill its missing cells from")


def _grid(values: Any, name: str) -> np.ndarray:
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or np.any(np.diff(grid) <= 0):
        raise ValueError(f"profile {name} must be a non-empty increasing list, got {values!r}")
    return grid


def _table(values: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64) \
        if len(shape) == 2 else np.array(_nulls_to_nan(values), dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"profile {name} has shape {array.shape}, expected {shape}")
    return array


def _nulls_to_nan(value: Any) -> Any:
    if isinstance(value, list):
        return [_nulls_to_nan(v) for v in value]
    return np.nan if value is None else value


# ---------------------------------------------------------------------------------------------
# 1. measured profile table
# ---------------------------------------------------------------------------------------------
class ProfileLatency(LatencyModel):
    """Costs read from a profile table (``"adaptk-profile"`` JSON, see :func:`load_profile`).

    Verify seconds come from ``verify.seconds[b][n][c]`` (batch size × tokens per sequence ×
    context length) by multi-linear interpolation. Outside the grid: below the smallest grid value
    the first value is used (clamp); above the largest, values are extrapolated linearly from the
    last two grid points with the slope floored at 0 (a measured dip, like SmolLM2's n=16 < n=12,
    never extrapolates into shrinking costs). Missing (``null``) cells are filled from their
    neighbours along tokens, then context, then batch size. Under ``"packed"`` a ragged batch is
    priced as ``Σ(k_i+1)/B`` tokens per row at the mean context; under ``"padded"`` as
    ``max k_i + 1`` tokens per row at the longest context.

    Draft seconds: ``draft_per_token[drafter]`` interpolated over batch size (and exit layer for
    ``early_exit``) times the number of drafter forwards; ``prompt_lookup`` is charged once per
    step (its table holds one whole-batch proposal). ``prefill`` is interpolated per prompt and
    summed.

    Parameters
    ----------
    profile
        A profile dict or a path to its JSON file.
    drafter
        ``"prompt_lookup"``, ``"early_exit"`` or ``"draft_model"``; ``None`` takes the first of
        those the profile has (no draft cost if it has none).
    ragged
        ``"padded"`` or ``"packed"`` (see :mod:`adaptk.estimators.latency`).
    exit_layer
        Default exit layer for ``early_exit`` when a call passes none.

    >>> profile = {"format": "adaptk-profile", "version": 1, "name": "toy", "kind": "analytic",
    ...            "verify": {"batch_sizes": [1, 8], "tokens_per_seq": [1, 2, 4], "context_lens": [128],
    ...                       "seconds": [[[0.030], [0.035], [0.045]], [[0.060], [0.070], [None]]]},
    ...            "draft_per_token": {"draft_model": {"batch_sizes": [1, 8], "seconds": [0.002, 0.004]}}}
    >>> model = ProfileLatency(profile)
    >>> model.predict_uniform(1, np.array([0, 1, 3]), [128]).round(4)     # verify 0.030, 0.035, 0.045
    array([0.03 , 0.037, 0.051])
    >>> round(model.predict(1, [2], [128]), 4)                             # 0.040 + 2 * 0.002
    0.044
    >>> [round(t, 4) for t in model.predict_components(8, [3] * 8, [128] * 8)]  # null filled along n
    [0.012, 0.09]
    """

    def __init__(self, profile: dict | str | Path, drafter: str | None = None, ragged: str = "padded",
                 exit_layer: int | None = None) -> None:
        self.profile = profile
        self.drafter = drafter
        self.ragged = _check_ragged(ragged)
        self.exit_layer = exit_layer
        data = _read_profile(profile) if isinstance(profile, (str, Path)) else profile
        if not isinstance(data, dict) or data.get("format") != "adaptk-profile":
            raise ValueError("profile must be an 'adaptk-profile' dict or JSON file")
        self.name = data.get("name", "")
        self.kind = data.get("kind", "")
        self.num_layers = data.get("num_layers")
        verify = data["verify"]
        self._b = _grid(verify["batch_sizes"], "verify.batch_sizes")
        self._n = _grid(verify["tokens_per_seq"], "verify.tokens_per_seq")
        self._c = _grid(verify["context_lens"], "verify.context_lens")
        table = _table(verify["seconds"], (self._b.size, self._n.size, self._c.size), "verify.seconds")
        self._verify_table = _fill_missing(table, [self._b, self._n, self._c])
        # context axis first for the per-call reduction: [c][b][n]
        self._vt_cbn = np.ascontiguousarray(np.moveaxis(self._verify_table, 2, 0))
        self._bl, self._cl = self._b.tolist(), self._c.tolist()
        drafts = data.get("draft_per_token") or {}
        if drafter is None:
            drafter = next((d for d in DRAFTERS if d in drafts), None)
        elif drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {DRAFTERS}, got {drafter!r}")
        elif drafter not in drafts:
            raise ValueError(f"drafter {drafter!r} is not in profile {self.name!r} (it has {sorted(drafts)})")
        self._drafter = drafter
        if drafter is not None:
            entry = drafts[drafter]
            self._db = _grid(entry["batch_sizes"], f"draft_per_token.{drafter}.batch_sizes")
            if drafter == "early_exit":
                layers = _grid(entry["layers"], "draft_per_token.early_exit.layers")
                self._dtable = _fill_missing(_table(entry["seconds"], (layers.size, self._db.size),
                                                    "draft_per_token.early_exit.seconds"), [layers, self._db])
                self._dl = layers.tolist()
            else:
                row = np.array(_nulls_to_nan(entry["seconds"]), dtype=np.float64)
                if row.shape != self._db.shape:
                    raise ValueError(f"draft_per_token.{drafter}.seconds must have one value per batch size")
                self._dtable = _fill_line(row, self._db)
            self._db = self._db.tolist()
        prefill = data.get("prefill")
        self._prefill = None
        if prefill:
            grid = _grid(prefill["tokens"], "prefill.tokens")
            self._prefill = (grid, _fill_line(np.array(_nulls_to_nan(prefill["seconds"]), dtype=np.float64), grid))

    def _verify(self, batch: int, n: np.ndarray, total: np.ndarray, ctx_sum: float, ctx_max: float) -> np.ndarray:
        ctx = ctx_max if self.ragged == "padded" else ctx_sum / batch
        by_bn = _interp_axis0(self._vt_cbn, self._cl, ctx)         # [b][n]
        row = _interp_axis0(by_bn, self._bl, float(batch))         # [n]
        return _interp_vec(self._n, row, n)

    def _draft(self, rows: int, forwards: np.ndarray, ctx_sum: float, exit_layer: int | None) -> np.ndarray:
        drafter = self._drafter
        if drafter is None or rows == 0:
            return np.zeros(forwards.shape)
        if drafter == "early_exit":
            layer = self.exit_layer if exit_layer is None else exit_layer
            if layer is None:
                raise ValueError("exit_layer is required for the early_exit drafter (pass it, or set it in the constructor)")
            per = float(_interp_axis0(_interp_axis0(self._dtable, self._dl, float(layer)), self._db, float(rows)))
        else:
            per = float(_interp_axis0(self._dtable, self._db, float(rows)))
        if drafter == "prompt_lookup":
            return np.where(forwards > 0, per, 0.0)
        return per * forwards

    def prefill_time(self, prompt_lens: Any) -> float:
        lens = np.atleast_1d(np.asarray(prompt_lens, dtype=np.float64))
        if self._prefill is None or lens.size == 0:
            return 0.0
        if lens.min() < 0:
            raise ValueError("prompt_lens must be >= 0")
        grid, values = self._prefill
        return float(np.where(lens > 0, _interp_vec(grid, values, lens), 0.0).sum())

    @classmethod
    def from_json(cls, path: str | Path, **kwargs: Any) -> ProfileLatency:
        """Build from a profile JSON file."""
        return cls(_read_profile(path), **kwargs)


def _read_profile(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _profile_dir() -> Any:
    return resources.files("adaptk.sim").joinpath("data", "profiles")


def available_profiles() -> list[str]:
    """Names of the profiles bundled in ``adaptk/sim/data/profiles``."""
    try:
        return sorted(p.name[:-5] for p in _profile_dir().iterdir() if p.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def load_profile(name: str, **kwargs: Any) -> ProfileLatency:
    """A :class:`ProfileLatency` for the bundled profile ``name`` (keyword arguments pass through)."""
    names = available_profiles()
    if name not in names:
        raise ValueError(f"unknown profile {name!r}; bundled profiles: {names}")
    text = _profile_dir().joinpath(f"{name}.json").read_text(encoding="utf-8")
    return ProfileLatency(json.loads(text), **kwargs)


# ---------------------------------------------------------------------------------------------
# 2. SmartSpec regression
# ---------------------------------------------------------------------------------------------
def _poly(x: np.ndarray, degree: int) -> np.ndarray:
    """Polynomial features without the constant: x, and for degree 2 every x_i x_j (i <= j)."""
    if degree == 1:
        return x
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([x, x[:, i] * x[:, j]], axis=1)


def _fit_by_r2(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, holdout: float) -> dict:
    """Fit degree 1 and 2 least squares, keep the one with the better held-out R² (ties: degree 1)."""
    from sklearn.linear_model import LinearRegression  # lazy: scikit-learn only when fitting
    from sklearn.metrics import r2_score

    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    xs = x / scale
    m = xs.shape[0]
    order = rng.permutation(m)
    n_test = int(round(m * holdout))
    scores: dict[int, float] = {}
    if m >= 8 and n_test >= 2:
        test, train = order[:n_test], order[n_test:]
        for degree in (1, 2):
            feats = _poly(xs, degree)
            if train.size <= feats.shape[1]:
                continue
            reg = LinearRegression().fit(feats[train], y[train])
            pred = reg.predict(feats[test])
            scores[degree] = float(r2_score(y[test], pred)) if np.ptp(y[test]) > 0 else -float(np.abs(pred - y[test]).max())
    degree = 2 if 2 in scores and scores[2] > scores.get(1, -np.inf) + 1e-6 else 1
    reg = LinearRegression().fit(_poly(xs, degree), y)
    return {"degree": degree, "scale": scale.tolist(), "coef": reg.coef_.tolist(),
            "intercept": float(reg.intercept_), "r2": {str(k): v for k, v in scores.items()}}


def _eval_fit(fit: dict, x: np.ndarray) -> np.ndarray:
    feats = _poly(x / fit["_scale"], fit["degree"])
    return feats @ fit["_coef"] + fit["intercept"]


def _prepare(fit: dict | None) -> dict | None:
    if fit is not None:
        fit["_scale"] = np.asarray(fit["scale"], dtype=np.float64)
        fit["_coef"] = np.asarray(fit["coef"], dtype=np.float64)
    return fit


class RegressionLatency(LatencyModel):
    """SmartSpec's cost model: least squares on ``[B, Σ(k_i+1), Σ context]`` for verify.

    Verify seconds are regressed on ``x = [B, T, Σ context]`` with ``T`` the verified tokens
    (``Σ(k_i+1)`` packed, ``B · (max k_i + 1)`` padded) plus an intercept (the constant per-step
    overhead). Draft seconds are regressed on ``[F, F·R, F·L]`` (``F`` drafter forwards, ``R`` drafting
    rows, ``L`` exit layer or 0) plus an intercept, over steps that drafted, and are 0 when nothing
    is drafted. For each of the two fits, a linear and a degree-2 polynomial model are fitted on a
    seeded random 75% of the samples and the one with the better R² on the other 25% is kept
    (ties go to linear), then refitted on all samples. scikit-learn is imported only in
    :meth:`fit`; prediction is plain numpy.

    ``observe`` appends to a bounded sample buffer and refits every ``refit_every`` observations
    (never, by default: SmartSpec profiles offline).

    >>> truth = RooflineLatency.from_preset("h100-llama3-8b")
    >>> model = RegressionLatency.from_model(truth, batch_sizes=[1, 8, 32, 64], ks=[0, 2, 4, 8],
    ...                                      context_lens=[256, 1024], seed=0)
    >>> model.verify_fit["degree"] in (1, 2)
    True
    >>> bool(abs(model.predict(8, [4] * 8, [512] * 8) / truth.predict(8, [4] * 8, [512] * 8) - 1) < 0.2)
    True
    """

    def __init__(self, ragged: str = "padded", holdout: float = 0.25, seed: int = 0,
                 refit_every: int | None = None, max_samples: int = 10_000) -> None:
        self.ragged = _check_ragged(ragged)
        self.holdout = holdout
        self.seed = seed
        self.refit_every = refit_every
        self.max_samples = max_samples
        self.verify_fit: dict | None = None
        self.draft_fit: dict | None = None
        self._samples: list[list] = []
        self._since_fit = 0

    def _features(self, samples: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        xv, yv, xd, yd = [], [], [], []
        for s in samples:
            s = LatencySample(*s)
            batch = _check_batch(s.batch_size)
            k = _check_draft(s.num_draft_tokens, batch)
            ctx_sum, _ = _ctx_stats(s.context_lens, batch)
            _, total, rows, forwards = self._shape(batch, k)
            xv.append([batch, total, ctx_sum])
            yv.append(_check_time(s.verify_time_s, "verify_time_s"))
            if rows:
                layer = 0.0 if s.exit_layer is None else float(s.exit_layer)
                xd.append([forwards, forwards * rows, forwards * layer])
                yd.append(_check_time(s.draft_time_s, "draft_time_s"))
        return (np.asarray(xv, dtype=np.float64).reshape(-1, 3), np.asarray(yv),
                np.asarray(xd, dtype=np.float64).reshape(-1, 3), np.asarray(yd))

    def fit(self, samples: Iterable[Any]) -> RegressionLatency:
        """Fit on :class:`LatencySample`-like tuples (replaces the buffer). Returns ``self``."""
        samples = [list(LatencySample(*s)) for s in samples]
        if not samples:
            raise ValueError("samples must not be empty")
        self._samples = samples[-self.max_samples:]
        self._refit()
        return self

    def _refit(self) -> None:
        xv, yv, xd, yd = self._features(self._samples)
        rng = np.random.default_rng(self.seed)
        self.verify_fit = _prepare(_fit_by_r2(xv, yv, rng, self.holdout))
        # a quadratic can dip to zero or below outside the profiled points; no verify pass is
        # faster than half the fastest one measured
        self.verify_fit["floor"] = 0.5 * float(np.min(yv))
        self.draft_fit = _prepare(_fit_by_r2(xd, yd, rng, self.holdout)) if len(yd) else None
        self._since_fit = 0

    def _require_fit(self) -> dict:
        if self.verify_fit is None:
            raise RuntimeError("RegressionLatency has not been fitted: call fit(samples) or from_model(...)")
        return self.verify_fit

    def _verify(self, batch: int, n: np.ndarray, total: np.ndarray, ctx_sum: float, ctx_max: float) -> np.ndarray:
        fit = self._require_fit()
        x = np.empty((total.size, 3))
        x[:, 0] = batch
        x[:, 1] = total
        x[:, 2] = ctx_sum
        return np.maximum(_eval_fit(fit, x), fit.get("floor", 0.0))

    def _draft(self, rows: int, forwards: np.ndarray, ctx_sum: float, exit_layer: int | None) -> np.ndarray:
        fit = self.draft_fit
        if fit is None or rows == 0:
            return np.zeros(forwards.shape)
        x = np.empty((forwards.size, 3))
        x[:, 0] = forwards
        x[:, 1] = forwards * rows
        x[:, 2] = forwards * (0.0 if exit_layer is None else float(exit_layer))
        return np.where(forwards > 0, np.maximum(_eval_fit(fit, x), 0.0), 0.0)

    def observe(self, batch_size: int, num_draft_tokens: Any, context_lens: Any, draft_time_s: float,
                verify_time_s: float, exit_layer: int | None = None) -> None:
        super().observe(batch_size, num_draft_tokens, context_lens, draft_time_s, verify_time_s, exit_layer)
        ctx = np.asarray(context_lens).tolist()
        self._samples.append([int(batch_size), np.asarray(num_draft_tokens).tolist(), ctx,
                              float(draft_time_s), float(verify_time_s), exit_layer])
        del self._samples[:-self.max_samples]
        self._since_fit += 1
        if self.refit_every and self._since_fit >= self.refit_every:
            self._refit()

    @classmethod
    def from_model(cls, model: LatencyModel, batch_sizes: Sequence[int], ks: Sequence[int],
                   context_lens: Sequence[int], seed: int = 0, exit_layers: Sequence[int | None] = (None,),
                   num_ragged: int = 0, noise: float = 0.0, **kwargs: Any) -> RegressionLatency:
        """"Profile" ``model`` on a grid and fit to it (how a profiled controller gets offline data).

        One sample per (batch size, uniform k, context length, exit layer), plus ``num_ragged``
        samples with random per-sequence k, each timing multiplied by ``1 + noise·N(0, 1)``.
        ``ragged`` defaults to ``model.ragged``.
        """
        rng = np.random.default_rng(seed)
        kwargs.setdefault("ragged", model.ragged)
        kwargs.setdefault("seed", seed)
        samples = []

        def add(batch: int, k: np.ndarray, ctx: int, layer: int | None) -> None:
            contexts = np.full(batch, ctx)
            draft, verify = model.predict_components(batch, k, contexts, layer)
            jitter = 1.0 + noise * rng.standard_normal(2) if noise else np.ones(2)
            samples.append(LatencySample(batch, k, contexts, max(draft * jitter[0], 0.0),
                                         max(verify * jitter[1], 0.0), layer))

        for layer in exit_layers:
            for batch in batch_sizes:
                for k in ks:
                    for ctx in context_lens:
                        add(int(batch), np.full(int(batch), int(k)), int(ctx), layer)
        for _ in range(num_ragged):
            batch = int(rng.choice(batch_sizes))
            add(batch, rng.integers(0, max(ks) + 1, size=batch), int(rng.choice(context_lens)),
                exit_layers[int(rng.integers(len(exit_layers)))])
        return cls(**kwargs).fit(samples)

    def state_dict(self) -> dict:
        clean = lambda fit: None if fit is None else {k: v for k, v in fit.items() if not k.startswith("_")}  # noqa: E731
        return {"verify_fit": clean(self.verify_fit), "draft_fit": clean(self.draft_fit),
                "samples": [[s[0], np.asarray(s[1]).tolist(), np.asarray(s[2]).tolist(), float(s[3]), float(s[4]), s[5]]
                            for s in self._samples],
                "since_fit": self._since_fit}

    def load_state_dict(self, state: dict) -> None:
        self.verify_fit = _prepare(dict(state["verify_fit"])) if state["verify_fit"] else None
        self.draft_fit = _prepare(dict(state["draft_fit"])) if state["draft_fit"] else None
        self._samples = [list(s) for s in state["samples"]]
        self._since_fit = int(state["since_fit"])


# ---------------------------------------------------------------------------------------------
# 3. learned online, no offline profile
# ---------------------------------------------------------------------------------------------
class _ForgettingLeastSquares:
    """Exponentially weighted least squares (forgetting ``lam``) regularised toward a prior mean.

    ``theta`` minimises ``Σ_i lam^(t−i) (y_i − x_i·θ)² + ‖θ − prior‖² / prior_var``. The textbook
    recursive update forgets its prior along with old data: in directions the data do not excite
    (at one batch size the batch feature is a constant) its covariance grows or, clipped, turns
    indefinite, and noisy timings then throw ``θ`` far off (a verify priced at 0 s or at 4.8 s where
    steps took 40–80 ms). Here the prior keeps its weight, so ``θ`` stays at the prior where the
    data say nothing, and the system solved is always positive definite. ``θ`` is solved lazily
    (a 5×5 system) when read after an update.
    """

    def __init__(self, theta: np.ndarray, prior_var: float, lam: float) -> None:
        self.prior = theta.astype(np.float64)
        self.ridge = 1.0 / prior_var
        self.lam = lam
        self.info = np.zeros((theta.size, theta.size))  # Σ lam^(t−i) x_i x_iᵀ
        self.moment = np.zeros(theta.size)              # Σ lam^(t−i) x_i y_i
        self._theta: np.ndarray | None = self.prior.copy()

    def update(self, x: np.ndarray, y: float) -> None:
        self.info *= self.lam
        self.info += np.outer(x, x)
        self.moment *= self.lam
        self.moment += x * y
        self._theta = None

    @property
    def theta(self) -> np.ndarray:
        if self._theta is None:
            regularised = self.info + self.ridge * np.eye(len(self.prior))
            self._theta = np.linalg.solve(regularised, self.moment + self.ridge * self.prior)
        return self._theta

    def state_dict(self) -> dict:
        return {"info": self.info.tolist(), "moment": self.moment.tolist()}

    def load_state_dict(self, state: dict) -> None:
        info = np.asarray(state["info"], dtype=np.float64)
        moment = np.asarray(state["moment"], dtype=np.float64)
        if info.shape != self.info.shape or moment.shape != self.moment.shape:
            raise ValueError(f"state regression of shape {info.shape} does not fit this model's {self.info.shape}")
        self.info, self.moment, self._theta = info, moment, None


class OnlineLatency(LatencyModel):
    """A cost model learned from :meth:`observe` alone — no offline profiling.

    Verify seconds = a global regression + a table of local corrections:

    * a least-squares fit with exponential forgetting (``forget``), regularised toward the prior,
      on the features ``[1, B, T, Σctx, T·ctx]`` (``T`` verified tokens, ``ctx`` the mean context
      under ``"packed"``, the longest under ``"padded"``), which captures the smooth trend and
      extrapolates to batch sizes, lengths and contexts never seen;
    * cells indexed by (batch size on a log2 grid 1, 2, 4, …, ``max_batch``; context on a log2
      grid 16, 32, …, ``max_context``; tokens per row 1 … ``max_tokens``). Measured curves have
      steps and dips (SmolLM2 on CPU jumps at n=4 and is not monotone at batch 1) that no small
      regression represents; the cells learn them exactly where the engine actually runs. Each
      cell keeps an EWMA of the measured seconds ``ȳ`` and of the regression features ``x̄`` at
      those steps; its correction is ``ȳ − x̄·θ`` against the *current* regression ``θ`` (so it
      never goes stale as the regression moves). An observation updates its neighbouring cells
      with multilinear weights (log2 B, log2 ctx, tokens); a prediction blends them the same way;
      cells never observed contribute 0 (pure regression).

    Draft seconds: a second such fit on ``[1, F, F·R, F·L]`` (``F`` drafter forwards, ``R`` drafting
    rows, ``L`` exit layer or 0) for steps that drafted, 0 when nothing is drafted.

    Prior before any data (``prior_step_s`` = one plain decoding step at batch 1): a verify step
    costs ``prior_step_s · (1 + prior_token_cost · (T − 1))`` and a draft forward
    ``prior_draft_cost · prior_step_s``. With the defaults an extra token is cheap at batch 1 and
    dear at batch 64, so a goodput controller speculates at small batch (and thereby measures
    the costs) and backs off at large batch until data say otherwise. Data replace the prior
    within a few distinct observations.

    ``optimistic=True`` prices a verify longer than any measured near this batch size and context
    at the cost of the longest one measured (verify cost does not fall as tokens are added, so
    that is a lower bound). A controller that maximises goodput under it tries a longer draft
    once, measures it, and learns whether it pays; under the prior alone it would never learn
    that an H100 verifies 16 tokens per row for the price of 2. Unbounded, it suits packed
    batches, where a try costs only the tokens it adds; in a padded batch one long try makes every
    row pay for it (on this project's CPU a padded batch of 64 verifying 17 tokens per row takes
    many plain steps). ``reach`` bounds it: only lengths up to ``reach`` tokens per row beyond
    the longest measured are priced like it, longer ones as the model predicts. With ``reach=1``
    a controller walks up one token per row at a time and stops where the measured cost rises.

    Cells use step size ``max(w / count, weight_new · w)`` (``w`` the cell's share of the
    observation): an exact running mean at first, then an EWMA that follows drift; ``forget``
    does the same for the regressions.

    >>> model = OnlineLatency(prior_step_s=0.03)
    >>> model.predict_uniform(1, np.array([0, 4]), [100]).round(4)          # the prior
    array([0.03  , 0.0456])
    >>> for _ in range(20):
    ...     model.observe(1, [4], [100], draft_time_s=0.010, verify_time_s=0.050)
    >>> round(model.predict(1, [4], [100]), 3)
    0.06
    """

    def __init__(self, ragged: str = "padded", prior_step_s: float = 0.03, prior_token_cost: float = 0.03,
                 prior_draft_cost: float = 0.1, forget: float = 0.995, weight_new: float = 0.1,
                 max_tokens: int = 33, max_batch: int = 1024, max_context: int = 1 << 20,
                 optimistic: bool = False, reach: int | None = None) -> None:
        self.ragged = _check_ragged(ragged)
        self.optimistic = bool(optimistic)
        if reach is not None and (isinstance(reach, bool) or not isinstance(reach, int) or reach < 1):
            raise ValueError(f"reach must be None or an int >= 1, got {reach!r}")
        self.reach = reach
        self.prior_step_s = prior_step_s
        self.prior_token_cost = prior_token_cost
        self.prior_draft_cost = prior_draft_cost
        self.forget = forget
        self.weight_new = weight_new
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.max_context = max_context
        if not 0.0 < forget <= 1.0:
            raise ValueError(f"forget must lie in (0, 1], got {forget!r}")
        if not 0.0 < weight_new <= 1.0:
            raise ValueError(f"weight_new must lie in (0, 1], got {weight_new!r}")
        # feature scales keep the RLS well conditioned: [1, B/64, T/256, Σctx/65536, T·ctx/262144]
        self._vscale = np.array([1.0, 1 / 64, 1 / 256, 1 / 65536, 1 / 262144])
        self._dscale = np.array([1.0, 1 / 8, 1 / 64, 1 / 256])
        p, c = float(prior_step_s), float(prior_token_cost)
        self._verify_fit = _ForgettingLeastSquares(np.array([p * (1 - c), 0.0, p * c * 256, 0.0, 0.0]), 100.0, forget)
        self._draft_fit = _ForgettingLeastSquares(np.array([0.0, prior_draft_cost * p * 8, 0.0, 0.0]), 100.0, forget)
        nb = int(math.ceil(math.log2(max_batch))) + 1
        nc = int(math.ceil(math.log2(max_context / 16))) + 1
        self._bidx = [float(i) for i in range(nb)]
        self._cidx = [float(i) for i in range(nc)]
        self._ngrid = np.arange(1.0, max_tokens + 1)
        # per cell: EWMA of measured verify seconds, of the features at those steps, and weight seen
        self._ybar = np.zeros((nb, nc, max_tokens))
        self._xbar = np.zeros((nb, nc, max_tokens, 5))
        self._counts = np.zeros((nb, nc, max_tokens))

    def _vfeatures(self, batch: int, total: np.ndarray, ctx_sum: float, ctx_max: float) -> tuple[np.ndarray, float]:
        ctx = ctx_max if self.ragged == "padded" else ctx_sum / batch
        ctx_total = ctx_max * batch if self.ragged == "padded" else ctx_sum
        x = np.empty((total.size, 5))
        x[:, 0] = 1.0
        x[:, 1] = batch
        x[:, 2] = total
        x[:, 3] = ctx_total
        x[:, 4] = total * ctx
        return x * self._vscale, ctx

    def _corners(self, batch: int, ctx: float) -> list[tuple[int, int, float]]:
        """(batch bucket, context bucket, weight) of the neighbouring cells, weights > 0."""
        b0, b1, wb = _bracket(self._bidx, min(math.log2(batch), self._bidx[-1]))
        c0, c1, wc = _bracket(self._cidx, min(math.log2(ctx / 16.0), self._cidx[-1]) if ctx > 16 else 0.0)
        out = []
        for bi, bw in ((b0, 1.0 - wb), (b1, wb)) if b0 != b1 else ((b0, 1.0),):
            for ci, cw in ((c0, 1.0 - wc), (c1, wc)) if c0 != c1 else ((c0, 1.0),):
                if bw * cw > 0:
                    out.append((bi, ci, bw * cw))
        return out

    def _explored(self, corners: list[tuple[int, int, float]]) -> float:
        """The most tokens per row measured at these cells' batch sizes, at any context (0 when none)."""
        top = 0
        for bi in {bi for bi, _, _ in corners}:
            seen = np.flatnonzero(self._counts[bi].max(axis=0) >= 0.5)
            if seen.size:
                top = max(top, int(seen[-1]) + 1)
        return float(top)

    def _verify(self, batch: int, n: np.ndarray, total: np.ndarray, ctx_sum: float, ctx_max: float) -> np.ndarray:
        corners = self._corners(batch, ctx_max if self.ragged == "padded" else ctx_sum / batch)
        if self.optimistic:
            # a longer verify costs at least what the longest measured one did (and at least a
            # plain step): price it at that, as far as the reach goes. With a bounded reach nothing
            # is priced optimistically before a measurement, so plain decoding gets measured first.
            explored = self._explored(corners)
            limit = math.inf if self.reach is None else explored + self.reach
            clamp = np.where(n <= limit, np.minimum(n, max(explored, 1.0)) / np.maximum(n, 1.0), 1.0)
            n, total = n * clamp, total * clamp
        x, ctx = self._vfeatures(batch, total, ctx_sum, ctx_max)
        theta = self._verify_fit.theta
        if len(corners) == 1:
            bi, ci, _ = corners[0]
            row = self._ybar[bi, ci] - self._xbar[bi, ci] @ theta
        else:
            bs, cs, ws = zip(*corners, strict=True)
            w = np.asarray(ws)
            row = w @ self._ybar[bs, cs] - (np.tensordot(w, self._xbar[bs, cs], axes=1) @ theta)
        resid = np.interp(n, self._ngrid, row, right=0.0)
        return np.maximum(x @ theta + resid, 1e-3 * self.prior_step_s)

    def _dfeatures(self, rows: int, forwards: np.ndarray, exit_layer: int | None) -> np.ndarray:
        x = np.empty((forwards.size, 4))
        x[:, 0] = 1.0
        x[:, 1] = forwards
        x[:, 2] = forwards * rows
        x[:, 3] = forwards * (0.0 if exit_layer is None else float(exit_layer))
        return x * self._dscale

    def _draft(self, rows: int, forwards: np.ndarray, ctx_sum: float, exit_layer: int | None) -> np.ndarray:
        if rows == 0:
            return np.zeros(forwards.shape)
        pred = self._dfeatures(rows, forwards, exit_layer) @ self._draft_fit.theta
        return np.where(forwards > 0, np.maximum(pred, 0.0), 0.0)

    def observe(self, batch_size: int, num_draft_tokens: Any, context_lens: Any, draft_time_s: float,
                verify_time_s: float, exit_layer: int | None = None) -> None:
        batch = _check_batch(batch_size)
        k = _check_draft(num_draft_tokens, batch)
        ctx_sum, ctx_max = _ctx_stats(context_lens, batch)
        draft_s = _check_time(draft_time_s, "draft_time_s")
        verify_s = _check_time(verify_time_s, "verify_time_s")
        n, total, rows, forwards = self._shape(batch, k)
        xs, ctx = self._vfeatures(batch, np.array([total]), ctx_sum, ctx_max)
        x = xs[0]
        self._verify_fit.update(x, verify_s)
        lo = int(math.floor(n)) - 1
        frac = n - 1 - lo
        bs, cs, ns, ws = [], [], [], []
        for bi, ci, w in self._corners(batch, ctx):
            for ni, nw in ((lo, 1.0 - frac), (lo + 1, frac)):
                if nw > 0 and ni < self.max_tokens:
                    bs.append(bi)
                    cs.append(ci)
                    ns.append(ni)
                    ws.append(w * nw)
        if ws:
            idx = (np.asarray(bs), np.asarray(cs), np.asarray(ns))
            w = np.asarray(ws)
            self._counts[idx] += w
            step = np.maximum(w / self._counts[idx], self.weight_new * w)
            self._ybar[idx] += step * (verify_s - self._ybar[idx])
            self._xbar[idx] += step[:, None] * (x - self._xbar[idx])
        if rows:
            xd = self._dfeatures(rows, np.array([forwards]), exit_layer)[0]
            self._draft_fit.update(xd, draft_s)

    def state_dict(self) -> dict:
        seen = np.nonzero(self._counts)
        return {"verify_fit": self._verify_fit.state_dict(), "draft_fit": self._draft_fit.state_dict(),
                "cells": [a.tolist() for a in seen], "counts": self._counts[seen].tolist(),
                "ybar": self._ybar[seen].tolist(), "xbar": self._xbar[seen].tolist()}

    def load_state_dict(self, state: dict) -> None:
        idx = tuple(np.asarray(a, dtype=np.int64) for a in state["cells"])
        if len(idx) != 3 or any(a.size and a.max() >= dim for a, dim in zip(idx, self._counts.shape, strict=True)):
            raise ValueError(f"state cells do not fit this model's table of shape {self._counts.shape}")
        if "verify_fit" not in state:
            raise ValueError("state has no 'verify_fit': it was saved by an earlier adaptk, whose cost regression "
                             "kept a covariance instead; it cannot be read, start without it")
        self._verify_fit.load_state_dict(state["verify_fit"])
        self._draft_fit.load_state_dict(state["draft_fit"])
        self._counts[:] = 0.0
        self._ybar[:] = 0.0
        self._xbar[:] = 0.0
        if idx[0].size:
            self._counts[idx] = state["counts"]
            self._ybar[idx] = state["ybar"]
            self._xbar[idx] = np.asarray(state["xbar"], dtype=np.float64).reshape(-1, 5)


# ---------------------------------------------------------------------------------------------
# 4. analytic roofline
# ---------------------------------------------------------------------------------------------
class RooflineLatency(LatencyModel):
    """Analytic costs from hardware peaks and model shapes (no measurement).

    One forward of ``N`` new tokens per row for ``B`` rows (``T`` tokens in all) over contexts
    ``C_i`` costs ``max(FLOPs / (peak_flops · flops_efficiency · D),
    bytes / (mem_bandwidth · bandwidth_efficiency · D)) + forward_overhead_s
    + (D > 1) · num_layers · comm_overhead_s_per_layer`` on ``D`` tensor-parallel devices, with

    * ``FLOPs = 2 · P · T + 4 · layers · heads · head_dim · T · C`` (matmuls + attention),
    * ``bytes = P · bytes_per_param + 2 · layers · kv_heads · head_dim · kv_bytes · Σ C_i``
      (weights once per forward + K and V cache read),

    where ``C`` is the mean context (packed) or the longest (padded, which also reads ``B · max C``).
    Weights dominate at small ``T`` (memory bound: verifying ``k+1`` tokens costs about one token),
    FLOPs past the knee ``T ≈ P·bytes_per_param · peak / (2P · bandwidth)`` (a few hundred tokens on an
    H100), so the best fixed ``k`` falls as the batch grows.

    Drafters: ``draft_model`` — the ``draft`` shape, a 1-token forward per position on the same
    device(s) (not tensor-parallel: ``draft["num_devices"]`` defaults to 1); ``early_exit`` — a 1-token
    forward of the target's first ``exit_layer`` layers (parameters scaled by the layer fraction);
    ``prompt_lookup`` — ``prompt_lookup_s_per_seq`` per drafting row, once per step.

    Shapes are dicts with ``num_params, num_layers, num_heads, num_kv_heads, head_dim`` and
    optionally ``bytes_per_param`` (2), ``kv_bytes`` (2). Hardware: ``peak_flops,
    mem_bandwidth`` and optionally ``flops_efficiency`` (0.6), ``bandwidth_efficiency`` (0.8),
    ``forward_overhead_s`` (0.0005), ``num_devices`` (1), ``comm_overhead_s_per_layer`` (1e-5).

    >>> model = RooflineLatency.from_preset("h100-llama3-8b", drafter="prompt_lookup")
    >>> t = model.predict_uniform(1, np.array([0, 4]), [512])
    >>> bool(t[1] / t[0] < 1.05)          # batch 1: 5 tokens cost about one (memory bound)
    True
    >>> t = model.predict_uniform(128, np.array([0, 4]), np.full(128, 512))
    >>> bool(t[1] / t[0] > 2)             # batch 128: 640 tokens are past the knee
    True
    """

    def __init__(self, target: dict, hardware: dict, draft: dict | None = None, drafter: str | None = None,
                 ragged: str = "packed", exit_layer: int | None = None, prompt_lookup_s_per_seq: float = 2e-5,
                 name: str = "", kind: str = "analytic", description: str = "") -> None:
        self.target = dict(target)
        self.hardware = dict(hardware)
        self.draft = None if draft is None else dict(draft)
        if drafter is None:
            drafter = "draft_model" if draft is not None else "prompt_lookup"
        if drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {DRAFTERS}, got {drafter!r}")
        if drafter == "draft_model" and draft is None:
            raise ValueError("drafter='draft_model' needs a draft shape")
        self.drafter = drafter
        self.ragged = _check_ragged(ragged)
        self.exit_layer = exit_layer
        self.prompt_lookup_s_per_seq = prompt_lookup_s_per_seq
        self.name = name
        self.kind = kind
        self.description = description
        for key in ("num_params", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if key not in self.target:
                raise ValueError(f"target shape lacks {key!r}")
        for key in ("peak_flops", "mem_bandwidth"):
            if key not in self.hardware:
                raise ValueError(f"hardware lacks {key!r}")
        self.num_layers = int(self.target["num_layers"])

    def _forward(self, shape: dict, devices: int, total: np.ndarray, ctx_attn: float, ctx_read: float,
                 layer_fraction: float = 1.0) -> np.ndarray:
        hw = self.hardware
        params = shape["num_params"] * layer_fraction
        layers = shape["num_layers"] * layer_fraction
        attn = 4.0 * layers * shape["num_heads"] * shape["head_dim"]
        flops = 2.0 * params * total + attn * total * ctx_attn
        kv = 2.0 * layers * shape["num_kv_heads"] * shape["head_dim"] * shape.get("kv_bytes", 2)
        nbytes = params * shape.get("bytes_per_param", 2) + kv * ctx_read
        compute = flops / (hw["peak_flops"] * hw.get("flops_efficiency", 0.6) * devices)
        memory = nbytes / (hw["mem_bandwidth"] * hw.get("bandwidth_efficiency", 0.8) * devices)
        comm = layers * hw.get("comm_overhead_s_per_layer", 1e-5) if devices > 1 else 0.0
        return np.maximum(compute, memory) + hw.get("forward_overhead_s", 5e-4) + comm

    def _ctx(self, batch: int, ctx_sum: float, ctx_max: float) -> tuple[float, float]:
        if self.ragged == "padded":
            return ctx_max, ctx_max * batch
        return ctx_sum / batch, ctx_sum

    def _verify(self, batch: int, n: np.ndarray, total: np.ndarray, ctx_sum: float, ctx_max: float) -> np.ndarray:
        ctx_attn, ctx_read = self._ctx(batch, ctx_sum, ctx_max)
        return self._forward(self.target, int(self.hardware.get("num_devices", 1)), total, ctx_attn, ctx_read)

    def _draft(self, rows: int, forwards: np.ndarray, ctx_sum: float, exit_layer: int | None) -> np.ndarray:
        if rows == 0:
            return np.zeros(forwards.shape)
        if self.drafter == "prompt_lookup":
            return np.where(forwards > 0, rows * self.prompt_lookup_s_per_seq, 0.0)
        batch_ctx = ctx_sum / max(rows, 1)
        if self.drafter == "early_exit":
            layer = self.exit_layer if exit_layer is None else exit_layer
            if layer is None:
                raise ValueError("exit_layer is required for the early_exit drafter (pass it, or set it in the constructor)")
            one = self._forward(self.target, int(self.hardware.get("num_devices", 1)), np.array([float(rows)]),
                                batch_ctx, batch_ctx * rows, layer / self.num_layers)[0]
        else:
            one = self._forward(self.draft, int(self.draft.get("num_devices", 1)), np.array([float(rows)]),
                                batch_ctx, batch_ctx * rows)[0]
        return one * forwards

    def prefill_time(self, prompt_lens: Any) -> float:
        lens = np.atleast_1d(np.asarray(prompt_lens, dtype=np.float64))
        if lens.size == 0:
            return 0.0
        if lens.min() < 0:
            raise ValueError("prompt_lens must be >= 0")
        devices = int(self.hardware.get("num_devices", 1))
        total = float(lens.sum())
        ctx_attn = float((lens * lens).sum() / max(total, 1.0)) / 2.0  # causal: mean context ≈ len / 2
        return float(self._forward(self.target, devices, np.array([total]), ctx_attn, 0.0)[0]) if total else 0.0

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> RooflineLatency:
        """Build from :data:`adaptk.estimators.presets.PRESETS` (keyword arguments override)."""
        from adaptk.estimators.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        spec = copy.deepcopy({k: v for k, v in PRESETS[name].items() if k not in ("format", "version")})
        spec.update(kwargs)
        return cls(**spec)

    @classmethod
    def from_json(cls, path: str | Path, **kwargs: Any) -> RooflineLatency:
        """Build from an ``"adaptk-roofline"`` JSON file (the preset schema)."""
        spec = {k: v for k, v in _read_profile(path).items() if k not in ("format", "version")}
        spec.update(kwargs)
        return cls(**spec)


# ---------------------------------------------------------------------------------------------
# 5. one lookup
# ---------------------------------------------------------------------------------------------
def get_latency_model(name_or_path: str | Path | dict, drafter: str | None = None, **kwargs: Any) -> LatencyModel:
    """A latency model from a bundled profile name, a preset name, a JSON file path, or ``"online"``.

    JSON files are read by their ``format``: ``"adaptk-profile"`` (:class:`ProfileLatency`) or
    ``"adaptk-roofline"`` (:class:`RooflineLatency`). ``"online"`` is an :class:`OnlineLatency`
    that learns from step timings (``drafter`` does not apply to it and is ignored). Other keyword
    arguments (``ragged``, ``exit_layer``, …) go to the model's constructor.

    >>> get_latency_model("h100-llama3-8b").kind
    'analytic'
    >>> get_latency_model({"name": "online", "ragged": "packed"}).ragged
    'packed'
    >>> get_latency_model("no-such-model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown latency model 'no-such-model'; ...
    """
    from adaptk.estimators.presets import PRESETS

    if isinstance(name_or_path, dict):  # a JSON-safe spec: {"name": ..., "drafter": ..., "exit_layer": ...}
        spec = dict(name_or_path)
        if "name" not in spec:
            raise ValueError(f"latency model spec {name_or_path!r} has no 'name'")
        name_or_path = spec.pop("name")
        kwargs = {**spec, **kwargs}
    name = str(name_or_path)
    if name == ONLINE:
        return OnlineLatency(**kwargs)
    if drafter is not None:
        kwargs["drafter"] = drafter
    path = Path(name)
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"latency model file {name!r} does not exist")
        data = _read_profile(path)
        fmt = data.get("format")
        if fmt == "adaptk-profile":
            return ProfileLatency(data, **kwargs)
        if fmt == "adaptk-roofline":
            return RooflineLatency.from_json(path, **kwargs)
        raise ValueError(f"{name!r}: unknown format {fmt!r} (expected 'adaptk-profile' or 'adaptk-roofline')")
    if name in available_profiles():
        return load_profile(name, **kwargs)
    if name in PRESETS:
        return RooflineLatency.from_preset(name, **kwargs)
    raise ValueError(
        f"unknown latency model {name!r}; bundled profiles: {available_profiles()}, "
        f"presets: {sorted(PRESETS)}, or a path to a JSON file"
    )
