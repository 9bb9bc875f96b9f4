"""benchmarks/hindsight_policy.py claims its table cells are exactly the flagship's: check it on replay."""

from __future__ import annotations

import numpy as np
import pytest

from adaptk.bench.runner import SUITES, build_controller, bundled_trace_paths, load_workloads
from adaptk.controllers.flagship import _HISTORY_STATES, _RATE_BUCKETS
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import replay


@pytest.mark.parametrize("batch_size", [1, 4])
def test_static_policy_cells_are_the_flagships(batch_size: int, benchmark_script) -> None:
    script = benchmark_script("hindsight_policy")
    work = load_workloads([bundled_trace_paths()["smollm2-prompt-lookup"]], SUITES["standard"])[
        "smollm2-prompt-lookup/math_reasoning"]
    latency = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    flagship = build_controller("adaptk", "smollm2-135m-cpu", "prompt_lookup")
    shadow = script.StaticCellPolicy({}, default=2)
    compared, mismatched = 0, []
    decide, update = flagship.decide, flagship.update

    def decide_both(context):
        nonlocal compared
        decision = decide(context)
        shadow.decide(context)
        cells = flagship._last_cell[flagship._slots_of(np.asarray(context.seq_ids))]
        for seq_id, ngram, cell in zip(context.seq_ids.tolist(), context.match_ngram_lens.tolist(),
                                       cells.tolist(), strict=True):
            ngram_bucket, rest = divmod(cell, _HISTORY_STATES * _RATE_BUCKETS)
            expected = (ngram_bucket, *divmod(rest, _RATE_BUCKETS))
            compared += 1
            if shadow._cell(seq_id, ngram) != expected:
                mismatched.append((seq_id, shadow._cell(seq_id, ngram), expected))
        return decision

    def update_both(feedback):
        shadow.update(feedback)
        return update(feedback)

    flagship.decide, flagship.update = decide_both, update_both
    replay(flagship, work, latency, batch_size)
    assert compared > 1000
    assert mismatched == []
