"""benchmarks/hint_ablation.py caps traces at the engine's K: check that the cap changes no schedule that
drafts at most K, and that the trace sets it reads are what its docstring says they are."""

from __future__ import annotations

import pytest

import adaptk
from adaptk.bench.runner import bundled_trace_paths
from adaptk.estimators.latency import get_latency_model
from adaptk.sim.replay import Workload, replay
from adaptk.sim.trace import TraceSet


def test_capping_at_k_changes_no_schedule_that_drafts_at_most_k(benchmark_script) -> None:
    script = benchmark_script("hint_ablation")
    traces = TraceSet.load(bundled_trace_paths()["smollm2-prompt-lookup"])
    latency = get_latency_model("smollm2-135m-cpu", drafter="prompt_lookup")
    full, capped = Workload(traces), script.capped_workload(traces, 8)
    assert (full.k_max, capped.k_max) == (16, 8)
    for k in (1, 3, 8):
        a = replay(adaptk.make("fixed", k=k), full, latency, 4, num_requests=24)
        b = replay(adaptk.make("fixed", k=k), capped, latency, 4, num_requests=24)
        assert (a.num_steps, a.num_tokens, a.total_time_s) == (b.num_steps, b.num_tokens, b.total_time_s)
    # and it does cap: a length the engine cannot draft is no longer on offer
    longer = replay(adaptk.make("fixed", k=16), full, latency, 4, num_requests=24)
    assert replay(adaptk.make("fixed", k=16), capped, latency, 4, num_requests=24).num_steps > longer.num_steps


@pytest.mark.parametrize(("name", "ngram_range"), [("smollm2-prompt-lookup-n1-3-96", [1, 3]),
                                                   ("smollm2-prompt-lookup-vllm-ngram", [2, 4])])
def test_the_96_token_trace_sets_share_outputs_and_differ_in_the_ngram_range(name, ngram_range, benchmark_script) -> None:
    script = benchmark_script("hint_ablation")
    traces = TraceSet.load(script.DATA / f"{name}.npz")
    other = TraceSet.load(script.DATA / "smollm2-prompt-lookup-n1-3-96.npz")
    assert [traces.meta["min_ngram"], traces.meta["max_ngram"]] == ngram_range
    assert (traces.k_max, traces.meta["max_new_tokens"]) == (8, 96)
    assert [(t.prompt_id, t.output_len) for t in traces] == [(t.prompt_id, t.output_len) for t in other]
    work = Workload(traces)
    matched = work.ngram_len[0]
    assert sorted(set(matched[matched > 0].tolist())) == list(range(ngram_range[0], ngram_range[1] + 1))
