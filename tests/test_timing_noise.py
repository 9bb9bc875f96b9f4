"""benchmarks/timing_noise.py scores every controller on the true clock and tells it noisy timings."""

from __future__ import annotations

import math

import adaptk
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import replay


def test_noise_free_column_is_a_plain_replay_and_noise_reaches_the_learners(benchmark_script) -> None:
    script = benchmark_script("timing_noise")
    label = "bundled, batch 8, CPU profile"
    run = script.run_setting((label, 0, 16))
    assert run["setting"] == label and set(run["relative_to_best_fixed"]) == set(script.CONTROLLERS)
    work = script._workload("bundled")
    latency = get_latency_model("smollm2-135m-cpu", drafter=work.traces.drafter)
    best = max(replay(adaptk.make("fixed", k=k), work, latency, 8, num_requests=16).token_goodput
               for k in range(script.K_MAX + 1))
    plain = replay(adaptk.make("adaptk", latency="online"), work, latency, 8, num_requests=16).token_goodput
    columns = run["relative_to_best_fixed"]["adaptk"]
    assert len(columns) == len(script.NOISE)
    assert math.isclose(columns[0], plain / best, rel_tol=1e-12)
    # adaptk learns from timings: noisy timings change its decisions, hence its (true-clock) goodput
    assert len(set(columns)) > 1
    assert all(0.3 < value < 2.0 for values in run["relative_to_best_fixed"].values() for value in values)
