"""``adaptk``: our own controller — per-sequence draft lengths that maximise predicted batch goodput."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adaptk.core import SpeculationController
from adaptk.estimators.latency import ONLINE, get_latency_model, is_online
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["AdaptK", "improve_by_batch_objective"]

_WIDTH = 32  # positions tracked per round; k_max beyond this is clipped
_NGRAM_BUCKETS = 5  # matched suffix length 0, 1, 2, 3+, and "no hint"
# new, last round rejected at once, partially accepted, fully accepted with a run of < 4, < 12 or
# more tokens accepted since the last rejection (long copy runs tend to go on)
_HISTORY_STATES = 6
_RUN_EDGES = np.array([4, 12])
_RATE_BUCKETS = 4  # unknown, < 0.25, < 0.6, >= 0.6
# Probing: after this many steps without drafting, allocate once under an upper confidence bound
# of the acceptance estimates (the interval doubles after every probe, up to _PROBE_MAX, and
# resets once drafting pays again). _PROBE_Z is the bound's width in posterior standard deviations.
_PROBE_START = 8
_PROBE_MAX = 1024
_PROBE_Z = 2.0
# The smoothed table is rebuilt every few updates: per-sequence features react at once, the
# pooled estimates need not, and the rebuild is most of an update's cost.
_REFRESH_EVERY = 4
_THRESHOLDS = np.array([0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05])
_LENGTHS = np.arange(_WIDTH + 1)
# From this batch size on, acceptance curves are computed per cell at refresh (all cells) rather than
# per row every step (the rows' cells only): same numbers, fewer operations once rows are many.
_CELL_CURVES_FROM_BATCH = 16
# At batch > 1, rounds of policy iteration on the batch objective (improve_by_batch_objective); on
# the synthetic regime-switching traces a third round (or a fifth) changed no decision.
_POLICY_PASSES = 2
# A sequence that has drafted nothing for this many steps forgets its last round: its history
# goes back to "new" (its own-rate bucket stays, so these are cells of their own, learned like any
# other). Without it a row judged hard by one round could stay undrafted, and unmeasured, for good.
_STALE_AFTER = 16


def improve_by_batch_objective(tokens: np.ndarray, costs: np.ndarray, start: int) -> tuple[int, float]:
    """Policy iteration on the batch objective (see ``AdaptK``): the chosen candidate and its value.

    ``tokens`` (rows, candidates) holds each row's expected tokens under each candidate allocation,
    ``costs`` (candidates,) its step seconds; candidate 0 is plain decoding and wins ties. Starting
    from candidate ``start`` as the reference, each pass picks the candidate of least
    ``T(k⃗) · Σ_i E_i(ref) / E_i(k_i)`` and makes it the reference. The value,
    ``Σ_i E_i(ref) / (T(k⃗) · Σ_i E_i(ref) / E_i(k_i))``, is the mean tokens per second per row at
    the answer (the per-step value when the answer is its own reference).

    >>> tokens = np.array([[1.0, 1.9, 2.71], [1.0, 1.2, 1.24], [1.0, 1.2, 1.24]])  # one easy row, two hard
    >>> costs = np.array([7.0, 9.48, 11.22])
    >>> int((tokens.sum(axis=0) / costs).argmax())                   # the step's tokens per second: k = 2
    2
    >>> improve_by_batch_objective(tokens, costs, start=2)[0]         # the time to finish the work: k = 1
    1
    """
    inverse = 1.0 / tokens
    i = start
    for _ in range(_POLICY_PASSES):
        reference = tokens[:, i]
        time_per_progress = costs * (reference @ inverse)
        time_per_progress[0] *= 1.0 - 1e-9
        previous, i = i, int(time_per_progress.argmin())
        if i == previous:
            break
    return i, float(reference.sum() / time_per_progress[i])


@register("adaptk")
class AdaptK(SpeculationController):
    """Choose every sequence's draft length to maximise predicted token goodput of the batch.

    Each step it predicts, for every sequence ``i`` and draft position ``j``, the probability
    ``c_ij`` that draft token ``j`` is accepted given that the ones before it were, turns that into
    the expected tokens emitted for every possible length, ``E_i(k) = 1 + Σ_{j<k} Π_{l≤j} c_il``,
    and picks the allocation ``k⃗`` that maximises ``Σ_i E_i(k_i) / T(B, k⃗, contexts)`` — ``k = 0``
    included, so it stops speculating where speculation does not pay.

    * **Acceptance** is a table of decayed Beta counts over position ``j`` and three context
      features known before drafting: the drafter's hint (for prompt lookup, the matched n-gram
      length), the sequence's last round (rejected at once / partial / fully accepted, the last
      split by how many tokens have been accepted since the last rejection: copy runs that have
      gone on long tend to go on; after 16 steps without drafting, "new" again) and the sequence's
      own acceptance rate. Sparse cells back off to coarser ones (hierarchical smoothing); a
      position not tried yet inherits the estimate of the position before it, which is the
      exploration: where the first positions are accepted, longer drafts get tried and
      measured, where they are not, nothing is spent (an optional UCB-style bonus on uncertain
      cells, ``exploration``, is off by default: on the bundled traces it only cost). For early-exit
      drafting the per-layer shadow agreement in ``Feedback.layer_matches`` gives every layer's
      acceptance each step, so the exit layer is chosen without trying each one; plain steps
      measure it too, so nothing is drafted until it has compared ``prior_strength`` positions,
      and, being free to measure, a layer's rate gets no optimism (it is shrunk toward 0).
    * **Cost** comes from the latency model: a profile or preset when ``latency`` names one (what
      ``adaptk bench`` passes as the profiling phase), otherwise learned online from the step
      timings in ``Feedback`` (:class:`~adaptk.estimators.latency.OnlineLatency`) — no profiling
      needed.
    * **Probing**: once nothing has been drafted for a while (doubling intervals), one step is
      allocated under an upper confidence bound of the first-position acceptance. Decayed counts
      age while nothing is drafted, so a stale "never" gets re-tested where drafting could pay,
      and nothing is spent where even the optimistic reading cannot (a compute-bound batch).
    * **Allocation** evaluates two families of candidates in one vectorised pass: a batch cap ``K``
      (``k_i = min(K, available_i)``, optimal when every row pays for the longest draft, as in a
      padded batch) and a survival threshold ``τ`` (``k_i`` = positions whose ``Π c ≥ τ``,
      optimal when cost follows total tokens, as in vLLM's packed batches).
    * **Batch objective**: at batch 1 the choice maximises expected tokens per second of the step.
      At batch > 1 that is myopic. Under continuous batching a row holds its slot for as many steps
      as its tokens take, so the batch holds the policy's own mix of easy and hard rows, and the
      time to finish the work is ``T · Σ_i N_i / E_i`` (a harmonic mean). Maximising
      ``Σ_i E_i / T`` each step races through easy stretches and fills the batch with hard rows.
      So candidates are scored against a reference allocation, by
      ``Σ_i E_i(ref) / (T(k⃗) · Σ_i E_i(ref) / E_i(k_i))``, starting from the per-step best and
      repeated once with the winner (policy iteration). ``objective="step"`` restores the
      per-step rule.

    Parameters
    ----------
    latency
        Cost profile / preset name, JSON path, or a spec dict for
        :func:`~adaptk.estimators.latency.get_latency_model`; ``None`` or ``"online"`` learns
        costs online from step timings (:class:`~adaptk.estimators.latency.OnlineLatency`),
        priced as a padded batch (every row pays for the longest draft, as in the reference
        decoder); ``{"name": "online", "ragged": "packed"}`` prices them by total tokens, as in
        vLLM (which :mod:`adaptk.adapters.vllm` passes). Either way verify lengths are explored
        optimistically (``optimistic=True``): a verify longer than any measured at this batch
        size is priced like the longest measured one, so it gets tried. Packed, any length is
        (a try costs only its own tokens); padded, only one token per row more (``reach=1``), so
        the lengths are walked up one at a time and the walk stops where the measured cost rises:
        a GPU that verifies several tokens per row for the price of one gets found out, and a CPU
        where the second token costs 3–6× the first pays for a few tries per batch size. Without
        it a large batch never leaves the prior's caution: on GPU-like padded costs at batch 64,
        0.90 of the best fixed ``k`` on average and 0.58 at worst, against 0.99 and 0.975 with it
        (``benchmarks/online_costs.py``).
    decay
        Per-step decay of the acceptance counts (``0.998`` ≈ a 500-step memory).
    prior_rate
        Acceptance assumed for a position with no data at all (optimistic, so it gets tried).
    prior_strength
        Pseudo-counts with which a cell leans on its coarser parent.
    exploration
        Weight of the optimism bonus ``exploration · sqrt(p(1−p)/(n+1))``.
    rate_weight
        EWMA weight of a sequence's own acceptance rate (feature).
    objective
        ``"throughput"`` (default): at batch > 1, score allocations by the batch objective above;
        ``"step"``: by the step's predicted tokens per second alone (the rule before it, kept for
        ablation). Identical at batch 1.

    Cost per step: about 49 µs for decide + update at batch 64 on this project's 2-core CPU
    (``benchmarks/bench_overhead.py``), just inside the 50 µs budget, the closest of any controller:
    a sequence's acceptance curves depend on its cell alone, so in a large batch they are computed
    per cell when the table is refreshed (every 4 updates), a step evaluates ~17 candidate
    allocations over the batch by gathers and one reduction, and the batch objective adds one or
    two matrix-vector products (a few µs). At batch 1 the refresh dominates (~62 µs per step).
    Either is well under 1% of a real step (≥ 30 ms on the CPU, ≥ 5 ms on an H100).

    >>> import adaptk
    >>> from adaptk import StepContext, Feedback
    >>> c = adaptk.make("adaptk", latency="h100-llama3-8b")
    >>> ctx = StepContext(step=0, seq_ids=[1], context_lens=[500], k_max=8, draft_available=[8], match_ngram_lens=[3])
    >>> int(c.decide(ctx).num_draft_tokens[0]) > 0          # batch 1 on an H100: speculation is nearly free
    True
    >>> for step in range(50):                                 # the drafts never match
    ...     k = c.decide(StepContext(step=step, seq_ids=[1], context_lens=[500], k_max=8,
    ...                              draft_available=[8], match_ngram_lens=[1])).num_draft_tokens
    ...     c.update(Feedback(seq_ids=[1], num_draft_tokens=k, num_accepted_tokens=[0]))
    >>> int(c.decide(StepContext(step=50, seq_ids=[1], context_lens=[500], k_max=8,
    ...                          draft_available=[8], match_ngram_lens=[1])).num_draft_tokens[0])
    0
    """

    required_signals = frozenset({"layer_agreement"})
    _TRANSIENT = ("_cost_cache", "_cached_ids", "_cached_slots", "_curves_cache")

    def __init__(
        self,
        latency: str | dict | None = None,
        decay: float = 0.998,
        prior_rate: float = 0.5,
        prior_strength: float = 4.0,
        exploration: float = 0.0,
        rate_weight: float = 0.3,
        objective: str = "throughput",
    ) -> None:
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        if not 0.0 < prior_rate < 1.0:
            raise ValueError(f"prior_rate must lie in (0, 1), got {prior_rate!r}")
        if prior_strength <= 0 or exploration < 0 or not 0.0 < rate_weight <= 1.0:
            raise ValueError("prior_strength must be > 0, exploration >= 0 and rate_weight in (0, 1]")
        if objective not in ("throughput", "step"):
            raise ValueError(f"objective must be 'throughput' or 'step', got {objective!r}")
        self.latency = latency
        self.decay = decay
        self.prior_rate = prior_rate
        self.prior_strength = prior_strength
        self.exploration = exploration
        self.rate_weight = rate_weight
        self.objective = objective
        cells = _NGRAM_BUCKETS * _HISTORY_STATES * _RATE_BUCKETS
        # Per cell, decayed counts of rounds that tried exactly t positions (t = min(drafted,
        # accepted + 1)) and that accepted exactly a: an update adds one count per round, and the
        # per-position trials and successes are their reverse cumulative sums, taken at refresh.
        # Counts are stored inflated by _count_scale (= decay^-updates): decaying them all is then
        # one scalar multiply per update instead of two passes over the tables.
        self._tried_upto = np.zeros((cells, _WIDTH + 1))
        self._accepted_upto = np.zeros((cells, _WIDTH + 1))
        self._count_scale = 1.0
        self._accept = np.full((cells, _WIDTH), prior_rate)  # smoothed, optimistic estimates per cell
        self._curves_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # width -> _curves(_accept) per cell
        self._layer_matches: np.ndarray | None = None  # decayed shadow agreement per layer (early exit)
        self._layer_compared: np.ndarray | None = None
        self._layer_signal: bool | None = None  # whether the engine reports shadow agreement (None: unknown yet)
        self._layer_positions = 0  # positions shadow agreement has compared for every layer, ever
        # per-sequence state lives in slots so a step touches it with a few vectorised operations
        self._slot_of: dict[int, int] = {}
        # the slots of the last batch seen: batches mostly repeat from one step to the next
        self._cached_ids: np.ndarray | None = None
        self._cached_slots = np.zeros(0, dtype=np.int64)
        self._free_slots: list[int] = []
        # the sequence's cell, less the drafter's hint: last round (0 new, 1 rejected at once,
        # 2 partial, 3-5 full) * _RATE_BUCKETS + own-rate bucket; it only changes in update
        self._cell_base = np.zeros(0, dtype=np.int64)
        self._own_rate = np.zeros(0)  # EWMA of accepted / drafted, -1 = unknown
        self._run = np.zeros(0, dtype=np.int64)  # tokens accepted since the sequence's last rejection
        self._since_drafted = np.zeros(0, dtype=np.int64)  # steps since the sequence last drafted
        self._last_cell = np.zeros(0, dtype=np.int64)
        self._last_context = np.zeros(0, dtype=np.int64)
        self._cost: Any = None
        self._learns_costs = False  # whether _cost is learned from feedback (set with _cost)
        self._drafter: str | None = None
        self._updates_since_refresh = 0
        self._cost_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._cost_observations = 0
        self._idle_steps = 0  # consecutive steps in which nothing was drafted
        self._probe_interval = _PROBE_START

    # -- cost model ------------------------------------------------------------------------------
    def _cost_model(self, context: StepContext) -> Any:
        if self._cost is None:
            if context.exit_layers is not None:
                self._init_cost("early_exit")
            elif context.draft_available is not None:
                self._init_cost("prompt_lookup")
            else:
                self._init_cost("draft_model")
        return self._cost

    def _init_cost(self, drafter: str) -> None:
        self._drafter = drafter
        self._learns_costs = is_online(self.latency)
        if self._learns_costs:
            spec = dict(self.latency) if isinstance(self.latency, dict) else {"name": ONLINE}
            # explore verify lengths optimistically: in a packed batch a try costs only its own
            # tokens, so any length gets tried; in a padded batch every row pays for the longest
            # draft, so only one token per row beyond the longest measured is priced like it
            spec.setdefault("optimistic", True)
            if spec.get("ragged", "padded") == "padded":
                spec.setdefault("reach", 1)
            self._cost = get_latency_model(spec)
        elif isinstance(self.latency, dict):
            self._cost = get_latency_model(self.latency)
        else:
            self._cost = get_latency_model(self.latency, drafter=drafter)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the cost model must exist before its learned state can be loaded into it
        drafter = state.get("state", {}).get("_drafter") if isinstance(state, dict) else None
        if isinstance(drafter, str) and self._cost is None:
            self._init_cost(drafter)
        super().load_state_dict(state)
        self._cached_ids = None

    def _cost_tables(self, batch: int, context_lens: np.ndarray, exit_layer: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``(verify, draft)`` seconds: verify by candidate index, draft by longest draft.

        Padded engines: verify is indexed by the longest draft ``K`` (every row verifies ``K+1``),
        and already includes the draft seconds. Packed engines: by the extra tokens ``Σ k_i``.
        Tables are cached per batch size and context bucket (10% steps), and rebuilt as an online
        cost model learns.
        """
        cost = self._cost
        ctx_sum = float(context_lens.sum())
        ctx_max = float(context_lens.max())
        version = self._cost_observations // 16 if self._learns_costs else 0
        key = (batch, int(math.log(ctx_sum + 1) * 10), int(math.log(ctx_max + 1) * 10), exit_layer, version)
        tables = self._cost_cache.get(key)
        if tables is None:
            if len(self._cost_cache) > 256:
                self._cost_cache.clear()
            forwards = np.arange(_WIDTH + 1, dtype=np.float64)
            if cost.ragged == "padded":
                n = forwards + 1.0
                verify = cost._verify(batch, n, n * batch, ctx_sum, ctx_max)
            else:
                total = batch + np.arange(batch * _WIDTH + 1, dtype=np.float64)
                verify = cost._verify(batch, total / batch, total, ctx_sum, ctx_max)
            draft = cost._draft(batch, forwards, ctx_sum, exit_layer)
            tables = (verify + draft, draft) if cost.ragged == "padded" else (verify, draft)
            self._cost_cache[key] = tables
        return tables

    def _candidate_costs(self, batch: int, lengths: np.ndarray, context_lens: np.ndarray,
                         exit_layer: int | None) -> np.ndarray:
        """Step seconds for each candidate column of ``lengths`` (batch, candidates)."""
        verify, draft = self._cost_tables(batch, context_lens, exit_layer)
        longest = lengths.max(axis=0)
        if self._cost.ragged == "padded":
            return verify[longest]
        return verify[lengths.sum(axis=0)] + draft[longest]

    # -- acceptance ------------------------------------------------------------------------------
    def _slots_of(self, seq_ids: np.ndarray, allocate: bool = True) -> np.ndarray:
        """Slot per sequence; the last batch's answer when the batch is the same."""
        cached = self._cached_ids
        if cached is not None and cached.shape == seq_ids.shape and (cached == seq_ids).all():
            return self._cached_slots
        ids = seq_ids.tolist()
        if allocate:
            slots = self._slots(ids)
        else:
            slots = np.fromiter(map(self._slot_of.__getitem__, ids), dtype=np.int64, count=len(ids))
        self._cached_ids, self._cached_slots = seq_ids.copy(), slots
        return slots

    def _slots(self, seq_ids: list[int]) -> np.ndarray:
        """Slot index per sequence, allocating slots for new sequences."""
        slot_of = self._slot_of
        for seq_id in seq_ids:
            if seq_id not in slot_of:
                if self._free_slots:
                    slot = self._free_slots.pop()
                else:
                    slot = len(self._cell_base)
                    grow = max(8, slot)
                    self._cell_base = np.concatenate([self._cell_base, np.zeros(grow, dtype=np.int64)])
                    self._own_rate = np.concatenate([self._own_rate, np.zeros(grow)])
                    self._run = np.concatenate([self._run, np.zeros(grow, dtype=np.int64)])
                    self._since_drafted = np.concatenate([self._since_drafted, np.zeros(grow, dtype=np.int64)])
                    self._last_cell = np.concatenate([self._last_cell, np.zeros(grow, dtype=np.int64)])
                    self._last_context = np.concatenate([self._last_context, np.zeros(grow, dtype=np.int64)])
                    self._free_slots.extend(range(slot + grow - 1, slot, -1))
                slot_of[seq_id] = slot
                self._cell_base[slot] = 0  # new, own rate unknown
                self._own_rate[slot] = -1.0
                self._run[slot] = 0
                self._since_drafted[slot] = 0
        return np.fromiter(map(slot_of.__getitem__, seq_ids), dtype=np.int64, count=len(seq_ids))

    def _features(self, context: StepContext, slots: np.ndarray) -> np.ndarray:
        """Cell index per sequence from (n-gram hint, last round, own rate)."""
        base = self._cell_base[slots]
        if context.match_ngram_lens is None:
            return base + 4 * _HISTORY_STATES * _RATE_BUCKETS
        return np.minimum(context.match_ngram_lens, 3) * (_HISTORY_STATES * _RATE_BUCKETS) + base

    def _refresh_acceptance(self) -> None:
        """Posterior means with backoff, plus the optimism bonus.

        Position 0 of a cell leans on coarser cells (same n-gram hint, then all cells); position
        ``j > 0`` leans on the same cell's position ``j − 1``: acceptance deep into a draft
        resembles acceptance just before it (long when the text is being copied), so positions the
        controller has not tried yet inherit a sensible, not an arbitrary, estimate.
        """
        m = self.prior_strength
        s, n = self._position_counts()
        shape = (_NGRAM_BUCKETS, _HISTORY_STATES, _RATE_BUCKETS)
        s0, n0 = s[:, 0].reshape(shape), n[:, 0].reshape(shape)
        p_all = (s0.sum() + m * self.prior_rate) / (n0.sum() + m)
        p_g = (s0.sum(axis=(1, 2)) + m * p_all) / (n0.sum(axis=(1, 2)) + m)
        p_gh = (s0.sum(axis=2) + m * p_g[:, None]) / (n0.sum(axis=2) + m)
        p = np.empty_like(s)
        p[:, 0] = ((s0 + m * p_gh[:, :, None]) / (n0 + m)).ravel()
        used = min(_WIDTH, (self._k_max or _WIDTH) + 1)
        for j in range(1, used):
            p[:, j] = (s[:, j] + m * p[:, j - 1]) / (n[:, j] + m)
        p[:, used:] = p[:, used - 1 : used]
        bonus = self.exploration * np.sqrt(p * (1 - p) / (n + 1))
        self._accept = np.clip(p + bonus, 0.0, 0.999)
        self._curves_cache = {}
        self._updates_since_refresh = 0

    def _position_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Decayed (successes, trials) per cell and position."""
        # position j was tried by rounds that tried more than j positions, accepted by those that accepted more than j
        tried = np.cumsum(self._tried_upto[:, ::-1], axis=1)[:, -2::-1]
        accepted = np.cumsum(self._accepted_upto[:, ::-1], axis=1)[:, -2::-1]
        return accepted / self._count_scale, tried / self._count_scale

    # -- the protocol ----------------------------------------------------------------------------
    def _decide(self, context: StepContext) -> Decision:
        batch = len(context.seq_ids)
        width = min(context.k_max, _WIDTH)
        slots = self._slots_of(context.seq_ids)
        if batch == 0 or width == 0:
            self._last_cell[slots] = 0
            return Decision(np.zeros(batch, dtype=np.int64))
        self._cost_model(context)
        if context.exit_layers is not None and self._layers_unmeasured():
            # shadow agreement measures every exit layer for free on plain steps: measure first
            self._last_cell[slots] = 0
            return Decision(np.zeros(batch, dtype=np.int64))
        cells = self._features(context, slots)
        cap = np.full(batch, width) if context.draft_available is None else np.minimum(context.draft_available, width)
        best_lengths, best_layer = self._allocate(cells, cap, context)
        if best_lengths.any():
            self._idle_steps, self._probe_interval = 0, _PROBE_START
        elif self._probe_due(context, cap):
            # act on an optimistic reading of the counts: probe only if some allocation could pay
            accept = self._optimistic_acceptance()[cells, :width]
            best_lengths, best_layer = self._allocate(cells, cap, context, accept)
        self._last_cell[slots] = cells
        if self._learns_costs:  # what an online cost model is told the step's contexts were
            self._last_context[slots] = context.context_lens
        return Decision(best_lengths.copy(), exit_layer=best_layer)  # not a view into the candidates

    @staticmethod
    def _curves(accept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row of ``accept`` (rows, width): expected tokens emitted for every length 0..width,
        and the length each survival threshold in ``_THRESHOLDS`` gives."""
        survival = np.cumprod(accept, axis=1)  # P(positions 0..j all accepted)
        expected = np.concatenate([np.ones((len(accept), 1)), 1.0 + np.cumsum(survival, axis=1)], axis=1)
        return expected, (survival[:, :, None] >= _THRESHOLDS[None, None, :]).sum(axis=1)

    def _cell_curves(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_curves` of every cell of the acceptance table, until it is next refreshed.

        A sequence's curves depend on its cell alone: in a large batch, computing them for every
        cell once per refresh instead of for every row every step is most of what keeps a
        decision cheap.
        """
        curves = self._curves_cache.get(width)
        if curves is None:
            curves = self._curves_cache[width] = self._curves(self._accept[:, :width])
        return curves

    def _allocate(self, cells: np.ndarray, cap: np.ndarray, context: StepContext,
                  accept: np.ndarray | None = None) -> tuple[np.ndarray, int | None]:
        """The candidate allocation (and exit layer) of highest predicted goodput (at batch > 1: under
        the batch objective).

        Acceptance comes from the table by ``cells``, from ``accept`` (batch, width) when given (the
        optimistic probe), or from an exit layer's shadow agreement where one has been measured.
        """
        batch, width = len(cells), min(context.k_max, _WIDTH)
        layers: tuple[int | None, ...] = context.exit_layers or (None,)
        best_value, best_lengths, best_layer = -np.inf, np.zeros(batch, dtype=np.int64), None
        uniform = np.minimum(_LENGTHS[None, : width + 1], cap[:, None])  # batch caps K = 0..width
        offsets = np.arange(0, batch * (width + 1), width + 1)[:, None]  # row starts in a flat (batch, width + 1)
        for layer in layers:
            if layer is not None and self._layer_compared is not None and layer - 1 < len(self._layer_compared):
                # shadow agreement of this layer: the same for every row. Plain steps measure it
                # for free, so it needs no optimism to get explored: it is shrunk toward 0.
                rate = self._layer_matches[layer - 1] / (self._layer_compared[layer - 1] + self.prior_strength)
                expected, counts = self._curves(np.full((1, width), rate))
                expected, counts = np.broadcast_to(expected, (batch, width + 1)), np.broadcast_to(counts, (batch, len(_THRESHOLDS)))
            elif accept is not None:
                expected, counts = self._curves(accept)
            elif batch < _CELL_CURVES_FROM_BATCH:
                expected, counts = self._curves(self._accept[cells, :width])
            else:
                expected, counts = self._cell_curves(width)
                expected, counts = expected[cells], counts[cells]
            thresholded = np.minimum(counts, cap[:, None])
            lengths = np.concatenate([uniform, thresholded], axis=1)
            tokens = np.take(expected, lengths + offsets)  # row i's expected tokens under candidate c
            costs = self._candidate_costs(batch, lengths, context.context_lens, layer)
            value = tokens.sum(axis=0) / costs
            value[0] *= 1.0 + 1e-9  # ties go to plain decoding
            i = int(value.argmax())
            chosen = value[i]
            if batch > 1 and self.objective == "throughput":
                i, chosen = improve_by_batch_objective(tokens, costs, i)
            if chosen > best_value:
                best_value, best_lengths, best_layer = chosen, lengths[:, i], layer
        return best_lengths, best_layer

    def _layers_unmeasured(self) -> bool:
        """Whether shadow agreement has yet to compare ``prior_strength`` positions per layer.

        Only while the engine reports it (or has not said yet): an engine that gives exit layers
        but no ``layer_matches`` is decided for from the acceptance table instead.
        """
        if self._layer_signal is False:
            return False
        return self._layer_positions < self.prior_strength

    def _probe_due(self, context: StepContext, cap: np.ndarray) -> bool:
        """Whether to reconsider "draft nothing" optimistically this step.

        An estimate that only changes when something is drafted would stay wrong forever once it
        says 0. So every so often (at doubling intervals while nothing is drafted) the controller
        allocates under an upper confidence bound of each acceptance estimate instead; as the
        decayed counts age, the bound widens, so stale "never" verdicts get re-tested, while
        where even the optimistic reading cannot pay (a compute-bound batch) nothing is spent.
        Early exit needs no probe: shadow agreement reports every layer's acceptance each step.
        """
        if context.exit_layers is not None or not cap.any():
            return False
        self._idle_steps += 1
        if self._idle_steps < self._probe_interval:
            return False
        self._idle_steps = 0
        self._probe_interval = min(2 * self._probe_interval, _PROBE_MAX)
        return True

    def _optimistic_acceptance(self) -> np.ndarray:
        """The estimates with the first position raised to its upper confidence bound.

        Only position 0 is raised: it decides whether a draft pays at all, and raising the deeper,
        rarely tried positions too would make every probe a long (and, in a busy batch, costly) one.
        """
        self._refresh_acceptance()
        optimistic = self._accept.copy()
        p = optimistic[:, 0]
        n = self._tried_upto[:, 1:].sum(axis=1) / self._count_scale + self.prior_strength
        optimistic[:, 0] = np.clip(p + _PROBE_Z * np.sqrt(p * (1 - p) / n), 0.0, 0.999)
        return optimistic

    def _update(self, feedback: Feedback) -> None:
        drafted, accepted = feedback.num_draft_tokens, feedback.num_accepted_tokens
        slots = self._slots_of(feedback.seq_ids, allocate=False)
        if self._cost is not None and len(slots) and feedback.verify_time_s > 0:
            if self._learns_costs:
                self._cost.observe(len(slots), np.minimum(drafted, _WIDTH), self._last_context[slots],
                                   feedback.draft_time_s, feedback.verify_time_s, feedback.exit_layer)
            self._cost_observations += 1
        self._count_scale /= self.decay
        if self._count_scale > 1e150:  # fold the scale back in long before it could overflow
            self._accepted_upto /= self._count_scale
            self._tried_upto /= self._count_scale
            self._count_scale = 1.0
        if feedback.layer_matches is None:
            if self._layer_signal is None and self._drafter == "early_exit":
                self._layer_signal = False
        else:
            self._layer_signal = True
            if self._layer_compared is None or len(self._layer_compared) != feedback.layer_matches.shape[1]:
                self._layer_matches = np.zeros(feedback.layer_matches.shape[1])
                self._layer_compared = np.zeros(feedback.layer_matches.shape[1])
            self._layer_matches = self._layer_matches * self.decay + feedback.layer_matches.sum(axis=0)
            compared = feedback.layer_compared.sum(axis=0)
            self._layer_compared = self._layer_compared * self.decay + compared
            self._layer_positions += int(compared.min())
        rounds = drafted > 0
        if not rounds.all():
            idle = slots[~rounds]
            self._since_drafted[idle] += 1
            stale = idle[self._since_drafted[idle] == _STALE_AFTER]
            self._cell_base[stale] %= _RATE_BUCKETS
        if not rounds.any():
            return
        slots = slots[rounds]
        self._since_drafted[slots] = 0
        d = np.minimum(drafted[rounds], _WIDTH)
        a = np.minimum(accepted[rounds], d)
        cells = self._last_cell[slots]
        np.add.at(self._tried_upto, (cells, np.minimum(d, a + 1)), self._count_scale)
        np.add.at(self._accepted_upto, (cells, a), self._count_scale)
        full = a == d
        run = np.where(full, self._run[slots] + a, 0)
        self._run[slots] = run
        history = np.where(full, 3 + np.searchsorted(_RUN_EDGES, run, side="right"), np.where(a > 0, 2, 1))
        observed = a / d
        old = self._own_rate[slots]
        rate = np.where(old < 0, observed, (1 - self.rate_weight) * old + self.rate_weight * observed)
        self._own_rate[slots] = rate
        self._cell_base[slots] = history * _RATE_BUCKETS + 1 + (rate >= 0.25) + (rate >= 0.6)
        self._updates_since_refresh += 1
        if self._updates_since_refresh >= _REFRESH_EVERY:
            self._refresh_acceptance()

    def _end_sequence(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id, None)
        self._cached_ids = None
        if slot is not None:
            self._free_slots.append(slot)
