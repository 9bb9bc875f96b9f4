"""benchmarks/calibration.py logs the flagship's rounds without changing what it decides."""

from __future__ import annotations

import numpy as np

from adaptk.bench.runner import SUITES, build_controller, bundled_trace_paths, load_workloads
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import replay


def test_logged_controller_decides_as_the_registered_one_and_logs_every_drafted_round(benchmark_script) -> None:
    script = benchmark_script("calibration")
    work = load_workloads([bundled_trace_paths()["smollm2-prompt-lookup"]], SUITES["standard"])[
        "smollm2-prompt-lookup/rag"]
    latency = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    plain = replay(build_controller("adaptk", "smollm2-135m-cpu", "prompt_lookup"), work, latency, 1)
    logged_controller = script.LoggedAdaptK(latency="smollm2-135m-cpu")
    logged = replay(logged_controller, work, latency, 1)
    assert logged.token_goodput == plain.token_goodput and logged.num_steps == plain.num_steps
    rounds = logged_controller.rounds
    drafted = sum(r["k"] for r in rounds)
    assert drafted == round(logged.mean_num_draft_tokens * logged.num_steps)  # batch 1: every drafted step
    assert all(len(r["estimate"]) == r["k"] and 0 <= r["accepted"] <= r["k"] for r in rounds)
    assert all(np.all((r["estimate"] > 0) & (r["estimate"] < 1)) for r in rounds)


def test_calibration_report_counts_match_the_rounds(benchmark_script) -> None:
    script = benchmark_script("calibration")
    row = script.calibrate("smollm2-prompt-lookup/math_reasoning")
    first = row["first_token"]
    by_length = row["by_length"]
    assert first["all_rounds"]["rounds"] == sum(b["rounds"] for b in by_length.values())
    assert first["long_rounds"]["rounds"] == by_length[f"{script.LONG}+"]["rounds"]
    assert first["long_rounds"]["rounds"] <= first["all_rounds_of_the_long_rounds_cells"]["rounds"]
    assert 0 < first["all_rounds"]["measured"] < 1
