"""`adaptk bench` on exact replay: every controller on the same work, beside the oracles."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from adaptk import registry
from adaptk.core import SpeculationController
from adaptk.sim.oracle import best_fixed, clairvoyant_batch1
from adaptk.sim.replay import Workload, replay
from adaptk.sim.trace import TraceSet

__all__ = ["Suite", "SUITES", "bundled_trace_paths", "load_workloads", "run_bench", "build_controller"]

#: Cost profiles the default suites run under: the measured CPU profile of the model the traces
#: were recorded with, and an analytic H100 preset where batching makes speculation expensive.
DEFAULT_PROFILES = ("smollm2-135m-cpu", "h100-llama3-8b")


@dataclass(frozen=True)
class Suite:
    """What a bench run covers."""

    name: str
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    per_task_workloads: bool = True
    traces_per_task: int | None = None  # None = all bundled traces
    requests_per_slot: int = 4  # num_requests = max(len(traces), requests_per_slot * batch_size)
    profiles: tuple[str, ...] = DEFAULT_PROFILES
    fixed_ks: tuple[int, ...] | None = None  # draft lengths the best-fixed oracle tries (None: 0..k_max)


SUITES = {
    "quick": Suite("quick", per_task_workloads=False, traces_per_task=3, requests_per_slot=2,
                   fixed_ks=(0, 1, 2, 3, 4, 6, 8, 12, 16)),
    "standard": Suite("standard"),
}


def bundled_trace_paths() -> dict[str, Path]:
    """Bundled trace files by drafter name."""
    folder = resources.files("adaptk") / "sim" / "data" / "traces"
    paths = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".npz"):
            paths[entry.name[: -len(".npz")]] = Path(str(entry))
    return paths


def load_workloads(trace_paths: list[Path], suite: Suite) -> dict[str, Workload]:
    """Workloads by name: ``<trace file>/mixed`` (all tasks in one batch) and one per task."""
    workloads: dict[str, Workload] = {}
    for path in trace_paths:
        traces = TraceSet.load(path)
        stem = Path(path).name.removesuffix(".npz")
        if suite.traces_per_task is not None:
            keep = []
            for category in traces.categories:
                keep += [t.prompt_id for t in traces if t.category == category][: suite.traces_per_task]
            traces = traces.subset(ids=keep)
        workloads[f"{stem}/mixed"] = Workload(traces)
        if suite.per_task_workloads:
            for category in traces.categories:
                workloads[f"{stem}/{category}"] = Workload(traces.subset(category=category))
    return workloads


def build_controller(spec: str | dict[str, Any], cost_profile: str, drafter: str | None = None,
                     exit_layer: int | None = None) -> SpeculationController:
    """Build from a registry spec; a controller that takes ``latency`` gets the cell's profile.

    That is the simulated counterpart of a profiling phase on the real hardware: the controller
    receives ``{"name": profile, "drafter": ..., "exit_layer": ...}`` (JSON data, like every
    parameter). Controllers that learn costs online take no ``latency`` parameter.
    """
    if isinstance(spec, str):
        spec = {"name": spec, "params": {}}
    cls = registry.get_class(spec["name"])
    params = dict(spec.get("params", {}))
    if "latency" in cls._param_names() and params.get("latency") is None:
        latency: dict[str, Any] = {"name": cost_profile}
        if drafter is not None:
            latency["drafter"] = drafter
        if exit_layer is not None:
            latency["exit_layer"] = exit_layer
        params["latency"] = latency
    return registry.make(spec["name"], **params)


def spec_label(spec: str | dict[str, Any]) -> str:
    if isinstance(spec, str):
        return spec
    params = spec.get("params") or {}
    if not params:
        return spec["name"]
    return spec["name"] + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


_WORKLOADS: dict[str, Workload] = {}


def _run_cell(task: tuple[str, str, int, list[Any], Suite]) -> list[dict[str, Any]]:
    from adaptk.estimators.latency import get_latency_model

    workload_name, profile, batch_size, specs, suite = task
    requests_per_slot = suite.requests_per_slot
    work = _WORKLOADS[workload_name]
    drafter = work.traces.drafter
    default_layer = work.exit_layers[-1] if work.exit_layers else None
    latency = get_latency_model(profile, drafter=drafter, **({"exit_layer": default_layer} if default_layer else {}))
    num_requests = max(len(work), requests_per_slot * batch_size)
    common = {"workload": workload_name, "drafter": drafter, "batch_size": batch_size, "cost_profile": profile,
              "engine": "replay", "num_requests": num_requests}
    ks = None if suite.fixed_ks is None else [k for k in suite.fixed_ks if k <= work.k_max]
    k_best, layer_best, best, fixed_results = best_fixed(work, latency, batch_size, ks=ks, num_requests=num_requests)
    plain = fixed_results[(0, layer_best if work.exit_layers else None)].token_goodput
    oracle = clairvoyant_batch1(work, latency) if batch_size == 1 else None
    limit = oracle.token_goodput if oracle else None

    def row(controller: str, metrics: dict[str, Any], goodput: float, **extra: Any) -> dict[str, Any]:
        return {
            "controller": controller,
            **common,
            "token_goodput": goodput,
            "mean_acceptance_length": metrics.get("mean_acceptance_length"),
            "mean_num_draft_tokens": metrics.get("mean_num_draft_tokens"),
            "acceptance_rate": metrics.get("acceptance_rate"),
            "tpot_s": metrics.get("tpot_s"),
            "latency_p50_s": metrics.get("latency_p50_s"),
            "latency_p99_s": metrics.get("latency_p99_s"),
            "num_steps": metrics.get("num_steps"),
            "relative_to_best_fixed": goodput / best.token_goodput,
            "relative_to_oracle": None if limit is None else goodput / limit,
            "relative_to_plain": goodput / plain,
            **extra,
        }

    rows = []
    for spec in specs:
        controller = build_controller(spec, profile, drafter, default_layer)
        started = time.perf_counter()
        result = replay(controller, work, latency, batch_size, num_requests=num_requests)
        rows.append(row(spec_label(spec), result.as_dict(), result.token_goodput,
                        params=json.loads(json.dumps(controller.params(), default=str)),
                        replay_wall_s=time.perf_counter() - started))
    rows.append(row("oracle:best-fixed", best.as_dict(), best.token_goodput, best_fixed_k=k_best,
                    best_fixed_exit_layer=layer_best))
    if oracle is not None:
        rows.append(row("oracle:clairvoyant", {"mean_acceptance_length": oracle.mean_acceptance_length},
                        oracle.token_goodput))
    return rows


def prepare(
    specs: list[str | dict[str, Any]],
    suite: Suite,
    trace_paths: list[Path] | None = None,
    profiles: tuple[str, ...] | None = None,
) -> tuple[dict[str, Workload], tuple[str, ...]]:
    """Check every input before any work: controller specs, trace files, cost profiles.

    Raises ``ValueError`` (or :class:`~adaptk.sim.trace.TraceFormatError`) naming what is wrong.
    """
    from adaptk.estimators.latency import get_latency_model

    profiles = profiles or suite.profiles
    for spec in specs:
        build_controller(spec, profiles[0])
    trace_paths = list(trace_paths or bundled_trace_paths().values())
    if not trace_paths:
        raise ValueError("no trace files given and none bundled")
    workloads = load_workloads(trace_paths, suite)
    for profile in profiles:
        for drafter in {w.traces.drafter for w in workloads.values()}:
            get_latency_model(profile, drafter=drafter)
    return workloads, profiles


def run_bench(
    specs: list[str | dict[str, Any]],
    suite: Suite,
    trace_paths: list[Path] | None = None,
    profiles: tuple[str, ...] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    prepared: tuple[dict[str, Workload], tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Replay every controller on every (workload, batch size, cost profile) cell; return rows.

    ``prepared`` is what :func:`prepare` returned, when the caller already checked the inputs.
    """
    workloads, profiles = prepared or prepare(specs, suite, trace_paths, profiles)
    batch_sizes = batch_sizes or suite.batch_sizes
    _WORKLOADS.clear()
    _WORKLOADS.update(workloads)
    # biggest cells first so the pool's tail is short
    tasks = [(w, p, b, list(specs), suite) for w in workloads for p in profiles for b in batch_sizes]
    tasks.sort(key=lambda t: -len(workloads[t[0]]) * max(1, 8 // t[2]))
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    if workers <= 1:
        for i, task in enumerate(tasks):
            rows += _run_cell(task)
            if progress:
                progress(i + 1, len(tasks))
    else:
        context = multiprocessing.get_context("fork")
        with context.Pool(workers) as pool:
            for i, cell_rows in enumerate(pool.imap_unordered(_run_cell, tasks)):
                rows += cell_rows
                if progress:
                    progress(i + 1, len(tasks))
    rows.sort(key=lambda r: (r["cost_profile"], r["workload"], r["batch_size"], r["controller"]))
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per controller: geometric mean of relative_to_best_fixed, worst cell, and vs plain."""
    out: dict[str, dict[str, float]] = {}
    names = sorted({r["controller"] for r in rows})
    for name in names:
        mine = [r for r in rows if r["controller"] == name]
        rel = np.array([r["relative_to_best_fixed"] for r in mine])
        plain = np.array([r["relative_to_plain"] for r in mine])
        oracle = [r["relative_to_oracle"] for r in mine if r["relative_to_oracle"] is not None]
        out[name] = {
            "geomean_vs_best_fixed": float(np.exp(np.mean(np.log(rel)))),
            "worst_vs_best_fixed": float(rel.min()),
            "worst_vs_plain": float(plain.min()),
            "geomean_vs_oracle_b1": float(np.exp(np.mean(np.log(oracle)))) if oracle else float("nan"),
            "cells": float(len(mine)),
        }
    return out
