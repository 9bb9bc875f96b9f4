"""Hindsight limits every controller is measured against.

* :func:`best_fixed` — the best single draft length (and exit layer) for a whole workload, found
  by replaying every fixed choice: what a perfectly tuned static configuration achieves.
* :func:`clairvoyant_batch1` — the optimum over *all* schedules at batch 1, knowing every match
  length in advance. With ``T[t]`` the least time to finish a sequence from output position ``t``::

      T[n] = 0,   T[t] = min_{k, ℓ} cost(d, ℓ, context + t) + T[t + min(d, m_t(ℓ), n-1-t) + 1],
      d = min(k, available_t(ℓ))

  Requests are served one after another, so the workload's optimum is the sum over sequences
  (plus their prefills). No controller can beat it at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaptk.controllers.fixed import Fixed
from adaptk.sim.replay import ReplayResult, Workload, replay
from adaptk.sim.trace import TraceSet

__all__ = ["best_fixed", "clairvoyant_batch1", "OracleResult"]


@dataclass(frozen=True)
class OracleResult:
    token_goodput: float
    total_time_s: float
    num_tokens: int
    mean_acceptance_length: float


def best_fixed(
    traces: TraceSet | Workload,
    latency: object,
    batch_size: int,
    *,
    ks: list[int] | None = None,
    **replay_kwargs: object,
) -> tuple[int, int | None, ReplayResult, dict[tuple[int, int | None], ReplayResult]]:
    """Replay ``fixed(k)`` for every ``k`` (and recorded exit layer); return the best.

    Returns ``(k, exit_layer, result, all_results)``.
    """
    work = traces if isinstance(traces, Workload) else Workload(traces)
    ks = list(range(work.k_max + 1)) if ks is None else ks
    layers: tuple[int | None, ...] = work.exit_layers or (None,)
    results: dict[tuple[int, int | None], ReplayResult] = {}
    for layer in layers:
        for k in ks:
            if k == 0 and layer != layers[0]:
                results[(0, layer)] = results[(0, layers[0])]  # plain decoding ignores the layer
                continue
            results[(k, layer)] = replay(Fixed(k), work, latency, batch_size, exit_layer=layer, **replay_kwargs)
    (k, layer), result = max(results.items(), key=lambda item: item[1].token_goodput)
    return k, layer, result, results


def clairvoyant_batch1(traces: TraceSet | Workload, latency: object) -> OracleResult:
    """The batch-1 optimum over all schedules (module docstring)."""
    work = traces if isinstance(traces, Workload) else Workload(traces)
    ks = np.arange(work.k_max + 1)
    layers: tuple[int | None, ...] = work.exit_layers or (None,)
    total_time = float(latency.prefill_time(work.prompt_lens))
    total_steps = 0
    for s in range(len(work)):
        n = int(work.lengths[s])
        if n <= 1:
            continue
        lo = int(work.offsets[s])
        best = np.zeros(n + 1)
        steps = np.zeros(n + 1)
        # cost[ℓ][t, k]: step time at context prompt + t drafting min(k, avail) tokens
        candidates = []
        for layer in layers:
            v = work.variant(layer)
            avail = None if work.draft_avail is None else work.draft_avail[v, lo:lo + n]
            candidates.append((layer, v, avail))
        # state t = output tokens emitted (the first comes from prefill); T[n] = 0 is done
        for t in range(n - 1, 0, -1):
            context = np.array([int(work.prompt_lens[s]) + t])
            remaining = n - 1 - t
            option_times = []
            option_steps = []
            for layer, v, avail in candidates:
                drafted = ks if avail is None else np.minimum(ks, avail[t])
                accepted = np.minimum(np.minimum(drafted, work.match_len[v, lo + t]), remaining)
                cost = latency.predict_uniform(1, drafted, context, layer)
                nxt = t + accepted + 1
                option_times.append(cost + best[nxt])
                option_steps.append(1 + steps[nxt])
            times = np.concatenate(option_times)
            i = int(np.argmin(times))
            best[t] = times[i]
            steps[t] = np.concatenate(option_steps)[i]
        total_time += best[1]
        total_steps += int(steps[1])
    num_tokens = int(work.lengths.sum())
    decode_tokens = int((work.lengths - 1).clip(min=0).sum())
    return OracleResult(
        token_goodput=num_tokens / total_time if total_time > 0 else float("inf"),
        total_time_s=total_time,
        num_tokens=num_tokens,
        mean_acceptance_length=decode_tokens / total_steps if total_steps else 0.0,
    )
