"""The flagship's batch objective against its per-step rule, on synthetic draft-model workloads.

At batch > 1, ``adaptk`` scores an allocation by the time to finish the work (a harmonic mean over
rows, ``objective="throughput"``, the default) rather than by the step's predicted tokens per second
(``objective="step"``): see "Batch objective" in the controller's docstring. The bundled traces
barely separate the two (prompt lookup on SmolLM2 rarely has stretches that are easy for long), so
this script measures it where the ground truth is known (:mod:`adaptk.sim.synthetic`):

* ``regime-switching`` — every sequence alternates between stretches of 20-60 tokens where draft
  tokens are accepted with probability 0.2 or 0.9;
* ``iid`` — every sequence accepts with its own fixed probability, drawn from U(0.3, 0.95).

Draft model, H100 preset (Llama-3-8B target, Llama-3.2-1B-shaped draft), exact replay, six seeds
per cell (each seed a different set of 24 sequences), relative to the best fixed ``k`` of the same
seed.

    python benchmarks/batch_objective.py     # ~6 min on 2 cores; writes benchmarks/results/batch-objective.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import adaptk
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.oracle import best_fixed
from adaptk.sim.replay import Workload, replay
from adaptk.sim.synthetic import iid_traces, regime_switching_traces

PROFILE = "h100-llama3-8b"
WORKLOADS = {
    "regime-switching": lambda seed: regime_switching_traces(seed=seed),
    "iid": lambda seed: iid_traces(alpha=(0.3, 0.95), seed=seed),
}
FIXED_KS = [0, 1, 2, 3, 4, 6, 8]


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def run_cell(workload: str, batch_size: int, seeds: list[int]) -> dict:
    relative: dict[str, list[float]] = {"throughput": [], "step": []}
    best_ks = []
    for seed in seeds:
        work = Workload(WORKLOADS[workload](seed))
        latency = get_latency_model(PROFILE, drafter="draft_model")
        requests = max(len(work), 4 * batch_size)
        k_best, _, best, _ = best_fixed(work, latency, batch_size, ks=FIXED_KS, num_requests=requests)
        best_ks.append(k_best)
        for objective in relative:
            controller = adaptk.make("adaptk", latency={"name": PROFILE, "drafter": "draft_model"}, objective=objective)
            result = replay(controller, work, latency, batch_size, num_requests=requests)
            relative[objective].append(result.token_goodput / best.token_goodput)
    return {
        "workload": workload, "batch_size": batch_size, "seeds": seeds, "best_fixed_k": best_ks,
        "relative_to_best_fixed": {objective: [round(v, 4) for v in values] for objective, values in relative.items()},
        "geomean_relative_to_best_fixed": {objective: round(geomean(values), 4) for objective, values in relative.items()},
        "worst_relative_to_best_fixed": {objective: round(min(values), 4) for objective, values in relative.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch-objective.json"))
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    cells = []
    print("| workload | batch | best fixed k (per seed) | throughput: geomean / worst | step: geomean / worst |")
    print("|---|---|---|---|---|")
    for workload in WORKLOADS:
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            cell = run_cell(workload, batch_size, seeds)
            cells.append(cell)
            mean, worst = cell["geomean_relative_to_best_fixed"], cell["worst_relative_to_best_fixed"]
            print(f"| {workload} | {batch_size} | {cell['best_fixed_k']} | {mean['throughput']:.3f} / "
                  f"{worst['throughput']:.3f} | {mean['step']:.3f} / {worst['step']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"profile": PROFILE, "drafter": "draft_model", "fixed_ks": FIXED_KS,
                                    "cells": cells}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
