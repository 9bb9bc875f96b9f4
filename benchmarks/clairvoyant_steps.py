"""How much a controller could gain at batch > 1 if it knew every row's acceptance in advance.

The clairvoyant oracle of ``adaptk bench`` exists at batch 1 only (an exact dynamic programme over
one sequence's positions). At batch B the schedule space couples every row, so this script measures a
**per-step clairvoyant** instead: each step it reads every running row's true match length ``m_i``
from the trace and picks the allocation of highest goodput *for that step* — under a padded cost (the
reference decoder) one batch cap ``K`` for every row, under a packed cost (vLLM) ``k_i = m_i`` for the
rows whose ``m_i`` reaches a threshold, best threshold taken. It is not a proven upper bound (a
schedule that gives up goodput now to land on better positions later could beat it), but no causal
controller knows ``m_i``; where even this one stays close to the best fixed ``k``, so must they.

A second column scores the same candidates with the flagship's batch objective (``adaptk``'s
docstring). Its weights stand for a row's lasting rate; a step's exact match length is not one, so
for this oracle it is not expected to help, and is reported only to show that.

    python benchmarks/clairvoyant_steps.py        # ~2 min; writes benchmarks/results/clairvoyant-steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from adaptk.bench.runner import SUITES, bundled_trace_paths, load_workloads
from adaptk.controllers.flagship import improve_by_batch_objective
from adaptk.core import SpeculationController
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.oracle import best_fixed
from adaptk.sim.replay import Workload, _request_order, replay
from adaptk.types import Decision, StepContext

ROOT = Path(__file__).resolve().parents[1]


class StepClairvoyant(SpeculationController):
    """Reads the trace it is replayed on: each row's match length at its current position."""

    def __init__(self, work: Workload, latency: object, num_requests: int, seed: int = 0,
                 objective: str = "step") -> None:
        super().__init__()
        self.work, self.latency, self.num_requests, self.seed = work, latency, num_requests, seed
        self.objective = objective
        self._order = _request_order(len(work), num_requests, seed)  # replay's request -> trace map

    def _decide(self, context: StepContext) -> Decision:
        work = self.work
        traces = self._order[context.seq_ids]
        flat = work.offsets[traces] + context.context_lens - work.prompt_lens[traces]
        offered = np.full(len(flat), context.k_max) if work.draft_avail is None else work.draft_avail[0, flat]
        useful = np.minimum(np.minimum(work.match_len[0, flat], offered), context.k_max).astype(np.int64)
        batch = len(flat)
        if self.latency.ragged == "padded":
            candidates = [np.minimum(useful, cap) for cap in range(context.k_max + 1)]
        else:
            candidates = [np.where(useful >= tau, useful, 0) for tau in range(1, context.k_max + 2)]
        tokens = np.stack(candidates, axis=1) + 1.0  # (rows, candidates): tokens each row emits
        costs = np.array([self.latency.predict(batch, lengths, context.context_lens) for lengths in candidates])
        i = int((tokens.sum(axis=0) / costs).argmax())
        if self.objective == "throughput" and batch > 1:
            i, _ = improve_by_batch_objective(tokens, costs, i)
        return Decision(candidates[i])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="smollm2-prompt-lookup/mixed")
    parser.add_argument("--batch-sizes", default="4,16,64")
    parser.add_argument("--profiles", default="smollm2-135m-cpu,h100-llama3-8b")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "clairvoyant-steps.json"))
    args = parser.parse_args(argv)
    workloads = load_workloads(list(bundled_trace_paths().values()), SUITES["standard"])
    rows = []
    for name in args.workloads.split(","):
        work = workloads[name]
        for profile in args.profiles.split(","):
            latency = get_latency_model(profile, drafter=work.traces.drafter)
            for batch in map(int, args.batch_sizes.split(",")):
                requests = max(len(work), SUITES["standard"].requests_per_slot * batch)
                k, _, fixed, _ = best_fixed(work, latency, batch, num_requests=requests)
                oracle = replay(StepClairvoyant(work, latency, requests), work, latency, batch, num_requests=requests)
                harmonic = replay(StepClairvoyant(work, latency, requests, objective="throughput"), work, latency,
                                  batch, num_requests=requests)
                rows.append({"workload": name, "cost_profile": profile, "batch_size": batch, "best_fixed_k": k,
                             "best_fixed_tok_s": fixed.token_goodput, "clairvoyant_step_tok_s": oracle.token_goodput,
                             "relative_to_best_fixed": oracle.token_goodput / fixed.token_goodput,
                             "clairvoyant_throughput_tok_s": harmonic.token_goodput,
                             "throughput_relative_to_best_fixed": harmonic.token_goodput / fixed.token_goodput})
                print(f"{name} {profile} b={batch}: best fixed k={k} {fixed.token_goodput:.1f} tok/s, per-step "
                      f"clairvoyant {oracle.token_goodput:.1f} ({oracle.token_goodput / fixed.token_goodput:.3f}x), "
                      f"with the batch objective {harmonic.token_goodput:.1f} "
                      f"({harmonic.token_goodput / fixed.token_goodput:.3f}x)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/clairvoyant_steps.py " + " ".join(argv or sys.argv[1:]),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
