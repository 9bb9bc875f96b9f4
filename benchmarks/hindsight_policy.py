"""The best *static* policy over the flagship's own features, chosen in hindsight on the traces.

`adaptk bench` measures every controller against the clairvoyant oracle, which knows each step's
match length before drafting. A causal controller only knows what the engine tells it before
drafting. This script asks how far that information can go: it maps the features ``adaptk`` decides
from (the n-gram hint's matched suffix length, the sequence's last round and copy run, the
sequence's own acceptance-rate bucket: exactly the flagship's table cells) to a draft length with a
lookup table, and fits the table **on the very workload it is scored on** by coordinate ascent
(start: the best fixed ``k`` everywhere; every visited cell tries every length in ``LENGTHS``; keep
what raises replayed goodput; repeat). Overfitted to the test data, it is an optimistic yardstick for
a controller that must learn online from those features, though not a proven bound (an online
controller may exploit patterns a static table cannot express).

    python benchmarks/hindsight_policy.py      # ~20 min on 2 cores; writes benchmarks/results/hindsight-policy.json

Batch 1, SmolLM2 CPU profile, prompt lookup: the cells where the issue asks for
``relative_to_oracle >= 0.85``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from adaptk.bench.runner import SUITES, build_controller, bundled_trace_paths, load_workloads
from adaptk.controllers.flagship import _RUN_EDGES, _STALE_AFTER
from adaptk.core import SpeculationController
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.oracle import best_fixed, clairvoyant_batch1
from adaptk.sim.replay import Workload, replay
from adaptk.types import Decision, Feedback, StepContext

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "smollm2-135m-cpu"
TRACES = "smollm2-prompt-lookup"
LENGTHS = (0, 1, 2, 3, 4, 6, 8, 12, 16)


class StaticCellPolicy(SpeculationController):
    """``k = table[cell]`` with the flagship's cells: (n-gram bucket, last round, own-rate bucket).

    Unlisted cells get ``default``. Counts how often each cell was decided for (``visits``).
    """

    def __init__(self, table: dict[tuple[int, int, int], int], default: int, rate_weight: float = 0.3) -> None:
        super().__init__()
        self.table, self.default, self.rate_weight = table, default, rate_weight
        self.visits: dict[tuple[int, int, int], int] = {}
        self._history: dict[int, tuple[int, int, float]] = {}  # seq -> (last round, run, own rate)
        self._since_drafted: dict[int, int] = {}

    def _cell(self, seq_id: int, ngram: int) -> tuple[int, int, int]:
        last, _, rate = self._history.get(seq_id, (0, 0, -1.0))
        rate_bucket = 0 if rate < 0 else 1 + (rate >= 0.25) + (rate >= 0.6)
        return min(ngram, 3), last, rate_bucket

    def _decide(self, context: StepContext) -> Decision:
        if context.match_ngram_lens is None:
            raise ValueError("StaticCellPolicy needs prompt-lookup traces (match_ngram_lens)")
        lengths = []
        for seq_id, ngram in zip(context.seq_ids.tolist(), context.match_ngram_lens.tolist(), strict=True):
            cell = self._cell(seq_id, ngram)
            self.visits[cell] = self.visits.get(cell, 0) + 1
            lengths.append(self.table.get(cell, self.default))
        return Decision(np.minimum(np.array(lengths, dtype=np.int64), context.k_max))

    def _update(self, feedback: Feedback) -> None:
        for seq_id, drafted, accepted in zip(feedback.seq_ids.tolist(), feedback.num_draft_tokens.tolist(),
                                             feedback.num_accepted_tokens.tolist(), strict=True):
            last, run, rate = self._history.get(seq_id, (0, 0, -1.0))
            if drafted == 0:
                idle = self._since_drafted[seq_id] = self._since_drafted.get(seq_id, 0) + 1
                if idle == _STALE_AFTER:  # the flagship forgets the last round of a long-idle sequence
                    self._history[seq_id] = (0, run, rate)
                continue
            self._since_drafted[seq_id] = 0
            accepted = min(accepted, drafted)
            if accepted == drafted:
                run += accepted
                last = 3 + int(np.searchsorted(_RUN_EDGES, run, side="right"))
            else:
                run, last = 0, (2 if accepted else 1)
            observed = accepted / drafted
            rate = observed if rate < 0 else (1 - self.rate_weight) * rate + self.rate_weight * observed
            self._history[seq_id] = (last, run, rate)

    def _end_sequence(self, seq_id: int) -> None:
        self._history.pop(seq_id, None)
        self._since_drafted.pop(seq_id, None)


def fit(work: Workload, latency: object, start: int, sweeps: int) -> tuple[float, dict]:
    """Coordinate ascent over the cells visited; returns (goodput, table)."""
    table: dict[tuple[int, int, int], int] = {}
    policy = StaticCellPolicy(table, start)
    best = replay(policy, work, latency, 1).token_goodput
    visited = policy.visits
    for _ in range(sweeps):
        improved = False
        for cell in sorted(visited, key=visited.get, reverse=True):
            if cell[0] == 0:  # no n-gram match: nothing to draft whatever the length
                continue
            for length in LENGTHS:
                if length == table.get(cell, start):
                    continue
                trial = {**table, cell: length}
                policy = StaticCellPolicy(trial, start)
                goodput = replay(policy, work, latency, 1).token_goodput
                if goodput > best:
                    best, table, improved = goodput, trial, True
                    visited = {**visited, **policy.visits}
        if not improved:
            break
    return best, table


def run_workload(args: tuple[str, int]) -> dict:
    name, sweeps = args
    work = load_workloads([bundled_trace_paths()[TRACES]], SUITES["standard"])[name]
    latency = get_latency_model(PROFILE, drafter=work.traces.drafter)
    k, _, fixed, _ = best_fixed(work, latency, 1)
    oracle = clairvoyant_batch1(work, latency).token_goodput
    adaptk = replay(build_controller("adaptk", PROFILE, work.traces.drafter), work, latency, 1).token_goodput
    hindsight, table = fit(work, latency, k, sweeps)
    return {
        "workload": name,
        "best_fixed_k": k,
        "goodput": {"best_fixed": fixed.token_goodput, "adaptk": adaptk, "hindsight_static": hindsight,
                    "clairvoyant": oracle},
        "relative_to_oracle": {"best_fixed": fixed.token_goodput / oracle, "adaptk": adaptk / oracle,
                               "hindsight_static": hindsight / oracle},
        "relative_to_best_fixed": {"adaptk": adaptk / fixed.token_goodput,
                                   "hindsight_static": hindsight / fixed.token_goodput},
        # the fitted table: [n-gram bucket, last round, own-rate bucket, k] for cells that differ from best_fixed_k
        "table": [[*cell, length] for cell, length in sorted(table.items()) if length != k],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="*", help="default: every prompt-lookup workload of the standard suite")
    parser.add_argument("--sweeps", type=int, default=3, help="coordinate-ascent sweeps (stops early when one gains nothing)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hindsight-policy.json")
    args = parser.parse_args(argv)
    names = args.workloads or sorted(load_workloads([bundled_trace_paths()[TRACES]], SUITES["standard"]))
    names = [n if n.startswith(TRACES) else f"{TRACES}/{n}" for n in names]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_workload, [(n, args.sweeps) for n in names]))
    print(f"{'workload':42s} {'fixed k':>7s}  {'relative to oracle: fixed  adaptk  hindsight':>44s}")
    for row in rows:
        r = row["relative_to_oracle"]
        print(f"{row['workload']:42s} {row['best_fixed_k']:7d}  {r['best_fixed']:27.3f} {r['adaptk']:7.3f} {r['hindsight_static']:10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/hindsight_policy.py " + " ".join(argv or sys.argv[1:]),
              "profile": PROFILE, "traces": TRACES, "batch_size": 1, "lengths": list(LENGTHS), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
