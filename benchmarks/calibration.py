"""How well ``adaptk``'s acceptance estimates predict what happens, on the rounds it chose to draft.

Batch 1, SmolLM2 CPU profile, prompt lookup (the cells of ``hindsight_policy.py``). Every drafted
round logs the estimates the decision was made from (the controller's smoothed table, by the
round's cell) and what was accepted. Reported per workload:

* the first draft token: estimated acceptance against the measured rate, over all drafted rounds,
  over long rounds (``k >= 5``), and, for the cells long rounds came from, over every round of
  those cells (the estimate at the moments it chose to draft long, against its usual value);
* expected tokens per round (``1 + Σ Π c``) against tokens emitted, by draft length;
* with ``--sensitivity``: goodput of ``adaptk`` with slower count decay or stronger pooling
  (``decay``, ``prior_strength``), relative to the registered defaults, per workload and as a
  geometric mean: the two obvious ways to damp the estimates' noise.

    python benchmarks/calibration.py --sensitivity     # ~1 min; writes benchmarks/results/calibration.json

The estimates of probe steps (an optimistic reading of the same counts) are logged as the table
has them, so long probes read a little less optimistic here than they were.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

from adaptk.bench.runner import SUITES, bundled_trace_paths, load_workloads
from adaptk.controllers.flagship import AdaptK
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import replay
from adaptk.types import Decision, Feedback, StepContext

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "smollm2-135m-cpu"
TRACES = "smollm2-prompt-lookup"
LONG = 5
VARIANTS = ({"decay": 0.999}, {"decay": 0.9995}, {"decay": 0.9999},
            {"prior_strength": 2.0}, {"prior_strength": 8.0}, {"prior_strength": 16.0})


class LoggedAdaptK(AdaptK):
    """``adaptk`` as registered, logging each drafted round's estimates and outcome."""

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.rounds: list[dict] = []
        self._pending: dict[int, tuple[int, np.ndarray]] = {}

    def _decide(self, context: StepContext) -> Decision:
        decision = super()._decide(context)
        cells = self._last_cell[self._slots_of(context.seq_ids)]
        for seq_id, k, cell in zip(context.seq_ids.tolist(), decision.num_draft_tokens.tolist(), cells.tolist(),
                                   strict=True):
            if k > 0:
                self._pending[seq_id] = (cell, self._accept[cell, :k].copy())
        return decision

    def _update(self, feedback: Feedback) -> None:
        for seq_id, drafted, accepted in zip(feedback.seq_ids.tolist(), feedback.num_draft_tokens.tolist(),
                                             feedback.num_accepted_tokens.tolist(), strict=True):
            if drafted > 0 and seq_id in self._pending:
                cell, estimate = self._pending.pop(seq_id)
                self.rounds.append({"cell": cell, "k": drafted, "accepted": accepted, "estimate": estimate})
        super()._update(feedback)


def _first_token(rounds: list[dict]) -> dict:
    if not rounds:
        return {"rounds": 0}
    return {"rounds": len(rounds), "estimated": float(np.mean([r["estimate"][0] for r in rounds])),
            "measured": float(np.mean([r["accepted"] > 0 for r in rounds]))}


@functools.cache
def _workloads() -> dict:
    return load_workloads([bundled_trace_paths()[TRACES]], SUITES["standard"])


def sensitivity(names: list[str]) -> list[dict]:
    """Goodput of each variant in ``VARIANTS`` relative to the defaults, per workload."""
    latency = get_latency_model(PROFILE, drafter="prompt_lookup")
    workloads = _workloads()

    def goodputs(params: dict) -> np.ndarray:
        return np.array([replay(AdaptK(latency=PROFILE, **params), workloads[name], latency, 1).token_goodput
                         for name in names])

    default = goodputs({})
    rows = []
    for params in VARIANTS:
        ratio = goodputs(params) / default
        rows.append({"params": params, "relative_to_default": dict(zip(names, ratio.tolist(), strict=True)),
                     "geomean": float(np.exp(np.log(ratio).mean()))})
    return rows


def calibrate(workload_name: str) -> dict:
    workload = _workloads()[workload_name]
    latency = get_latency_model(PROFILE, drafter="prompt_lookup")
    controller = LoggedAdaptK(latency=PROFILE)
    result = replay(controller, workload, latency, 1)
    rounds = controller.rounds
    long_rounds = [r for r in rounds if r["k"] >= LONG]
    long_cells = {r["cell"] for r in long_rounds}
    by_length = {}
    for label, low, high in (("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), (f"{LONG}+", LONG, 10**9)):
        chosen = [r for r in rounds if low <= r["k"] <= high]
        if chosen:
            by_length[label] = {
                "rounds": len(chosen),
                "expected_tokens": float(np.mean([1 + np.cumprod(r["estimate"]).sum() for r in chosen])),
                "emitted_tokens": float(np.mean([1 + r["accepted"] for r in chosen])),
            }
    return {
        "workload": workload_name,
        "token_goodput": result.token_goodput,
        "first_token": {
            "all_rounds": _first_token(rounds),
            "long_rounds": _first_token(long_rounds),
            "all_rounds_of_the_long_rounds_cells": _first_token([r for r in rounds if r["cell"] in long_cells]),
        },
        "by_length": by_length,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="*", help="default: every prompt-lookup workload of the standard suite")
    parser.add_argument("--sensitivity", action="store_true", help="also replay the decay / prior_strength variants")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration.json")
    args = parser.parse_args(argv)
    names = args.workloads or sorted(_workloads())
    names = [n if n.startswith(TRACES) else f"{TRACES}/{n}" for n in names]
    rows = [calibrate(name) for name in names]
    print("first draft token, estimated/measured, over: all rounds | long rounds | every round of the long rounds' "
          "cells;  tokens per long round, expected/emitted")
    for row in rows:
        f = row["first_token"]
        cols = [f"{f[key]['estimated']:.3f}/{f[key]['measured']:.3f}" if f[key]["rounds"] else "—"
                for key in ("all_rounds", "long_rounds", "all_rounds_of_the_long_rounds_cells")]
        long_row = row["by_length"].get(f"{LONG}+")
        tokens = f"{long_row['expected_tokens']:.2f}/{long_row['emitted_tokens']:.2f}" if long_row else "—"
        print(f"{row['workload']:38s} {cols[0]:>12s} {cols[1]:>12s} {cols[2]:>12s}   {tokens:>10s}")
    result = {"command": "python benchmarks/calibration.py " + " ".join(argv or sys.argv[1:]),
              "profile": PROFILE, "traces": TRACES, "batch_size": 1, "long_from_k": LONG, "rows": rows}
    if args.sensitivity:
        result["sensitivity"] = sensitivity(names)
        print("adaptk with other settings, goodput relative to the defaults:")
        for row in result["sensitivity"]:
            per = " ".join(f"{v:.3f}" for v in row["relative_to_default"].values())
            print(f"  {json.dumps(row['params']):28s} geomean {row['geomean']:.3f}   ({per})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
