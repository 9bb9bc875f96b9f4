"""Exact replay of a controller on recorded traces, at any batch size and arrival pattern.

The replay plays the engine's part of the step protocol: it builds a :class:`StepContext`
(including the drafter's hints), asks the controller, drafts ``min(k, available)`` tokens
(consulting the stop rule after each drafted token when the trace has the signal), accepts
``min(drafted, m_t)``, charges the step time from a latency model and hands the controller the
same :class:`Feedback` a real engine would. Under greedy verification this is an exact
counterfactual of the real run, given the latency model.

Batching is continuous: up to ``batch_size`` requests run at once, a finished request's slot is
refilled at the next step from the requests that have arrived (all at time 0 by default, or
Poisson arrivals at ``arrival_rate`` requests/s). Admitting requests costs their prefill, which
produces each request's first token.

``timing_noise`` models a shared, noisy machine: the step times handed to the controller are
multiplied by ``exp(σ·z_t)``, ``z`` a unit AR(1) process (``timing_noise_corr`` its step-to-step
correlation: 0 is independent jitter, 0.99 slow spells lasting ~100 steps), while the replay's
clock keeps the true times. Every controller is scored on the same work and the same clock, so
what the noise costs is what it does to the controller's decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adaptk.core import SpeculationController
from adaptk.sim.trace import TraceSet
from adaptk.types import Feedback, StepContext

__all__ = ["ReplayResult", "Workload", "replay"]


@dataclass(frozen=True)
class ReplayResult:
    """Metrics of one replay. Times are simulated seconds."""

    controller: str
    batch_size: int
    num_requests: int
    num_steps: int
    num_sequence_steps: int
    num_tokens: int
    total_time_s: float
    token_goodput: float
    mean_acceptance_length: float
    mean_num_draft_tokens: float
    acceptance_rate: float
    tpot_s: float
    ttft_mean_s: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p99_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Workload:
    """Flattened, replay-ready view of a :class:`TraceSet` (built once, reused by many replays)."""

    def __init__(self, traces: TraceSet) -> None:
        if not len(traces):
            raise ValueError("traces: the trace set is empty")
        self.traces = traces
        self.k_max = traces.k_max
        self.lengths = np.array([t.output_len for t in traces], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.prompt_lens = np.array([t.prompt_len for t in traces], dtype=np.int64)
        self.seq_index = np.repeat(np.arange(len(traces)), self.lengths)
        first = traces.traces[0]

        def stack(name: str) -> np.ndarray | None:
            if getattr(first, name) is None:
                return None
            return np.concatenate([getattr(t, name) for t in traces], axis=1)

        self.match_len = stack("match_len").astype(np.int64)
        avail = stack("draft_avail")
        self.draft_avail = None if avail is None else avail.astype(np.int64)
        ngram = stack("ngram_len")
        self.ngram_len = None if ngram is None else ngram.astype(np.int64)
        self.draft_prob = _as_float(stack("draft_prob"))
        self.draft_entropy = _as_float(stack("draft_entropy"))
        self.kl = _as_float(stack("kl"))
        self.layer_agree_cumsum = None
        if first.layer_agree is not None:
            # cumsum over positions with a leading zero row per trace, so matches over positions
            # [t, t + a] of trace s are cs[offset_s + s + t + a + 1] - cs[offset_s + s + t].
            rows = []
            for trace in traces:
                agree = trace.layer_agree.astype(np.int64)
                rows.append(np.vstack([np.zeros((1, agree.shape[1]), dtype=np.int64), np.cumsum(agree, axis=0)]))
            self.layer_agree_cumsum = np.vstack(rows)
        self.exit_layers = tuple(v for v in traces.variants if v is not None) or None
        self.num_layers = traces.num_layers

    def __len__(self) -> int:
        return len(self.lengths)

    def variant(self, exit_layer: int | None) -> int:
        return self.traces.variant_index(exit_layer)


def _as_float(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else array.astype(np.float64)


def _request_order(num_traces: int, num_requests: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    reps = math.ceil(num_requests / num_traces)
    return np.concatenate([rng.permutation(num_traces) for _ in range(reps)])[:num_requests]


def replay(
    controller: SpeculationController,
    traces: TraceSet | Workload,
    latency: Any,
    batch_size: int,
    *,
    arrival_rate: float | None = None,
    num_requests: int | None = None,
    seed: int = 0,
    exit_layer: int | None = None,
    timing_noise: float = 0.0,
    timing_noise_corr: float = 0.0,
) -> ReplayResult:
    """Replay ``controller`` on ``traces`` under ``latency`` (a latency model) and return metrics.

    Parameters
    ----------
    batch_size
        Concurrency limit (requests decoded together).
    arrival_rate
        Poisson arrival rate in requests/s; ``None`` means every request is waiting at time 0.
    num_requests
        Requests to serve, drawn by cycling through seeded permutations of the traces. Default:
        ``max(len(traces), 4 * batch_size)`` so that most steps run at the full batch.
    exit_layer
        Variant used when the controller does not choose an exit layer (early-exit traces); the
        deepest recorded exit layer by default.
    timing_noise, timing_noise_corr
        σ of the log-normal factor on the step times the controller is told, and the factor's
        AR(1) step-to-step correlation (see the module docstring); the score uses true times.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if arrival_rate is not None and not arrival_rate > 0:
        raise ValueError(f"arrival_rate must be positive, got {arrival_rate!r}")
    if not (isinstance(timing_noise, (int, float)) and 0.0 <= timing_noise < math.inf):
        raise ValueError(f"timing_noise must be a finite number >= 0, got {timing_noise!r}")
    if not (isinstance(timing_noise_corr, (int, float)) and 0.0 <= timing_noise_corr < 1.0):
        raise ValueError(f"timing_noise_corr must lie in [0, 1), got {timing_noise_corr!r}")
    work = traces if isinstance(traces, Workload) else Workload(traces)
    if num_requests is None:
        num_requests = max(len(work), 4 * int(batch_size))
    if num_requests < 1:
        raise ValueError("num_requests must be >= 1")
    order = _request_order(len(work), num_requests, seed)
    if arrival_rate is None:
        arrivals = np.zeros(num_requests)
    else:
        arrivals = np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / arrival_rate, num_requests))
    # without a choice from the controller, draft from the deepest recorded exit layer (the most
    # accurate drafter of the set)
    default_variant = work.variant(exit_layer if exit_layer is not None else (work.exit_layers or (None,))[-1])
    want = set(controller.required_signals)
    stop_rule = controller.stop_rule
    k_max = work.k_max

    # per-slot state of the running requests
    req = np.zeros(0, dtype=np.int64)          # request index
    pos = np.zeros(0, dtype=np.int64)          # output tokens produced so far (t)
    finish = np.full(num_requests, np.nan)
    first_token = np.full(num_requests, np.nan)
    now = 0.0
    next_request = 0
    num_steps = 0
    seq_steps = 0
    total_drafted = 0
    total_accepted = 0
    step_tokens = 0
    noise_rng = np.random.default_rng([seed, 2])
    noise_z = noise_rng.standard_normal() if timing_noise else 0.0
    innovation = math.sqrt(1.0 - timing_noise_corr**2)

    while next_request < num_requests or len(req):
        # admit arrived requests into free slots; their prefill yields the first token
        free = int(batch_size) - len(req)
        if free > 0 and next_request < num_requests:
            if not len(req) and arrivals[next_request] > now:
                now = float(arrivals[next_request])
            hi = next_request
            while hi < num_requests and hi - next_request < free and arrivals[hi] <= now:
                hi += 1
            if hi > next_request:
                admitted = np.arange(next_request, hi)
                now += float(latency.prefill_time(work.prompt_lens[order[admitted]]))
                first_token[admitted] = now
                single = work.lengths[order[admitted]] <= 1
                finish[admitted[single]] = now
                keep = admitted[~single]
                req = np.concatenate([req, keep])
                pos = np.concatenate([pos, np.ones(len(keep), dtype=np.int64)])
                next_request = hi
        if not len(req):
            continue

        trace_ids = order[req]
        n_out = work.lengths[trace_ids]
        flat = work.offsets[trace_ids] + pos
        seq_ids = req  # request index doubles as a stable sequence id
        context_lens = work.prompt_lens[trace_ids] + pos
        hint_avail = None if work.draft_avail is None else work.draft_avail[default_variant, flat]
        context = StepContext(
            step=num_steps,
            seq_ids=seq_ids,
            context_lens=context_lens,
            k_max=k_max,
            num_layers=work.num_layers,
            exit_layers=work.exit_layers,
            draft_available=hint_avail,
            match_ngram_lens=None if work.ngram_len is None else work.ngram_len[default_variant, flat],
            queue_len=int(np.searchsorted(arrivals, now, side="right") - next_request),
        )
        decision = controller.decide(context)
        variant = default_variant if decision.exit_layer is None else work.variant(decision.exit_layer)
        cost_layer = work.traces.variants[variant]
        drafted = decision.num_draft_tokens
        if work.draft_avail is not None:
            drafted = np.minimum(drafted, work.draft_avail[variant, flat])
        width = int(drafted.max()) if len(drafted) else 0
        if width:
            last = work.offsets[trace_ids] + n_out - 1
            cols = np.minimum(flat[:, None] + np.arange(width)[None, :], last[:, None])
        if stop_rule is not None and width and work.draft_prob is not None:
            drafted = drafted.copy()
            for j in range(width):
                active = np.flatnonzero(drafted > j)
                if not len(active):
                    break
                probs = work.draft_prob[variant, cols[active, j]]
                ent = None if work.draft_entropy is None else work.draft_entropy[variant, cols[active, j]]
                stop = np.asarray(stop_rule.should_stop(seq_ids[active], j, probs, ent), dtype=bool)
                drafted[active[stop]] = j + 1
            width = int(drafted.max())
        accepted = np.minimum(np.minimum(drafted, work.match_len[variant, flat]), n_out - 1 - pos)

        draft_s, verify_s = latency.predict_components(len(req), drafted, context_lens, cost_layer)
        now += draft_s + verify_s
        if timing_noise:
            told = math.exp(timing_noise * noise_z)
            draft_s, verify_s = draft_s * told, verify_s * told
            noise_z = timing_noise_corr * noise_z + innovation * noise_rng.standard_normal()

        signals: dict[str, Any] = {}
        if width and (want or stop_rule is not None):
            for key, source in (("draft_probs", work.draft_prob), ("draft_entropies", work.draft_entropy),
                                ("kl_divergences", work.kl)):
                if source is not None and (key in want or stop_rule is not None):
                    signals[key] = source[variant, cols]
        if "layer_agreement" in want and work.layer_agree_cumsum is not None:
            base = work.offsets[trace_ids] + trace_ids + pos
            cs = work.layer_agree_cumsum
            signals["layer_matches"] = cs[base + accepted + 1] - cs[base]
            signals["layer_compared"] = np.repeat((accepted + 1)[:, None], cs.shape[1], axis=1)

        pos = pos + accepted + 1
        done = pos >= n_out
        controller.update(
            Feedback(
                seq_ids=seq_ids,
                num_draft_tokens=drafted,
                num_accepted_tokens=accepted,
                draft_time_s=draft_s,
                verify_time_s=verify_s,
                step=num_steps,
                exit_layer=decision.exit_layer,
                finished=done,
                **signals,
            )
        )
        num_steps += 1
        seq_steps += len(req)
        total_drafted += int(drafted.sum())
        total_accepted += int(accepted.sum())
        step_tokens += int(accepted.sum()) + len(req)
        if done.any():
            for seq_id in req[done].tolist():
                controller.on_sequence_end(seq_id)
            finish[req[done]] = now
            req, pos = req[~done], pos[~done]

    lengths = work.lengths[order]
    latencies = finish - arrivals
    decode_tokens = lengths - 1
    tpot = (finish - first_token)[decode_tokens > 0] / decode_tokens[decode_tokens > 0]
    num_tokens = int(lengths.sum())
    return ReplayResult(
        controller=repr(controller),
        batch_size=int(batch_size),
        num_requests=num_requests,
        num_steps=num_steps,
        num_sequence_steps=seq_steps,
        num_tokens=num_tokens,
        total_time_s=now,
        token_goodput=num_tokens / now if now > 0 else math.inf,
        mean_acceptance_length=step_tokens / seq_steps if seq_steps else 0.0,
        mean_num_draft_tokens=total_drafted / seq_steps if seq_steps else 0.0,
        acceptance_rate=total_accepted / total_drafted if total_drafted else 0.0,
        tpot_s=float(np.mean(tpot)) if len(tpot) else 0.0,
        ttft_mean_s=float(np.mean(first_token - arrivals)),
        latency_mean_s=float(np.mean(latencies)),
        latency_p50_s=float(np.percentile(latencies, 50)),
        latency_p99_s=float(np.percentile(latencies, 99)),
    )
