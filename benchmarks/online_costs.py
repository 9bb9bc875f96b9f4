"""Costs learned online: the flagship's bounded optimism against the cautious online model.

``adaptk`` without a cost profile (``latency=None``, what the Hugging Face adapter and the reference
decoder get unless told otherwise) learns step costs from the engine's timings. Each cell replays,
relative to the best fixed ``k`` of that cell:

* ``cautious``: the online model without optimism (``{"name": "online", "optimistic": false}``,
  the default before): a verify length never measured is priced by the prior and the regression;
* ``bounded``: the default, a padded online model with ``optimistic=True, reach=1`` (one token per
  row beyond the longest measured at this batch size is priced like it);
* ``profiled``: the cell's cost profile itself (what ``adaptk bench`` passes), for reference.

Regimes:

* ``cpu``: the measured SmolLM2-135M CPU profile (padded), the bundled prompt-lookup traces, five
  workloads, batch 1/4/16/64;
* ``gpu-padded``: the two analytic GPU presets run as padded engines (the reference decoder on a
  GPU), synthetic draft-model traces (i.i.d. high and middling acceptance, regime switching; three
  seeds each), batch 1/4/16/64.

Usage::

    python benchmarks/online_costs.py [--out benchmarks/results/online-costs.json]   # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import adaptk
from adaptk.bench.runner import bundled_trace_paths
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.oracle import best_fixed
from adaptk.sim.replay import Workload, replay
from adaptk.sim.synthetic import iid_traces, regime_switching_traces
from adaptk.sim.trace import TraceSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_objective import geomean  # noqa: E402

BATCH_SIZES = (1, 4, 16, 64)
CPU_WORKLOADS = ("math_reasoning", "qa", "summarization", "translation", "mixed")
GPU_PRESETS = ("h100-llama3-8b", "h100x4-llama3-70b")
SEEDS = (0, 1, 2)


def controllers(profile: str | dict[str, Any]) -> dict[str, Any]:
    return {"cautious": {"name": "online", "optimistic": False}, "bounded": None, "profiled": profile}


def synthetic(kind: str, seed: int) -> TraceSet:
    if kind == "iid-high":
        return iid_traces(n=24, alpha=(0.7, 0.95), seed=seed)
    if kind == "iid-mid":
        return iid_traces(n=24, alpha=(0.4, 0.7), seed=seed)
    return regime_switching_traces(n=24, seed=seed)


def cell(work: Workload, engine: Any, profile: str | dict[str, Any], batch_size: int, **labels: Any) -> dict[str, Any]:
    k, _, best, _ = best_fixed(work, engine, batch_size)
    row: dict[str, Any] = {**labels, "batch_size": batch_size, "best_fixed_k": k}
    for name, latency in controllers(profile).items():
        result = replay(adaptk.make("adaptk", latency=latency), work, engine, batch_size)
        row[name] = result.token_goodput / best.token_goodput
    print(" ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()),
          flush=True)
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in ("cautious", "bounded", "profiled"):
        values = [row[name] for row in rows]
        out[name] = {"geomean_vs_best_fixed": geomean(values), "worst_vs_best_fixed": min(values)}
    ratios = [row["bounded"] / row["cautious"] for row in rows]
    out["bounded_over_cautious"] = {"geomean": geomean(ratios), "worst": min(ratios), "best": max(ratios)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/online-costs.json"))
    args = parser.parse_args()

    cpu_rows = []
    traces = TraceSet.load(bundled_trace_paths()["smollm2-prompt-lookup"])
    engine = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    for workload in CPU_WORKLOADS:
        work = Workload(traces if workload == "mixed" else traces.subset(category=workload))
        for batch_size in BATCH_SIZES:
            cpu_rows.append(cell(work, engine, "smollm2-135m-cpu", batch_size, regime="cpu", workload=workload))

    gpu_rows = []
    for preset in GPU_PRESETS:
        engine = get_latency_model(preset, drafter="draft_model", ragged="padded")
        # the profiled reference must price the batch as the engine does: padded
        profile = {"name": preset, "drafter": "draft_model", "ragged": "padded"}
        for kind in ("iid-high", "iid-mid", "switching"):
            for seed in SEEDS:
                work = Workload(synthetic(kind, seed))
                for batch_size in BATCH_SIZES:
                    gpu_rows.append(cell(work, engine, profile, batch_size, regime="gpu-padded", preset=preset,
                                         workload=kind, seed=seed))

    results = {
        "command": "python benchmarks/online_costs.py",
        "summary": {"cpu": summary(cpu_rows), "gpu-padded": summary(gpu_rows),
                    **{f"gpu-padded b={b}": summary([r for r in gpu_rows if r["batch_size"] == b]) for b in BATCH_SIZES},
                    **{f"cpu b={b}": summary([r for r in cpu_rows if r["batch_size"] == b]) for b in BATCH_SIZES}},
        "cells": cpu_rows + gpu_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for regime in ("cpu", "gpu-padded"):
        print(regime, json.dumps(results["summary"][regime]))


if __name__ == "__main__":
    main()
